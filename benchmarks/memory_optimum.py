"""The best mean return any policy can get on MiniGrid-MemoryS11-v0 as the scripts build it (view 3x3).

MiniGrid pays 1 - 0.9 * steps / max_steps for reaching the matching object, with the env's own max_steps
(5 * 11**2 = 605; the scripts cut episodes at the paper's 96 steps with a TimeLimit, which leaves that scale
alone), and the agent starts anywhere in the hallway facing away from the cue, so even a perfect memory needs
10-17 steps. A breadth-first search over (position, direction, cue seen) finds the fewest steps to reach the
matching object after seeing the cue, for each of the first N layouts.

    python benchmarks/memory_optimum.py               # layouts of seeds 0..399
"""

import argparse
import collections

import gymnasium as gym
import minigrid
import numpy as np

gym.register_envs(minigrid)
MOVES = [(1, 0), (0, 1), (-1, 0), (0, -1)]  # MiniGrid's directions: right, down, left, up


def fewest_steps(env) -> int:
    """Fewest actions from the reset state to the matching object with the cue seen on the way."""
    cue = (1, env.height // 2 - 1)  # the start room's object, where MemoryEnv puts it

    def sees_cue(position, direction) -> bool:
        env.agent_pos, env.agent_dir = np.array(position), direction
        return env.in_view(*cue)

    start = (tuple(env.agent_pos), env.agent_dir)
    success, failure = tuple(env.success_pos), tuple(env.failure_pos)
    frontier, visited = collections.deque([(*start, sees_cue(*start), 0)]), set()
    while frontier:
        position, direction, seen, steps = frontier.popleft()
        if (position, direction, seen) in visited:
            continue
        visited.add((position, direction, seen))
        if position == success and seen:
            return steps
        if position in (success, failure):  # the episode is over
            continue
        ahead = (position[0] + MOVES[direction][0], position[1] + MOVES[direction][1])
        cell = env.grid.get(*ahead)
        moved = ahead if cell is None or cell.can_overlap() else position
        for new_position, new_direction in ((position, (direction - 1) % 4), (position, (direction + 1) % 4),
                                            (moved, direction)):  # fmt: skip
            frontier.append((new_position, new_direction, seen or sees_cue(new_position, new_direction), steps + 1))
    raise RuntimeError("the matching object is unreachable")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layouts", type=int, default=400)
    options = parser.parse_args()
    env = gym.make("MiniGrid-MemoryS11-v0", agent_view_size=3).unwrapped
    steps = []
    for seed in range(options.layouts):
        env.reset(seed=seed)
        steps.append(fewest_steps(env))
    returns = [1 - 0.9 * n / env.max_steps for n in steps]
    print("| max_steps (reward scale) | optimal mean return | mean steps | fewest | most |\n|---|---|---|---|---|")
    print(f"| {env.max_steps} | {np.mean(returns):.4f} | {np.mean(steps):.2f} | {min(steps)} | {max(steps)} |")


if __name__ == "__main__":
    main()
