"""Forward + backward of the Mamba trunks' recurrences over one training minibatch, against autograd through a
per-step loop: why ppo_mamba.py's scan has a hand-written backward (and, on the CPU, a C++ loop) and
ppo_mamba2.py's torch path has no loop at all (and, on the CPU, a C++ loop too).

Each row times the recurrence alone (inputs already projected), T = 128 steps, episode starts with probability
0.03, float32, on whatever device is given:

- Mamba (x [T, E, D], A [D, S]): autograd through `h = decay_t * h + input_t` iterated with `unbind`, against
  `SelectiveScan` (one torch loop each way, hand-written backward) and, on the CPU, the C++ scan that
  `--mamba-backend auto` runs (`cpu_kernels`); each with dt's softplus before it and the D skip and SiLU(z) gate
  after it, which the C++ scan fuses;
- Mamba-2 (x [T, E, H, P], scalar A per head): autograd through the same per-step loop, against `ssd` (chunked,
  no loop over steps) and, on the CPU, the C++ SSD that `--mamba-backend auto` runs (`cpu_kernels`).

    python benchmarks/mamba_scan.py                 # the CPU, classic-control sizes
    python benchmarks/mamba_scan.py --device cuda
"""

import argparse
import time

import torch
from common import load_script

MAMBA, MAMBA2 = load_script("ppo_mamba"), load_script("ppo_mamba2")


def autograd_loop(decay, inputs, C, state):
    """The textbook recurrence, differentiated by autograd: one multiply-add and one readout per step."""
    outputs = []
    for decay_t, input_t, C_t in zip(decay.unbind(0), inputs.unbind(0), C.unbind(0), strict=True):
        state = decay_t * state + input_t
        outputs.append((state * C_t).sum(-1))
    return torch.stack(outputs), state


def gate(y, x, D, z):
    """What the mixer does with the scan's output: the D skip and the SiLU(z) gate."""
    return (y + x * D) * torch.nn.functional.silu(z)


def mamba_loop(x, dt_raw, A, B, C, starts, state, D, z):
    dt = torch.nn.functional.softplus(dt_raw)
    decay = torch.exp(dt[..., None] * A).masked_fill(starts[..., None, None], 0)
    y, h = autograd_loop(decay, (dt * x)[..., None] * B[:, :, None], C[:, :, None], state)
    (gate(y, x, D, z).sum() + h.sum()).backward()


def mamba_scan(x, dt_raw, A, B, C, starts, state, D, z):
    dt = torch.nn.functional.softplus(dt_raw)
    y, h = MAMBA.SelectiveScan.apply(x, dt, A, B, C, (~starts).float(), state)
    (gate(y, x, D, z).sum() + h.sum()).backward()


def mamba_cpu_scan(kernel):
    def run(x, dt_raw, A, B, C, starts, state, D, z):  # the softplus and the gate inside the C++ loops
        y, h = MAMBA.CpuSelectiveScan.apply(x, dt_raw, A, B, C, (~starts).float(), state, D, z, kernel)
        (y.sum() + h.sum()).backward()

    return run


def mamba2_loop(x, dt, A, B, C, starts, state):
    decay = torch.exp(dt * A).masked_fill(starts[..., None], 0)[..., None, None]
    inputs = (dt[..., None] * x)[..., None] * B[:, :, None, None]
    y, h = autograd_loop(decay, inputs, C[:, :, None, None], state)
    (y.sum() + h.sum()).backward()


def mamba2_ssd(x, dt, A, B, C, starts, state):
    y, h = MAMBA2.ssd(x, dt, A, B, C, starts, state, 64)
    (y.sum() + h.sum()).backward()


def mamba2_cpu_ssd(kernels):
    def run(x, dt, A, B, C, starts, state):
        y, h = MAMBA2.CpuSSD.apply(x, dt, A, B, C, (~starts).float(), state, kernels)
        (y.sum() + h.sum()).backward()

    return run


def timed(function, inputs, device, repeats: int) -> float:
    function(*inputs)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        function(*inputs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3


def leaf(*shape, device, positive: bool = False) -> torch.Tensor:
    t = torch.randn(*shape, device=device)
    return (torch.nn.functional.softplus(t) if positive else t).requires_grad_()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=20)
    options = parser.parse_args()
    device = torch.device(options.device)
    cpu_kernel = cpu_kernels = None
    if device.type == "cpu":
        (cpu_kernel, why_torch), (cpu_kernels, why_torch_2) = MAMBA.cpu_kernels(), MAMBA2.cpu_kernels()
        for why in (why_torch, why_torch_2):
            if why:
                print(why)
    steps = 128
    print("| trunk | envs | state per env | autograd loop ms | ours ms | speed-up |\n|---|---|---|---|---|---|")
    for envs in (8, 16):
        torch.manual_seed(0)
        starts = torch.rand(steps, envs, device=device) < 0.03
        for inner, state_size in ((136, 8), (128, 16)):  # classic control's defaults, and the paper's N = 16
            inputs = (leaf(steps, envs, inner, device=device), leaf(steps, envs, inner, device=device),
                      (-torch.rand(inner, state_size, device=device)).requires_grad_(),
                      leaf(steps, envs, state_size, device=device), leaf(steps, envs, state_size, device=device),
                      starts, torch.zeros(envs, inner, state_size, device=device), leaf(inner, device=device),
                      leaf(steps, envs, inner, device=device))  # fmt: skip
            slow, fast = (timed(f, inputs, device, options.repeats) for f in (mamba_loop, mamba_scan))
            print(f"| Mamba | {envs} | {inner} x {state_size} | {slow:.1f} | {fast:.1f} | {slow / fast:.1f}x |")
            if cpu_kernel is not None:
                fast = timed(mamba_cpu_scan(cpu_kernel), inputs, device, options.repeats)
                row = f"| Mamba, C++ scan | {envs} | {inner} x {state_size} | {slow:.1f} | {fast:.1f}"
                print(f"{row} | {slow / fast:.1f}x |")
        heads, head_size, state_size = 5, 32, 16  # classic control's defaults
        inputs = (leaf(steps, envs, heads, head_size, device=device),
                  leaf(steps, envs, heads, device=device, positive=True),
                  (-torch.rand(heads, device=device)).requires_grad_(),
                  leaf(steps, envs, state_size, device=device), leaf(steps, envs, state_size, device=device),
                  starts, torch.zeros(envs, heads, head_size, state_size, device=device))  # fmt: skip
        slow, fast = (timed(f, inputs, device, options.repeats) for f in (mamba2_loop, mamba2_ssd))
        size = f"{heads} x {head_size} x {state_size}"
        print(f"| Mamba-2 | {envs} | {size} | {slow:.1f} | {fast:.1f} | {slow / fast:.1f}x |")
        if cpu_kernels is not None:
            fast = timed(mamba2_cpu_ssd(cpu_kernels), inputs, device, options.repeats)
            print(f"| Mamba-2, C++ SSD | {envs} | {size} | {slow:.1f} | {fast:.1f} | {slow / fast:.1f}x |")
    print(f"\n{torch.__version__}, {device}, {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
