"""Time one training pass (forward + backward over whole rollout sequences) of the LSTM and GRU trunks.

The scripts cut each minibatch's sequences at the time steps where any environment starts and run the fused
kernel over the pieces ("chunks", what `Trunk.forward` does). This compares it, at each domain's default
size and minibatch of whole environments, with:

- "loop": one kernel call per time step, state zeroed at starts (CleanRL's `ppo_atari_lstm.py`, the paper);
- "segments": every episode segment cut out, padded to the longest and run in one call (DESIGN section 9);
- "bucketed": the same segments grouped by length (powers of two), one padded call per group;
- "packed": the same segments as one PackedSequence (no padding work, each segment's own final state).

The segment methods cut and scatter with tensor indexing (no Python loop over segments), as a real
implementation would; they return outputs only (the final state is what padding gets wrong).

Every method's outputs are checked against the loop's before timing. Prints a Markdown table.

    python benchmarks/recurrent_training.py                    # CPU
    python benchmarks/recurrent_training.py --device cuda      # cuDNN, TF32 off as in the invariant tests
"""

import argparse
import statistics
import time

import torch
from common import load_script

DOMAINS = {  # case -> flags: each script's domain defaults give the sizes
    "classic": ["--env-id", "CartPoleNoVel-v1"],
    "mujoco": ["--env-id", "HalfCheetah-v4"],
    "atari": ["--env-id", "ALE/Breakout-v5"],
    "minigrid-rgb": ["--env-id", "MiniGrid-MemoryS11-v0"],
    "minigrid-symbolic": ["--env-id", "MiniGrid-MemoryS11-v0", "--minigrid-obs", "symbolic"],
}


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


def segment_layout(state, starts):
    """Every step's episode segment and position in it (segments numbered env by env, each env's first one
    carrying the stored state unless it starts at 0), built with tensor ops: no loop over segments."""
    num_steps, num_envs = starts.shape
    first = starts.T.clone()
    first[:, 0] = 1
    segment = first.reshape(-1).cumsum(0).long() - 1
    begins = torch.nonzero(first.reshape(-1)).flatten()
    position = torch.arange(len(segment), device=starts.device) - begins[segment]
    env, carried = begins // num_steps, (begins % num_steps == 0) & (starts[0, begins // num_steps] == 0)
    keep = carried.float()[:, None]
    if isinstance(state, tuple):
        initial = tuple(part[env] * keep for part in state)
    else:
        initial = state[env] * keep
    lengths = torch.bincount(segment)
    return segment.view(num_envs, num_steps).T, position.view(num_envs, num_steps).T, lengths, initial


def select(state, index):
    return tuple(part[index][None] for part in state) if isinstance(state, tuple) else state[index][None]


def segments(trunk, x, state, starts, pack: bool = False):
    segment, position, lengths, initial = segment_layout(state, starts)
    padded = x.new_zeros(int(lengths.max()), len(lengths), x.shape[-1]).index_put((position, segment), x)
    if pack:  # PackedSequence: no work on padding
        packed_input = torch.nn.utils.rnn.pack_padded_sequence(padded, lengths.cpu(), enforce_sorted=False)
        y, _ = torch.nn.utils.rnn.pad_packed_sequence(trunk.rnn(packed_input, select(initial, slice(None)))[0])
    else:
        y, _ = trunk.rnn(padded, select(initial, slice(None)))
    return y[position, segment]


def packed(trunk, x, state, starts):
    return segments(trunk, x, state, starts, pack=True)


def bucketed(trunk, x, state, starts):
    """Segments grouped by length (powers of two), one padded call per group."""
    segment, position, lengths, initial = segment_layout(state, starts)
    bucket = torch.ceil(torch.log2(lengths.float())).long()
    out = x.new_zeros(*x.shape[:2], trunk.output_size)
    for k in torch.unique(bucket).tolist():
        members = torch.nonzero(bucket == k).flatten()
        local = torch.full_like(bucket, -1).index_put((members,), torch.arange(len(members), device=x.device))
        steps = torch.nonzero(bucket[segment] == k).unbind(1)
        index = (position[steps], local[segment[steps]])
        padded = x.new_zeros(int(lengths[members].max()), len(members), x.shape[-1]).index_put(index, x[steps])
        y, _ = trunk.rnn(padded, select(initial, members))
        out = out.index_put(steps, y[index])
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
        module = load_script(name)
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
