"""benchmarks/memory_diagnosis.py: the probe tells a remembered cue from chance, and the replay of a real
checkpoint prints every table."""

import subprocess
import sys

import memory_diagnosis
import numpy as np
import torch
from conftest import DOMAINS, ROOT, TEMPLATE, TINY, load


def probe_samples(features_of_cue, count: int = 400, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    samples = []
    for episode in range(count):
        cue = bool(rng.integers(2))
        features = features_of_cue(cue, rng)
        samples.append({"trunk": features, "cue": cue, "age": 1 + episode % 12, "episode": episode})
    return samples


def test_probe_reads_a_remembered_cue_and_not_noise():
    remembered = probe_samples(lambda cue, rng: np.r_[float(cue), rng.normal(size=7)])
    assert all(accuracy == 1.0 for accuracy, _ in memory_diagnosis.probe_accuracy(remembered, "trunk").values())
    noise = probe_samples(lambda cue, rng: rng.normal(size=8))
    accuracies = [accuracy for accuracy, _ in memory_diagnosis.probe_accuracy(noise, "trunk").values()]
    assert 0.3 < np.mean(accuracies) < 0.7
    # Scored on held-out episodes only: the odd ones, half of each age bucket
    assert sum(n for _, n in memory_diagnosis.probe_accuracy(noise, "trunk").values()) == 200


def test_replay_of_a_checkpoint_prints_every_table(tmp_path, monkeypatch):
    module = load(TEMPLATE)
    monkeypatch.chdir(tmp_path)
    module.main(module.parse_args([*DOMAINS["minigrid-symbolic"], *TINY]))
    (run_dir,) = (tmp_path / "runs").iterdir()
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "memory_diagnosis.py"), str(run_dir), "--episodes", "24"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"## {run_dir.name}: mlp at step 64, 24 episodes" in out
    table = out[out.index("| start x |") :].split("\n\n")[0].splitlines()[2:]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table]
    assert {int(row[0]) for row in rows} <= set(range(1, 9))
    assert sum(int(row[2]) for row in rows) == 24  # every episode counted once, by its start
    assert all(row[1] == ("yes" if row[0] == "1" else "no") for row in rows)
    first_turns = [[float(p) for p in row[7].split(" / ")] for row in rows]  # P(left) / P(right), each start
    assert all(0 <= left + right <= 1 for left, right in first_turns)
    for heading in ("| start x |", "| probe on |", "| cue seen | object ahead |", "| from x = 2 |", "| step |"):
        assert heading in out

    # Made to turn left and then right from x = 2, every forced episode sees the cue after its first step
    checkpoint = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)
    args = module.Args(**checkpoint["args"])
    episodes = memory_diagnosis.replay(module, args, checkpoint, 160, force_look=True)[0]
    forced = [e for e in episodes if e["forced"]]
    assert forced and all(e["first_seen"] == 1 and e["start_x"] == memory_diagnosis.LOOK_FROM for e in forced)
    unforced = memory_diagnosis.replay(module, args, checkpoint, 40)[0]
    assert not any(e["forced"] for e in unforced)
