"""Attention trunks (`Trunk.layers`, ppo_trxl.py and ppo_gtrxl.py): a sliding window of M steps in the current
episode, the same in one-step rollout calls and in one whole-sequence training call, with the C++ loops and
with the torch path, and a state whose size is fixed by M alone. GTrXL's gates start each layer close to the
identity map."""

import copy

import pytest
import torch
from conftest import (
    DOMAINS,
    ENVS,
    ROOT,
    STEPS,
    assert_agree_to_float32_rounding,
    assert_one_step_calls_equal_one_call,
    built_cpu_kernels,
    load,
    outputs,
    rollout_batch,
    trunk_on,
)

# Windows shorter than the sequence, so the M-step limit is exercised: 12 steps are 4 blocks of 3 queries, or
# 3 blocks of 5 with the last one padded
MEMORY_LENGTHS = [3, 5]


def attention_module(script):
    module = load(script)
    if not hasattr(module.Args, "memory_length"):
        pytest.skip(f"{script.name} has no attention window")
    return module


def windowed_batch(module, device, memory_length, backend="auto"):
    argv = [*DOMAINS["classic"], "--memory-length", str(memory_length), "--num-layers", "2"]
    return rollout_batch(module, "classic", device, argv=[*argv, "--attention-backend", backend])


@pytest.mark.parametrize("backend", ["auto", "torch"])  # auto: the C++ loops on a CPU
@pytest.mark.parametrize("memory_length", MEMORY_LENGTHS)
def test_one_step_calls_equal_one_call_when_the_window_is_shorter_than_the_sequence(
    script, memory_length, backend, device
):
    assert_one_step_calls_equal_one_call(*windowed_batch(attention_module(script), device, memory_length, backend))


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("memory_length", MEMORY_LENGTHS)
def test_a_step_sees_exactly_layers_times_m_steps_back(script, memory_length, backend, device):
    """Each layer looks M steps back at the layer below, so L layers reach L * M steps back (Dai et al.'s
    O(N x L) context): an observation L * M + 1 steps back changes nothing, L * M steps back it does."""
    agent, obs, starts, actions = windowed_batch(attention_module(script), device, memory_length, backend)
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
    themselves are checked against one whole call above); after an optimizer step, or from a state neither of
    the last two calls returned, the whole window is projected again."""
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
    # A copy (copy.deepcopy, torch.save) starts without the cache: its weights count their versions from 0 again
    assert agent.trunk.rollout_cache and copy.deepcopy(agent).trunk.rollout_cache == []
    # An Adam step after a training call changes the weights in place: the cache, which still holds states[4]'s
    # window, must not serve the old keys
    before = copy.deepcopy(agent)
    agent.get_value(obs, agent.initial_state(ENVS, device), starts)[0].square().mean().backward()
    torch.optim.Adam(agent.parameters(), lr=1e-2).step()
    after, later = step(states[4], 4)
    assert projected == whole_window
    # A time-limit bootstrap steps from the last state, then the next rollout step does: both reuse its window,
    # rebuilt under the new weights
    for _ in range(2):
        step(later, 5)
        assert projected == own_step
    step(states[2], 2)  # an older state: not among the cached memories
    assert projected == whole_window
    agent.trunk.rollout_cache = []
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


ATTENTION = [ROOT / "ppo_trxl.py", ROOT / "ppo_gtrxl.py"]
CPU_KERNEL, TORCH_KERNEL = "C++ sliding-window attention", "block-local attention"


def trunks_by_backend(script, argv: list[str], dtype: torch.dtype) -> dict:
    """The script's trunk with the C++ loops (auto) and with the torch path, the same weights."""
    trunks = {backend: trunk_on(load(script), argv, backend, dtype) for backend in ("auto", "torch")}
    assert trunks["auto"].kernel.startswith(CPU_KERNEL) and trunks["torch"].kernel.startswith(TORCH_KERNEL)
    return trunks


def trunk_results(trunk, x, state, starts) -> list[torch.Tensor]:
    """Training (outputs, state, and the gradients of x and every weight) and two rollout steps after it."""
    x = x.clone().requires_grad_()
    y, new_state = trunk(x, state, starts)
    torch.manual_seed(2)
    weights = torch.randn(y.shape, dtype=y.dtype)
    gradients = torch.autograd.grad((y * weights).sum(), [x, *trunk.parameters()])
    with torch.inference_mode():  # the rollout: one step at a time, the second from the first's key/value cache
        step, step_state = trunk(x[:1], new_state, starts[:1])
        second, second_state = trunk(x[1:2], step_state, starts[1:2])
    return [y, *new_state, *gradients, step, *step_state, second, *second_state]


