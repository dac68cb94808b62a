"""Tiny real runs: every script ends complete in every domain and is deterministic; the outputs, failure,
interruption and resume, which main() (a shared section) does alike for all, run on the template."""

import csv
import json
import os
import signal
from pathlib import Path

import pytest
import torch
from conftest import DOMAINS, SCRIPTS, TEMPLATE, TINY, interrupted_run, load, run_script
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

# What a run's speed and machine change from one run to the next; the rest of summary.json is reproducible.
TIMING_FIELDS = {
    "wall_s",
    "compile_s",
    "sps",
    "rollout_sps",
    "update_sps",
    "inference_latency_ms",
    "cpu_rss_gb",
    "run_name",
}
SUMMARY_FIELDS = TIMING_FIELDS | {
    "script",
    "arch",
    "env_id",
    "domain",
    "seed",
    "args",
    "global_step",
    "total_timesteps",
    "gpu_mem_allocated_gb",
    "gpu_mem_reserved_gb",
    "params",
    "final_return_mean",
    "return_curve",
    "versions",
    "kernel",
    "device",
    "first_minibatch_ratio_error",
    "status",
    "reason",
    "success_rate",
}
TENSORBOARD_KEYS = {
    "charts/episodic_return",
    "charts/episodic_length",
    "charts/learning_rate",
    "charts/SPS",
    "losses/value_loss",
    "losses/policy_loss",
    "losses/entropy",
    "losses/old_approx_kl",
    "losses/approx_kl",
    "losses/clipfrac",
    "losses/explained_variance",
    "perf/rollout_sps",
    "perf/update_sps",
    "perf/inference_latency_ms",
    "perf/cpu_rss_gb",
    "debug/first_minibatch_ratio_error",
}


def train(module, argv, cwd: Path, monkeypatch) -> tuple[Path, dict]:
    monkeypatch.chdir(cwd)
    module.main(module.parse_args(argv))
    (run_dir,) = (cwd / "runs").iterdir()
    return run_dir, json.loads((run_dir / "summary.json").read_text())


@pytest.mark.parametrize("domain", DOMAINS)
def test_tiny_run_completes_in_every_domain(module, script, domain, tmp_path, monkeypatch):
    run_dir, summary = train(module, [*DOMAINS[domain], *TINY], tmp_path, monkeypatch)
    assert summary["status"] == "complete" and summary["reason"] is None
    assert summary.keys() >= SUMMARY_FIELDS
    assert summary["script"] == script.name and summary["domain"] == domain.split("-")[0]
    assert summary["global_step"] == 64 == summary["args"]["num_iterations"] * summary["args"]["batch_size"]
    assert summary["params"] > 0 and summary["inference_latency_ms"] > 0 and summary["cpu_rss_gb"] > 0
    assert summary["versions"]["torch"] == torch.__version__
    # Invariant 3 in real training: the first minibatch's ratios are 1 before any gradient step.
    assert summary["first_minibatch_ratio_error"] < 1e-5
    assert run_dir.name.startswith(DOMAINS[domain][1].replace("/", "_") + "__")
    with open(run_dir / summary["return_curve"]) as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["global_step", "episodic_return", "episodic_length"]
    assert len(rows) - 1 == summary["episodes"]


def test_tensorboard_keys_and_return_curve(template, tmp_path, monkeypatch):
    argv = ["--env-id", "CartPole-v1", "--num-envs", "4", "--num-minibatches", "2", "--total-timesteps", "2048"]
    run_dir, summary = train(template, argv, tmp_path, monkeypatch)
    events = EventAccumulator(str(run_dir)).Reload()
    assert set(events.Tags()["scalars"]) >= TENSORBOARD_KEYS
    returns = [event.value for event in events.Scalars("charts/episodic_return")]
    assert len(returns) == summary["episodes"] > 10
    # Real returns, not normalised ones: CartPole pays 1 per step, so a return is the episode's length.
    lengths = [event.value for event in events.Scalars("charts/episodic_length")]
    assert returns == lengths
    assert summary["final_return_mean"] == pytest.approx(sum(returns[-100:]) / len(returns[-100:]))


def test_success_rate_is_the_share_of_recent_positive_returns(template):
    success_rate = template.success_rate
    assert success_rate([0.0, 0.97, 0.5, 0.0]) == 0.5
    assert success_rate([]) is None


