"""Recurrent trunks (`Trunk.rnn`, ppo_lstm.py and ppo_gru.py): training runs the kernel once per piece
between episode starts, never once per time step, and the pieces give exactly what a per-step loop gives;
the C++ loops that both run by default on a CPU give what nn.LSTM and nn.GRU give."""

from pathlib import Path

import pytest
import torch
from conftest import DOMAINS, ROOT, assert_agree_to_float32_rounding, load, trunk_on

STEPS, ENVS = 128, 4
RECURRENT = {"ppo_lstm.py": ("--lstm-backend", "nn.LSTM"), "ppo_gru.py": ("--gru-backend", "nn.GRU")}  # flag, rnn


def recurrent_trunk(module, device):
    """The script's trunk running its nn.LSTM or nn.GRU (`--lstm-backend torch`, `--gru-backend torch`)."""
    flag = RECURRENT.get(Path(module.__file__).name, (None,))[0]
    args = module.parse_args(DOMAINS["classic"] + ([flag, "torch"] if flag else []))
    if not hasattr(module.Trunk(args.hidden_size, args), "rnn"):
        pytest.skip("not a recurrent trunk")
    torch.manual_seed(0)
    return module.Trunk(args.hidden_size, args).to(device), args.hidden_size


def count_kernel_calls(trunk, x, state, starts) -> tuple[torch.Tensor, int]:
    calls = []
    handle = trunk.rnn.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        y, _ = trunk(x, state, starts)
    handle.remove()
    return y, len(calls)


def test_one_kernel_call_per_distinct_start_time(module, device):
    trunk, hidden = recurrent_trunk(module, device)
    x = torch.randn(STEPS, ENVS, hidden, device=device)
    state = trunk.initial_state(ENVS, device)
    starts = torch.zeros(STEPS, ENVS, device=device)
    starts[0] = 1
    assert count_kernel_calls(trunk, x, state, starts)[1] == 1  # a whole rollout without an episode end
    starts[[17, 17, 40, 90], [0, 3, 1, 1]] = 1  # two environments start together at 17
    assert count_kernel_calls(trunk, x, state, starts)[1] == 4


def test_pieces_equal_a_per_step_loop_with_gradients(module, device):
    """Forward and backward of the training pass match one kernel call per step (CleanRL's loop)."""
    trunk, hidden = recurrent_trunk(module, device)
    x = torch.randn(STEPS, ENVS, hidden, device=device, requires_grad=True)
    state = trunk.initial_state(ENVS, device)
    state = tuple(map(torch.randn_like, state)) if isinstance(state, tuple) else torch.randn_like(state)
    starts = (torch.rand(STEPS, ENVS, generator=torch.Generator().manual_seed(1)) < 0.05).float().to(device)

    def per_step(x):
        carried, outputs = state, []
        for t in range(STEPS):
            y, carried = trunk(x[t : t + 1], carried, starts[t : t + 1])
            outputs.append(y)
        return torch.cat(outputs), carried

    loop_grads = torch.autograd.grad(per_step(x)[0].square().sum(), [x, *trunk.parameters()])
    pieces_grads = torch.autograd.grad(trunk(x, state, starts)[0].square().sum(), [x, *trunk.parameters()])
    for loop_grad, pieces_grad in zip(loop_grads, pieces_grads, strict=True):
        # float32 sums over 512 steps in another order (cuDNN's backward): 1e-5 of the largest entry
        torch.testing.assert_close(pieces_grad, loop_grad, atol=1e-5 * loop_grad.abs().max().item(), rtol=0)
    with torch.no_grad():  # and the final state (h, or h and c)
        loop_state, pieces_state = per_step(x)[1], trunk(x, state, starts)[1]
    if not isinstance(loop_state, tuple):  # the GRU's h alone
        loop_state, pieces_state = (loop_state,), (pieces_state,)
    for loop_part, pieces_part in zip(loop_state, pieces_state, strict=True):
        torch.testing.assert_close(pieces_part, loop_part, atol=1e-6, rtol=0)


