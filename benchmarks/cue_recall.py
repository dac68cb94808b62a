"""Can a trunk learn to carry a cue for 20 steps when it is taught directly, without PPO?

MiniGrid-MemoryS11 asks the agent to remember the cue it saw at the start until it reaches the split at the end
of the hallway, about 20 steps later. This trains each script's trunk (its MemoryS11 symbolic row, so the sizes
the memory runs use) with a linear head on a supervised version of that: the first input of a sequence is one
of two cue vectors, the next 23 are distractors drawn from 8 others (fixed random vectors), and the loss is the
cross-entropy of naming the cue at steps 20-23. Adam at the runs' learning rate (2.5e-4), batches of 32, the
trunk's exact episode start at step 0. Printed: the accuracy at step 20 on 256 fresh sequences after 100, 200,
400 and 800 updates, mean over 2 seeds. A trunk that does not learn this within 800 updates of a clean signal
has little chance on the task, where the signal is sparse; one that learns it fast here and still guesses on the
task is held back by what PPO gives it to learn from.

    python benchmarks/cue_recall.py [--trunks mamba2 gru ...]
"""

import argparse

import torch
from common import load_script

STEPS, CUE_READ_FROM, BATCH = 24, 20, 32
CHECKPOINTS = (100, 200, 400, 800)
TRUNKS = {  # name -> (script, extra flags)
    "mlp": ("ppo_mlp", []),
    "lstm": ("ppo_lstm", []),
    "gru": ("ppo_gru", []),
    "trxl": ("ppo_trxl", []),
    "gtrxl": ("ppo_gtrxl", []),
    "mamba": ("ppo_mamba", []),
    # Mamba-2's own start and two memory-first ones (its MemoryS11 row has the last), without the post-MLP
    "mamba2": ("ppo_mamba2", ["--dt-init", "1e-3", "1e-1", "--a-init", "1", "16", "--d-init", "1", "--no-post-mlp"]),
    "mamba2 D 0": (
        "ppo_mamba2",
        ["--dt-init", "1e-3", "1e-1", "--a-init", "1", "16", "--d-init", "0", "--no-post-mlp"],
    ),
    "mamba2 dt 0.1-1, -A 0.05-1, D 0": (
        "ppo_mamba2",
        ["--dt-init", "0.1", "1", "--a-init", "0.05", "1", "--d-init", "0", "--no-post-mlp"],
    ),
}


def recall(script, flags: list[str], seed: int, checkpoints: tuple[int, ...] = CHECKPOINTS) -> list[float]:
    """The accuracy at step 20 after each number of updates in `checkpoints`."""
    args = script.parse_args(["--env-id", "MiniGrid-MemoryS11-v0", "--minigrid-obs", "symbolic", *flags])
    torch.manual_seed(seed)
    trunk = script.Trunk(args.hidden_size, args)
    head = torch.nn.Linear(trunk.output_size, 2)
    tokens = torch.randn(10, args.hidden_size)  # 0 and 1 are the cues, 2-9 the distractors
    optimizer = torch.optim.Adam([*trunk.parameters(), *head.parameters()], lr=args.learning_rate, eps=1e-5)

    def sequences(batch: int):
        cue = torch.randint(0, 2, (batch,))
        ids = torch.randint(2, 10, (STEPS, batch))
        ids[0] = cue
        starts = torch.zeros(STEPS, batch)
        starts[0] = 1
        hidden, _ = trunk(tokens[ids], trunk.initial_state(batch, torch.device("cpu")), starts)
        return head(hidden[CUE_READ_FROM:]), cue

    accuracies = []
    for update in range(1, max(checkpoints) + 1):
        logits, cue = sequences(BATCH)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), cue.repeat(STEPS - CUE_READ_FROM))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if update in checkpoints:
            with torch.no_grad():
                logits, cue = sequences(256)
                accuracies.append((logits[0].argmax(-1) == cue).float().mean().item())
    return accuracies


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trunks", nargs="+", choices=list(TRUNKS), default=list(TRUNKS))
    parser.add_argument("--seeds", type=int, default=2)
    options = parser.parse_args()
    torch.set_num_threads(1)
    print("| trunk | " + " | ".join(f"after {n} updates" for n in CHECKPOINTS) + " |")
    print("|---" * (len(CHECKPOINTS) + 1) + "|")
    for name in options.trunks:
        script_name, flags = TRUNKS[name]
        script = load_script(script_name)
        runs = torch.tensor([recall(script, flags, seed) for seed in range(1, options.seeds + 1)])
        print(f"| {name} | " + " | ".join(f"{value:.2f}" for value in runs.mean(0)) + " |", flush=True)


if __name__ == "__main__":
    main()