def test_minigrid_summary_and_tensorboard_carry_the_success_rate(template, tmp_path, monkeypatch):
    module = template
    argv = [*DOMAINS["minigrid-symbolic"], *TINY, "--num-envs", "4", "--total-timesteps", "512"]
    run_dir, summary = train(module, [*argv, "--minigrid-max-steps", "4"], tmp_path, monkeypatch)
    with open(run_dir / "episodes.csv") as f:
        returns = [float(row["episodic_return"]) for row in csv.DictReader(f)][-100:]
    assert len(returns) > 50
    assert summary["success_rate"] == sum(r > 0 for r in returns) / len(returns)
    events = EventAccumulator(str(run_dir)).Reload()
    assert events.Scalars("charts/success_rate")[-1].value == pytest.approx(summary["success_rate"])
    (tmp_path / "classic").mkdir()
    _, summary = train(module, [*DOMAINS["classic"], *TINY], tmp_path / "classic", monkeypatch)
    assert summary["success_rate"] is None


def test_a_budget_below_one_batch_still_makes_one_update(template, tmp_path, monkeypatch):
    _, summary = train(template, [*DOMAINS["classic"], *TINY, "--total-timesteps", "1"], tmp_path, monkeypatch)
    assert summary["status"] == "complete" and summary["global_step"] == 32


