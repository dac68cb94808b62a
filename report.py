"""Turn the runs of `benchmark.sh` (or of any `ppo_*.py`) into the paper's tables and learning curves.

    python report.py runs/ --out results/

Reads every `summary.json` under the given directories. A cell is one architecture (a `--no-state-reset` run
is its own row, "lstm (leak)"), one environment and one seed; when a cell was run more than once, the runs of
its largest budget (`--total-timesteps`) count, so a quick pass never stands in for the full one, and of those
the newest complete run, else the newest (by the start time that ends each run's name). The grid is every row
x every environment x every seed seen: a cell with no run is reported missing, one that failed or was
interrupted is reported with its reason, and neither is dropped in silence. Writes to the output directory,
each table as Markdown and CSV:

    efficiency       per architecture, averaged over environments: steps/s, inference latency, GPU memory
                     allocated and reserved, CPU RSS, parameters (the paper's efficiency table)
    speed            steps/s per architecture and environment, and the hours a cell of that budget needs
    returns          final return (mean of the last 100 episodes) mean +- sample std over seeds
    aggregate        IQM and optimality gap of normalised returns across environments, with 95% stratified
                     bootstrap confidence intervals (rliable, Agarwal et al. 2021)
    problems         corrupt summaries and cells that are missing, failed, interrupted or still running
    curves/<env>.png one learning curve per environment: every architecture, mean and +-1 std over seeds
    report.md        all of the above on one page
"""

import argparse
import csv
import json
import math
import sys
import warnings
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from rliable import library as rly
from rliable import metrics

# Returns are normalised per environment as (return - random) / (reference - random): 0 is a random policy, 1
# the reference. Each score names its source; MiniGrid and masked classic control use this project's own
# build of the task (MiniGrid: a 96-step TimeLimit, the env's own reward scale), so their figures were computed
# for it.
REFERENCE_SCORES = {
    # env id: (random, reference, source)
    "HalfCheetah-v4": (-280.178953, 12135.0, "D4RL REF_MIN/MAX_SCORE (random and expert policies), Fu et al. 2020"),
    "Hopper-v4": (-20.272305, 3234.3, "D4RL REF_MIN/MAX_SCORE (random and expert policies), Fu et al. 2020"),
    "Walker2d-v4": (1.629008, 4592.3, "D4RL REF_MIN/MAX_SCORE (random and expert policies), Fu et al. 2020"),
    "ALE/Breakout-v5": (1.7, 864.0, "random: Mnih et al. 2015; reference: the game's maximum (two walls of 432)"),
    "ALE/Pong-v5": (-20.7, 21.0, "random: Mnih et al. 2015; reference: the game's maximum (21-0)"),
    "CartPoleNoVel-v1": (22.2, 500.0, "random: benchmarks/reference_scores.py; reference: CartPole-v1's time limit"),
    "LunarLanderNoVel-v3": (
        -181.7,
        200.0,
        "random: benchmarks/reference_scores.py; reference: LunarLander-v3's reward_threshold ('solved')",
    ),
    "MiniGrid-DoorKey-8x8-v0": (
        0.0,
        0.9763,
        "benchmarks/reference_scores.py: random policy; reference: the shortest path with the whole grid known",
    ),
    "MiniGrid-MemoryS11-v0": (
        0.144,
        0.9798,
        "random: benchmarks/reference_scores.py; reference: best possible mean return, benchmarks/memory_optimum.py",
    ),
}
EFFICIENCY_FIELDS = [  # (summary key, column title, format)
    ("sps", "steps/s", "{:,.0f}"),
    ("update_sps", "update steps/s", "{:,.0f}"),
    ("inference_latency_ms", "latency ms", "{:.3f}"),
    ("gpu_mem_allocated_gb", "GPU alloc GB", "{:.3f}"),
    ("gpu_mem_reserved_gb", "GPU reserved GB", "{:.3f}"),
    ("cpu_rss_gb", "CPU RSS GB", "{:.2f}"),
    ("params", "params", "{:,.0f}"),
]
REQUIRED_KEYS = ["arch", "env_id", "seed", "status", "args", "total_timesteps", "global_step"]
ARCH_ORDER = ["mlp", "lstm", "gru", "trxl", "gtrxl", "mamba", "mamba2"]


