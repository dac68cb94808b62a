"""Why does a trunk guess on MiniGrid-MemoryS11? Replays a run's checkpoint and measures what its policy does.

- Success by start position: the agent starts facing east at x = 1..8 of the hallway; only from x = 1 is the
  cue (the start room's object at (1, 2)) in its first 3x3 view. Per start: success rate, episode length,
  the share of episodes in which the agent ever faced west in the hallway (turned back) and in which it ever
  saw the cue.
- A linear probe of memory: at every step where the cue was seen earlier in the episode but is out of view
  now, does a logistic regression on the trunk's output tell the cue (key or ball)? Trained on half the
  episodes, scored on the other half, by steps since the cue was last seen. The same probe on the encoder's
  output (no memory) is the control: it must sit at chance (0.5).
- The decision: facing one of the two objects at the hallway's end, the agent should step forward if it
  matches the cue and turn away if not. The policy's probability of stepping forward and the critic's value
  there, for a matching and a different object, in episodes that saw the cue and in those that did not.
- Whether the policy would look at all, and whether looking would pay: the probability of turning left or
  right at the first step, per start; and, from x = 2, episodes made to turn left and then right first (the
  cue is then in the view's left column), against episodes left alone. A policy that never turns and gains
  nothing when made to has a memory that does not yet read the cue from that view.
- Entropy, approximate KL and success over training, read from the run's TensorBoard events.

Actions are sampled from the policy, as in training.

    python benchmarks/memory_diagnosis.py runs/<run_name> [--episodes 800]
"""

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from common import load_script
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.distributions import Categorical

WEST, SOUTH, NORTH = 2, 1, 3  # MiniGrid's direction indices (0 is east)
LEFT, RIGHT, FORWARD = 0, 1, 2  # its first three actions
LOOK_FROM = 2  # the start from which a left turn brings the cue into view
STEPS_SINCE_CUE = [(1, 2), (3, 5), (6, 10), (11, 96)]