def test_the_trunk_trains_at_its_own_learning_rate_and_both_anneal(template, tmp_path, monkeypatch):
    steps = []  # (parameters, learning rate) of each group at every optimizer step

    class RecordingAdam(torch.optim.Adam):
        def step(self, *args, **kwargs):
            steps.append([(group["params"], group["lr"]) for group in self.param_groups])
            return super().step(*args, **kwargs)

    monkeypatch.setattr(torch.optim, "Adam", RecordingAdam)
    rates = ["--learning-rate", "1e-3", "--trunk-learning-rate", "1e-4"]
    agents, make_agent = [], template.Agent

    def recording_agent(*args):
        agents.append(make_agent(*args))
        return agents[-1]

    monkeypatch.setattr(template, "Agent", recording_agent)
    train(template, [*DOMAINS["classic"], *TINY, *rates], tmp_path, monkeypatch)
    (agent,) = agents
    trunk = {id(p) for p in agent.trunk.parameters()}
    everything_else = {id(p) for p in agent.parameters()} - trunk
    assert trunk and everything_else
    assert len(steps) == 2 * 2 * 2  # 2 updates of 2 epochs x 2 minibatches
    for index, ((rest, rest_rate), (trunk_group, trunk_rate)) in enumerate(steps):
        fraction = 1.0 - (index // 4) / 2  # annealed linearly, update by update
        assert (rest_rate, trunk_rate) == (1e-3 * fraction, 1e-4 * fraction)
        assert {id(p) for p in rest} == everything_else and {id(p) for p in trunk_group} == trunk
    assert template.parse_args([*DOMAINS["classic"], "--learning-rate", "3e-3"]).trunk_learning_rate == 3e-3


@pytest.mark.parametrize(
    ("domain", "flags", "threads"),
    [
        ("classic", [], [1]),
        ("minigrid-symbolic", [], [1]),
        ("minigrid-rgb", [], []),
        ("minigrid-rgb", ["--torch-threads", "3"], [3]),
    ],
)
def test_small_inputs_train_on_one_torch_thread_and_the_flag_overrides(
    template, domain, flags, threads, tmp_path, monkeypatch
):
    calls = []
    monkeypatch.setattr(template.torch, "set_num_threads", calls.append)  # the test process keeps its threads
    train(template, [*DOMAINS[domain], *TINY, *flags], tmp_path, monkeypatch)
    assert calls == threads  # images: torch's own default, untouched


def test_same_seed_same_summary(module, tmp_path, monkeypatch):
    argv = [*DOMAINS["classic"], *TINY, "--total-timesteps", "256", "--torch-deterministic"]
    summaries = []
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
        _, summary = train(module, argv, tmp_path / name, monkeypatch)
        summaries.append({k: v for k, v in summary.items() if k not in TIMING_FIELDS})
    assert summaries[0] == summaries[1]
    assert summaries[0]["episodes"] > 0


@pytest.mark.parametrize(
    "env", [DOMAINS["classic"], ["--env-id", "Hopper-v4"], DOMAINS["minigrid-symbolic"]], ids=lambda env: env[1]
)
def test_async_envs_train_exactly_as_the_envs_in_this_process(template, env, tmp_path, monkeypatch):
    """--async-envs moves each env into a worker process and changes nothing else: same episodes, same
    updates, same result (MuJoCo's observation statistics live in the workers; Hopper's episodes are short)."""
    argv = [*env, *TINY, "--total-timesteps", "256"]
    runs = {}
    for name, flags in (("sync", []), ("async", ["--async-envs"])):
        (tmp_path / name).mkdir()
        run_dir, summary = train(template, [*argv, *flags], tmp_path / name, monkeypatch)
        runs[name] = (
            {k: v for k, v in summary.items() if k not in TIMING_FIELDS},
            (run_dir / "episodes.csv").read_text(),
        )
    (sync, sync_episodes), (async_, async_episodes) = runs["sync"], runs["async"]
    assert async_["args"].pop("async_envs") and not sync["args"].pop("async_envs")
    assert async_ == sync and async_episodes == sync_episodes
    assert sync["status"] == "complete" and sync["episodes"] > 0


COMPILING = [script for script in SCRIPTS if load(script).NO_COMPILE is None]


@pytest.mark.parametrize("script", COMPILING, ids=lambda path: path.stem)
def test_compile_builds_every_graph_before_the_first_env_step(script, tmp_path, monkeypatch):
    """No graph is compiled once training runs (a recompile there would be timed as training): the graphs
    are counted by a backend that runs them as traced, and every env step of three updates sees them all."""
    module, graphs, graphs_at_steps = load(script), [], []
    real_compile, real_make_envs = torch.compile, module.make_envs

    def counting_compile(function, **options):
        def backend(graph, example_inputs):
            graphs.append(graph)
            return graph.forward

        return real_compile(function, backend=backend, **options)

    def spying_make_envs(args, run_name):
        envs = real_make_envs(args, run_name)
        real_step = envs.step

        def step(actions):
            graphs_at_steps.append(len(graphs))
            return real_step(actions)

        envs.step = step
        return envs

    monkeypatch.setattr(torch, "compile", counting_compile)
    monkeypatch.setattr(module, "make_envs", spying_make_envs)
    # episodes cut at 4 steps: training sequences with starts inside
    argv = [*DOMAINS["minigrid-symbolic"], *TINY, "--total-timesteps", "96", "--minigrid-max-steps", "4"]
    _, summary = train(module, [*argv, "--compile"], tmp_path, monkeypatch)
    assert summary["status"] == "complete" and summary["global_step"] == 96 and summary["compile_s"] > 0
    assert len(graphs_at_steps) == 48 and set(graphs_at_steps) == {len(graphs)} and graphs


def tensors(outputs) -> list[torch.Tensor]:
    """(action, logprob, entropy, value, state) as a list of tensors; a state is None or a tuple of them."""
    *heads, state = outputs
    return [*heads, *(state or ())]


@pytest.mark.parametrize("script", COMPILING, ids=lambda path: path.stem)
def test_the_compiled_agent_computes_what_the_eager_one_does(script):
    """torch.compile's fused code (inductor) against eager: three rollout steps' outputs and states (the
    attention trunks' key/value cache hit in both), and a training pass's PPO loss, its logged statistics and
    every gradient, over sequences with starts inside."""
    module = load(script)
    args = module.parse_args(DOMAINS["minigrid-symbolic"])  # MemoryS11's sizes and trunk settings
    env = module.make_env(args, 0, "")()
    torch.manual_seed(0)
    agent = module.Agent(env.observation_space, env.action_space, args)
    compiled = torch.compile(agent.get_action_and_value, dynamic=False)
    num_steps, num_envs = 16, 4
    observations, (observation, _) = [], env.reset(seed=0)
    for _ in range(num_steps * num_envs):  # real views: the embedding takes MiniGrid's indices only
        observations.append(torch.as_tensor(observation))
        observation, _, terminated, truncated, _ = env.step(env.action_space.sample())
        if terminated or truncated:
            observation, _ = env.reset()
    obs = torch.stack(observations).reshape(num_steps, num_envs, *env.observation_space.shape)
    starts = (torch.rand(num_steps, num_envs) < 0.2).float()
    actions = torch.randint(env.action_space.n, (num_steps, num_envs))
    state = agent.initial_state(num_envs, torch.device("cpu"))
    chains = []  # three rollout steps each, every one from the state the step before returned
    for step_fn in (agent.get_action_and_value, compiled):
        chain, step_state = [], state
        with torch.inference_mode():
            for t in range(3):
                chain.append(step_fn(obs[t : t + 1], step_state, starts[t : t + 1], actions[t : t + 1]))
                step_state = chain[-1][-1]
                if hasattr(agent.trunk, "rollout_cache"):  # the attention trunks: the next step reuses it
                    assert agent.trunk.rollout_cache[-1][0] is step_state[0]
        chains.append(chain)
    for eager_step, compiled_step in zip(*chains, strict=True):
        for eager, fused in zip(tensors(eager_step), tensors(compiled_step), strict=True):
            torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-6)
    # the training pass as --compile runs it: the whole PPO loss compiled (and the agent inside it)
    logprobs, advantages, values, returns = torch.randn(4, num_steps, num_envs).unbind(0)
    inputs = (obs, state, starts, actions, logprobs.clamp(max=-0.1), advantages, values, returns)
    results = []
    for loss_fn in (module.ppo_loss, torch.compile(module.ppo_loss, dynamic=False)):
        agent.zero_grad()
        loss, stats = loss_fn(agent, args, *inputs)
        loss.backward()
        results.append([loss, *stats, *(p.grad.clone() for p in agent.parameters())])
    for eager, fused in zip(*results, strict=True):
        torch.testing.assert_close(fused, eager, rtol=1e-3, atol=1e-4)  # sums of 64 steps, reordered


