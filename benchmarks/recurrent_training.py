"""Time one training pass (forward + backward over whole rollout sequences) of the LSTM and GRU trunks.

The scripts cut each minibatch's sequences at the time steps where any environment starts and run the fused
kernel over the pieces ("chunks", what `Trunk.forward` does). This compares it, at each domain's default
size and minibatch of whole environments, with:

- "loop": one kernel call per time step, state zeroed at starts (CleanRL's `ppo_atari_lstm.py`, the paper);
- "segments": every episode segment cut out, padded to the longest and run in one call (DESIGN section 9);
- "bucketed": the same segments grouped by length (powers of two), one padded call per group;
- "packed": the same segments as one PackedSequence (no padding work, each segment's own final state).

Every method's outputs are checked against the loop's before timing. Prints a Markdown table.

    python benchmarks/recurrent_training.py                    # CPU
    python benchmarks/recurrent_training.py --device cuda      # cuDNN, TF32 off as in the invariant tests
"""

import argparse
import importlib.util
import itertools
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DOMAINS = {  # case -> flags: each script's domain defaults give the sizes
    "classic": ["--env-id", "CartPoleNoVel-v1"],
    "mujoco": ["--env-id", "HalfCheetah-v4"],
    "atari": ["--env-id", "ALE/Breakout-v5"],
    "minigrid-rgb": ["--env-id", "MiniGrid-MemoryS11-v0"],
    "minigrid-symbolic": ["--env-id", "MiniGrid-MemoryS11-v0", "--minigrid-obs", "symbolic"],
}


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def as_layers(state):
    return tuple(part[None] for part in state) if isinstance(state, tuple) else state[None]


def scaled(state, keep):
    return tuple(part * keep for part in state) if isinstance(state, tuple) else state * keep


def loop(trunk, x, state, starts):
    state, outputs = as_layers(state), []
    for t in range(len(x)):
        y, state = trunk.rnn(x[t : t + 1], scaled(state, (1.0 - starts[t])[None, :, None]))
        outputs.append(y)
    return torch.cat(outputs)


def cut_segments(x, state, starts):
    """Episode segments of every environment: (input [length, hidden], initial state, env, first step)."""
    segments = []
    for env in range(x.shape[1]):
        cuts = [0, *(torch.nonzero(starts[1:, env]).flatten() + 1).tolist(), len(x)]
        for begin, end in itertools.pairwise(cuts):
            carried = begin == 0 and not starts[0, env]
            initial = scaled(state, 1.0 if carried else 0.0)
            initial = tuple(part[env] for part in initial) if isinstance(initial, tuple) else initial[env]
            segments.append((x[begin:end, env], initial, env, begin))
    return segments


def initial_states(segments):
    initial = [seg[1] for seg in segments]
    if isinstance(initial[0], tuple):
        return tuple(torch.stack(parts)[None] for parts in zip(*initial, strict=True))
    return torch.stack(initial)[None]


def run_padded(trunk, segments, out, pack: bool = False):
    inputs = [seg[0] for seg in segments]
    if pack:  # PackedSequence: no work on padding, and each segment's own final state
        y, _ = trunk.rnn(torch.nn.utils.rnn.pack_sequence(inputs, enforce_sorted=False), initial_states(segments))
        y, _ = torch.nn.utils.rnn.pad_packed_sequence(y)
    else:
        y, _ = trunk.rnn(torch.nn.utils.rnn.pad_sequence(inputs), initial_states(segments))
    for index, (inputs, _, env, begin) in enumerate(segments):
        out[begin : begin + len(inputs), env] = y[: len(inputs), index]


def segments(trunk, x, state, starts):
    out = x.new_zeros(*x.shape[:2], trunk.output_size)
    run_padded(trunk, cut_segments(x, state, starts), out)
    return out


def packed(trunk, x, state, starts):
    out = x.new_zeros(*x.shape[:2], trunk.output_size)
    run_padded(trunk, cut_segments(x, state, starts), out, pack=True)
    return out


def bucketed(trunk, x, state, starts):
    out, groups = x.new_zeros(*x.shape[:2], trunk.output_size), {}
    for segment in cut_segments(x, state, starts):
        groups.setdefault((len(segment[0]) - 1).bit_length(), []).append(segment)
    for group in groups.values():
        run_padded(trunk, group, out)
    return out


def chunks(trunk, x, state, starts):
    return trunk(x, state, starts)[0]


METHODS = {"loop": loop, "chunks": chunks, "segments": segments, "bucketed": bucketed, "packed": packed}


def time_method(method, trunk, x, state, starts, device, repeats: int) -> float:
    times = []
    for _ in range(repeats + 2):  # two warm-ups
        trunk.zero_grad()
        if device.type == "cuda":
            torch.cuda.synchronize()
        tic = time.perf_counter()
        method(trunk, x, state, starts).square().mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - tic)
    return 1e3 * statistics.median(times[2:])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--scripts", nargs="+", default=["ppo_lstm", "ppo_gru"])
    parser.add_argument("--start-probabilities", nargs="+", type=float, default=[0.01, 0.05])
    parser.add_argument("--repeats", type=int, default=10)
    options = parser.parse_args()
    device = torch.device(options.device)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {options.device}"
          + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else ""))  # fmt: skip
    print("\n| script | case | hidden | envs x steps | P(start) | " + " | ".join(METHODS) + " | loop / chunks |")
    print("|---" * (6 + len(METHODS)) + "|")
    for name in options.scripts:
        module = load(name)
        for case, flags in DOMAINS.items():
            args = module.parse_args(flags)
            envs, steps = args.num_envs // args.num_minibatches, args.num_steps
            torch.manual_seed(0)
            trunk = module.Trunk(args.hidden_size, args).to(device)
            x = torch.randn(steps, envs, args.hidden_size, device=device)
            state = trunk.initial_state(envs, device)  # a warm state, so carrying it in is checked too
            state = tuple(map(torch.randn_like, state)) if isinstance(state, tuple) else torch.randn_like(state)
            for probability in options.start_probabilities:
                generator = torch.Generator().manual_seed(1)
                starts = (torch.rand(steps, envs, generator=generator) < probability).float().to(device)
                with torch.no_grad():
                    reference = loop(trunk, x, state, starts)
                    for method in METHODS.values():
                        torch.testing.assert_close(method(trunk, x, state, starts), reference, atol=1e-5, rtol=0)
                ms = {key: time_method(method, trunk, x, state, starts, device, options.repeats)
                      for key, method in METHODS.items()}  # fmt: skip
                cells = " | ".join(f"{ms[key]:.1f} ms" for key in METHODS)
                print(f"| {name}.py | {case} | {args.hidden_size} | {envs} x {steps} | {probability} | {cells} | "
                      f"{ms['loop'] / ms['chunks']:.1f}x |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
