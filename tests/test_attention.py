"""Attention trunks (`Trunk.layers`, ppo_trxl.py and ppo_gtrxl.py): a sliding window of M steps in the current
episode, the same in one-step rollout calls and in one whole-sequence training call, and a state whose size is
fixed by M alone. GTrXL's gates start each layer close to the identity map."""

import copy

import pytest
import torch
from conftest import DOMAINS, ENVS, ROOT, STEPS, load, outputs, rollout_batch

# Windows shorter than the sequence, so the M-step limit is exercised: 12 steps are 4 blocks of 3 queries, or
# 3 blocks of 5 with the last one padded
MEMORY_LENGTHS = [3, 5]


def attention_module(script):
    module = load(script)
    if not hasattr(module.Args, "memory_length"):
        pytest.skip(f"{script.name} has no attention window")
    return module


def windowed_batch(module, device, memory_length):
    argv = [*DOMAINS["classic"], "--memory-length", str(memory_length), "--num-layers", "2"]
    return rollout_batch(module, "classic", device, argv=argv)


@pytest.mark.parametrize("memory_length", MEMORY_LENGTHS)
def test_one_step_calls_equal_one_call_when_the_window_is_shorter_than_the_sequence(script, memory_length, device):
    agent, obs, starts, actions = windowed_batch(attention_module(script), device, memory_length)
    whole, whole_state = outputs(agent, obs, agent.initial_state(ENVS, device), starts, actions)
    state, steps = agent.initial_state(ENVS, device), []
    for t in range(STEPS):
        step, state = outputs(agent, obs[t : t + 1], state, starts[t : t + 1], actions[t : t + 1])
        steps.append(step)
    torch.testing.assert_close(torch.cat(steps, dim=1), whole, atol=1e-5, rtol=0)
    for a, b in zip(state, whole_state, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("memory_length", MEMORY_LENGTHS)
def test_a_step_sees_exactly_layers_times_m_steps_back(script, memory_length, device):
    """Each layer looks M steps back at the layer below, so L layers reach L * M steps back (Dai et al.'s
    O(N x L) context): an observation L * M + 1 steps back changes nothing, L * M steps back it does."""
    agent, obs, starts, actions = windowed_batch(attention_module(script), device, memory_length)
    starts.zero_()
    starts[0] = 1
    t, reach = STEPS - 1, len(agent.trunk.layers) * memory_length
    assert reach + 1 <= t, "the sequence must be longer than the reach"
    base, _ = outputs(agent, obs, agent.initial_state(ENVS, device), starts, actions)
    for back, changes in ((reach + 1, False), (reach, True)):
        changed = obs.clone()
        changed[t - back] = changed[t - back] + 1.0
        other, _ = outputs(agent, changed, agent.initial_state(ENVS, device), starts, actions)
        difference = (other[:, t] - base[:, t]).abs().max().item()
        assert (difference > 1e-4) == changes, f"{back} steps back: output moved by {difference}"


def test_a_rollout_step_projects_only_its_own_input_until_a_weight_changes(script, device):
    """One-step calls without gradient reuse the window's keys and values from the step before (the values
    themselves are checked against one whole call above); after an optimizer step, or from a state the last
    call did not return, the whole window is projected again."""
    agent, obs, starts, actions = windowed_batch(attention_module(script), device, MEMORY_LENGTHS[1])
    layers = len(agent.trunk.layers)
    own_step, whole_window = [1] * layers, [MEMORY_LENGTHS[1]] * layers + [1] * layers  # the memory, then the step
    projected = []  # the number of steps each layer's key/value projection was given
    for layer in agent.trunk.layers:
        layer.key_value.register_forward_hook(lambda _, inputs, output: projected.append(inputs[0].shape[1]))

    def step(state, t):
        projected.clear()
        return outputs(agent, obs[t : t + 1], state, starts[t : t + 1], actions[t : t + 1])

    states = [agent.initial_state(ENVS, device)]
    for t in range(4):
        states.append(step(states[-1], t)[1])
        assert projected == (whole_window if t == 0 else own_step), t
    # An Adam step after a training call changes the weights in place: the cache must not serve the old keys
    before = copy.deepcopy(agent)
    agent.get_value(obs, agent.initial_state(ENVS, device), starts)[0].square().mean().backward()
    torch.optim.Adam(agent.parameters(), lr=1e-2).step()
    after, later = step(states[4], 4)
    assert projected == whole_window
    step(later, 5)  # rebuilt under the new weights
    assert projected == own_step
    step(states[2], 2)  # an older state: not the memory the cache holds
    assert projected == whole_window
    agent.trunk.rollout_cache = None
    torch.testing.assert_close(after, step(states[4], 4)[0], atol=1e-6, rtol=0)
    old = outputs(before, obs[4:5], states[4], starts[4:5], actions[4:5])[0]
    assert (after - old).abs().max() > 1e-4  # the Adam step changed what this state gives


@pytest.mark.parametrize("block", [1, 3])
def test_a_window_scores_alibi_inside_and_minus_infinity_outside(script, block):
    """Query i of a block and key j of its M + block keys are M + i - j steps apart: head h scores the key
    -slope_h x distance if it is not later and at most M steps back, and -inf otherwise (the rollout's block is
    one step, training's M)."""
    module = attention_module(script)
    memory_length = 3
    args = module.parse_args([*DOMAINS["classic"], "--memory-length", str(memory_length), "--num-heads", "2"])
    trunk = module.Trunk(8, args)
    window = trunk.window(block, torch.device("cpu"))
    assert window.shape == (2, block, memory_length + block)
    for head, slope in enumerate(trunk.slopes.tolist()):
        for query in range(block):
            for key in range(memory_length + block):
                distance = memory_length + query - key
                expected = -slope * distance if 0 <= distance <= memory_length else -float("inf")
                assert window[head, query, key].item() == pytest.approx(expected), (head, query, key)
    assert trunk.window(block, torch.device("cpu")) is window, "built once per block size"


def test_state_size_is_fixed_by_the_memory_length_alone(script, device):
    module = attention_module(script)
    agent, obs, starts, actions = windowed_batch(module, device, MEMORY_LENGTHS[0])
    starts.zero_()
    starts[0] = 1
    _, short_state = outputs(agent, obs[:2], agent.initial_state(ENVS, device), starts[:2], actions[:2])
    _, long_state = outputs(agent, obs, agent.initial_state(ENVS, device), starts, actions)
    memory, in_episode = long_state
    shape = (ENVS, len(agent.trunk.layers), MEMORY_LENGTHS[0], agent.trunk.output_size)
    assert memory.shape == short_state[0].shape == shape
    assert in_episode.tolist() == [MEMORY_LENGTHS[0]] * ENVS and short_state[1].tolist() == [2] * ENVS


@pytest.mark.parametrize("domain", ["classic", "minigrid-symbolic"])
def test_gtrxl_layers_start_close_to_the_identity(domain, device):
    """Parisotto et al.: with the gate bias b_g = 2 each GRU-type gate passes mostly its input x through, so
    every layer's output is close to its input; with b_g = 0 it is not."""
    module = load(ROOT / "ppo_gtrxl.py")
    deviations = {}
    for gate_bias in (2.0, 0.0):
        torch.manual_seed(0)
        args = module.parse_args([*DOMAINS[domain], "--gate-bias", str(gate_bias)])
        trunk = module.Trunk(args.hidden_size, args).to(device)
        x = torch.randn(64, 8, args.hidden_size, device=device)
        starts = torch.zeros(64, 8, device=device)
        starts[0] = 1
        with torch.no_grad():
            y, (memory, _) = trunk(x, trunk.initial_state(8, device), starts)
        # memory[:, l] holds layer l's last M inputs, which are layer l - 1's outputs; the last layer's are y
        layer_inputs = memory.unbind(1)
        layer_outputs = [*memory[:, 1:].unbind(1), y.transpose(0, 1)[:, -args.memory_length :]]
        deviations[gate_bias] = max(
            ((out - inp).norm() / inp.norm()).item() for inp, out in zip(layer_inputs, layer_outputs, strict=True)
        )
    assert deviations[2.0] < 0.3, deviations
    assert deviations[0.0] > 2 * deviations[2.0], deviations


def test_gtrxl_gate_bias_is_zero_on_memory_s11_only():
    """b_g = 2 everywhere but MiniGrid-MemoryS11-v0, where the gates start open (the row's comment says why);
    a flag the user passes still wins."""
    module = load(ROOT / "ppo_gtrxl.py")
    memory = ["--env-id", "MiniGrid-MemoryS11-v0", "--minigrid-obs", "symbolic"]
    assert module.parse_args(memory).gate_bias == 0.0
    assert module.parse_args([*memory, "--gate-bias", "2"]).gate_bias == 2.0
    doorkey = ["--env-id", "MiniGrid-DoorKey-8x8-v0", "--minigrid-obs", "symbolic"]
    for other in (DOMAINS["classic"], DOMAINS["atari"], doorkey):
        assert module.parse_args(other).gate_bias == 2.0, other


def test_gtrxl_gate_bias_must_be_finite(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        load(ROOT / "ppo_gtrxl.py").parse_args(["--gate-bias", "nan"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().endswith("--gate-bias must be finite, got nan")
    assert not list(tmp_path.iterdir())
