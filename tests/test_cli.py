"""Bad input: one line on stderr, exit status 2, nothing written. parse_args is a shared section, so its cases
run on the template; the command line and `--help` run for every script."""

import dataclasses
import importlib.util
import pickle

import pytest
import torch
from conftest import DOMAINS, run_script

BAD_INPUT = {
    "unknown env id": (["--env-id", "NoSuchEnv-v0"], "unknown env id"),
    "tuple observations": (["--env-id", "Blackjack-v1"], "Blackjack-v1 has Tuple observations"),
    "discrete observations": (["--env-id", "FrozenLake-v1"], "FrozenLake-v1 has Discrete observations"),
    "box actions with image observations": (["--env-id", "CarRacing-v3"], "needs a vector"),
    "num envs not divisible": (["--num-envs", "6", "--num-minibatches", "4"], "not divisible"),
    "zero envs": (["--num-envs", "0"], "--num-envs must be positive"),
    "negative total": (["--total-timesteps", "-5"], "--total-timesteps must be positive"),
    "zero steps": (["--num-steps", "0"], "--num-steps must be positive"),
    "zero epochs": (["--update-epochs", "0"], "--update-epochs must be positive"),
    "zero hidden size": (["--hidden-size", "0"], "--hidden-size must be positive"),
    "zero minigrid time limit": (["--minigrid-max-steps", "0"], "--minigrid-max-steps must be positive"),
    "masked index out of range": (["--env-id", "CartPole-v1", "--masked-indices", "7"], "out of range"),
    "masked indices on images": (["--env-id", "ALE/Breakout-v5", "--masked-indices", "1"], "vector observations"),
    "view pool on vectors": (["--view-pool"], "--view-pool pools over an image or grid"),
    "resume of a missing run": (["--resume", "runs/missing"], "no checkpoint"),
    "unknown minigrid obs": ([*DOMAINS["minigrid-rgb"], "--minigrid-obs", "pixels"], "rgb or symbolic"),
    "frame stack below one": (["--frame-stack", "0"], "--frame-stack must be at least 1"),
    "zero torch threads": (["--torch-threads", "0"], "--torch-threads must be positive"),
}
# Each real-valued PPO setting: finite, and inside the range where it means something (see Args).
OUT_OF_RANGE = {
    "learning_rate": ["nan", "inf", "0", "-1e-3"],
    "trunk_learning_rate": ["nan", "inf", "0", "-1e-3"],
    "gamma": ["nan", "0", "1.5", "-0.5"],
    "gae_lambda": ["nan", "-0.1", "1.01"],
    "clip_coef": ["nan", "inf", "0", "-1"],
    "ent_coef": ["nan", "inf", "-0.01"],
    "vf_coef": ["nan", "inf", "0", "-0.5"],
    "max_grad_norm": ["nan", "inf", "0", "-1"],
    "target_kl": ["nan", "inf", "0", "-0.01"],
}
for name, values in OUT_OF_RANGE.items():
    flag = "--" + name.replace("_", "-")
    for value in values:
        BAD_INPUT[f"{flag} {value}"] = ([flag, value], f"{flag} must be finite and ")
if importlib.util.find_spec("wandb") is None:
    BAD_INPUT["track without wandb"] = (["--track"], "pip install wandb")
if importlib.util.find_spec("moviepy") is None:
    BAD_INPUT["video without moviepy"] = (["--capture-video"], "pip install moviepy")
# Values at the edge of each range are good input.
GOOD_EDGES = [["--gamma", "1"], ["--gae-lambda", "0"], ["--gae-lambda", "1"], ["--ent-coef", "0"]]


def assert_bad_input(module, argv, message, directory, capsys):
    before = sorted(directory.rglob("*"))
    with pytest.raises(SystemExit) as exit_info:
        module.parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert sorted(directory.rglob("*")) == before  # nothing written


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_exits_2_with_one_line(template, case, tmp_path, monkeypatch, capsys):
    argv, message = BAD_INPUT[case]
    monkeypatch.chdir(tmp_path)
    assert_bad_input(template, argv, message, tmp_path, capsys)


