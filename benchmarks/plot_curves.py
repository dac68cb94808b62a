"""Learning curves from runs' episodes.csv: the mean return of the last 100 episodes against env steps.

python benchmarks/plot_curves.py docs/figures/cartpole.png runs/CartPole-v1__* --target 475
"""

import argparse
import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def curve(run_dir: Path, window: int = 100) -> tuple[list[int], list[float]]:
    with open(run_dir / "episodes.csv") as f:
        rows = [(int(step), float(ret)) for step, ret, _ in list(csv.reader(f))[1:]]
    steps, means = [], []
    for i, (step, _) in enumerate(rows):
        recent = [ret for _, ret in rows[max(0, i + 1 - window) : i + 1]]
        steps.append(step)
        means.append(sum(recent) / len(recent))
    return steps, means


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", type=Path)
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--target", type=float, help="draw the issue's threshold")
    options = parser.parse_args()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for run_dir in options.runs:
        summary = json.loads((run_dir / "summary.json").read_text())
        flags = summary["args"]
        label = f"{summary['script']} {summary['env_id']}" + (
            f" --frame-stack {flags['frame_stack']}" if flags["frame_stack"] > 1 else ""
        )
        label += f" [{flags['exp_name']}]" if flags["exp_name"] != Path(summary["script"]).stem else ""
        ax.plot(*curve(run_dir), label=f"{label} (seed {summary['seed']}): {summary['final_return_mean']:.2f}")
    if options.target is not None:
        ax.axhline(options.target, color="gray", linestyle="--", linewidth=1, label=f"target {options.target:g}")
    ax.set_xlabel("environment steps")
    ax.set_ylabel("return, mean of last 100 episodes")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    options.output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(options.output, dpi=110)


if __name__ == "__main__":
    main()
