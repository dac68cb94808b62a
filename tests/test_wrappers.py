"""Environment wrappers: velocity masking, the MiniGrid view, Atari's life loss. The environments are a shared
section, so they are tested on the template."""

import copy

import numpy as np
import pytest
from conftest import DOMAINS, TINY
from minigrid.core.constants import OBJECT_TO_IDX


def single_env(module, *argv):
    args = module.parse_args([*argv, *TINY])
    return args, module.make_env(args, 0, "")()


@pytest.mark.parametrize(("env_id", "masked"), [("CartPoleNoVel-v1", [1, 3]), ("LunarLanderNoVel-v3", [2, 3, 5])])
def test_masked_indices_are_zero_and_others_are_not(template, env_id, masked):
    _, env = single_env(template, "--env-id", env_id)
    observations = [env.reset(seed=0)[0]]
    for _ in range(30):
        obs, _, terminated, truncated, _ = env.step(env.action_space.sample())
        observations.append(obs)
        if terminated or truncated:
            break
    observations = np.array(observations)
    assert observations.shape[1] == env.unwrapped.observation_space.shape[0]  # the shape is kept
    assert (observations[:, masked] == 0).all()
    visible = [i for i in range(observations.shape[1]) if i not in masked and i < 6]  # 6, 7: LunarLander legs
    assert (np.abs(observations[:, visible]).max(axis=0) > 0).all()


def test_masked_indices_flag_on_any_box_env(template):
    args, env = single_env(template, "--env-id", "CartPole-v1", "--masked-indices", "0", "2")
    assert args.masked_indices == (0, 2)
    obs, _ = env.reset(seed=0)
    for _ in range(5):
        obs, *_ = env.step(0)
        assert obs[0] == 0 and obs[2] == 0 and obs[1] != 0


def test_masked_indices_on_mujoco_stay_zero_through_normalisation(template):
    args, env = single_env(template, *DOMAINS["mujoco"], "--masked-indices", "0", "2", "8")
    assert args.masked_indices == (0, 2, 8)
    env.action_space.seed(0)
    observations = [env.reset(seed=0)[0]]
    for _ in range(20):
        observations.append(env.step(env.action_space.sample())[0])
    observations = np.array(observations)
    assert observations.shape == (21, 17)  # the shape is kept
    assert (observations[:, [0, 2, 8]] == 0).all()
    visible = [i for i in range(17) if i not in (0, 2, 8)]
    assert (np.abs(observations[:, visible]).max(axis=0) > 0).all()


def test_unmasked_cartpole_sees_velocity(template):
    args, env = single_env(template, "--env-id", "CartPole-v1")
    assert args.masked_indices == ()
    env.reset(seed=0)
    obs, *_ = env.step(0)
    assert obs[1] != 0 and obs[3] != 0


@pytest.mark.parametrize("obs_kind", ["rgb", "symbolic"])
def test_minigrid_view_three_and_time_limit_96(template, obs_kind):
    _, env = single_env(template, *DOMAINS["minigrid-rgb"], "--minigrid-obs", obs_kind)
    assert env.unwrapped.agent_view_size == 3
    obs, _ = env.reset(seed=0)
    assert obs.shape == ((3, 84, 84) if obs_kind == "rgb" else (3, 3, 3))
    done_action = env.unwrapped.actions.done  # does nothing in MemoryS11: only the clock runs
    for step in range(1, 97):
        _, _, terminated, truncated, _ = env.step(done_action)
        assert not terminated
        assert truncated == (step == 96)


def test_minigrid_symbols_are_the_view_from_the_agents_cell(template):
    """The 3x3 view is indexed [x, y] with the agent at the bottom centre, facing up: (1, 1) is the cell in
    front of it and (1, 2) its own cell, empty while it carries nothing. Turning changes what is in front."""
    _, env = single_env(template, *DOMAINS["minigrid-symbolic"])
    obs, _ = env.reset(seed=0)
    grid_env = env.unwrapped
    seen = set()
    for _ in range(4):
        front = grid_env.grid.get(*grid_env.front_pos)
        expected = front.encode() if front else (OBJECT_TO_IDX["empty"], 0, 0)
        np.testing.assert_array_equal(obs[1, 1], expected)
        np.testing.assert_array_equal(obs[1, 2], (OBJECT_TO_IDX["empty"], 0, 0))
        seen.add(tuple(expected))
        obs, *_ = env.step(grid_env.actions.left)
    assert len(seen) > 1  # a wall and open floor: the check saw both kinds of cell


