"""Memory length M of the attention trunks: speed and memory for each M, in one run, against ppo_mlp.py.

1. A short real training run of each script per M in a fresh process, read back from its summary.json: steps/s
   (overall and update phase), median rollout inference latency, peak CPU RSS and peak GPU memory allocated.
2. One environment driven through a single long episode, one rollout step at a time: the state's size and the
   peak memory allocated by a step (GPU) or the step's latency stay flat as the episode grows past M, because
   the state is the last M layer inputs and nothing else.

    python benchmarks/attention_memory.py                               # CartPoleNoVel-v1, M = 32 64 128 256
    python benchmarks/attention_memory.py --env-id MiniGrid-MemoryS11-v0 --minigrid-obs symbolic --updates 10
    python benchmarks/attention_memory.py --device cuda
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import ROOT, load_script


def training_summary(script: str, flags: list[str], device: str) -> dict:
    with tempfile.TemporaryDirectory() as cwd:
        command = [sys.executable, str(ROOT / script), *flags, "--exp-name", "attention_memory"]
        command += [] if device == "cuda" else ["--no-cuda"]
        subprocess.run(command, cwd=cwd, check=True, capture_output=True)
        (summary,) = Path(cwd).glob("runs/*/summary.json")
        return json.loads(summary.read_text())


def long_episode(module, env_flags: list[str], memory_length: int, lengths: list[int], device: torch.device):
    """Latency and memory of one rollout step after `length` steps of the same episode."""
    torch.manual_seed(0)
    args = module.parse_args([*env_flags, "--memory-length", str(memory_length)])
    env = module.make_env(args, 0, "")()
    agent = module.Agent(env.observation_space, env.action_space, args).to(device)
    obs = torch.as_tensor(env.reset(seed=0)[0], device=device)[None, None]
    env.close()
    state, starts, rows, step = agent.initial_state(1, device), torch.ones(1, 1, device=device), [], 0
    for length in lengths:
        with torch.no_grad():
            while step < length:  # the same observation every step: only the episode's length changes
                _, _, _, _, state = agent.get_action_and_value(obs, state, starts)
                starts, step = torch.zeros_like(starts), step + 1
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            times = []
            for _ in range(50):  # timed steps that do not extend the episode: the state is not kept
                tic = time.perf_counter()
                agent.get_action_and_value(obs, state, starts)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - tic)
        state_kb = sum(part.numel() * part.element_size() for part in state) / 1024
        peak = torch.cuda.max_memory_allocated(device) / 1024**2 if device.type == "cuda" else None
        rows.append((length, state_kb, 1e3 * sorted(times)[len(times) // 2], peak))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env-id", default="CartPoleNoVel-v1")
    parser.add_argument("--minigrid-obs", default="rgb")
    parser.add_argument("--memory-lengths", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--updates", type=int, default=20, help="PPO updates per training run")
    parser.add_argument("--episode-lengths", type=int, nargs="+", default=[1, 100, 1000, 5000])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    options = parser.parse_args()
    env_flags = ["--env-id", options.env_id, "--minigrid-obs", options.minigrid_obs]
    batch_size = load_script("ppo_mlp").parse_args(env_flags).batch_size
    flags = [*env_flags, "--total-timesteps", str(options.updates * batch_size)]

    print(f"Training, {options.env_id}, {options.updates} updates, {options.device}\n")
    print("| script | M | SPS | x MLP | update SPS | latency ms | peak RSS GB | GPU allocated GB | params |")
    print("|---" * 9 + "|")
    mlp = training_summary("ppo_mlp.py", flags, options.device)

    def print_row(script: str, label, s: dict):  # each row as soon as it is measured
        gpu = "-" if s["gpu_mem_allocated_gb"] is None else f"{s['gpu_mem_allocated_gb']:.3f}"
        row = f"| {script} | {label} | {s['sps']:,.0f} | {s['sps'] / mlp['sps']:.2f} | {s['update_sps']:,.0f} "
        row += f"| {s['inference_latency_ms']:.2f} | {s['cpu_rss_gb']:.2f} | {gpu} | {s['params']:,} |"
        print(row, flush=True)

    print_row("ppo_mlp.py", "-", mlp)
    for script in ("ppo_trxl.py", "ppo_gtrxl.py"):
        for memory_length in options.memory_lengths:
            summary = training_summary(script, [*flags, "--memory-length", str(memory_length)], options.device)
            print_row(script, memory_length, summary)

    device = torch.device(options.device)
    print(f"\nOne episode, one environment, rollout steps ({device})\n")
    print("| script | M | episode length | state KB | step latency ms | peak allocated by a step MB |")
    print("|---" * 6 + "|")
    for script in ("ppo_trxl", "ppo_gtrxl"):
        module = load_script(script)
        for memory_length in options.memory_lengths:
            for length, state_kb, latency, peak in long_episode(
                module, env_flags, memory_length, options.episode_lengths, device
            ):
                peak = "-" if peak is None else f"{peak:.2f}"
                row = f"| {script}.py | {memory_length} | {length:,} | {state_kb:.1f} | {latency:.3f} | {peak} |"
                print(row, flush=True)


if __name__ == "__main__":
    main()
