"""Bad input: one line on stderr, exit status 2, nothing written (DESIGN section 11)."""

import importlib.util

import pytest
from conftest import DOMAINS, run_script

BAD_INPUT = {
    "unknown env id": (["--env-id", "NoSuchEnv-v0"], "unknown env id"),
    "box actions with image observations": (["--env-id", "CarRacing-v3"], "needs a vector"),
    "num envs not divisible": (["--num-envs", "6", "--num-minibatches", "4"], "not divisible"),
    "zero envs": (["--num-envs", "0"], "--num-envs must be positive"),
    "negative total": (["--total-timesteps", "-5"], "--total-timesteps must be positive"),
    "zero steps": (["--num-steps", "0"], "--num-steps must be positive"),
    "zero epochs": (["--update-epochs", "0"], "--update-epochs must be positive"),
    "zero hidden size": (["--hidden-size", "0"], "--hidden-size must be positive"),
    "negative learning rate": (["--learning-rate", "-1e-3"], "--learning-rate"),
    "masked index out of range": (["--env-id", "CartPole-v1", "--masked-indices", "7"], "out of range"),
    "resume of a missing run": (["--resume", "runs/missing"], "no checkpoint"),
    "unknown minigrid obs": ([*DOMAINS["minigrid-rgb"], "--minigrid-obs", "pixels"], "rgb or symbolic"),
    "frame stack below one": (["--frame-stack", "0"], "--frame-stack must be at least 1"),
}
if importlib.util.find_spec("wandb") is None:
    BAD_INPUT["track without wandb"] = (["--track"], "pip install wandb")
if importlib.util.find_spec("moviepy") is None:
    BAD_INPUT["video without moviepy"] = (["--capture-video"], "pip install moviepy")


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_exits_2_with_one_line(module, case, tmp_path, monkeypatch, capsys):
    argv, message = BAD_INPUT[case]
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        module.parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert list(tmp_path.iterdir()) == []


def test_bad_input_from_the_command_line(script, tmp_path):
    result = run_script(script, "--env-id", "NoSuchEnv-v0", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"{script.name}: error: unknown env id 'NoSuchEnv-v0'"]
    assert list(tmp_path.iterdir()) == []


def test_help_documents_every_flag(script, tmp_path):
    result = run_script(script, "--help", cwd=tmp_path)
    assert result.returncode == 0
    for flag in ("--env-id", "--total-timesteps", "--frame-stack", "--masked-indices", "--minigrid-obs", "--resume"):
        assert flag in result.stdout
    assert "--batch-size" not in result.stdout  # computed, not a flag