def gru_trunk(backend: str, hidden_size: int, std: float):
    """ppo_gru.py's trunk in float64 with random weights, running nn.GRU (torch) or the C++ loops (auto)."""
    module = load(ROOT / "ppo_gru.py")
    return module, trunk_on(module, [*DOMAINS["classic"], "--hidden-size", str(hidden_size)], backend, std=std)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_the_gru_hand_written_backward_equals_autograd_through_nn_gru(backend):
    """ppo_gru.py's CPU gradient (`GRUBackward`, its step loop in torch or in C++) against autograd through the
    same `nn.GRU` pieces, in float64: the output, the input, the initial state and all four parameters, with
    episode starts inside the sequence; and the rollout's one step."""
    trunk = gru_trunk(backend, hidden_size=76, std=0.3)[1]
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, ENVS, 76, dtype=torch.float64, generator=generator, requires_grad=True)
    state = torch.randn(ENVS, 76, dtype=torch.float64, generator=generator, requires_grad=True)
    starts = (torch.rand(STEPS, ENVS, generator=generator) < 0.05).double()
    starts[[0, 60, 60], [1, 0, 2]] = 1  # a start at the first step, two environments starting together
    weights = torch.randn(STEPS, ENVS, 76, dtype=torch.float64, generator=generator)
    inputs = [x, state, *trunk.parameters()]

    def loss(y, final_state):
        return (y * weights).sum() + final_state.square().sum()

    y, final_state = trunk(x, state, starts)
    hand_written = torch.autograd.grad(loss(y, final_state), inputs)
    reference_y = trunk.pieces(x, state, starts)
    reference = torch.autograd.grad(loss(reference_y, reference_y[-1]), inputs)
    exact = backend == "torch"  # the forward is nn.GRU's own; the C++ loop adds in its own order
    torch.testing.assert_close(y, reference_y, rtol=0, atol=0 if exact else 1e-12)
    for grad, reference_grad in zip(hand_written, reference, strict=True):
        torch.testing.assert_close(grad, reference_grad, rtol=1e-10, atol=1e-12)
    assert state.grad is None and hand_written[1].abs().sum() > 0
    with torch.inference_mode():  # the rollout: one step, no autograd, a start for environment 1
        step, step_state = trunk(x[:1], state, starts[:1])
    torch.testing.assert_close(step, trunk.pieces(x[:1], state, starts[:1]), rtol=0, atol=0 if exact else 1e-12)
    assert torch.equal(step_state, step[0])


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_the_gru_hand_written_backward_passes_gradcheck(backend):
    """Finite differences, independent of nn.GRU's autograd: a small GRU, 12 steps, starts inside."""
    module, trunk = gru_trunk(backend, hidden_size=5, std=0.5)
    x = torch.randn(12, 3, 5, dtype=torch.float64, requires_grad=True)
    state = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    starts = torch.zeros(12, 3, dtype=torch.float64)
    starts[[0, 4, 4, 9], [0, 1, 2, 1]] = 1
    params = list(trunk.parameters())
    assert torch.autograd.gradcheck(
        lambda x, state, *params: module.GRUBackward.apply(x, state, starts, trunk, *params), (x, state, *params)
    )


