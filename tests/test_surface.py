"""The function surface of DESIGN section 3, in every domain, and parameter parity (section 6)."""

import copy
import dataclasses

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import DOMAINS, TEMPLATE, TINY, assert_agree_to_float32_rounding, load, saved_and_loaded

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


def build_on(module, trunk_path: str):
    """A CartPoleNoVel agent on its trunk's default path (`default`: the C++ loops on a CPU, where the trunk has
    them) or its torch path (`torch`: the script's `--*-backend torch`); skips a script without that choice."""
    backends = [field.name for field in dataclasses.fields(module.Args) if field.name.endswith("_backend")]
    if trunk_path == "torch" and not backends:
        pytest.skip("this script's trunk has one path")
    extra = [f"--{backends[0].replace('_', '-')}", "torch"] if trunk_path == "torch" else []
    _, envs, agent = build(module, "classic", extra)
    obs = torch.as_tensor(envs.reset(seed=0)[0])[None]
    envs.close()
    return agent, (obs, agent.initial_state(2, torch.device("cpu")), torch.ones(1, 2))


@pytest.mark.parametrize("trunk_path", ["default", "torch"])
def test_an_agent_deep_copies(module, trunk_path):
    """copy.deepcopy of an agent (a target network, a snapshot) works on either path: the copy runs what the
    original runs (sharing the loaded C++ loops) and computes what it does, and its weights are its own."""
    agent, inputs = build_on(module, trunk_path)
    copied = copy.deepcopy(agent)
    assert copied.trunk.kernel == agent.trunk.kernel
    assert getattr(copied.trunk, "cpu_kernels", None) is getattr(agent.trunk, "cpu_kernels", None)
    torch.testing.assert_close(copied.get_value(*inputs)[0], agent.get_value(*inputs)[0])
    assert all(a is not b for a, b in zip(copied.parameters(), agent.parameters(), strict=True))


@pytest.mark.parametrize("trunk_path", ["default", "torch"])
def test_a_whole_agent_saves_and_loads(module, monkeypatch, trunk_path):
    """torch.save(agent) and torch.load of the whole module work on either path: the file says whether the C++
    loops ran, not their module, and the loaded agent runs what the original ran and computes what it does."""
    agent, inputs = build_on(module, trunk_path)
    loaded = saved_and_loaded(module, monkeypatch, agent)
    assert loaded.trunk.kernel == agent.trunk.kernel
    assert getattr(loaded.trunk, "cpu_kernels", None) is getattr(agent.trunk, "cpu_kernels", None)
    torch.testing.assert_close(loaded.get_value(*inputs)[0], agent.get_value(*inputs)[0])


def test_a_saved_agent_loads_where_the_cpp_loops_cannot_build(module, monkeypatch, request, capsys):
    """An agent saved with the C++ loops and loaded where they do not build runs the torch path, says why, and
    computes what the original does (to float32 rounding: the two paths add in other orders)."""
    agent, inputs = build_on(module, "default")
    if getattr(agent.trunk, "cpu_kernels", None) is None:
        pytest.skip("this trunk has no C++ loops")
    why = []
    loaded = saved_and_loaded(
        module, monkeypatch, agent, lambda: why.append(request.getfixturevalue("no_cpp_compiler"))
    )
    assert loaded.trunk.cpu_kernels is None and loaded.trunk.kernel.endswith(why[0]), loaded.trunk.kernel
    assert why[0] in capsys.readouterr().err
    assert_agree_to_float32_rounding(loaded.get_value(*inputs)[0], agent.get_value(*inputs)[0])


def test_without_a_compiler_a_trunk_runs_its_torch_path_and_says_why(module, no_cpp_compiler, capsys):
    """Where the C++ loops cannot build (`load_inline` raising, as without g++), `auto` runs the torch path: its
    label is `--*-backend torch`'s with the reason after it, and stderr says so in one line."""
    backends = [field.name for field in dataclasses.fields(module.Args) if field.name.endswith("_backend")]
    if not backends:
        pytest.skip("this script's trunk has one path")
    agent, torch_agent = build_on(module, "default")[0], build_on(module, "torch")[0]
    assert agent.trunk.cpu_kernels is None
    assert agent.trunk.kernel.startswith(torch_agent.trunk.kernel) and agent.trunk.kernel.endswith(no_cpp_compiler)
    message = capsys.readouterr().err.strip()
    assert message.startswith(f"--{backends[0].replace('_', '-')} auto: {no_cpp_compiler}; using ")
    assert "\n" not in message


def test_compile_runs_the_torch_path_throughout(module):
    """Under --compile a trunk builds no C++ loops: the compiled graphs run its torch path, and so do the eager
    calls between them (the time-limit bootstrap, the value after the rollout), as its label says."""
    if module.NO_COMPILE:
        pytest.skip(module.NO_COMPILE)
    if getattr(build_on(module, "default")[0].trunk, "cpu_kernels", None) is None:
        pytest.skip("this trunk has no C++ loops")
    _, envs, compiled = build(module, "classic", ["--compile"])
    envs.close()
    assert compiled.trunk.cpu_kernels is None
    assert compiled.trunk.kernel == build_on(module, "torch")[0].trunk.kernel


