"""Mamba and Mamba-2 trunks (ppo_mamba.py, ppo_mamba2.py): the scans (torch and C++), the SSD and the
convolution against a step-by-step float64 recurrence with starts anywhere and a warm initial state, gradients
through starts, the scan and backend choices, and the mamba-ssm kernel against the torch path where CUDA and
mamba-ssm exist."""

import dataclasses
import json

import pytest
import torch
from conftest import (
    DOMAINS,
    ROOT,
    TEMPLATE,
    TINY,
    assert_agree_to_float32_rounding,
    built_cpu_kernels,
    load,
    outputs,
    rollout_batch,
    run_script,
    saved_and_loaded,
    tf32_off,
    trunk_on,
)

MAMBA, MAMBA2 = ROOT / "ppo_mamba.py", ROOT / "ppo_mamba2.py"
STEPS, ENVS = 13, 3


def episode_starts() -> torch.Tensor:
    starts = torch.zeros(STEPS, ENVS, dtype=torch.bool)
    starts[[0, 4, 5, 9, 12], [0, 1, 1, 2, 0]] = True  # at the first step, back to back, at the last step
    return starts


def recurrence(x, dt, decay, B, C, starts, state):
    """The SSM one step at a time: h = decay * h + dt B x, zeroed before a start; y = C h."""
    outputs = []
    for t in range(len(x)):
        keep = (~starts[t]).double().reshape(-1, *[1] * (state.dim() - 1))
        state = keep * decay[t] * state + dt[t][..., None] * x[t][..., None] * B[t].reshape(
            ENVS, *[1] * (state.dim() - 2), -1
        )
        outputs.append((state * C[t].reshape(ENVS, *[1] * (state.dim() - 2), -1)).sum(-1))
    return torch.stack(outputs), state


@pytest.mark.parametrize("chunk_size", [1, 4, 5, STEPS, 64])
def test_ssd_equals_the_recurrence(chunk_size):
    ssd = load(MAMBA2).ssd
    torch.manual_seed(0)
    heads, head_size, state_size = 2, 4, 5
    x = torch.randn(STEPS, ENVS, heads, head_size, dtype=torch.float64)
    dt = torch.nn.functional.softplus(torch.randn(STEPS, ENVS, heads, dtype=torch.float64))
    A = -3 * torch.rand(heads, dtype=torch.float64)
    B, C = torch.randn(2, STEPS, ENVS, state_size, dtype=torch.float64)
    initial = torch.randn(ENVS, heads, head_size, state_size, dtype=torch.float64)
    starts = episode_starts()
    decay = torch.exp(dt * A)[..., None, None]
    expected_y, expected_state = recurrence(x, dt[..., None], decay, B, C, starts, initial)
    y, state = ssd(x, dt, A, B, C, starts, initial, chunk_size)
    torch.testing.assert_close(y, expected_y, rtol=0, atol=1e-12)
    torch.testing.assert_close(state, expected_state, rtol=0, atol=1e-12)


def scan_inputs(inner: int = 6, state_size: int = 5):
    """x, dt before its softplus (two entries past softplus's threshold of 20), A, B, C, the initial state,
    D and z: what the mixer gives its scan."""
    torch.manual_seed(0)
    x = torch.randn(STEPS, ENVS, inner, dtype=torch.float64)
    dt_raw = torch.randn(STEPS, ENVS, inner, dtype=torch.float64)
    dt_raw[[2, 7], [0, 2], [0, inner - 1]] = torch.tensor([20.5, 25.0], dtype=torch.float64)
    A = -3 * torch.rand(inner, state_size, dtype=torch.float64)
    B, C = torch.randn(2, STEPS, ENVS, state_size, dtype=torch.float64)
    initial = torch.randn(ENVS, inner, state_size, dtype=torch.float64)
    D, z = torch.randn(inner, dtype=torch.float64), torch.randn(STEPS, ENVS, inner, dtype=torch.float64)
    return x, dt_raw, A, B, C, initial, D, z


def selective_scan(name: str):
    """Mamba's scan as the mixer calls it, from x, dt before its softplus, A, B, C, keep, the initial state, D
    and z to ((C . h) + D x) SiLU(z) and the final state: the torch scan with the torch ops around it, or the
    C++ loops of this machine's build, which fuse them."""
    module = load(MAMBA)
    if name == "torch":

        def torch_scan(x, dt_raw, A, B, C, keep, initial, D, z):
            y, state = module.SelectiveScan.apply(x, torch.nn.functional.softplus(dt_raw), A, B, C, keep, initial)
            return (y + x * D) * torch.nn.functional.silu(z), state

        return torch_scan
    kernels = built_cpu_kernels(module)
    return lambda *inputs: module.CpuSelectiveScan.apply(*inputs, kernels)


