"""Learning checks with the scripts' own defaults (minutes each): `python -m pytest -m slow`.

These are the measured targets of docs/performance.md, rerun as tests; they are excluded from the default run.
"""

import json

import pytest
from conftest import TEMPLATE, run_script

pytestmark = pytest.mark.slow


def final_return(tmp_path, *argv) -> float:
    result = run_script(TEMPLATE, *argv, "--seed", "1", cwd=tmp_path, timeout=1800)
    assert result.returncode == 0, result.stderr
    (summary,) = tmp_path.glob("runs/*/summary.json")
    return json.loads(summary.read_text())["final_return_mean"]


def test_cartpole_is_solved_within_200k_steps(tmp_path):
    assert final_return(tmp_path, "--env-id", "CartPole-v1", "--total-timesteps", "200000") >= 475


def test_cartpole_without_velocity_needs_memory(tmp_path):
    assert final_return(tmp_path, "--env-id", "CartPoleNoVel-v1", "--total-timesteps", "500000") < 200


def test_four_frames_recover_the_velocity(tmp_path):
    argv = ["--env-id", "CartPoleNoVel-v1", "--frame-stack", "4", "--total-timesteps", "500000"]
    assert final_return(tmp_path, *argv) >= 450