def read_summaries(directories: list[Path]) -> tuple[list[dict], list[tuple[str, str]]]:
    """Every readable summary (with its directory) and every unreadable one (path, why)."""
    summaries, corrupt = [], []
    for directory in directories:
        for path in sorted(directory.rglob("summary.json")):
            try:
                summary = json.loads(path.read_text())
                absent = [key for key in REQUIRED_KEYS if key not in summary]
                if absent:
                    raise KeyError(f"no {', '.join(absent)}")
                row = row_label(summary)
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
                corrupt.append((str(path), f"{type(error).__name__}: {error}"))
                print(f"report.py: skipping {path}: {type(error).__name__}: {error}", file=sys.stderr)
                continue
            summaries.append(summary | {"row": row, "dir": path.parent})
    return summaries, corrupt


def row_label(summary: dict) -> str:
    return summary["arch"] + (" (leak)" if summary["args"].get("no_state_reset") else "")


def row_order(row: str) -> tuple:
    arch = row.split()[0]
    return (ARCH_ORDER.index(arch) if arch in ARCH_ORDER else len(ARCH_ORDER), arch, row)


def started(summary: dict) -> float:
    """When a run started: the unix time its name ends with (`<env>__<exp>__<seed>__<time>`, as every script
    names its runs), else its folder's modification time (which a copy or a checkout resets)."""
    stamp = str(summary.get("run_name") or summary["dir"].name).rsplit("__", 1)[-1]
    return float(stamp) if stamp.isdigit() else summary["dir"].stat().st_mtime


def choose_cells(summaries: list[dict]) -> dict[tuple, dict]:
    """(row, env, seed) -> the run that counts: of the runs with the cell's largest budget, the newest complete
    one, else the newest."""
    runs = defaultdict(list)
    for summary in summaries:
        runs[summary["row"], summary["env_id"], summary["seed"]].append(summary)
    return {
        cell: max(candidates, key=lambda s: (s["total_timesteps"], s["status"] == "complete", started(s)))
        for cell, candidates in runs.items()
    }


def fmt(value, pattern: str) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else pattern.format(value)