@pytest.mark.parametrize("trunk_path", ["default", "torch"])
def test_a_float64_trunk_runs_a_rollout_step_and_a_gradient_step(module, trunk_path):
    """`trunk.double()` (for gradient checks) works on either path: its initial state follows the module's
    dtype, and float32 starts, as `Agent.features` passes them, mix with float64 everywhere."""
    agent, (obs, _, starts) = build_on(module, trunk_path)
    trunk = agent.trunk.double()
    x = agent.encoder(obs[0]).detach().double()[None]  # [1, 2 envs, the trunk's input size]
    state = trunk.initial_state(2, torch.device("cpu"))
    floats = [
        part for part in torch.utils._pytree.tree_leaves(state) if torch.is_tensor(part) and part.is_floating_point()
    ]
    assert all(part.dtype == torch.float64 for part in floats)
    with torch.inference_mode():
        y, _ = trunk(x, state, starts)
    assert y.dtype == torch.float64
    steps = 6
    sequence = (x.repeat(steps, 1, 1) + torch.randn(steps, *x.shape[1:], dtype=torch.float64)).requires_grad_()
    starts = torch.zeros(steps, 2)
    starts[[0, 3], [0, 1]] = 1
    y, _ = trunk(sequence, trunk.initial_state(2, torch.device("cpu")), starts)
    y.sum().backward()  # raised before: float32 states or masks beside float64 tensors
    assert y.dtype == torch.float64 and torch.isfinite(sequence.grad).all()


@pytest.mark.parametrize("domain", DOMAINS)
def test_parameter_count_within_ten_percent_of_mlp(module, domain):
    """DESIGN section 6: every script's default sizes match ppo_mlp.py's parameter count within +-10%."""

    def count(mod):
        args = mod.parse_args(DOMAINS[domain])
        env = mod.make_env(args, 0, "")()
        agent = mod.Agent(env.observation_space, env.action_space, args)
        return sum(p.numel() for p in agent.parameters())

    if module is load(TEMPLATE):
        pytest.skip("the reference itself")
    reference = count(load(TEMPLATE))
    assert abs(count(module) - reference) <= 0.1 * reference


def test_atari_scale_matches_the_paper():
    """The paper's Atari networks have about 2.3-3.2 M parameters; ours is in that neighbourhood."""
    module = load(TEMPLATE)
    *_, agent = build(module, "atari")
    assert 2.0e6 <= sum(p.numel() for p in agent.parameters()) <= 3.2e6


def test_view_pool_reads_the_symbolic_view_as_a_bag_of_cells():
    """--view-pool: with the per-cell weights zeroed, the encoder sees what is in view and not where it lies."""
    module = load(TEMPLATE)
    torch.manual_seed(0)
    _, envs, plain = build(module, "minigrid-symbolic")
    _, _, pooled = build(module, "minigrid-symbolic", ["--view-pool"])
    obs = torch.as_tensor(envs.reset(seed=0)[0])  # [envs, 3, 3, 3]
    envs.close()
    cells = torch.tensor([1, 5, 0, 8, 3, 7, 2, 4, 6])  # every cell elsewhere in the view, the same objects
    moved = obs.flatten(1, 2)[:, cells].reshape(obs.shape)
    assert not torch.equal(moved, obs)
    linear = pooled.encoder.net[0]
    per_cell = plain.encoder.net[0].in_features
    assert linear.in_features == per_cell + 3 * 8  # one summed embedding per channel
    with torch.no_grad():
        linear.weight[:, :per_cell] = 0
        torch.testing.assert_close(pooled.encoder(moved), pooled.encoder(obs))
        linear.weight[:, :per_cell].normal_()
        assert not torch.allclose(pooled.encoder(moved), pooled.encoder(obs))


@pytest.mark.parametrize("domain", ["atari", "minigrid-rgb"])
def test_view_pool_on_images_adds_the_average_of_each_feature_map(domain):
    module = load(TEMPLATE)
    torch.manual_seed(0)
    _, envs, plain = build(module, domain)
    _, _, pooled = build(module, domain, ["--view-pool"])
    obs = torch.as_tensor(envs.reset(seed=0)[0])
    envs.close()
    maps = pooled.encoder.net[:6](obs.float() / 255.0)  # the convolutions' output
    head = pooled.encoder.net[7]
    assert head.in_features == plain.encoder.net[7].in_features + maps.shape[1]
    with torch.no_grad():
        head.weight[:, : maps[0].numel()] = 0  # what remains reads the pooled features only
        expected = torch.relu(maps.mean((-2, -1)) @ head.weight[:, maps[0].numel() :].T + head.bias)
        torch.testing.assert_close(pooled.encoder(obs), expected)