def test_the_lstm_c_plus_plus_loops_equal_autograd_through_nn_lstm():
    """ppo_lstm.py's C++ loops (`LSTMSteps`) against autograd through the same `nn.LSTM` pieces, in float64: the
    outputs, the final (h, c), and the gradients of the input, the initial h and c and all four parameters,
    with episode starts inside the sequence; and the rollout's one step."""
    module = load(ROOT / "ppo_lstm.py")
    trunks = {
        backend: trunk_on(module, DOMAINS["classic"], backend, std=0.3, mean=0.1) for backend in ("auto", "torch")
    }
    assert trunks["auto"].kernel.startswith("C++ LSTM loops") and trunks["torch"].kernel.startswith("nn.LSTM")
    generator = torch.Generator().manual_seed(1)
    hidden = trunks["auto"].output_size
    x = torch.randn(STEPS, ENVS, hidden, dtype=torch.float64, generator=generator, requires_grad=True)
    state = [torch.randn(ENVS, hidden, dtype=torch.float64, generator=generator, requires_grad=True) for _ in "hc"]
    starts = (torch.rand(STEPS, ENVS, generator=generator) < 0.05).double()
    starts[[0, 60, 60], [1, 0, 2]] = 1  # a start at the first step, two environments starting together
    weights = torch.randn(STEPS, ENVS, hidden, dtype=torch.float64, generator=generator)
    results = {}
    for backend, trunk in trunks.items():
        y, (h, c) = trunk(x, state, starts)
        loss = (y * weights).sum() + h.square().sum() + (c * weights[0]).sum()
        with torch.inference_mode():  # the rollout: one step, no autograd, a start for environment 1
            step, step_state = trunk(x[:1], state, starts[:1])
        results[backend] = [y, h, c, *torch.autograd.grad(loss, [x, *state, *trunk.parameters()]), step, *step_state]
    names = ["y", "h", "c", "x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "step", "step h", "step c"]
    for name, loops, nn_lstm in zip(names, *results.values(), strict=True):
        torch.testing.assert_close(loops, nn_lstm, rtol=1e-10, atol=1e-12, msg=name)


def test_the_lstm_c_plus_plus_loops_pass_gradcheck():
    module = load(ROOT / "ppo_lstm.py")
    args = module.parse_args(DOMAINS["classic"] + ["--hidden-size", "5"])
    trunk = module.Trunk(args.hidden_size, args).double()
    assert trunk.cpu_kernels is not None, trunk.kernel  # CI's CPU has a compiler
    for param in trunk.parameters():
        torch.nn.init.normal_(param, std=0.5)
    inputs = [torch.randn(shape, dtype=torch.float64, requires_grad=True) for shape in ((12, 3, 5), (3, 5), (3, 5))]
    starts = torch.zeros(12, 3, dtype=torch.float64)
    starts[[0, 4, 4, 9], [0, 1, 2, 1]] = 1
    params = list(trunk.rnn.parameters())

    def lstm(x, h0, c0, *params):
        return module.LSTMSteps.apply(x, h0, c0, starts, trunk.cpu_kernels, *params)

    assert torch.autograd.gradcheck(lstm, (*inputs, *params))


@pytest.mark.parametrize("script", list(RECURRENT))
def test_the_c_plus_plus_loops_agree_with_nn_rnn_in_float32_at_the_memory_row_size(script):
    """The loops vectorise their sums in float32: at MiniGrid-MemoryS11 symbolic's width, 128 steps of 2
    environments with starts, a trunk with them and one with nn.LSTM / nn.GRU (the same weights) agree to
    float32 rounding in the outputs, the final state and every gradient."""
    module, results = load(ROOT / script), {}
    for backend in ("torch", "auto"):
        trunk = trunk_on(module, DOMAINS["minigrid-symbolic"], backend, torch.float32, std=0.1)
        generator = torch.Generator().manual_seed(1)
        x = torch.randn(STEPS, 2, trunk.output_size, generator=generator, requires_grad=True)
        state = trunk.initial_state(2, torch.device("cpu"))
        for part in torch.utils._pytree.tree_leaves(state):  # a warm state
            part.normal_(generator=generator)
        starts = (torch.rand(STEPS, 2, generator=generator) < 0.03).float()
        y, final_state = trunk(x, state, starts)
        weights = torch.randn(y.shape, generator=generator)
        results[backend] = [y, *torch.autograd.grad((y * weights).sum(), [x, *trunk.parameters()])]
        results[backend] += list(final_state) if isinstance(final_state, tuple) else [final_state]
    for nn_rnn, loops in zip(*results.values(), strict=True):
        assert_agree_to_float32_rounding(loops, nn_rnn)
