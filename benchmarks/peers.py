"""Steps per second of our scripts against Stable-Baselines3 on the same PPO config, and against each other.

Every entry runs in a fresh process (so no run warms another's caches or threads), and the entries run in
turn, round after round, each next to the entry it is compared with and in reverse order every other round
(A B C ... C B A ...). A figure is the median over rounds of steps / training-loop seconds: our scripts'
`summary.json` `sps`, the peers' timed around `model.learn` (neither counts imports or building the envs and
the network). A ratio is the median over rounds of that round's ratio: this machine's speed can halve from one
minute to the next (measured: ppo_mlp.py at 5,938 and 2,550 steps/s in two rounds), and a pair run side by side
sees the same speed.

    python benchmarks/peers.py                        # every config, 3 rounds
    python benchmarks/peers.py --configs cartpole-novel --rounds 2 --entries ppo_mlp.py sb3-ppo
    python benchmarks/peers.py --configs memory-symbolic --entries ppo_mlp.py ppo_mamba2.py --compile
    python benchmarks/peers.py --entries ppo_mlp.py ppo_mamba2.py --variants "ppo_mamba2.py --mamba-backend torch"

Configs (the PPO flags are the same for every entry in a config; network sizes are each script's own):
- cartpole-novel: CartPoleNoVel-v1 (CartPole-v1 with observation indices 1 and 3 zeroed), 8 envs x 128
  steps, 4 minibatches of 256, 10 epochs, lr 2.5e-4. Peers: SB3 `PPO("MlpPolicy")` and sb3-contrib
  `RecurrentPPO("MlpLstmPolicy")` on a masking wrapper of their own, with their libraries' default networks
  (the targets) and with the network of the script each is compared with (for reference).
- memory-symbolic: MiniGrid-MemoryS11-v0, symbolic observations, 16 envs x 128 steps, 8 minibatches,
  8 epochs (its defaults row). Our scripts only.

The random-policy ceiling is the same wrapped vector env as `ppo_mlp.py`'s, stepped with random actions;
the MLP's rollout phase is quoted as a share of it. A variant (a script with flags of its own) runs right after
its script in every round and is reported against it and against ppo_mlp.py, with no target: the effect of a
flag, paired by round like every other ratio.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import load_script  # noqa: E402
from throughput import ppo_summary, random_policy_sps  # noqa: E402

PPO_FLAGS = {
    "cartpole-novel": [
        "--env-id",
        "CartPoleNoVel-v1",
        "--num-envs",
        "8",
        "--num-steps",
        "128",
        "--num-minibatches",
        "4",
        "--update-epochs",
        "10",
        "--learning-rate",
        "2.5e-4",
    ],
    "memory-symbolic": [
        "--env-id",
        "MiniGrid-MemoryS11-v0",
        "--minigrid-obs",
        "symbolic",
        "--num-envs",
        "16",
        "--num-steps",
        "128",
        "--num-minibatches",
        "8",
        "--update-epochs",
        "8",
        "--learning-rate",
        "2.5e-4",
    ],
}
SCRIPTS = ["ppo_mlp.py", "ppo_lstm.py", "ppo_gru.py", "ppo_trxl.py", "ppo_gtrxl.py", "ppo_mamba.py", "ppo_mamba2.py"]
PEERS = {
    "cartpole-novel": [
        "sb3-ppo",
        "sb3-ppo-our-net",
        "sb3-ppo-our-work",
        "sb3-recurrent-ppo",
        "sb3-recurrent-ppo-our-net",
    ],
    "memory-symbolic": [],
}
STEPS = {"cartpole-novel": 51_200, "memory-symbolic": 40_960}  # 50 and 20 updates
# sb3-contrib's RecurrentPPO runs at about a hundred steps a second here: 10 updates are enough to time it
PEER_STEPS = {
    "sb3-ppo": 51_200,
    "sb3-ppo-our-net": 51_200,
    "sb3-ppo-our-work": 51_200,
    "sb3-recurrent-ppo": 10_240,
    "sb3-recurrent-ppo-our-net": 10_240,
}
TARGETS = {  # entry -> (the entry it is compared with, the least ratio the issue asks for)
    "ppo_mlp.py": ("sb3-ppo", 1.5),
    "ppo_lstm.py": ("sb3-recurrent-ppo", 15.0),
}
SAME_NETWORK = {"ppo_mlp.py": "sb3-ppo-our-net", "ppo_lstm.py": "sb3-recurrent-ppo-our-net"}  # for reference
SAME_WORK = {"ppo_mlp.py": "sb3-ppo-our-work"}  # our network, value clipping and reward normalisation too
# Each entry next to the one it is compared with: the MLP among its SB3 peers, the LSTM among its sb3-contrib ones
RUN_ORDER = ["sb3-ppo", "sb3-ppo-our-net", "ppo_mlp.py", "sb3-ppo-our-work", "ppo_lstm.py", "sb3-recurrent-ppo"]
RUN_ORDER += ["sb3-recurrent-ppo-our-net", *SCRIPTS[2:]]
MEMORY_TARGET = 0.5  # every memory script against ppo_mlp.py, same flags
ROLLOUT_TARGET = 0.25  # ppo_mlp.py's rollout phase against the random-policy ceiling
template = load_script("ppo_mlp")  # for the configs' batch sizes and the ceiling's vector env


def run_ours(script: str, config: str, extra_flags: list[str]) -> dict:
    batch_size = template.parse_args(PPO_FLAGS[config]).batch_size
    flags = PPO_FLAGS[config] + extra_flags
    summary = ppo_summary(ROOT / script, flags, STEPS[config] // batch_size, batch_size)
    return {"sps": summary["sps"], "rollout_sps": summary["rollout_sps"]}


def make_peer(name: str):
    """A peer's model on its own 8 CartPoleNoVel envs, with the issue's PPO config.

    `sb3-ppo` and `sb3-recurrent-ppo` are the libraries' defaults, the peers the targets are set against
    (PPO: separate 64-64 tanh actor and critic; RecurrentPPO: an LSTM of 256 for each, then 64-64). The
    `-our-net` entries get the network of the script they are compared with (ppo_mlp.py's: three shared
    128-wide tanh layers, then linear heads; ppo_lstm.py's: a 64-wide tanh encoder and one shared 64-wide
    LSTM), so that their ratio compares the PPO code alone. `sb3-ppo-our-work` also does the two things
    ppo_mlp.py does on classic control that SB3's defaults do not: it clips the value loss (clip_range_vf 0.2,
    CleanRL's clip_vloss) and normalises rewards (VecNormalize: the return's running std, clipped at 10).
    """
    import gymnasium as gym
    import numpy as np
    import torch.nn as nn
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.torch_layers import BaseFeaturesExtractor

    class TanhLayers(BaseFeaturesExtractor):
        def __init__(self, observation_space: gym.spaces.Box, widths: tuple[int, ...]):
            super().__init__(observation_space, widths[-1])
            layers, size = [], observation_space.shape[0]
            for width in widths:
                layers += [nn.Linear(size, width), nn.Tanh()]
                size = width
            self.net = nn.Sequential(*layers)

        def forward(self, observations):
            return self.net(observations)

    def mask_velocities(env):  # CartPoleNoVel-v1: cart and pole velocities (indices 1, 3) read as 0
        return gym.wrappers.TransformObservation(env, lambda obs: obs * np.array([1, 0, 1, 0], obs.dtype), None)

    envs = make_vec_env("CartPole-v1", n_envs=8, seed=1, wrapper_class=mask_velocities)
    # device "auto": CUDA where torch sees it, as our scripts' default --cuda does, so both sides share a device
    config = dict(n_steps=128, batch_size=256, n_epochs=10, learning_rate=2.5e-4, device="auto", seed=1)
    if name == "sb3-ppo-our-work":
        from stable_baselines3.common.vec_env import VecNormalize

        envs = VecNormalize(envs, norm_obs=False, norm_reward=True, clip_reward=10.0, gamma=0.99)
        config["clip_range_vf"] = 0.2
    if name.startswith("sb3-ppo"):
        from stable_baselines3 import PPO

        policy = dict(features_extractor_class=TanhLayers, features_extractor_kwargs=dict(widths=(128,) * 3))
        policy.update(net_arch=[])
        model = PPO("MlpPolicy", envs, policy_kwargs=None if name == "sb3-ppo" else policy, **config)
    else:
        from sb3_contrib import RecurrentPPO

        policy = dict(features_extractor_class=TanhLayers, features_extractor_kwargs=dict(widths=(64,)))
        policy.update(net_arch=[], lstm_hidden_size=64, shared_lstm=True, enable_critic_lstm=False)
        model = RecurrentPPO("MlpLstmPolicy", envs, policy_kwargs=policy if "our-net" in name else None, **config)
    return model


def run_peer(name: str, steps: int) -> dict:
    """One peer's training in this process (the caller gives it a fresh one): the steps/s of `learn`."""
    model = make_peer(name)
    start = time.perf_counter()
    model.learn(total_timesteps=steps)
    return {"sps": model.num_timesteps / (time.perf_counter() - start), "rollout_sps": None}


