"""How much of an input reaches ppo_mamba2.py's trunk output t steps later, before any training.

For each initialisation (dt range, -A range, D), the norm of d y_t / d x_0 for t = 0, 2, 5, 10, 20 (a random
projection of the output, 32 sequences of random inputs, the MiniGrid-MemoryS11 symbolic row's sizes without the
post-MLP, mean over 3 seeds), and its ratio at t = 10 to t = 0. At t = 0 the residual path dominates; from t = 4
on (past the convolution's window) only the SSM state carries x_0.

    python benchmarks/mamba2_memory_at_init.py
"""

import torch
from common import load_script

mamba2 = load_script("ppo_mamba2")
STARTS = {  # name -> extra flags
    "reference (dt 0.001-0.1, -A 1-16, D 1)": ["--dt-init", "1e-3", "1e-1", "--a-init", "1", "16", "--d-init", "1"],
    "D 0": ["--dt-init", "1e-3", "1e-1", "--a-init", "1", "16", "--d-init", "0"],
    "dt 0.1-1, -A 0.05-1": ["--dt-init", "0.1", "1", "--a-init", "0.05", "1", "--d-init", "1"],
    "dt 0.1-1, -A 0.05-1, D 0": ["--dt-init", "0.1", "1", "--a-init", "0.05", "1", "--d-init", "0"],
}
LAGS = (0, 2, 5, 10, 20)


def reach(flags: list[str], seed: int) -> list[float]:
    args = mamba2.parse_args(
        ["--env-id", "MiniGrid-MemoryS11-v0", "--minigrid-obs", "symbolic", "--no-post-mlp", *flags]
    )
    torch.manual_seed(seed)
    trunk = mamba2.Trunk(args.hidden_size, args)
    x = torch.randn(max(LAGS) + 5, 32, args.hidden_size, requires_grad=True)
    starts = torch.zeros(x.shape[:2])
    starts[0] = 1
    y, _ = trunk(x, trunk.initial_state(32, x.device), starts)
    projection = torch.randn(args.hidden_size)
    return [torch.autograd.grad((y[t] @ projection).sum(), x, retain_graph=True)[0][0].norm().item() for t in LAGS]


def main():
    torch.set_num_threads(1)
    print("| start | " + " | ".join(f"t = {t}" for t in LAGS) + " | t = 10 / t = 0 |")
    print("|---" * (len(LAGS) + 2) + "|")
    for name, flags in STARTS.items():
        norms = torch.tensor([reach(flags, seed) for seed in range(3)]).mean(0)
        cells = " | ".join(f"{value:.4f}" for value in norms)
        print(f"| {name} | {cells} | {norms[LAGS.index(10)] / norms[0]:.4f} |")


if __name__ == "__main__":
    main()