def test_minigrid_success_pays_on_the_envs_own_scale(template):
    # The 96-step cut is a TimeLimit; MiniGrid's own max_steps (5 x 11^2) sets the reward, as in the paper.
    _, env = single_env(template, *DOMAINS["minigrid-symbolic"])
    env.reset(seed=0)
    grid_env = env.unwrapped
    assert grid_env.max_steps == 605
    (x, y), hallway_y = grid_env.success_pos, grid_env.height // 2
    grid_env.agent_pos, grid_env.agent_dir = (x, hallway_y), 3 if y < hallway_y else 1  # facing the goal
    _, reward, terminated, _, info = env.step(grid_env.actions.forward)
    assert terminated and reward == pytest.approx(1 - 0.9 * 1 / 605)
    assert info["episode"]["r"] == pytest.approx(reward)


def test_minigrid_rgb_is_the_partial_view_in_pixels(template):
    _, env = single_env(template, *DOMAINS["minigrid-rgb"])
    obs, _ = env.reset(seed=0)
    assert obs.dtype == np.uint8 and obs.shape == (3, 84, 84)
    np.testing.assert_array_equal(obs, np.transpose(env.unwrapped.get_frame(tile_size=28, agent_pov=True), (2, 0, 1)))


def test_frame_stack(template):
    _, env = single_env(template, "--env-id", "CartPoleNoVel-v1", "--frame-stack", "4")
    obs, _ = env.reset(seed=0)
    assert obs.shape == (16,)
    next_obs, *_ = env.step(0)
    np.testing.assert_array_equal(next_obs[:12], obs[4:])  # oldest first: the window slides by one frame
    _, env = single_env(template, *DOMAINS["atari"], "--frame-stack", "4")
    assert env.reset(seed=0)[0].shape == (4, 84, 84)


def test_atari_life_loss_ends_the_training_episode_not_the_game(template):
    _, env = single_env(template, *DOMAINS["atari"])
    ale = env.unwrapped.ale
    assert env.unwrapped._frameskip == 1  # frame skip is applied once, by AtariPreprocessing
    env.reset(seed=0)
    lives = ale.lives()
    rng = np.random.default_rng(0)
    terminated = False
    info = {}
    while not terminated:
        _, reward, terminated, _, info = env.step(int(rng.integers(4)))
        assert reward in (0.0, 1.0)  # clipped
    assert ale.lives() == lives - 1 and not ale.game_over()
    assert "episode" not in info  # the game's episode statistics wait for the real end
    frame_before = ale.getFrameNumber()
    env.reset()
    assert ale.getFrameNumber() > frame_before  # not a new game: the frame counter keeps running
    assert ale.lives() == lives - 1


@pytest.mark.parametrize("async_envs", [False, True], ids=["sync", "async"])
def test_normalisation_statistics_survive_a_checkpoint(template, async_envs):
    """A resumed run must scale observations and rewards as the interrupted one did, with the envs in this
    process or in worker processes."""
    args = template.parse_args([*DOMAINS["mujoco"], *TINY, *(["--async-envs"] if async_envs else [])])
    envs, fresh = template.make_envs(args, ""), template.make_envs(args, "")
    envs.reset(seed=0)
    for _ in range(20):
        envs.step(envs.action_space.sample())
    saved = copy.deepcopy(template.env_statistics(envs, args))  # as a checkpoint round trip would give them
    assert len(saved["return_rms"]) == 1 and len(saved["obs_rms"]) == args.num_envs
    template.load_env_statistics(fresh, saved)
    restored = template.env_statistics(fresh, args)
    for before, after in zip(
        [*saved["return_rms"], *saved["obs_rms"]], [*restored["return_rms"], *restored["obs_rms"]], strict=True
    ):
        np.testing.assert_array_equal(before.mean, after.mean)
        np.testing.assert_array_equal(before.var, after.var)
        assert before.count == after.count > 20
    envs.close()
    fresh.close()