def measure(entry: str, config: str, extra_flags: list[str]) -> dict:
    if entry in PEER_STEPS:
        command = [sys.executable, __file__, "--peer", entry, "--steps", str(PEER_STEPS[entry])]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        return json.loads(output.splitlines()[-1])
    script, *flags = entry.split()  # a variant: the script, then its own flags
    return run_ours(script, config, extra_flags + flags)


def report(config: str, entries: list[str], figures: dict[str, list[dict]], ceilings: list[float]) -> list[bool]:
    """The table: medians over rounds, and each ratio paired by round (the random-policy ceiling was measured
    just before ppo_mlp.py in each round)."""
    sps = {entry: statistics.median(run["sps"] for run in figures[entry]) for entry in entries}

    def ratio(entry: str, other: str) -> float:  # paired by round
        pairs = zip(figures[entry], figures[other], strict=True)
        return statistics.median(mine["sps"] / theirs["sps"] for mine, theirs in pairs)

    print(f"\n### {config} ({' '.join(PPO_FLAGS[config])})\n")
    print("| entry | steps/s (median) | runs | compared with | ratio | target | met |")
    print("|---|---|---|---|---|---|---|")
    met = []
    for entry in entries:
        targets = [TARGETS[entry]] if entry in TARGETS else []
        if entry in SCRIPTS[1:]:
            targets.append(("ppo_mlp.py", MEMORY_TARGET))
        if entry.split()[0] != entry:  # a variant: against its script and the MLP, no target
            targets = [(entry.split()[0], None), ("ppo_mlp.py", None)]
        targets = [(other, target) for other, target in targets if other in sps] or [(None, None)]
        runs = ", ".join(f"{run['sps']:,.0f}" for run in figures[entry])
        for other, target in targets:
            if other is None:
                print(f"| {entry} | {sps[entry]:,.0f} | {runs} | | | | |")
                continue
            paired = ratio(entry, other)
            if target is None:
                print(f"| {entry} | {sps[entry]:,.0f} | {runs} | {other} | {paired:.2f}x | | |")
                continue
            met.append(paired >= target)
            print(f"| {entry} | {sps[entry]:,.0f} | {runs} | {other} | {paired:.2f}x | {target}x | {met[-1]} |")
    for entry, peer in SAME_NETWORK.items():
        if entry in sps and peer in sps:
            print(f"\n{entry} against {peer}, the same network: {ratio(entry, peer):.2f}x (no target)")
    for entry, peer in SAME_WORK.items():
        if entry in sps and peer in sps:
            print(f"\n{entry} against {peer}, the same work: {ratio(entry, peer):.2f}x (no target)")
    if "ppo_mlp.py" in sps:
        rollout = statistics.median(run["rollout_sps"] for run in figures["ppo_mlp.py"])
        share = statistics.median(
            run["rollout_sps"] / ceiling for run, ceiling in zip(figures["ppo_mlp.py"], ceilings, strict=True)
        )
        met.append(share >= ROLLOUT_TARGET)
        print(
            f"\nppo_mlp.py's rollout phase: {rollout:,.0f} steps/s, {share:.0%} of the random-policy ceiling of "
            f"{statistics.median(ceilings):,.0f} steps/s (target {ROLLOUT_TARGET:.0%}, met: {met[-1]})"
        )
    return met


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(PPO_FLAGS), choices=list(PPO_FLAGS))
    parser.add_argument("--entries", nargs="+", help="scripts and peers to run (default: all of the config's)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--variants",
        nargs="+",
        default=[],
        metavar="'SCRIPT FLAGS'",
        help="a script (among the entries) with flags of its own, run right after it in every round",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="our scripts run with --compile (steps/s then leaves out compiling, as summary.json's sps does); "
        "every script among the entries must take it",
    )
    parser.add_argument("--peer", choices=list(PEER_STEPS), help=argparse.SUPPRESS)  # one peer run, internal
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.peer:
        print(json.dumps(run_peer(options.peer, options.steps)))
        return

    import platform

    import torch

    if options.entries and set(options.entries) - set(RUN_ORDER):
        parser.error(f"--entries: unknown {sorted(set(options.entries) - set(RUN_ORDER))}; choose from {RUN_ORDER}")
    for variant in options.variants:
        if variant.split()[0] not in SCRIPTS:
            parser.error(f"--variants: {variant.split()[0]} is not one of our scripts {SCRIPTS}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, every entry on {device}")
    # SB3 gains nothing from a second thread here (docs/performance.md, "One torch thread or two")
    print(
        f"torch threads: our scripts their --torch-threads default (1 for vector and symbolic observations), "
        f"the peers torch's default ({torch.get_num_threads()})"
    )
    all_met, extra_flags = [], ["--compile"] if options.compile else []
    for config in options.configs:
        entries = [
            e for e in RUN_ORDER if e in SCRIPTS + PEERS[config] and (not options.entries or e in options.entries)
        ]
        refusing = [e for e in entries if options.compile and e in SCRIPTS and load_script(e[:-3]).NO_COMPILE]
        if refusing:
            parser.error(f"--compile: {', '.join(refusing)} refuse it; name the entries that take it")
        for variant in options.variants:
            if variant.split()[0] not in entries:
                parser.error(f"--variants: {variant.split()[0]} is not among this run's entries")
            entries.insert(entries.index(variant.split()[0]) + 1, variant)
        figures, ceilings = {entry: [] for entry in entries}, []
        for round_index in range(options.rounds):
            for entry in entries if round_index % 2 == 0 else entries[::-1]:
                if entry == "ppo_mlp.py":
                    ceilings.append(random_policy_sps(template, PPO_FLAGS[config]))
                figures[entry].append(measure(entry, config, extra_flags))
                print(f"round {round_index + 1}, {entry}: {figures[entry][-1]['sps']:,.0f} steps/s", flush=True)
        all_met += report(config, entries, figures, ceilings)
    if not all_met:
        print("\nno target measured: the entries leave out every pair a target compares")
        return
    print(f"\nevery target met: {all(all_met)} ({sum(all_met)} of {len(all_met)})")


if __name__ == "__main__":
    main()
