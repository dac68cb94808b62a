"""benchmark.sh and report.py: the grid's commands, a tiny real grid end to end, skipping, resuming, failures,
and report.py's tables on runs with known returns, corrupt summaries and missing cells."""

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, SCRIPTS, TINY, interrupted_run

BENCHMARK = ROOT / "benchmark.sh"
REPORT = ROOT / "report.py"
# RLBenchNet's grid: environment -> budget in steps.
PAPER_GRID = {
    "HalfCheetah-v4": 5_000_000,
    "Hopper-v4": 5_000_000,
    "Walker2d-v4": 5_000_000,
    "ALE/Breakout-v5": 10_000_000,
    "ALE/Pong-v5": 10_000_000,
    "CartPoleNoVel-v1": 5_000_000,
    "LunarLanderNoVel-v3": 5_000_000,
    "MiniGrid-DoorKey-8x8-v0": 5_000_000,
    "MiniGrid-MemoryS11-v0": 15_000_000,
}
TINY_FLAGS = [flag for flag in TINY if flag not in ("--total-timesteps", "64")] + ["--minigrid-obs", "symbolic"]
TINY_GRID = ["--archs", "mlp,lstm", "--envs", "CartPoleNoVel-v1=256,MiniGrid-MemoryS11-v0=384", "--seeds", "1"]


def bench(*argv: str, cwd: Path, timeout: float = 600, **environment: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHON": sys.executable, **environment}
    return subprocess.run(
        [str(BENCHMARK), *argv], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=environment
    )


def report(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPORT), *argv], cwd=cwd, capture_output=True, text=True, timeout=300)


def parse_command(line: str) -> dict:
    words = line.split()
    flags = {words[i]: words[i + 1] for i in range(2, len(words) - 1) if words[i].startswith("--")}
    return {"script": Path(words[1]).name, **flags, "words": words}


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


# ---- benchmark.sh without running anything ----


def test_help_lists_every_option(tmp_path):
    result = bench("--help", cwd=tmp_path)
    assert result.returncode == 0
    for option in ["--archs", "--envs", "--seeds", "--steps-scale", "--ablation", "--workers", "--slurm",
                   "--partition", "--time", "--dry-run"]:  # fmt: skip
        assert option in result.stdout


