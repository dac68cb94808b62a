"""Learning checks with the scripts' own defaults (minutes each): `python -m pytest -m slow`.

These are the measured targets of docs/performance.md, rerun as tests; they are excluded from the default run.
"""

import csv
import json

import memory_diagnosis
import pytest
import torch
from conftest import ROOT, TEMPLATE, load, run_script

pytestmark = pytest.mark.slow


def summary_of_run(tmp_path, *argv, script=TEMPLATE, timeout=1800) -> dict:
    result = run_script(script, *argv, "--seed", "1", cwd=tmp_path, timeout=timeout)
    assert result.returncode == 0, result.stderr
    (summary,) = tmp_path.glob("runs/*/summary.json")
    return json.loads(summary.read_text())


def final_return(tmp_path, *argv, script=TEMPLATE) -> float:
    return summary_of_run(tmp_path, *argv, script=script)["final_return_mean"]


def best_100_episode_mean(tmp_path) -> float:
    (curve,) = tmp_path.glob("runs/*/episodes.csv")
    returns = [float(row["episodic_return"]) for row in csv.DictReader(curve.open())]
    return max(sum(returns[i - 100 : i]) / 100 for i in range(100, len(returns) + 1))


def test_cartpole_is_solved_within_200k_steps(tmp_path):
    assert final_return(tmp_path, "--env-id", "CartPole-v1", "--total-timesteps", "200000") >= 475


def test_cartpole_without_velocity_needs_memory(tmp_path):
    assert final_return(tmp_path, "--env-id", "CartPoleNoVel-v1", "--total-timesteps", "500000") < 200


def test_four_frames_recover_the_velocity(tmp_path):
    argv = ["--env-id", "CartPoleNoVel-v1", "--frame-stack", "4", "--total-timesteps", "500000"]
    assert final_return(tmp_path, *argv) >= 450


@pytest.mark.parametrize(
    ("name", "steps", "target"),
    [
        ("ppo_lstm.py", 500_000, 475),
        ("ppo_gru.py", 500_000, 475),
        ("ppo_trxl.py", 1_000_000, 450),
        ("ppo_gtrxl.py", 1_000_000, 450),
        ("ppo_mamba.py", 1_000_000, 450),
        ("ppo_mamba2.py", 1_000_000, 450),
    ],
)
def test_memory_solves_cartpole_without_velocity(tmp_path, name, steps, target):
    """The best 100-episode mean reaches the issue's target within the budget (each script's default one)."""
    final_return(tmp_path, "--env-id", "CartPoleNoVel-v1", "--total-timesteps", str(steps), script=ROOT / name)
    assert best_100_episode_mean(tmp_path) >= target


def test_gtrxl_remembers_the_cue_on_memory_s11(tmp_path):
    """GTrXL with its MemoryS11 defaults (3 M steps, seed 1; about 30 min alone on 2 cores) remembers the cue:
    replayed, the trained agent succeeds in >= 0.9 of the episodes that saw the cue (a trunk without memory can
    only guess at the end, 1 in 2; GTrXL after 41 k steps: 0.21). Not issue 12's bar of solving the task
    (last-100 mean >= 0.9): that also needs the agent to learn to turn back and look, which float rounding
    decides per CPU. Seeds 1-3 solved it on the CPU of their published row, seed 1 on an Intel Xeon too, but
    seed 1 on an AMD EPYC (Zen 4) ended at 0.64, remembering (1.00 when it saw the cue) and never looking."""
    argv = ["--env-id", "MiniGrid-MemoryS11-v0", "--minigrid-obs", "symbolic"]
    summary = summary_of_run(tmp_path, *argv, script=ROOT / "ppo_gtrxl.py", timeout=6 * 3600)
    (run_dir,) = tmp_path.glob("runs/*")
    checkpoint = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)
    module = load(ROOT / "ppo_gtrxl.py")
    args = module.Args(**checkpoint["args"])
    torch.manual_seed(args.seed)
    episodes = memory_diagnosis.replay(module, args, checkpoint, 400)[0]
    seen = [episode["success"] for episode in episodes if episode["saw_cue"]]
    assert len(seen) >= 40, f"{len(seen)} of 400 replayed episodes saw the cue"
    success = sum(seen) / len(seen)
    assert success >= 0.9, f"success {success:.2f} when the cue was seen; the run: {summary['final_return_mean']}"