def replay(
    module, args, checkpoint: dict, episodes: int, num_envs: int = 16, force_look: bool = False
) -> tuple[list, list, list]:
    """Episodes (start, cue, success, length, turned back, saw cue and when first, P(left) and P(right) at the
    first step), probe samples (features, cue, age) and decisions (cue seen, object ahead matches, P(forward),
    value). With `force_look`, every other episode from x = LOOK_FROM turns left and then right first (`forced`)."""
    args = dataclasses.replace(args, num_envs=num_envs, capture_video=False, async_envs=False)  # it reads envs.envs
    envs = module.make_envs(args, "")
    agent = module.Agent(envs.single_observation_space, envs.single_action_space, args)
    agent.load_state_dict(checkpoint["agent"])
    agent.eval()
    obs, _ = envs.reset(seed=10_000 + args.seed)  # layouts training never started from at these seeds
    starts = torch.ones(num_envs)
    state = agent.initial_state(num_envs, torch.device("cpu"))

    episode_ids = iter(range(10**9))

    def episode_start(env) -> dict:
        grid_env = env.unwrapped
        cue = grid_env.grid.get(1, grid_env.height // 2 - 1).type
        start_x, episode_id = int(grid_env.agent_pos[0]), next(episode_ids)
        forced = force_look and start_x == LOOK_FROM and episode_id % 2 == 1
        return {"start_x": start_x, "cue": cue, "turned_back": False, "saw_cue": False, "first_seen": None,
                "last_seen": None, "length": 0, "id": episode_id, "forced": forced}  # fmt: skip

    current = [episode_start(env) for env in envs.envs]
    finished, samples, decisions = [], [], []
    while len(finished) < episodes:
        with torch.no_grad():
            obs_tensor = torch.as_tensor(obs)[None]
            encoded = agent.encoder(obs_tensor[0])
            hidden, state = agent.features(obs_tensor, state, starts[None])
            policy = Categorical(logits=agent.actor(hidden[0]))
            action, values = policy.sample(), agent.critic(hidden[0])[:, 0]
        for i, env in enumerate(envs.envs):
            grid_env, record = env.unwrapped, current[i]
            if record["length"] == 0:
                record["p_left"], record["p_right"] = float(policy.probs[i, LEFT]), float(policy.probs[i, RIGHT])
            if record["forced"] and record["length"] < 2:
                action[i] = (LEFT, RIGHT)[record["length"]]
            in_view = grid_env.in_view(1, grid_env.height // 2 - 1)
            if in_view:
                record["saw_cue"], record["last_seen"] = True, record["length"]
                if record["first_seen"] is None:
                    record["first_seen"] = record["length"]
            elif record["last_seen"] is not None:
                samples.append({"trunk": hidden[0, i].numpy(), "encoder": encoded[i].numpy(),
                                "cue": record["cue"] == "key", "age": record["length"] - record["last_seen"],
                                "episode": record["id"]})  # fmt: skip
            x, y = grid_env.agent_pos
            # Facing west in the hallway, on the way back to the cue (not the turn at the end, between the objects)
            record["turned_back"] |= grid_env.agent_dir == WEST and x < grid_env.success_pos[0]
            if x == grid_env.success_pos[0] and y == grid_env.height // 2 and grid_env.agent_dir in (NORTH, SOUTH):
                ahead = grid_env.grid.get(x, y + (2 if grid_env.agent_dir == SOUTH else -2))
                decisions.append({"saw_cue": record["saw_cue"], "match": ahead.type == record["cue"],
                                  "forward": float(policy.probs[i, FORWARD]), "value": float(values[i])})  # fmt: skip
        obs, reward, terminated, truncated, _ = envs.step(action.numpy())
        for i in range(num_envs):
            current[i]["length"] += 1
            if terminated[i] or truncated[i]:
                finished.append({**current[i], "success": bool(reward[i] > 0)})
                current[i] = episode_start(envs.envs[i])
        starts = torch.as_tensor(terminated | truncated, dtype=torch.float32)
    envs.close()
    return finished[:episodes], samples, decisions


def probe_accuracy(samples: list[dict], key: str) -> dict:
    """Held-out accuracy of a logistic regression from `key` features to the cue, by steps since it was seen."""
    if len({s["cue"] for s in samples}) < 2:
        return {}
    features = torch.tensor(np.stack([s[key] for s in samples]), dtype=torch.float64)
    features = (features - features.mean(0)) / (features.std(0) + 1e-6)
    labels = torch.tensor([float(s["cue"]) for s in samples], dtype=torch.float64)
    train = torch.tensor([s["episode"] % 2 == 0 for s in samples])
    weights = torch.zeros(features.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weights], max_iter=200)
    design = torch.cat([features, torch.ones(len(samples), 1, dtype=torch.float64)], 1)

    def closure():
        optimizer.zero_grad()
        logits = design[train] @ weights
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels[train])
        loss = loss + 1e-3 * weights.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        correct = ((design @ weights > 0).double() == labels).numpy()
    ages, held_out = np.array([s["age"] for s in samples]), ~train.numpy()
    result = {}
    for low, high in STEPS_SINCE_CUE:
        chosen = held_out & (ages >= low) & (ages <= high)
        result[f"{low}-{high}"] = (float(correct[chosen].mean()), int(chosen.sum())) if chosen.any() else None
    return result


def mean(values: list) -> float:
    return float(np.mean(values)) if values else float("nan")


