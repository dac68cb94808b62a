"""Steps per second of PPO against the random-policy ceiling of the same wrapped vector env, in one run.

For each domain's default config: the env alone under random actions (the ceiling), then a short real
training run of each script in a fresh process, read back from its summary.json (overall, rollout and update
steps/s, each against the first script's, inference latency, peak CPU RSS and GPU memory). Prints a Markdown
table for docs/performance.md.

    python benchmarks/throughput.py                               # ppo_mlp.py, every config
    python benchmarks/throughput.py --scripts ppo_mlp.py ppo_lstm.py --configs cartpole-novel memory-rgb
    python benchmarks/throughput.py --scripts ppo_mlp.py ppo_lstm.py --configs cartpole-novel --updates 489  # 500 k
    python benchmarks/throughput.py --configs breakout breakout-async memory-rgb memory-rgb-async  # --async-envs
"""

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {
    "cartpole": (["--env-id", "CartPole-v1"], 40),
    "cartpole-4-epochs": (["--env-id", "CartPole-v1", "--update-epochs", "4"], 40),  # CleanRL's epochs
    "cartpole-novel": (["--env-id", "CartPoleNoVel-v1"], 40),
    "cartpole-novel-fs4": (["--env-id", "CartPoleNoVel-v1", "--frame-stack", "4"], 40),
    "halfcheetah": (["--env-id", "HalfCheetah-v4"], 10),
    "breakout": (["--env-id", "ALE/Breakout-v5"], 3),
    "breakout-async": (["--env-id", "ALE/Breakout-v5", "--async-envs"], 3),
    "memory-rgb": (["--env-id", "MiniGrid-MemoryS11-v0"], 3),
    "memory-rgb-async": (["--env-id", "MiniGrid-MemoryS11-v0", "--async-envs"], 3),
    "memory-symbolic": (["--env-id", "MiniGrid-MemoryS11-v0", "--minigrid-obs", "symbolic"], 10),
    "doorkey-symbolic": (["--env-id", "MiniGrid-DoorKey-8x8-v0", "--minigrid-obs", "symbolic"], 10),
}  # name -> (flags, PPO updates to time)


def random_policy_sps(module, flags: list[str], seconds: float = 5.0) -> float:
    args = module.parse_args(flags)
    envs = module.make_envs(args, "")
    envs.reset(seed=0)
    envs.action_space.seed(0)
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        envs.step(envs.action_space.sample())
        steps += args.num_envs
    envs.close()
    return steps / (time.perf_counter() - start)


def ppo_summary(script: Path, flags: list[str], updates: int, batch_size: int) -> dict:
    with tempfile.TemporaryDirectory() as cwd:
        command = [sys.executable, str(script), *flags, "--total-timesteps", str(updates * batch_size)]
        subprocess.run([*command, "--exp-name", "throughput"], cwd=cwd, check=True, capture_output=True)
        (summary,) = Path(cwd).glob("runs/*/summary.json")
        return json.loads(summary.read_text())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scripts", nargs="+", default=["ppo_mlp.py"])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--updates", type=int, help="PPO updates to time in every config (default: the config's)")
    options = parser.parse_args()
    spec = importlib.util.spec_from_file_location("template", ROOT / "ppo_mlp.py")
    template = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(template)

    print(
        f"| config | script | envs | random-policy SPS | PPO SPS | ratio | x {options.scripts[0]} | rollout SPS "
        "| update SPS | update share | latency ms | forward share of rollout | peak RSS GB | GPU GB | params |"
    )
    print("|---" * 15 + "|")  # fmt: skip
    for name in options.configs:
        flags, updates = CONFIGS[name]
        updates = options.updates or updates
        ceiling = random_policy_sps(template, flags)
        first_sps = None
        for script in options.scripts:
            args = template.parse_args(flags)
            s = ppo_summary(ROOT / script, flags, updates, args.batch_size)
            first_sps = first_sps or s["sps"]
            gpu = "-" if s["gpu_mem_allocated_gb"] is None else f"{s['gpu_mem_allocated_gb']:.3f}"
            # Where the time goes: the update's share of a PPO iteration, and the network's share of the rollout
            # (one batched forward per env step against the time of that whole step).
            update_share = s["rollout_sps"] / (s["rollout_sps"] + s["update_sps"])
            forward_share = s["inference_latency_ms"] / 1e3 / (args.num_envs / s["rollout_sps"])
            print(
                f"| {name} | {script} | {args.num_envs} | {ceiling:,.0f} | {s['sps']:,.0f} | {s['sps'] / ceiling:.2f} "
                f"| {s['sps'] / first_sps:.2f} | {s['rollout_sps']:,.0f} | {s['update_sps']:,.0f} | {update_share:.0%} "
                f"| {s['inference_latency_ms']:.3f} | {forward_share:.0%} | {s['cpu_rss_gb']:.2f} | {gpu} "
                f"| {s['params']:,} |",
                flush=True,
            )
    print(f"\n{s['device']}; torch {s['versions']['torch']}, gymnasium {s['versions']['gymnasium']}")


if __name__ == "__main__":
    main()