@pytest.mark.parametrize("script", ATTENTION, ids=lambda path: path.stem)
@pytest.mark.parametrize("head_size", [3, 16])  # 16: a head size the loops know at compile time
def test_trunk_with_the_cpu_loops_equals_the_trunk_with_the_torch_path(script, head_size):
    """`auto` (the C++ loops on a CPU) and `torch`, in float64: the same outputs, state and gradients, over 13
    steps with a window of 5 (the torch path pads its last block), starts inside and a warm memory partly in the
    episode, and in rollout steps. (Float32 rounding: below.)"""
    argv = [*DOMAINS["classic"], "--memory-length", "5", "--num-layers", "2", "--num-heads", "2"]
    trunks = trunks_by_backend(script, [*argv, "--head-size", str(head_size)], torch.float64)
    size, steps = trunks["auto"].output_size, 13
    torch.manual_seed(1)
    x = torch.randn(steps, ENVS, size, dtype=torch.float64)
    starts = torch.zeros(steps, ENVS, dtype=torch.float64)
    starts[[0, 4, 5, 12], [0, 1, 1, 2]] = 1
    memory = torch.randn(ENVS, 2, 5, size, dtype=torch.float64)
    state = memory, torch.tensor([0, 3, 5])  # memory steps in the current episode
    results = {backend: trunk_results(trunk, x, state, starts) for backend, trunk in trunks.items()}
    for auto_result, torch_result in zip(*results.values(), strict=True):
        torch.testing.assert_close(auto_result, torch_result, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("script", ATTENTION, ids=lambda path: path.stem)
def test_cpu_attention_in_float32_at_the_row_size_agrees_with_the_torch_path(script):
    """The C++ loops vectorise their sums in float32 (reassociated): at the MemoryS11 symbolic row's sizes (M 64,
    128 steps, the script's heads) they must still agree with the torch path to float32 rounding."""
    trunks = trunks_by_backend(script, DOMAINS["minigrid-symbolic"], torch.float32)
    size, memory_length, layers = trunks["auto"].output_size, trunks["auto"].memory_length, 2
    torch.manual_seed(1)
    x = torch.randn(128, 2, size)
    starts = (torch.rand(128, 2) < 0.02).float()
    state = torch.randn(2, layers, memory_length, size), torch.tensor([10, memory_length])
    results = {backend: trunk_results(trunk, x, state, starts) for backend, trunk in trunks.items()}
    for auto_result, torch_result in zip(*results.values(), strict=True):
        if auto_result.is_floating_point():
            assert_agree_to_float32_rounding(auto_result, torch_result)
        else:
            assert torch.equal(auto_result, torch_result)


@pytest.mark.parametrize("script", ATTENTION, ids=lambda path: path.stem)
def test_cpu_attention_gradients_equal_finite_differences(script):
    module = load(script)
    kernels = built_cpu_kernels(module)
    torch.manual_seed(0)
    envs, steps, memory_length, heads, head_size = 2, 5, 3, 2, 3
    queries = torch.randn(envs, steps, heads * head_size, dtype=torch.float64, requires_grad=True)
    key_values = torch.randn(envs, memory_length + steps, 2 * heads * head_size, dtype=torch.float64)
    starts = torch.zeros(steps, envs)
    starts[2, 0] = 1
    in_episode, slopes = torch.tensor([1, 3]), torch.tensor([0.25, 0.0625], dtype=torch.float64)

    def attention(queries, key_values):
        return module.CpuAttention.apply(queries, key_values, kernels, starts, in_episode, slopes, memory_length, heads)

    assert torch.autograd.gradcheck(attention, (queries, key_values.requires_grad_()))


def test_cpu_gate_equals_the_torch_gate_and_its_gradients_equal_finite_differences():
    """GTrXL's GRU-type gate from the C++ loops: the torch gate's output and gradients in float64, and gradcheck."""
    module = load(ROOT / "ppo_gtrxl.py")
    kernels = built_cpu_kernels(module)
    torch.manual_seed(0)
    gate = module.GRUGate(4, gate_bias=0.5).double()
    x, y = (torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True) for _ in range(2))
    leaves = [x, y, *gate.parameters()]
    weights = torch.randn(2, 3, 4, dtype=torch.float64)
    for kernel_result, torch_result in zip(
        [gate(x, y, kernels), *torch.autograd.grad((gate(x, y, kernels) * weights).sum(), leaves)],
        [gate(x, y), *torch.autograd.grad((gate(x, y) * weights).sum(), leaves)],
        strict=True,
    ):
        torch.testing.assert_close(kernel_result, torch_result, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda *inputs: gate(*inputs, kernels), (x, y))
    in_order = gate.from_y.weight, gate.from_x.weight, gate.from_reset_x.weight, gate.gate_bias
    gate_weights = [weight.detach().clone().requires_grad_() for weight in in_order]
    assert torch.autograd.gradcheck(lambda *w: module.CpuGate.apply(x, y, *w, kernels), gate_weights)


@pytest.mark.parametrize("script", ATTENTION, ids=lambda path: path.stem)
def test_heads_wider_than_the_cpu_loops_take_run_the_torch_path_and_say_why(script, capsys):
    module = load(script)
    args = module.parse_args([*DOMAINS["classic"], "--head-size", str(module.CPU_MAX_HEAD_SIZE + 1)])
    trunk = module.Trunk(args.hidden_size, args)
    why = f"the C++ loops take heads up to {module.CPU_MAX_HEAD_SIZE} wide, got {module.CPU_MAX_HEAD_SIZE + 1}"
    assert trunk.cpu_kernels is None and trunk.kernel.endswith(why)
    assert capsys.readouterr().err.strip() == f"--attention-backend auto: {why}; using the torch path"


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
