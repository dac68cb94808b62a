"""benchmarks/peers.py: the peers train on our networks and config, and the table states each target."""

import json
import subprocess
import sys

import peers
from conftest import ROOT, load


def parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_matched_peers_have_our_networks_and_config():
    for peer, script in (("sb3-ppo", "ppo_mlp.py"), ("sb3-recurrent-ppo", "ppo_lstm.py")):
        module = load(ROOT / script)
        args = module.parse_args(peers.PPO_FLAGS["cartpole-novel"])
        envs = module.make_envs(args, "")
        agent = module.Agent(envs.single_observation_space, envs.single_action_space, args)
        model = peers.make_peer(f"{peer}-our-net")
        assert parameters(model.policy) == parameters(agent), peer
        assert (model.n_envs, model.n_steps, model.batch_size, model.n_epochs) == (8, 128, 256, 10)
        assert model.batch_size == args.minibatch_size and model.learning_rate == args.learning_rate
        assert parameters(peers.make_peer(peer).policy) != parameters(agent)  # the library's default


def test_the_same_work_peer_clips_the_value_loss_and_normalises_rewards_as_the_mlp_does():
    module = load(ROOT / "ppo_mlp.py")
    args = module.parse_args(peers.PPO_FLAGS["cartpole-novel"])
    envs = module.make_envs(args, "")
    agent = module.Agent(envs.single_observation_space, envs.single_action_space, args)
    model = peers.make_peer("sb3-ppo-our-work")
    assert parameters(model.policy) == parameters(agent)
    assert args.clip_vloss and model.clip_range_vf(1.0) == args.clip_coef
    normaliser = model.get_vec_normalize_env()
    assert normaliser.norm_reward and not normaliser.norm_obs
    assert (normaliser.clip_reward, normaliser.gamma) == (10.0, args.gamma)


def test_a_peer_run_reports_its_steps_per_second():
    command = [sys.executable, str(ROOT / "benchmarks" / "peers.py"), "--peer", "sb3-ppo", "--steps", "1024"]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    assert json.loads(output.splitlines()[-1])["sps"] > 0


def test_compile_runs_our_scripts_compiled_and_names_those_that_refuse(monkeypatch):
    calls = []
    monkeypatch.setattr(peers, "ppo_summary", lambda *args: calls.append(args) or {"sps": 1.0, "rollout_sps": 2.0})
    assert peers.run_ours("ppo_mamba2.py", "memory-symbolic", ["--compile"]) == {"sps": 1.0, "rollout_sps": 2.0}
    assert calls[0][1] == [*peers.PPO_FLAGS["memory-symbolic"], "--compile"]
    command = [sys.executable, str(ROOT / "benchmarks" / "peers.py"), "--configs", "memory-symbolic", "--compile"]
    command += ["--entries", "ppo_mlp.py", "ppo_lstm.py", "ppo_trxl.py", "ppo_gru.py"]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 2
    assert "--compile: ppo_lstm.py, ppo_gru.py refuse it" in result.stderr.splitlines()[-1]


def test_report_gives_each_ratio_against_its_target(capsys):
    def runs(*sps):
        return [{"sps": value, "rollout_sps": 2 * value} for value in sps]

    figures = {
        "ppo_mlp.py": runs(3000, 3300, 3100),  # median 3100, rollout 6200
        "ppo_gru.py": runs(1500, 1600, 1400),  # median 1500: 0.48x the MLP's
        "ppo_lstm.py": runs(1600, 1600, 1600),
        "sb3-ppo": runs(2000, 2000, 2000),  # the MLP: 1.55x
        "sb3-recurrent-ppo": runs(100, 100, 100),  # the LSTM: 16x
        "sb3-ppo-our-net": runs(1550, 1550, 1550),  # the MLP: 2x
        "sb3-ppo-our-work": runs(2480, 2480, 2480),  # the MLP: 1.25x
    }
    met = peers.report("cartpole-novel", list(figures), figures, ceilings=[31_000] * 3)
    table = capsys.readouterr().out
    assert "| ppo_mlp.py | 3,100 | 3,000, 3,300, 3,100 | sb3-ppo | 1.55x | 1.5x | True |" in table
    assert "| ppo_gru.py | 1,500 | 1,500, 1,600, 1,400 | ppo_mlp.py | 0.48x | 0.5x | False |" in table
    assert "| ppo_lstm.py | 1,600 | 1,600, 1,600, 1,600 | sb3-recurrent-ppo | 16.00x | 15.0x | True |" in table
    assert "| ppo_lstm.py | 1,600 | 1,600, 1,600, 1,600 | ppo_mlp.py | 0.52x | 0.5x | True |" in table
    assert "20% of the random-policy ceiling of 31,000 steps/s (target 25%, met: False)" in table
    assert "ppo_mlp.py against sb3-ppo-our-net, the same network: 2.00x (no target)" in table
    assert "ppo_mlp.py against sb3-ppo-our-work, the same work: 1.25x (no target)" in table
    assert met == [True, False, True, True, False]


