"""The function surface of DESIGN section 3, in every domain, and parameter parity (section 6)."""

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import DOMAINS, TEMPLATE, TINY, load

OBS_KIND = {  # shape and dtype reaching the network, by domain (DESIGN section 4)
    "mujoco": ((17,), np.float32),
    "atari": ((1, 84, 84), np.uint8),
    "classic": ((4,), np.float32),
    "minigrid-rgb": ((3, 84, 84), np.uint8),
    "minigrid-symbolic": ((3, 3, 3), np.uint8),
}


def build(module, domain: str, extra=()):
    args = module.parse_args([*DOMAINS[domain], *TINY, *extra])
    envs = module.make_envs(args, "test")
    agent = module.Agent(envs.single_observation_space, envs.single_action_space, args)
    return args, envs, agent


@pytest.mark.parametrize("domain", DOMAINS)
def test_shapes_in_every_domain(module, domain):
    torch.manual_seed(0)
    args, envs, agent = build(module, domain)
    obs_np, _ = envs.reset(seed=0)
    shape, dtype = OBS_KIND[domain]
    assert envs.single_observation_space.shape == shape
    assert obs_np.dtype == dtype
    num_envs, device = args.num_envs, torch.device("cpu")
    obs = torch.as_tensor(obs_np)[None]
    starts = torch.ones(1, num_envs)

    action, logprob, entropy, value, _ = agent.get_action_and_value(obs, agent.initial_state(num_envs, device), starts)
    continuous = isinstance(envs.single_action_space, gym.spaces.Box)
    assert action.shape == ((1, num_envs, 6) if continuous else (1, num_envs))
    assert logprob.shape == entropy.shape == value.shape == (1, num_envs)
    next_obs, *_ = envs.step(action[0].numpy())
    assert envs.single_observation_space.contains(next_obs[0])

    # Training shape: a whole sequence, with the actions given back.
    steps = 5
    sequence = torch.as_tensor(np.stack([obs_np] * steps))
    starts = torch.zeros(steps, num_envs)
    starts[0] = 1
    actions = torch.stack([action[0]] * steps)
    _, logprob, entropy, value, _ = agent.get_action_and_value(
        sequence, agent.initial_state(num_envs, device), starts, actions
    )
    assert logprob.shape == entropy.shape == value.shape == (steps, num_envs)
    assert torch.isfinite(logprob).all() and torch.isfinite(value).all()
    value_only, _ = agent.get_value(sequence, agent.initial_state(num_envs, device), starts)
    torch.testing.assert_close(value_only, value)
    envs.close()


def test_starts_may_be_bool(module):
    _, envs, agent = build(module, "classic")
    obs = torch.as_tensor(envs.reset(seed=0)[0])[None]
    state = agent.initial_state(2, torch.device("cpu"))
    as_float, _ = agent.get_value(obs, state, torch.ones(1, 2))
    as_bool, _ = agent.get_value(obs, state, torch.ones(1, 2, dtype=torch.bool))
    torch.testing.assert_close(as_float, as_bool)


@pytest.mark.parametrize("domain", DOMAINS)
def test_parameter_count_within_ten_percent_of_mlp(module, domain):
    """DESIGN section 6: every script's default sizes match ppo_mlp.py's parameter count within +-10%."""

    def count(mod):
        args = mod.parse_args(DOMAINS[domain])
        env = mod.make_env(args, 0, "")()
        agent = mod.Agent(env.observation_space, env.action_space, args)
        return sum(p.numel() for p in agent.parameters())

    reference = count(load(TEMPLATE))
    assert abs(count(module) - reference) <= 0.1 * reference


def test_atari_scale_matches_the_paper():
    """The paper's Atari networks have about 2.3-3.2 M parameters; ours is in that neighbourhood."""
    module = load(TEMPLATE)
    *_, agent = build(module, "atari")
    assert 2.0e6 <= sum(p.numel() for p in agent.parameters()) <= 3.2e6