def test_dry_run_prints_the_papers_grid(tmp_path):
    result = bench("--dry-run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    commands = [parse_command(line) for line in result.stdout.splitlines()]
    cells = {(c["script"], c["--env-id"], c["--seed"]) for c in commands}
    assert len(commands) == len(cells) == len(SCRIPTS) * len(PAPER_GRID) * 3
    assert cells == {(s.name, env, seed) for s in SCRIPTS for env in PAPER_GRID for seed in "123"}
    for command in commands:
        assert int(command["--total-timesteps"]) == PAPER_GRID[command["--env-id"]]
    assert f"{len(cells)} cells: 0 complete, 0 to resume, {len(cells)} to start" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_dry_run_scales_budgets_takes_new_envs_and_passes_flags_on(tmp_path):
    result = bench("--dry-run", "--archs", "mlp,lstm", "--envs", "CartPoleNoVel-v1,Acrobot-v1=1001", "--seeds", "7",
                   "--steps-scale", "0.001", "--", "--num-envs", "2", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    commands = [parse_command(line) for line in result.stdout.splitlines()]
    assert [(c["script"], c["--env-id"], c["--total-timesteps"]) for c in commands] == [
        ("ppo_mlp.py", "CartPoleNoVel-v1", "5000"),
        ("ppo_mlp.py", "Acrobot-v1", "1"),  # rounded, never below one step
        ("ppo_lstm.py", "CartPoleNoVel-v1", "5000"),
        ("ppo_lstm.py", "Acrobot-v1", "1"),
    ]
    assert all(c["--seed"] == "7" and c["words"][-2:] == ["--num-envs", "2"] for c in commands)


def test_ablation_leak_adds_a_no_state_reset_row_per_memory_trunk(tmp_path):
    memory = [s.stem.removeprefix("ppo_") for s in SCRIPTS if s.stem != "ppo_mlp"]
    result = bench("--dry-run", "--ablation", "leak", "--envs", "CartPoleNoVel-v1", "--seeds", "1", cwd=tmp_path)
    commands = [parse_command(line) for line in result.stdout.splitlines()]
    leaky = [c for c in commands if "--no-state-reset" in c["words"]]
    assert len(commands) == len(SCRIPTS) + len(memory)
    assert sorted(c["--exp-name"] for c in leaky) == sorted(f"ppo_{arch}_leak" for arch in memory)
    assert all(c["script"] != "ppo_mlp.py" for c in leaky)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--archs", "nosuch"], "no ppo_nosuch.py"),
        (["--envs", "Acrobot-v1"], "give its budget as Acrobot-v1=STEPS"),
        (["--envs", "Acrobot-v1=-5"], "budget of Acrobot-v1 must be a positive integer"),
        (["--seeds", "1,x"], "--seeds must be comma-separated integers"),
        (["--steps-scale", "0"], "--steps-scale must be a positive number"),
        (["--workers", "0"], "--workers must be a positive integer"),
        (["--ablation", "reset"], "the only ablation is leak"),
        (["--frobnicate"], "unknown option --frobnicate"),
        (["--seeds"], "--seeds needs a value"),
        (["--", "--seed", "3"], "--seed after --: the grid sets it per cell"),
        (["--", "--num-envs", "4", "--exp-name=x"], "--exp-name=x after --: the grid sets it per cell"),
    ],
)
def test_bad_input_exits_2_with_one_line(argv, message, tmp_path):
    result = bench("--dry-run", *argv, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr
    assert not (tmp_path / "runs").exists()


def test_slurm_dry_run_writes_one_array_over_the_cells(tmp_path):
    result = bench("--slurm", "--dry-run", "--archs", "mlp", "--envs", "CartPoleNoVel-v1", "--seeds", "1,2",
                   "--partition", "gpu", "--time", "2:00:00", "--", "--num-envs", "4", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert result.stdout.count("#SBATCH --array=") == 1
    for directive in ["--array=0,1", "--requeue", "--signal=B:TERM@300", "--time=2:00:00", "--partition=gpu",
                      "--ntasks=1", "--gpus-per-task=1", "--cpus-per-task=4"]:  # fmt: skip
        assert f"#SBATCH {directive}" in lines
    assert lines[-1].startswith(f'exec {BENCHMARK} --cell "$SLURM_ARRAY_TASK_ID" --archs mlp')
    assert lines[-1].endswith("-- --num-envs 4")


# ---- A tiny real grid: 2 scripts x 2 environments x 1 seed ----


@pytest.fixture(scope="module")
def tiny_grid(tmp_path_factory):
    directory = tmp_path_factory.mktemp("grid")
    # Two "GPUs" that this machine does not have: each worker gets one; torch then finds no CUDA and uses the CPU.
    result = bench(*TINY_GRID, "--workers", "2", "--", *TINY_FLAGS, cwd=directory, CUDA_VISIBLE_DEVICES="3,5")
    return directory, result


def test_tiny_grid_completes_every_cell(tiny_grid):
    directory, result = tiny_grid
    assert result.returncode == 0, result.stdout + result.stderr
    summaries = [json.loads(p.read_text()) for p in directory.glob("runs/*/summary.json")]
    assert sorted((s["arch"], s["env_id"], s["status"]) for s in summaries) == [
        ("lstm", "CartPoleNoVel-v1", "complete"),
        ("lstm", "MiniGrid-MemoryS11-v0", "complete"),
        ("mlp", "CartPoleNoVel-v1", "complete"),
        ("mlp", "MiniGrid-MemoryS11-v0", "complete"),
    ]
    assert sorted(p.name for p in (directory / "runs/benchmark/logs").iterdir()) == [
        "lstm__CartPoleNoVel-v1__1.log", "lstm__MiniGrid-MemoryS11-v0__1.log",
        "mlp__CartPoleNoVel-v1__1.log", "mlp__MiniGrid-MemoryS11-v0__1.log",
    ]  # fmt: skip
    assert "4 cells: 4 complete, 0 failed" in result.stderr
    starts = [line for line in result.stdout.splitlines() if line.startswith("start ")]
    assert len(starts) == 4 and all(" on GPU 3: " in line or " on GPU 5: " in line for line in starts)


def test_complete_cells_are_skipped(tiny_grid):
    directory, _ = tiny_grid
    before = sorted(directory.glob("runs/*__*"))
    again = bench(*TINY_GRID, "--", *TINY_FLAGS, cwd=directory)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("skip ") == 4 and "start " not in again.stdout
    assert sorted(directory.glob("runs/*__*")) == before
    dry = bench(*TINY_GRID, "--dry-run", "--", *TINY_FLAGS, cwd=directory)
    assert dry.stdout.count("# complete: runs/") == 4


def test_report_on_the_tiny_grid_writes_every_table_and_plot(tiny_grid):
    directory, _ = tiny_grid
    result = report("runs", "--out", "results", "--bootstrap-reps", "200", cwd=directory)
    assert result.returncode == 0, result.stderr
    out = directory / "results"
    for table in ["efficiency", "speed", "returns", "aggregate"]:
        assert (out / f"{table}.md").is_file()
    assert [row["arch"] for row in read_csv(out / "efficiency.csv")] == ["mlp", "lstm"]
    assert all(float(row["steps/s"].replace(",", "")) > 0 for row in read_csv(out / "efficiency.csv"))
    assert {(row["env"], row["arch"]) for row in read_csv(out / "speed.csv")} == {
        (env, arch) for env in ["CartPoleNoVel-v1", "MiniGrid-MemoryS11-v0"] for arch in ["mlp", "lstm"]
    }
    returns = read_csv(out / "returns.csv")
    assert [row["arch"] for row in returns] == ["mlp", "lstm"]
    assert all("(n=1)" in row["CartPoleNoVel-v1"] and "(n=1)" in row["MiniGrid-MemoryS11-v0"] for row in returns)
    assert [row["arch"] for row in read_csv(out / "aggregate.csv")] == ["mlp", "lstm"]
    assert sorted(p.name for p in (out / "curves").iterdir()) == ["CartPoleNoVel-v1.png", "MiniGrid-MemoryS11-v0.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in (out / "curves").iterdir())
    assert "## Problems\n\nNone." in (out / "report.md").read_text()


def test_a_failed_cell_is_listed_with_its_reason_and_the_exit_status_is_1(tmp_path):
    result = bench("--archs", "mlp", "--envs", "NoSuchEnv-v0=64,CartPoleNoVel-v1=64", "--seeds", "1", "--",
                   *TINY_FLAGS, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 1
    assert "failed cells:" in result.stderr
    assert "mlp__NoSuchEnv-v0__1: exit status 2: ppo_mlp.py: error: unknown env id 'NoSuchEnv-v0'" in result.stderr
    assert "2 cells: 1 complete, 1 failed" in result.stderr
    assert (tmp_path / "runs/benchmark/logs/mlp__NoSuchEnv-v0__1.log").is_file()


def test_a_cell_that_failed_before_starts_again(tmp_path):
    run_dir = tmp_path / "runs/CartPoleNoVel-v1__ppo_mlp__1__1000"
    run_dir.mkdir(parents=True)
    summary = {"status": "failed", "reason": "non-finite loss", "args": {"total_timesteps": 64}}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    (run_dir / "checkpoint.pt").write_bytes(b"")
    dry = bench("--dry-run", "--archs", "mlp", "--envs", "CartPoleNoVel-v1=64", "--seeds", "1", cwd=tmp_path)
    assert "--resume" not in dry.stdout and "--env-id CartPoleNoVel-v1 --seed 1 --total-timesteps 64" in dry.stdout
    assert "1 cells: 0 complete, 0 to resume, 1 to start (1 of them failed before)" in dry.stderr


def test_an_interrupted_cell_resumes_in_its_own_directory(tmp_path):
    argv = ["--env-id", "CartPoleNoVel-v1", "--seed", "1", "--total-timesteps", "20000", *TINY_FLAGS]
    _, _, run_dir = interrupted_run(argv, tmp_path)
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "interrupted"

    grid = ["--archs", "mlp", "--envs", "CartPoleNoVel-v1=20000", "--seeds", "1", "--", *TINY_FLAGS]
    dry = bench("--dry-run", *grid, cwd=tmp_path)
    assert dry.stdout.split()[-2:] == ["--resume", f"runs/{run_dir.name}"]
    assert "1 cells: 0 complete, 1 to resume, 0 to start" in dry.stderr
    result = bench(*grid, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["args"]["resume"] == f"runs/{run_dir.name}"
    assert summary["global_step"] == 20000
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted(["benchmark", run_dir.name])


# ---- report.py on runs with known returns ----


def fake_run(runs: Path, arch: str, env_id: str, seed: int, final_return: float, status: str = "complete", **extra):
    leak, started = extra.pop("leak", False), extra.pop("started", 1000 + seed)
    run_dir = runs / f"{env_id.replace('/', '_')}__ppo_{arch}{'_leak' * leak}__{seed}__{started}"
    run_dir.mkdir(parents=True)
    (run_dir / "episodes.csv").write_text(
        "global_step,episodic_return,episodic_length\n" + "".join(f"{10 * i},{final_return},5\n" for i in range(1, 4))
    )
    summary = {"arch": arch, "env_id": env_id, "seed": seed, "status": status, "reason": extra.pop("reason", None),
               "args": {"no_state_reset": leak}, "total_timesteps": 30, "global_step": 30,
               "final_return_mean": final_return, "return_curve": "episodes.csv", "sps": 100.0 * seed,
               "inference_latency_ms": 1.0, "cpu_rss_gb": 0.5, "gpu_mem_allocated_gb": None,
               "gpu_mem_reserved_gb": None, "params": 1000, "update_sps": 200.0, **extra}  # fmt: skip
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


def test_report_normalises_aggregates_and_flags_every_problem(tmp_path):
    runs = tmp_path / "runs"
    for seed in (1, 2, 3):
        fake_run(runs, "mlp", "CartPoleNoVel-v1", seed, 500.0)  # the reference: normalised 1
        fake_run(runs, "mlp", "ALE/Pong-v5", seed, 21.0)
        fake_run(runs, "gru", "CartPoleNoVel-v1", seed, 22.2)  # the random policy: normalised 0
        fake_run(runs, "gru", "ALE/Pong-v5", seed, -20.7)
        fake_run(runs, "gru", "ALE/Pong-v5", seed, -20.7, leak=True)
    fake_run(runs, "gru", "CartPoleNoVel-v1", 1, 100.0, leak=True)
    fake_run(runs, "gru", "CartPoleNoVel-v1", 2, 100.0, leak=True, status="failed", reason="non-finite loss")
    (runs / "broken").mkdir()
    (runs / "broken/summary.json").write_text("{not json")
    (runs / "partial").mkdir()
    (runs / "partial/summary.json").write_text(json.dumps({"arch": "mlp"}))

    result = report("runs", "--out", "out", "--bootstrap-reps", "200", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "broken/summary.json" in result.stderr and "partial/summary.json" in result.stderr
    out = tmp_path / "out"
    problems = {(row["run"], row["env"], row["seed"], row["status"]): row["reason"]
                for row in read_csv(out / "problems.csv")}  # fmt: skip
    assert problems.pop(("gru (leak)", "CartPoleNoVel-v1", "2", "failed")) == "non-finite loss"
    assert problems.pop(("gru (leak)", "CartPoleNoVel-v1", "3", "missing")) == "no run"
    assert sorted(run for run, *_ in problems) == ["runs/broken/summary.json", "runs/partial/summary.json"]

    returns = {row["arch"]: row for row in read_csv(out / "returns.csv")}
    assert list(returns) == ["mlp", "gru", "gru (leak)"]
    assert returns["mlp"]["CartPoleNoVel-v1"] == "500.00 +- 0.00 (n=3)"
    assert returns["gru (leak)"]["CartPoleNoVel-v1"] == "100.00 +- n/a (n=1), 2 not complete"
    # The reference scores 1 and the random policy 0; the leaky row has one complete run on CartPole, so one
    # run per environment; on Pong it scores 0, on CartPole (100 - 22.2) / (500 - 22.2).
    aggregate = {row["arch"]: row for row in read_csv(out / "aggregate.csv")}
    assert (aggregate["mlp"]["IQM"], aggregate["mlp"]["optimality gap"]) == ("1.000", "0.000")
    assert (aggregate["gru"]["IQM"], aggregate["gru"]["optimality gap"]) == ("0.000", "1.000")
    leak = (100 - 22.2) / (500 - 22.2) / 2
    assert (aggregate["gru (leak)"]["IQM"], aggregate["gru (leak)"]["optimality gap"]) == (
        f"{leak:.3f}",
        f"{1 - leak:.3f}",
    )
    note = (out / "aggregate.md").read_text()
    assert (
        "every row completed (ALE/Pong-v5, CartPoleNoVel-v1); runs per environment: mlp 3, gru 3, gru (leak) 1" in note
    )
    efficiency = {row["arch"]: row for row in read_csv(out / "efficiency.csv")}
    assert efficiency["mlp"]["steps/s"] == "200" and efficiency["mlp"]["GPU alloc GB"] == "n/a"
    assert efficiency["gru (leak)"]["envs"] == "2"


@pytest.mark.slurm
@pytest.mark.skipif(shutil.which("sbatch") is None, reason="no SLURM here (scripts/slurm_local.sh sets one up)")
def test_slurm_job_array_completes_every_cell_and_a_requeued_task_resumes(tmp_path):
    def wait_for(job: str, timeout: float = 600):
        deadline = time.time() + timeout
        while subprocess.run(["squeue", "--noheader", "--jobs", job], capture_output=True, text=True).stdout.strip():
            assert time.time() < deadline, f"job {job} still queued after {timeout} s"
            time.sleep(2)

    slurm = ["--slurm", "--gpus-per-task", "0", "--cpus-per-task", "1"]
    submitted = bench(*slurm, *TINY_GRID, "--", *TINY_FLAGS, cwd=tmp_path)
    assert submitted.returncode == 0, submitted.stderr
    wait_for(submitted.stdout.strip())
    summaries = [json.loads(p.read_text()) for p in tmp_path.glob("runs/*/summary.json")]
    assert sorted((s["arch"], s["env_id"], s["status"]) for s in summaries) == [
        (arch, env, "complete") for arch in ("lstm", "mlp") for env in ("CartPoleNoVel-v1", "MiniGrid-MemoryS11-v0")
    ]
    assert "4 cells: 4 complete, 0 to resume, 0 to start" in bench(*slurm, *TINY_GRID, cwd=tmp_path).stderr

    # A longer cell, requeued once it has a checkpoint: SLURM sends SIGTERM, the script checkpoints, the task
    # runs again and resumes from the same directory.
    grid = ["--archs", "mlp", "--envs", "CartPoleNoVel-v1=20000", "--seeds", "5", "--"]
    grid += [*TINY_FLAGS, "--checkpoint-interval", "1"]
    job = bench(*slurm, *grid, cwd=tmp_path).stdout.strip()
    deadline = time.time() + 300
    while not list(tmp_path.glob("runs/CartPoleNoVel-v1__ppo_mlp__5__*/checkpoint.pt")):
        assert time.time() < deadline, "no checkpoint within 300 s"
        time.sleep(1)
    subprocess.run(["scontrol", "requeue", f"{job}_0"], check=True)
    wait_for(job)
    (run_dir,) = tmp_path.glob("runs/CartPoleNoVel-v1__ppo_mlp__5__*")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["global_step"] == 20000
    assert summary["args"]["resume"] == f"runs/{run_dir.name}"
    log = (tmp_path / "runs/benchmark/logs/mlp__CartPoleNoVel-v1__5.log").read_text()
    assert "interrupted: continue with" in log
    assert f"resuming {run_dir.name} at step" in log


def test_report_reach_gives_each_seeds_first_step_to_a_target(tmp_path):
    runs = tmp_path / "runs"
    # Seed 1: 100 episodes at 0.5, then 100 at 1.0: the last-100 mean first reaches 0.9 after episode 180, when
    # 80 of the last 100 pay 1.0 (0.2 x 0.5 + 0.8 x 1.0 = 0.9). Seed 2 stays at 0.5 and never reaches it.
    for seed, returns in ((1, [0.5] * 100 + [1.0] * 100), (2, [0.5] * 200)):
        run_dir = fake_run(runs, "trxl", "MiniGrid-MemoryS11-v0", seed, returns[-1])
        rows = "".join(f"{1000 * (i + 1)},{ret},10\n" for i, ret in enumerate(returns))
        (run_dir / "episodes.csv").write_text("global_step,episodic_return,episodic_length\n" + rows)
    result = report(
        "runs", "--out", "out", "--bootstrap-reps", "50", "--reach", "MiniGrid-MemoryS11-v0=0.9", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    (row,) = read_csv(tmp_path / "out" / "reach.csv")
    assert row["arch"] == "trxl" and row["seeds that reached it"] == "1 of 2"
    assert row["first step (last-100 mean >= target)"] == "seed 1: 0.18 M; seed 2: never"
    assert "## Steps to a target return" in (tmp_path / "out" / "report.md").read_text()
    bad = report("runs", "--reach", "0.9", cwd=tmp_path)
    assert bad.returncode == 2 and "--reach wants ENV=RETURN" in bad.stderr


def test_report_counts_the_largest_budget_and_the_newest_start_of_a_cell(tmp_path):
    """A finished quick pass does not stand in for a full-budget run that failed, and of two runs of one budget the
    one that started later counts, whatever the folders' modification times say (a copy resets them)."""
    runs = tmp_path / "runs"
    fake_run(runs, "mlp", "CartPoleNoVel-v1", 1, 400.0, total_timesteps=10, started=3000)  # a quick pass
    fake_run(runs, "mlp", "CartPoleNoVel-v1", 1, 300.0, status="failed", reason="out of memory", started=2000)
    older = fake_run(runs, "mlp", "CartPoleNoVel-v1", 2, 100.0, started=2000)
    fake_run(runs, "mlp", "CartPoleNoVel-v1", 2, 200.0, started=2500)
    os.utime(older, (5000, 5000))  # the older run's folder looks newer
    result = report("runs", "--out", "out", "--bootstrap-reps", "200", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    problems = [(row["seed"], row["status"], row["reason"]) for row in read_csv(tmp_path / "out/problems.csv")]
    assert problems == [("1", "failed", "out of memory")]
    returns = read_csv(tmp_path / "out/returns.csv")[0]
    assert returns["CartPoleNoVel-v1"] == "200.00 +- n/a (n=1), 1 not complete"