def mean_or_none(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def write_table(out: Path, name: str, header: list[str], rows: list[list], note: str = "") -> str:
    """Write name.csv and name.md; return the Markdown."""
    with open(out / f"{name}.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    lines = [f"| {' | '.join(header)} |", f"|{'---|' * len(header)}"]
    lines += [f"| {' | '.join(str(cell) for cell in row)} |" for row in rows]
    markdown = "\n".join(lines) + "\n" + (f"\n{note}\n" if note else "")
    (out / f"{name}.md").write_text(markdown)
    return markdown


class Grid:
    """The cells that count, and the grid they span: every row x every environment x every seed seen."""

    def __init__(self, summaries: list[dict]):
        self.cells = choose_cells(summaries)
        self.rows = sorted({row for row, _, _ in self.cells}, key=row_order)
        known = list(REFERENCE_SCORES)
        self.envs = sorted({env for _, env, _ in self.cells}, key=lambda e: (known.index(e) if e in known else 99, e))
        self.seeds = sorted({seed for _, _, seed in self.cells})
        self.complete = defaultdict(list)  # (row, env) -> complete runs, by seed
        for (row, env, _), summary in sorted(self.cells.items(), key=lambda item: item[0][2]):
            if summary["status"] == "complete":
                self.complete[row, env].append(summary)

    def runs(self, row: str, env: str) -> list[dict]:
        return [s for (r, e, _), s in self.cells.items() if (r, e) == (row, env)]


def problems_table(out: Path, grid: Grid, corrupt: list[tuple[str, str]]) -> str:
    """Corrupt summaries, and every cell of the grid that is missing or not complete: nothing is dropped."""
    table = [[path, "", "", "corrupt summary", why] for path, why in corrupt]
    for row in grid.rows:
        for env in grid.envs:
            for seed in grid.seeds:
                summary = grid.cells.get((row, env, seed))
                if summary is None:
                    table.append([row, env, seed, "missing", "no run"])
                elif summary["status"] != "complete":
                    table.append([row, env, seed, summary["status"], summary.get("reason") or str(summary["dir"])])
    markdown = write_table(out, "problems", ["run", "env", "seed", "status", "reason"], table)
    return markdown if table else "None.\n"


def efficiency_table(out: Path, grid: Grid) -> str:
    """Per architecture: the mean over environments of each environment's mean over seeds (complete runs)."""
    table = []
    for row in grid.rows:
        done = [env for env in grid.envs if grid.complete[row, env]]
        values = [
            fmt(mean_or_none([mean_or_none([s.get(key) for s in grid.complete[row, env]]) for env in done]), pattern)
            for key, _, pattern in EFFICIENCY_FIELDS
        ]
        table.append([row, *values, len(done)])
    header = ["arch", *[title for _, title, _ in EFFICIENCY_FIELDS], "envs"]
    note = "Means over the environments each architecture completed (last column); n/a: not measured (no GPU)."
    return write_table(out, "efficiency", header, table, note)


def speed_table(out: Path, grid: Grid) -> str:
    table = []
    for env in grid.envs:
        budget = max(s["total_timesteps"] for (_, e, _), s in grid.cells.items() if e == env)
        for row in grid.rows:
            sps = mean_or_none([s.get("sps") for s in grid.complete[row, env]])
            table.append([env, row, fmt(sps, "{:,.0f}"), budget, fmt(budget / sps / 3600 if sps else None, "{:.2f}")])
    note = "hours per run: the largest budget seen for the environment over the measured steps/s."
    return write_table(out, "speed", ["env", "arch", "steps/s", "budget", "hours per run"], table, note)


def returns_table(out: Path, grid: Grid) -> str:
    table = []
    for row in grid.rows:
        entries = []
        for env in grid.envs:
            runs = grid.complete[row, env]
            returns = [s["final_return_mean"] for s in runs if s.get("final_return_mean") is not None]
            spread = f"{np.std(returns, ddof=1):.2f}" if len(returns) > 1 else "n/a"  # the sample std over seeds
            text = f"{np.mean(returns):.2f} +- {spread} (n={len(returns)})" if returns else "n/a"
            successes = [s["success_rate"] for s in runs if s.get("success_rate") is not None]
            if successes:  # MiniGrid: the share of the last 100 episodes that reached the goal
                text += f", success {np.mean(successes):.2f}"
            if len(runs) < len(grid.seeds):
                text += f", {len(grid.seeds) - len(runs)} not complete"
            if len(returns) < len(runs):
                text += f", {len(runs) - len(returns)} without a finished episode"
            budgets = sorted({s["total_timesteps"] for s in grid.runs(row, env)})
            if len(budgets) > 1:
                text += f", budgets differ: {', '.join(map(str, budgets))}"
            entries.append(text)
        table.append([row, *entries])
    return write_table(out, "returns", ["arch", *grid.envs], table)


def aggregate_table(out: Path, grid: Grid, reps: int) -> str:
    """IQM and optimality gap over the environments every row completed (each row's runs: its fewest per env)."""
    header = ["arch", "IQM", "IQM 95% CI", "optimality gap", "gap 95% CI"]
    scored = [
        env for env in grid.envs if env in REFERENCE_SCORES and all(finished(grid, row, env) for row in grid.rows)
    ]
    if not scored:
        return write_table(
            out, "aggregate", header, [], "No environment with reference scores was completed by every row."
        )
    normalised = {}  # row -> [runs, envs]; the stratified bootstrap needs as many runs in every environment
    for row in grid.rows:
        runs = min(len(finished(grid, row, env)) for env in scored)
        normalised[row] = np.array(
            [[normalise(env, s["final_return_mean"]) for s in finished(grid, row, env)[:runs]] for env in scored]
        ).T
    # A fixed bootstrap seed: the same runs give the same intervals at every report
    point, interval = rly.get_interval_estimates(
        normalised, iqm_and_gap, reps=reps, random_state=np.random.RandomState(0)
    )
    table = [
        [row, f"{point[row][0]:.3f}", f"[{interval[row][0, 0]:.3f}, {interval[row][1, 0]:.3f}]",
         f"{point[row][1]:.3f}", f"[{interval[row][0, 1]:.3f}, {interval[row][1, 1]:.3f}]"]
        for row in grid.rows
    ]  # fmt: skip
    sources = "\n".join(
        f"- {env}: random {REFERENCE_SCORES[env][0]}, reference {REFERENCE_SCORES[env][1]} ({REFERENCE_SCORES[env][2]})"
        for env in scored
    )
    runs = ", ".join(f"{row} {len(scores)}" for row, scores in normalised.items())
    note = (
        f"Over the {len(scored)} environments every row completed ({', '.join(scored)}); runs per environment: "
        f"{runs}; 95% stratified bootstrap CIs, {reps} resamples. Normalisation, (return - random) / "
        f"(reference - random):\n\n{sources}"
    )
    return write_table(out, "aggregate", header, table, note)


def normalise(env: str, final_return: float) -> float:
    random_score, reference, _ = REFERENCE_SCORES[env]
    return (final_return - random_score) / (reference - random_score)


def finished(grid: Grid, row: str, env: str) -> list[dict]:
    """Complete runs with at least one episode (a final return), by seed."""
    return [s for s in grid.complete[row, env] if s.get("final_return_mean") is not None]


def iqm_and_gap(scores: np.ndarray) -> np.ndarray:
    return np.array([metrics.aggregate_iqm(scores), metrics.aggregate_optimality_gap(scores)])


def first_reach(steps: np.ndarray, returns: np.ndarray, target: float, window: int = 100) -> float | None:
    """The step of the first episode after which the mean of the last `window` episodes is >= target (a full
    window only: one early lucky episode is not a learned policy); None if it never is."""
    if len(returns) < window:
        return None
    cumulative = np.concatenate([[0.0], np.cumsum(returns)])
    means = (cumulative[window:] - cumulative[:-window]) / window  # means[i]: episodes i .. i + window - 1
    reached = np.flatnonzero(means >= target)
    return float(steps[reached[0] + window - 1]) if len(reached) else None


def reach_table(out: Path, grid: Grid, targets: dict[str, float]) -> str:
    """Per row and target environment: each seed's first step at which the last-100 mean reached the target."""
    table = []
    for env, target in targets.items():
        for row in grid.rows:
            runs = sorted(grid.runs(row, env), key=lambda s: s["seed"])
            if not runs:
                continue
            cells = []
            for summary in runs:
                episodes = read_curve(summary)
                step = first_reach(*episodes, target) if episodes is not None else None
                cells.append(f"seed {summary['seed']}: {'never' if step is None else f'{step / 1e6:.2f} M'}")
            reached = sum("never" not in cell for cell in cells)
            table.append([env, target, row, f"{reached} of {len(runs)}", "; ".join(cells)])
    header = ["env", "target", "arch", "seeds that reached it", "first step (last-100 mean >= target)"]
    return write_table(out, "reach", header, table, "Runs of every status are counted, each up to its last step.")


def plot_curves(out: Path, grid: Grid) -> str:
    """Per environment: each row's last-100-episode mean return by step, mean and +-1 std over seeds."""
    (out / "curves").mkdir(exist_ok=True)
    for env in grid.envs:
        horizon = max(max(s["global_step"] for (_, e, _), s in grid.cells.items() if e == env), 1)
        steps = np.linspace(0, horizon, 200)
        figure, axes = plt.subplots(figsize=(6, 4))
        for row in grid.rows:
            curves = []
            for summary in grid.runs(row, env):
                episodes = read_curve(summary)
                if episodes is not None:
                    curve = trailing_mean_at(*episodes, steps)
                    curves.append(np.where(steps <= summary["global_step"], curve, np.nan))  # not past its end
            if not curves:
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # steps before any seed's first episode
                mean, std = np.nanmean(curves, axis=0), np.nanstd(curves, axis=0)
            axes.plot(steps, mean, label=f"{row} (n={len(curves)})")
            axes.fill_between(steps, mean - std, mean + std, alpha=0.2)
        axes.set(title=env, xlabel="environment steps", ylabel="return (last 100 episodes)")
        axes.legend(fontsize="small")
        figure.tight_layout()
        figure.savefig(out / "curves" / f"{env.replace('/', '_')}.png", dpi=120)
        plt.close(figure)
    return "\n".join(f"![{env}](curves/{env.replace('/', '_')}.png)" for env in grid.envs) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="directories holding runs (searched recursively)")
    parser.add_argument("--out", type=Path, default=Path("results"), help="where the tables and plots go")
    parser.add_argument("--bootstrap-reps", type=int, default=2000, help="stratified bootstrap resamples")
    parser.add_argument(
        "--reach",
        action="append",
        default=[],
        metavar="ENV=RETURN",
        help="also tabulate the first step at which each run's last-100 mean reached RETURN (repeatable)",
    )
    options = parser.parse_args()
    targets = {}
    for item in options.reach:
        env, _, value = item.rpartition("=")
        try:
            targets[env] = float(value)
        except ValueError:
            parser.error(f"--reach wants ENV=RETURN, got {item!r}")
        if not env:
            parser.error(f"--reach wants ENV=RETURN, got {item!r}")
    for directory in options.runs:
        if not directory.is_dir():
            parser.error(f"{directory} is not a directory")

    summaries, corrupt = read_summaries(options.runs)
    grid = Grid(summaries)
    out = options.out
    out.mkdir(parents=True, exist_ok=True)
    complete = sum(len(runs) for runs in grid.complete.values())
    cells = len(grid.rows) * len(grid.envs) * len(grid.seeds)
    sections = [
        f"# Results\n\n{len(summaries)} runs read from {', '.join(map(str, options.runs))}: {len(grid.rows)} "
        f"architectures x {len(grid.envs)} environments x {len(grid.seeds)} seeds, "
        f"{complete} of {cells} cells complete.\n",
        "## Problems\n\n" + problems_table(out, grid, corrupt),
        "## Efficiency\n\n" + efficiency_table(out, grid),
        "## Speed per environment\n\n" + speed_table(out, grid),
        "## Final return (last 100 episodes), mean +- std over seeds\n\n" + returns_table(out, grid),
        "## Aggregate (normalised returns)\n\n" + aggregate_table(out, grid, options.bootstrap_reps),
        *(["## Steps to a target return\n\n" + reach_table(out, grid, targets)] if targets else []),
        "## Learning curves\n\n" + plot_curves(out, grid),
    ]
    (out / "report.md").write_text("\n".join(sections))
    print(f"{len(summaries)} runs, {complete} of {cells} cells complete, {len(corrupt)} corrupt -> {out}/report.md")


def read_curve(summary: dict) -> tuple[np.ndarray, np.ndarray] | None:
    """(global_step, episodic_return) of every finished episode, from the run's return-curve file."""
    try:
        data = np.loadtxt(summary["dir"] / summary["return_curve"], delimiter=",", skiprows=1, ndmin=2)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (data[:, 0], data[:, 1]) if len(data) else None


def trailing_mean_at(steps: np.ndarray, returns: np.ndarray, grid: np.ndarray, window: int = 100) -> np.ndarray:
    """Mean of the last `window` episodes finished by each grid step (NaN before the first)."""
    finished = np.searchsorted(steps, grid, side="right")
    cumulative = np.concatenate([[0.0], np.cumsum(returns)])
    first = np.maximum(finished - window, 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(finished > 0, (cumulative[finished] - cumulative[first]) / (finished - first), np.nan)


if __name__ == "__main__":
    main()