@pytest.mark.parametrize("argv", GOOD_EDGES, ids=" ".join)
def test_values_at_the_edge_of_a_range_are_accepted(template, argv):
    args = template.parse_args(argv)
    assert getattr(args, argv[0][2:].replace("-", "_")) == float(argv[1])


def checkpoint_file(tmp_path, contents) -> str:
    run_dir = tmp_path / "runs" / "interrupted"
    run_dir.mkdir(parents=True)
    if isinstance(contents, bytes):
        (run_dir / "checkpoint.pt").write_bytes(contents)
    else:
        torch.save(contents, run_dir / "checkpoint.pt")
    return str(run_dir.relative_to(tmp_path))


RESUME_CASES = {
    "corrupt file": (b"not a checkpoint", "cannot read"),
    "truncated pickle": (pickle.dumps({"args": {}})[:-3], "cannot read"),
    "not a dict": ([1, 2, 3], "written by an unknown program"),
    "written before checkpoints named their script": ({"args": {}}, "written by an unknown program"),
    "written by another script": ({"script": "ppo_lstm.py", "args": {}}, "written by ppo_lstm.py, not by"),
    "arguments this version lacks": ({"script": "ppo_mlp.py", "args": {"no_such_flag": 1}}, "lacks: no_such_flag"),
    "env statistics of an earlier version": (
        {"script": "ppo_mlp.py", "args": {}, "env_statistics": [[{}], [{}]]},
        "earlier version of ppo_mlp.py: its env statistics do not load",
    ),
    "one optimizer group, as in earlier versions": (
        {"script": "ppo_mlp.py", "args": {}, "optimizer": {"state": {}, "param_groups": [{"params": [0]}]}},
        "earlier version of ppo_mlp.py: its optimizer state does not load",
    ),
}


@pytest.mark.parametrize("case", RESUME_CASES)
def test_resume_of_a_checkpoint_this_script_cannot_continue(template, case, tmp_path, monkeypatch, capsys):
    contents, message = RESUME_CASES[case]
    monkeypatch.chdir(tmp_path)
    run = checkpoint_file(tmp_path, contents)
    assert_bad_input(template, ["--resume", run], message, tmp_path, capsys)


def test_compile_is_refused_by_the_trunks_it_slows_down(script, module, tmp_path, monkeypatch, capsys):
    """The MLP, the attention trunks, Mamba and Mamba-2 ran faster compiled; the LSTM's and GRU's episode cuts
    (data-dependent) made them slower, so they refuse --compile and say why."""
    monkeypatch.chdir(tmp_path)
    if script.name not in ("ppo_lstm.py", "ppo_gru.py"):
        assert module.NO_COMPILE is None and module.parse_args(["--compile"]).compile
    else:
        assert f"{script.name}'s " in module.NO_COMPILE and "slower than eager" in module.NO_COMPILE
        assert_bad_input(module, ["--compile"], f"--compile: {module.NO_COMPILE}", tmp_path, capsys)


def test_bad_input_from_the_command_line(script, tmp_path):
    result = run_script(script, "--env-id", "Blackjack-v1", cwd=tmp_path)
    assert result.returncode == 2
    expected = f"{script.name}: error: Blackjack-v1 has Tuple observations; this domain needs a vector"
    assert result.stderr.strip().splitlines() == [expected]
    assert list(tmp_path.iterdir()) == []


def test_help_documents_every_flag(script, module, tmp_path):
    result = run_script(script, "--help", cwd=tmp_path)
    assert result.returncode == 0
    computed = {"domain", "batch_size", "minibatch_size", "num_iterations"}  # filled in by parse_args
    for field in dataclasses.fields(module.Args):
        flag = "--" + field.name.replace("_", "-")
        assert (flag in result.stdout) == (field.name not in computed), flag