def gated_recurrence(x, dt_raw, A, B, C, starts, initial, D, z):
    """`recurrence` with the mixer's operations around the scan, step by step in float64."""
    dt = torch.nn.functional.softplus(dt_raw)
    y, state = recurrence(x, dt, torch.exp(dt[..., None] * A), B, C, starts, initial)
    return (y + x * D) * z * torch.sigmoid(z), state


SCANS = ["torch", "cpu"]


@pytest.mark.parametrize("name", SCANS)
def test_selective_scan_equals_the_recurrence(name):
    scan = selective_scan(name)
    x, dt_raw, A, B, C, initial, D, z = scan_inputs()
    starts = episode_starts()
    expected_y, expected_state = gated_recurrence(x, dt_raw, A, B, C, starts, initial, D, z)
    y, state = scan(x, dt_raw, A, B, C, (~starts).double(), initial, D, z)
    torch.testing.assert_close(y, expected_y, rtol=0, atol=1e-12)
    torch.testing.assert_close(state, expected_state, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", SCANS)
def test_selective_scan_gradients_equal_autograd_through_the_recurrence(name):
    """The scan's backward is written by hand: every gradient against autograd through the step-by-step loop."""
    scan = selective_scan(name)
    inputs = [t.requires_grad_() for t in scan_inputs()]
    keep = (~episode_starts()).double()

    def loss(y, state):  # weights every output and the final state differently
        return (y * torch.linspace(-1, 2, y.numel(), dtype=y.dtype).view_as(y)).sum() + state.square().sum()

    x, dt_raw, A, B, C, initial, D, z = inputs
    reference = gated_recurrence(x, dt_raw, A, B, C, keep == 0, initial, D, z)
    expected = torch.autograd.grad(loss(*reference), inputs)
    got = torch.autograd.grad(loss(*scan(x, dt_raw, A, B, C, keep, initial, D, z)), inputs)
    names = ["x", "dt_raw", "A", "B", "C", "initial_state", "D", "z"]
    for name, e, g in zip(names, expected, got, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10, msg=name)


def test_cpu_scan_gradients_equal_finite_differences():
    scan, keep = selective_scan("cpu"), (~episode_starts()).double()
    x, dt_raw, A, B, C, initial, D, z = [t.requires_grad_() for t in scan_inputs(inner=3, state_size=2)]
    inputs = (x, dt_raw, A, B, C, initial, D, z)
    assert torch.autograd.gradcheck(lambda *a: scan(*a[:5], keep, *a[5:]), inputs)


@pytest.mark.parametrize("inner, state_size", [(208, 16), (136, 8), (70, 8)])
def test_cpu_scan_in_float32_at_the_row_size_agrees_with_the_torch_scan(inner, state_size):
    """The C++ loop reassociates its float32 sums: at MemoryS11's and classic control's sizes (and at a width of
    70, no whole number of any instruction set's blocks of 4, 8 or 16 floats, so padded) it must still agree
    with the torch scan to float32 rounding, forward and backward, starts and a warm state included, and a step
    whose decays underflow (dt = 30: exp(dt A) below float32's smallest normal number, which the C++ exp takes
    as exp(-87))."""
    torch.manual_seed(0)
    steps, envs = 128, 2
    x = torch.randn(steps, envs, inner)
    dt_raw = torch.randn(steps, envs, inner) - 2
    dt_raw[40, 1] = 30.0
    A = -torch.arange(1, state_size + 1.0).repeat(inner, 1)
    B, C = torch.randn(2, steps, envs, state_size)
    keep = (torch.rand(steps, envs) > 0.05).float()
    initial, D, z = torch.randn(envs, inner, state_size), torch.randn(inner), torch.randn(steps, envs, inner)
    inputs = [t.requires_grad_() for t in (x, dt_raw, A, B, C)] + [keep]
    inputs += [t.requires_grad_() for t in (initial, D, z)]
    weights = torch.randn(steps, envs, inner), torch.randn(envs, inner, state_size)
    results = {}
    for name in SCANS:
        y, state = selective_scan(name)(*inputs)
        loss = (y * weights[0]).sum() + (state * weights[1]).sum()
        wrt = [t for t in inputs if t.requires_grad]
        results[name] = [y, state, *torch.autograd.grad(loss, wrt)]
    names = ["y", "state", "x", "dt_raw", "A", "B", "C", "initial", "D", "z"]
    for name, torch_result, cpu_result in zip(names, *results.values(), strict=True):
        assert_agree_to_float32_rounding(cpu_result, torch_result, name)


# Each script's flag for its C++ loops or its torch path, and the start of `kernel` with each
BACKENDS = {
    MAMBA: ("--mamba-backend", "C++ convolution and selective scan", "torch selective scan"),
    MAMBA2: ("--mamba-backend", "C++ convolution, SSD and gated norm", "torch chunked SSD"),
}


@pytest.mark.parametrize("script", [MAMBA, MAMBA2], ids=lambda path: path.stem)
def test_trunk_with_the_cpu_loops_equals_the_trunk_with_the_torch_path(script):
    """`auto` (the C++ loops on a CPU) and `torch`, the same weights, in float64: the same outputs, state and
    weight gradients, in training (starts inside) and in the rollout (one step). (Float32 rounding: below.)"""
    module, (_, cpu_kernel, torch_kernel), results = load(script), BACKENDS[script], {}
    trunks = {backend: trunk_on(module, DOMAINS["minigrid-symbolic"], backend) for backend in ("auto", "torch")}
    assert trunks["auto"].kernel.startswith(cpu_kernel)
    assert trunks["torch"].kernel.startswith(torch_kernel)
    torch.manual_seed(1)
    x = torch.randn(64, ENVS, trunks["auto"].output_size, dtype=torch.float64)
    starts = torch.zeros(64, ENVS, dtype=torch.float64)
    starts[[0, 10, 11, 63], [0, 1, 1, 2]] = 1
    initial = [part.double().normal_() for part in trunks["auto"].initial_state(ENVS, torch.device("cpu"))]
    for backend, trunk in trunks.items():
        y, state = trunk(x, initial, starts)
        (y.square().mean() + sum(part.square().mean() for part in state)).backward()
        with torch.inference_mode():
            step, step_state = trunk(x[:1], initial, starts[:1])
        results[backend] = [y, *state, step, *step_state, *(p.grad for p in trunk.parameters())]
    for auto_result, torch_result in zip(*results.values(), strict=True):
        torch.testing.assert_close(auto_result, torch_result, rtol=1e-9, atol=1e-12)


def cpu_kernels(script=MAMBA2):
    """The script and its C++ loops of this machine's build."""
    module = load(script)
    return module, built_cpu_kernels(module)


def ssd_inputs(state_size: int, heads: int = 2, head_size: int = 4, steps: int = STEPS, envs: int = ENVS):
    x = torch.randn(steps, envs, heads, head_size, dtype=torch.float64)
    dt = torch.nn.functional.softplus(torch.randn(steps, envs, heads, dtype=torch.float64))
    A = -3 * torch.rand(heads, dtype=torch.float64)
    B, C = torch.randn(2, steps, envs, state_size, dtype=torch.float64)
    initial = torch.randn(envs, heads, head_size, state_size, dtype=torch.float64)
    return x, dt, A, B, C, initial


def weighted_gradients(outputs, weights, inputs):
    """The gradients of a loss that weights every entry of every output differently."""
    return torch.autograd.grad(sum((t * w).sum() for t, w in zip(outputs, weights, strict=True)), inputs)


@pytest.mark.parametrize("state_size", [5, 16])  # 16: a state size the loops know at compile time
def test_cpu_ssd_equals_the_recurrence_and_its_gradients_autograds(state_size):
    module, kernels = cpu_kernels()
    torch.manual_seed(0)
    inputs = [t.requires_grad_() for t in ssd_inputs(state_size)]
    x, dt, A, B, C, initial = inputs
    starts = episode_starts()
    expected = recurrence(x, dt[..., None], torch.exp(dt * A)[..., None, None], B, C, starts, initial)
    got = module.CpuSSD.apply(x, dt, A, B, C, (~starts).double(), initial, kernels)
    for name, e, g in zip(["y", "state"], expected, got, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-12, msg=name)
    weights = [torch.randn_like(t) for t in expected]
    expected_grads, got_grads = (weighted_gradients(outputs, weights, inputs) for outputs in (expected, got))
    for name, e, g in zip(["x", "dt", "A", "B", "C", "initial_state"], expected_grads, got_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("script", [MAMBA, MAMBA2], ids=lambda path: path.stem)
@pytest.mark.parametrize("steps", [1, 2, STEPS])  # 1: the rollout's step
@pytest.mark.parametrize("taps", [1, 2, 4])
def test_cpu_convolution_equals_the_torch_convolution_and_its_gradients(taps, steps, script):
    """SiLU(causal_conv) in C++ against the torch one (itself tested step by step above), forward, next window
    and the gradients of x, the window, the weight and the bias, in float64; and finite differences."""
    module, kernels = cpu_kernels(script)
    torch.manual_seed(0)
    conv = torch.nn.Conv1d(6, 6, taps, groups=6).double()
    x = torch.randn(steps, ENVS, 6, dtype=torch.float64, requires_grad=True)
    window = torch.randn(ENVS, taps - 1, 6, dtype=torch.float64, requires_grad=True)
    starts = episode_starts()[:steps].long()
    inputs = [x, window, conv.weight, conv.bias]
    out, next_window = module.causal_conv(x, window, conv, starts)
    expected = [torch.nn.functional.silu(out), next_window]
    got = module.CpuConvSiLU.apply(x, window, conv.weight, conv.bias, starts, kernels)
    for name, e, g in zip(["output", "next window"], expected, got, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-12, msg=name)
    weights = [torch.randn_like(t) for t in expected]
    expected_grads, got_grads = (weighted_gradients(outputs, weights, inputs) for outputs in (expected, got))
    for name, e, g in zip(["x", "window", "weight", "bias"], expected_grads, got_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-12, msg=name)
    if steps == STEPS and taps == 4:
        small = (x[..., :3], window[..., :3], conv.weight[:3], conv.bias[:3])  # 3 channels
        small = [t.detach().clone().requires_grad_() for t in small]
        assert torch.autograd.gradcheck(lambda *a: module.CpuConvSiLU.apply(*a, starts, kernels), small)


def test_cpu_ssd_gradients_equal_finite_differences():
    module, kernels = cpu_kernels()
    torch.manual_seed(0)
    keep = (~episode_starts()).double()
    inputs = [t.requires_grad_() for t in ssd_inputs(state_size=2, heads=2, head_size=2)]
    assert torch.autograd.gradcheck(lambda *a: module.CpuSSD.apply(*a[:5], keep, a[5], kernels), inputs)


def test_cpu_gated_norm_equals_the_torch_norm_and_its_gradients_equal_finite_differences():
    """Mamba-2's norm(flatten(y + D x) * silu(z)) from the C++ loops against the torch path's ops, in float64 and
    at float32's rounding, and gradcheck."""
    module, kernels = cpu_kernels()
    torch.manual_seed(0)
    for dtype, check in ((torch.float64, None), (torch.float32, assert_agree_to_float32_rounding)):
        norm = torch.nn.RMSNorm(12, eps=1e-5).to(dtype)
        torch.nn.init.normal_(norm.weight)
        y, x = (torch.randn(5, 2, 3, 4, dtype=dtype, requires_grad=True) for _ in range(2))
        D, z = torch.randn(3, dtype=dtype, requires_grad=True), torch.randn(5, 2, 12, dtype=dtype, requires_grad=True)
        leaves, weights = [y, x, D, z, norm.weight], torch.randn(5, 2, 12, dtype=dtype)
        torch_out = norm((y + x * D[:, None]).flatten(-2) * torch.nn.functional.silu(z))
        cpu_out = module.CpuGatedNorm.apply(y, x, D, z, norm.weight, norm.eps, kernels)
        expected = [torch_out, *weighted_gradients([torch_out], [weights], leaves)]
        for got, want in zip([cpu_out, *weighted_gradients([cpu_out], [weights], leaves)], expected, strict=True):
            if check is None:
                torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
            else:
                check(got, want)
    inputs = [t.detach().double().requires_grad_() for t in (y, x, D, z, norm.weight)]
    assert torch.autograd.gradcheck(lambda *a: module.CpuGatedNorm.apply(*a, 1e-5, kernels), inputs)


def test_cpu_loops_in_float32_at_the_row_size_agree_with_the_torch_path():
    """The C++ loops vectorise their sums in float32 (reassociated): at the MemoryS11 row's sizes (7 heads of 32,
    state 16, 256 steps, 256 convolution channels) they must still agree with the torch path to float32
    rounding, forward and backward, starts and a warm state included."""
    module, kernels = cpu_kernels()
    torch.manual_seed(0)
    steps, envs = 256, 2
    x, dt, A, B, C, initial = (t.float() for t in ssd_inputs(16, heads=7, head_size=32, steps=steps, envs=envs))
    starts = torch.rand(steps, envs) < 0.02
    conv = torch.nn.Conv1d(256, 256, 4, groups=256)
    conv_x, window = torch.randn(steps, envs, 256), torch.randn(envs, 3, 256)
    leaves = [t.requires_grad_() for t in (x, dt, A, B, C, initial, conv_x, window)] + [conv.weight, conv.bias]
    results = {}
    for path in ("torch", "cpu"):
        if path == "torch":
            y, state = module.ssd(x, dt, A, B, C, starts, initial, chunk_size=64)
            out, next_window = module.causal_conv(conv_x, window, conv, starts.long())
            out = torch.nn.functional.silu(out)
        else:
            y, state = module.CpuSSD.apply(x, dt, A, B, C, (~starts).float(), initial, kernels)
            out, next_window = module.CpuConvSiLU.apply(conv_x, window, conv.weight, conv.bias, starts.long(), kernels)
        outputs = [y, state, out, next_window]
        torch.manual_seed(2)  # the same weights for both (randn_like would follow each tensor's strides)
        weights = [torch.randn(t.shape) for t in outputs]
        results[path] = outputs + list(weighted_gradients(outputs, weights, leaves))
    names = ["y", "state", "conv out", "next window", "x", "dt", "A", "B", "C", "initial", "conv x", "window"]
    for name, torch_result, cpu_result in zip([*names, "weight", "bias"], *results.values(), strict=True):
        assert_agree_to_float32_rounding(cpu_result, torch_result, name)


@pytest.mark.parametrize("script", [MAMBA, MAMBA2], ids=lambda path: path.stem)
@pytest.mark.parametrize("taps", [1, 2, 4])
def test_convolution_never_reads_across_a_start(script, taps):
    causal_conv = load(script).causal_conv
    torch.manual_seed(0)
    conv = torch.nn.Conv1d(6, 6, taps, groups=6).double()
    x = torch.randn(STEPS, ENVS, 6, dtype=torch.float64)
    window = torch.randn(ENVS, taps - 1, 6, dtype=torch.float64)
    starts = episode_starts()
    y, next_window = causal_conv(x, window, conv, starts.long())
    outputs = []
    for t in range(STEPS):  # step by step: forget the window at a start, then slide it
        window = window * (~starts[t]).double()[:, None, None]
        inputs = torch.cat([window, x[t][:, None]], 1)  # [ENVS, taps, 6]
        outputs.append((inputs * conv.weight[:, 0].T).sum(1) + conv.bias)
        window = inputs[:, 1:]
    torch.testing.assert_close(y, torch.stack(outputs), rtol=0, atol=1e-12)
    torch.testing.assert_close(next_window, window, rtol=0, atol=0)


@pytest.mark.parametrize("script", [MAMBA, MAMBA2], ids=lambda path: path.stem)
def test_gradients_are_finite_across_starts(script):
    """A start sets a log-decay to -inf (Mamba-2) or a decay to 0 (Mamba): no NaN may reach the weights."""
    module = load(script)
    args = module.parse_args([*DOMAINS["classic"], "--num-layers", "2"])
    torch.manual_seed(0)
    trunk = module.Trunk(args.hidden_size, args)
    x = torch.randn(64, ENVS, args.hidden_size)
    starts = torch.zeros(64, ENVS)
    starts[[0, 10, 11, 63], [0, 1, 1, 2]] = 1
    y, state = trunk(x, trunk.initial_state(ENVS, torch.device("cpu")), starts)
    (y.square().mean() + sum(part.square().mean() for part in state)).backward()
    assert all(torch.isfinite(p.grad).all() for p in trunk.parameters())


@pytest.mark.parametrize("script", [MAMBA, MAMBA2], ids=lambda path: path.stem)
def test_state_is_the_convolution_window_and_the_ssm_state(script):
    module = load(script)
    args = module.parse_args([*DOMAINS["minigrid-symbolic"]])
    trunk = module.Trunk(args.hidden_size, args)
    window, ssm_state = trunk.initial_state(5, torch.device("cpu"))
    assert window.shape[:3] == (5, args.num_layers, args.conv_size - 1)
    if script == MAMBA2:
        assert ssm_state.shape == (5, args.num_layers, args.num_heads, args.head_size, args.state_size)
    else:
        assert ssm_state.shape == (5, args.num_layers, args.expand * args.hidden_size, args.state_size)
    _, after = trunk(torch.randn(300, 5, args.hidden_size), (window, ssm_state), torch.zeros(300, 5))
    assert [part.shape for part in after] == [window.shape, ssm_state.shape]  # fixed size, however long


def test_cuda_backend_without_a_cuda_device_says_why_and_trains_with_torch(tmp_path):
    result = run_script(MAMBA2, *DOMAINS["classic"], *TINY, "--mamba-backend", "cuda", "--no-cuda", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "--mamba-backend cuda: no CUDA device; using the torch path" in result.stderr
    (summary,) = (tmp_path / "runs").glob("*/summary.json")
    assert summary.read_text().count('"kernel": "torch') == 1


def test_unknown_backend_is_bad_input(tmp_path):
    result = run_script(MAMBA2, "--mamba-backend", "triton", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().endswith("--mamba-backend must be one of auto, torch, cuda, got 'triton'")
    assert not list(tmp_path.iterdir())


BAD_INITIALISATION = {
    "--dt-init 0 0.1": "--dt-init must be two finite numbers with 0 < low <= high, got 0.0 0.1",
    "--dt-init 0.1 0.01": "--dt-init must be two finite numbers with 0 < low <= high, got 0.1 0.01",
    "--a-init 1 inf": "--a-init must be two finite numbers with 0 < low <= high, got 1.0 inf",
    "--a-init nan 1": "--a-init must be two finite numbers with 0 < low <= high, got nan 1.0",
    "--d-init nan": "--d-init must be finite, got nan",
}


@pytest.mark.parametrize("argv", BAD_INITIALISATION)
def test_bad_initialisation_ranges_are_bad_input(argv, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        load(MAMBA2).parse_args(argv.split())
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().endswith(BAD_INITIALISATION[argv])
    assert not list(tmp_path.iterdir())


def test_initialisation_flags_set_dt_a_and_d():
    """dt = softplus(dt_bias) log-uniform within --dt-init, -A = exp(A_log) within --a-init, D = --d-init;
    the defaults are the reference implementation's [1e-3, 1e-1], [1, 16] and 1, except on MemoryS11."""
    module = load(MAMBA2)
    reference = ["--dt-init", "1e-3", "1e-1", "--a-init", "1", "16", "--d-init", "1"]
    for argv, dt_range, a_range, d in [
        ([*DOMAINS["classic"]], (1e-3, 1e-1), (1, 16), 1.0),
        ([*DOMAINS["minigrid-symbolic"]], (0.1, 1), (0.05, 1), 0.0),
        ([*DOMAINS["minigrid-symbolic"], *reference], (1e-3, 1e-1), (1, 16), 1.0),
    ]:
        args = module.parse_args([*argv, "--num-heads", "64"])
        for mixer in module.Trunk(args.hidden_size, args).mixers:
            dt = torch.nn.functional.softplus(mixer.dt_bias.detach())
            decay_rate = mixer.A_log.detach().exp()
            assert dt_range[0] * 0.999 <= dt.min() and dt.max() <= dt_range[1] * 1.001
            assert dt.max() / dt.min() > (dt_range[1] / dt_range[0]) ** 0.5  # spread over the range
            assert a_range[0] * 0.999 <= decay_rate.min() and decay_rate.max() <= a_range[1] * 1.001
            assert torch.equal(mixer.D.detach(), torch.full((64,), d))


def test_mamba1_offers_no_backend_it_cannot_run(tmp_path):
    """No mamba-ssm kernel can run Mamba-1 exactly (its scan takes no initial state and no resets): its
    `--mamba-backend` picks this file's C++ loops or its torch path, never cuda."""
    module = load(MAMBA)
    assert module.TRUNK_CHOICE_FIELDS == {"mamba_backend": ("auto", "torch")}
    args = module.parse_args([*DOMAINS["classic"], "--mamba-backend", "torch"])
    assert module.Trunk(args.hidden_size, args).kernel.startswith("torch selective scan")
    result = run_script(MAMBA, "--mamba-backend", "cuda", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().endswith("--mamba-backend must be one of auto, torch, got 'cuda'")


def test_a_state_too_large_for_the_cpu_scan_takes_the_torch_scan_and_says_why(capsys):
    module = load(MAMBA)
    state_size = module.CPU_SCAN_MAX_STATE + 1
    args = module.parse_args([*DOMAINS["classic"], "--state-size", str(state_size)])
    trunk = module.Trunk(args.hidden_size, args)
    why = f"the C++ scan takes a state size up to {module.CPU_SCAN_MAX_STATE}, got {state_size}"
    assert trunk.cpu_kernels is None and trunk.kernel.endswith(why)
    assert capsys.readouterr().err.strip() == f"--mamba-backend auto: {why}; using the torch path"


def test_tf32_off_restores_the_global_flags():
    """The kernel test turns TF32 off; the flags are global, so every other test must find them as they were."""
    flags = torch.backends.cudnn, torch.backends.cuda.matmul
    before = [flag.allow_tf32 for flag in flags]
    for setting in (True, False):
        flags[0].allow_tf32 = flags[1].allow_tf32 = setting
        with tf32_off():
            assert [flag.allow_tf32 for flag in flags] == [False, False]
        assert [flag.allow_tf32 for flag in flags] == [setting, setting]
    flags[0].allow_tf32, flags[1].allow_tf32 = before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mamba_ssm_kernel_equals_the_torch_path(without_tf32):
    """mamba-ssm's mamba_chunk_scan_combined (seq_idx, initial_states) against the torch SSD, same weights and
    inputs, starts inside the sequence. The kernel computes in TF32 whatever torch's flags say: outputs differ from
    float64 by about 2.3e-3 relative, so the tolerance is 1e-2 of each tensor's largest entry."""
    module = load(MAMBA2)
    kernel, why = module.mamba_ssm_kernel()
    if kernel is None:
        pytest.skip(why)
    # The torch path in float32 proper (TF32 off, restored after the test); the kernel computes in TF32 anyway
    args = module.parse_args([*DOMAINS["minigrid-symbolic"], "--mamba-backend", "cuda"])
    torch.manual_seed(0)
    device = torch.device("cuda")
    trunk = module.Trunk(args.hidden_size, args).to(device)
    x = torch.randn(128, 8, args.hidden_size, device=device, requires_grad=True)
    state = tuple(torch.randn_like(part) for part in trunk.initial_state(8, device))
    starts = (torch.rand(128, 8, device=device) < 0.05).float()
    outputs, gradients = [], []
    for use_kernel in (True, False):
        trunk.cuda_kernel = kernel if use_kernel else None
        y, after = trunk(x, state, starts)
        (y.square().mean() + after[1].square().mean()).backward()
        outputs.append((y.detach(), *(part.detach() for part in after)))
        gradients.append([p.grad.clone() for p in trunk.parameters()] + [x.grad.clone()])
        trunk.zero_grad()
        x.grad = None
    # Each tensor against its own scale: gradients of 1e-8 (the post-MLP's) must not pass by an absolute 1e-3
    for kernel_result, torch_result in zip([*outputs[0], *gradients[0]], [*outputs[1], *gradients[1]], strict=True):
        scale = torch_result.abs().max().item()
        torch.testing.assert_close(kernel_result, torch_result, rtol=1e-2, atol=1e-2 * scale)


def test_a_memory_first_start_carries_an_input_further():
    """benchmarks/mamba2_memory_at_init.py: with the reference start an input 10 steps back reaches the
    output at about 1e-3 of a current one; dt in [0.1, 1], -A in [0.05, 1] and D = 0 carry it about 100x
    further."""
    benchmark = load(ROOT / "benchmarks" / "mamba2_memory_at_init.py")
    lag = 3  # LAGS index of t = 10
    reference = benchmark.reach(benchmark.STARTS["reference (dt 0.001-0.1, -A 1-16, D 1)"], seed=0)
    memory_first = benchmark.reach(benchmark.STARTS["dt 0.1-1, -A 0.05-1, D 0"], seed=0)
    assert reference[lag] / reference[0] < 0.005
    assert memory_first[lag] / memory_first[0] > 20 * reference[lag] / reference[0]


def test_taught_directly_the_mamba2_trunk_recalls_a_cue_20_steps_later_and_the_mlp_cannot():
    """benchmarks/cue_recall.py: the supervised version of MemoryS11's memory. Mamba-2 with the memory-first
    start names the cue 20 steps on after 200 updates (both seeds of the benchmark); the MLP stays at chance."""
    cue_recall = load(ROOT / "benchmarks" / "cue_recall.py")
    memory_first = cue_recall.TRUNKS["mamba2 dt 0.1-1, -A 0.05-1, D 0"][1]
    (recalled,) = cue_recall.recall(load(MAMBA2), memory_first, seed=1, checkpoints=(200,))
    assert recalled >= 0.95  # 1.00 here; the margin is for other CPUs' rounding
    (chance,) = cue_recall.recall(load(TEMPLATE), [], seed=1, checkpoints=(200,))
    assert 0.35 < chance < 0.65


def test_the_memory_s11_row_is_the_run_that_solved_it():
    """The committed Mamba-2 runs that solved MemoryS11 (seeds 2 and 3) were made with a flag (--num-steps 256);
    it is now the MemoryS11 row, so each run is what `python ppo_mamba2.py --env-id MiniGrid-MemoryS11-v0
    --minigrid-obs symbolic --seed N` does."""
    summaries = sorted((ROOT / "results" / "memory").glob("*__mem_mamba2_steps256__*/summary.json"))
    assert len(summaries) >= 2
    for summary in summaries:
        ran = json.loads(summary.read_text())["args"]
        defaults = dataclasses.asdict(
            load(MAMBA2).parse_args([*DOMAINS["minigrid-symbolic"], "--seed", str(ran["seed"])])
        )
        defaults = json.loads(json.dumps(defaults))  # tuples as the JSON lists of summary.json
        different = {name for name in ran if ran[name] != defaults[name]} - {"resume"}  # set if it was resumed
        assert different == {"exp_name"}, different
    for argv in (DOMAINS["classic"], ["--env-id", "MiniGrid-DoorKey-8x8-v0"]):
        args = load(MAMBA2).parse_args(argv)
        assert (args.post_mlp, args.d_init, args.trunk_learning_rate) == (False, 1.0, args.learning_rate), argv


def test_post_mlp_adds_the_papers_residual_mlp_and_resets_stay_exact():
    module, cpu = load(MAMBA2), torch.device("cpu")
    agent, obs, starts, actions = rollout_batch(module, "minigrid-symbolic", cpu)  # the MemoryS11 row has it
    plain = rollout_batch(module, "minigrid-symbolic", cpu, argv=(*DOMAINS["minigrid-symbolic"], "--no-post-mlp"))[0]
    width, half = agent.trunk.output_size, agent.trunk.output_size // 2
    added = width + (width * half + half) + (half * width + width)  # the norm's weight, the two linear layers
    assert sum(p.numel() for p in agent.parameters()) - sum(p.numel() for p in plain.parameters()) == added
    assert plain.trunk.post_mlp is None
    # Resets and one-step calls with the post-MLP: tests/test_invariants.py runs this row (minigrid-symbolic).
    # The MLP acts: switching its last layer off changes the outputs
    state = agent.initial_state(starts.shape[1], cpu)
    before = outputs(agent, obs, state, starts, actions)[0]
    with torch.no_grad():
        agent.trunk.post_mlp[-1].weight.zero_()
        agent.trunk.post_mlp[-1].bias.zero_()
    assert not torch.allclose(outputs(agent, obs, state, starts, actions)[0], before)


def test_a_saved_agent_with_mamba_ssm_loads_where_it_is_missing(monkeypatch, capsys):
    """torch.save(agent) of a `--mamba-backend cuda` trunk stores that the kernel ran, not the kernel: loading
    looks it up again, and where mamba-ssm is missing runs the torch path and says why."""
    module = load(MAMBA2)
    monkeypatch.setattr(module, "mamba_ssm_kernel", lambda: (lambda *inputs, **options: None, None))  # not picklable
    monkeypatch.setattr(module.torch.cuda, "is_available", lambda: True)  # the kernel loads for a CUDA device
    trunk = module.Trunk(16, module.parse_args([*DOMAINS["classic"], "--mamba-backend", "cuda"]))
    assert trunk.cuda_kernel is not None
    why = "mamba-ssm is not importable (No module named 'mamba_ssm')"

    def mamba_ssm_missing():
        monkeypatch.setattr(module, "mamba_ssm_kernel", lambda: (None, why))

    loaded = saved_and_loaded(module, monkeypatch, trunk, before_loading=mamba_ssm_missing)
    assert loaded.cuda_kernel is None and loaded.why_torch == why
    assert capsys.readouterr().err.strip() == f"loaded without the cuda kernels: {why}; the torch path"