def test_a_ratio_pairs_the_runs_of_one_round(capsys):
    """The machine's speed halved between rounds: each round's ratio is 2, the medians' ratio is not."""
    figures = {
        "ppo_mlp.py": [{"sps": sps, "rollout_sps": sps} for sps in (4000, 2000, 2000)],
        "sb3-ppo": [{"sps": sps, "rollout_sps": None} for sps in (2000, 2000, 1000)],
    }
    peers.report("cartpole-novel", list(figures), figures, ceilings=[8000, 8000, 4000])
    table = capsys.readouterr().out
    assert "| ppo_mlp.py | 2,000 | 4,000, 2,000, 2,000 | sb3-ppo | 2.00x | 1.5x | True |" in table
    assert "2,000 steps/s, 50% of the random-policy ceiling of 8,000 steps/s" in table


def test_a_variant_runs_its_script_with_its_flags_and_is_reported_without_a_target(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(peers, "ppo_summary", lambda *args: calls.append(args) or {"sps": 1.0, "rollout_sps": 2.0})
    peers.measure("ppo_mamba2.py --mamba-backend torch", "cartpole-novel", [])
    assert calls[0][0] == ROOT / "ppo_mamba2.py"
    assert calls[0][1] == [*peers.PPO_FLAGS["cartpole-novel"], "--mamba-backend", "torch"]
    figures = {
        "ppo_mlp.py": [{"sps": 4000, "rollout_sps": 4000}],
        "ppo_mamba2.py": [{"sps": 2000, "rollout_sps": 2000}],
        "ppo_mamba2.py --mamba-backend torch": [{"sps": 1000, "rollout_sps": 1000}],
    }
    met = peers.report("cartpole-novel", list(figures), figures, ceilings=[8000])
    table = capsys.readouterr().out
    assert "| ppo_mamba2.py --mamba-backend torch | 1,000 | 1,000 | ppo_mamba2.py | 0.50x | | |" in table
    assert "| ppo_mamba2.py --mamba-backend torch | 1,000 | 1,000 | ppo_mlp.py | 0.25x | | |" in table
    assert met == [True, True]  # the Mamba-2 target (0.5x) and the rollout ceiling; the variant has none
    command = [sys.executable, str(ROOT / "benchmarks" / "peers.py"), "--entries", "ppo_mlp.py"]
    result = subprocess.run([*command, "--variants", "ppo_gru.py --num-layers 2"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "--variants: ppo_gru.py is not among this run's entries" in result.stderr.splitlines()[-1]


def test_unknown_entries_and_variants_of_a_peer_are_refused():
    """A typo must not run nothing and report every target met (0 of 0)."""
    command = [sys.executable, str(ROOT / "benchmarks" / "peers.py")]
    result = subprocess.run([*command, "--entries", "ppo_mlp"], capture_output=True, text=True)
    assert result.returncode == 2 and "--entries: unknown ['ppo_mlp']" in result.stderr.splitlines()[-1]
    result = subprocess.run(
        [*command, "--entries", "sb3-ppo", "--variants", "sb3-ppo --x"], capture_output=True, text=True
    )
    assert result.returncode == 2 and "--variants: sb3-ppo is not one of our scripts" in result.stderr.splitlines()[-1]