def test_non_finite_loss_fails_the_run_and_says_why(template, tmp_path, monkeypatch):
    module = template
    original = module.Agent.get_action_and_value

    def poisoned(self, obs, state, starts, action=None):
        action, logprob, entropy, value, state = original(self, obs, state, starts, action)
        return action, logprob, entropy, value * float("nan"), state

    monkeypatch.setattr(module.Agent, "get_action_and_value", poisoned)
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        train(module, [*DOMAINS["classic"], *TINY], tmp_path, monkeypatch)
    (run_dir,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "non-finite loss" in summary["reason"]


def test_sigterm_checkpoints_and_resume_reaches_the_same_total(tmp_path):
    script = TEMPLATE
    argv = ["--env-id", "CartPoleNoVel-v1", "--num-envs", "4", "--num-steps", "32", "--num-minibatches", "2"]
    argv += ["--update-epochs", "1", "--total-timesteps", "20000", "--checkpoint-interval", "100000"]
    process, stderr, run_dir = interrupted_run(argv, tmp_path)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and "SIGTERM" in summary["reason"]
    assert 0 < summary["global_step"] < 20000 and summary["global_step"] % 128 == 0
    assert torch.load(run_dir / "checkpoint.pt", weights_only=False)["script"] == script.name
    assert "--resume" in stderr

    resumed = run_script(script, "--resume", str(run_dir.relative_to(tmp_path)), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"at step {summary['global_step']:,}" in resumed.stdout
    final = json.loads((run_dir / "summary.json").read_text())
    assert final["status"] == "complete"
    assert final["global_step"] == 20096  # ceil(20000 / 128) updates of 128 steps
    assert final["episodes"] > summary["episodes"]
    assert final["args"] == summary["args"] | {"resume": str(run_dir.relative_to(tmp_path))}
    assert list(tmp_path.iterdir()) == [tmp_path / "runs"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "slurm-sigterm"])
def test_a_signal_to_every_process_still_checkpoints_with_async_envs(signum, tmp_path):
    """Ctrl-C reaches the whole process group and SLURM's SIGTERM every process of the job: the env workers
    ignore both, and the main process checkpoints, closes them and leaves none behind."""
    argv = ["--env-id", "CartPoleNoVel-v1", "--num-envs", "2", "--num-steps", "32", "--num-minibatches", "2"]
    argv += ["--update-epochs", "1", "--total-timesteps", "200000", "--async-envs"]
    process, stderr, run_dir = interrupted_run(argv, tmp_path, signum, process_group=True)
    assert process.returncode == 128 + signum, stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and signal.Signals(signum).name in summary["reason"]
    with pytest.raises(ProcessLookupError):  # the group is empty: no worker outlived the run
        os.killpg(process.pid, 0)


def test_sigint_drops_the_partial_rollout_and_keeps_the_last_update(template, tmp_path, monkeypatch):
    """Ctrl-C in the middle of a rollout: the checkpoint holds exactly the updates finished before it."""
    module = template
    make_envs = module.make_envs

    def make_envs_interrupted_at_step_40(args, run_name):
        envs = make_envs(args, run_name)
        step, calls = envs.step, []

        def step_then_interrupt(actions):
            calls.append(actions)
            if len(calls) == 40:  # 2 updates of 16 steps done, 8 steps into the third
                os.kill(os.getpid(), signal.SIGINT)
            return step(actions)

        envs.step = step_then_interrupt
        return envs

    monkeypatch.setattr(module, "make_envs", make_envs_interrupted_at_step_40)
    with pytest.raises(SystemExit) as exit_info:
        train(module, [*DOMAINS["classic"], *TINY, "--total-timesteps", "3200"], tmp_path, monkeypatch)
    assert exit_info.value.code == 128 + signal.SIGINT
    (run_dir,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and "SIGINT" in summary["reason"]
    assert summary["global_step"] == 64
    assert torch.load(run_dir / "checkpoint.pt", weights_only=False)["iteration"] == 2