def training_curve(run_dir: Path, points: int = 8) -> list[tuple]:
    """(step, entropy, approx KL, clip fraction, success) at evenly spaced updates of the run."""
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0}).Reload()
    series = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    steps = sorted(series.get("losses/entropy", {}))
    chosen = [steps[round(i * (len(steps) - 1) / (points - 1))] for i in range(points)] if steps else []
    tags = ("losses/entropy", "losses/approx_kl", "losses/clipfrac", "charts/success_rate")
    return [(step, *(series.get(tag, {}).get(step) for tag in tags)) for step in chosen]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--episodes", type=int, default=800)
    options = parser.parse_args()
    summary = json.loads((options.run_dir / "summary.json").read_text())
    module = load_script(Path(summary["script"]).stem)
    checkpoint = torch.load(options.run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)
    args = module.Args(**checkpoint["args"])
    torch.manual_seed(args.seed)
    episodes, samples, decisions = replay(module, args, checkpoint, options.episodes)
    step = checkpoint["iteration"] * args.batch_size
    print(f"## {options.run_dir.name}: {summary['arch']} at step {step:,}, {len(episodes)} episodes\n")

    print("| start x | cue in first view | episodes | success | mean length | turned back | saw the cue "
          "| P(left) / P(right) at the first step |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for x in sorted({e["start_x"] for e in episodes}):
        group = [e for e in episodes if e["start_x"] == x]
        keys = ("success", "length", "turned_back", "saw_cue", "p_left", "p_right")
        share = {key: np.mean([e[key] for e in group]) for key in keys}
        print(f"| {x} | {'yes' if x == 1 else 'no'} | {len(group)} | {share['success']:.2f} | {share['length']:.1f} "
              f"| {share['turned_back']:.2f} | {share['saw_cue']:.2f} "
              f"| {share['p_left']:.3f} / {share['p_right']:.3f} |")  # fmt: skip
    saw = [e["success"] for e in episodes if e["saw_cue"]]
    missed = [e["success"] for e in episodes if not e["saw_cue"]]
    print(
        f"\nall: success {mean([e['success'] for e in episodes]):.3f}; success when the cue was seen "
        f"{mean(saw):.3f} ({len(saw)} episodes), when not {mean(missed):.3f} ({len(missed)} episodes)\n"
    )

    print("| probe on | " + " | ".join(f"{low}-{high} steps since the cue" for low, high in STEPS_SINCE_CUE) + " |")
    print("|---|" + "---|" * len(STEPS_SINCE_CUE))
    for key, name in (("trunk", "trunk output (memory)"), ("encoder", "encoder output (control)")):
        accuracy = probe_accuracy(samples, key)
        cells = [accuracy.get(f"{low}-{high}") for low, high in STEPS_SINCE_CUE]
        cells = [f"{cell[0]:.2f} (n={cell[1]})" if cell else "-" for cell in cells]
        print(f"| {name} | " + " | ".join(cells) + " |")

    print("\n| cue seen | object ahead | decisions | P(forward) | value |\n|---|---|---|---|---|")
    for saw_cue in (True, False):
        for match in (True, False):
            group = [d for d in decisions if d["saw_cue"] == saw_cue and d["match"] == match]
            forward, value = mean([d["forward"] for d in group]), mean([d["value"] for d in group])
            print(f"| {'yes' if saw_cue else 'no'} | {'matches' if match else 'differs'} | {len(group)} "
                  f"| {forward:.2f} | {value:.3f} |")  # fmt: skip

    torch.manual_seed(args.seed)
    looks = [
        e for e in replay(module, args, checkpoint, options.episodes, force_look=True)[0] if e["start_x"] == LOOK_FROM
    ]
    print(f"\n| from x = {LOOK_FROM} | episodes | success | saw the cue |\n|---|---|---|---|")
    for forced, name in ((False, "left alone"), (True, "made to turn left, then right")):
        group = [e for e in looks if e["forced"] == forced]
        print(f"| {name} | {len(group)} | {mean([e['success'] for e in group]):.2f} "
              f"| {mean([e['saw_cue'] for e in group]):.2f} |")  # fmt: skip

    print("\n| step | entropy | approx KL | clip fraction | success (last 100) |\n|---|---|---|---|---|")
    for step, *values in training_curve(options.run_dir):
        print(f"| {step:,} | " + " | ".join("-" if v is None else f"{v:.4g}" for v in values) + " |")


if __name__ == "__main__":
    main()
