"""The random-policy and reference scores that report.py normalises with, for the tasks this project builds itself.

MuJoCo and Atari take published figures (listed in report.py). The masked classic-control tasks and the MiniGrid
tasks with the paper's 3x3 view and 96-step time limit are this project's own, so their figures are computed here:

- random: the mean real return of uniformly random actions (masking does not matter to a random policy);
- MiniGrid-DoorKey-8x8-v0's reference: the shortest path to the goal with the whole grid known (pick up the key,
  open the door, walk in), found by breadth-first search and scored 1 - 0.9 * steps / max_steps as MiniGrid pays
  it (the env's own max_steps, 10 * 8**2 = 640: the 96-step time limit does not change the reward's scale).
  The agent sees 3x3 cells, so no policy reaches this bound; it is the best any policy could do.
  MiniGrid-MemoryS11-v0's reference comes from benchmarks/memory_optimum.py in the same way.

    python benchmarks/reference_scores.py        # 1,000 random episodes per task, 400 DoorKey layouts
"""

import argparse
import collections

import gymnasium as gym
import minigrid
import numpy as np
from memory_optimum import fewest_steps
from minigrid.core.world_object import Door, Key

gym.register_envs(minigrid)
MOVES = [(1, 0), (0, 1), (-1, 0), (0, -1)]  # MiniGrid's directions: right, down, left, up
TIME_LIMIT = 96  # the paper's MiniGrid time limit, a TimeLimit wrapper as in the scripts


def random_return(env_id: str, episodes: int, **kwargs) -> float:
    env = gym.make(env_id, **kwargs)
    env.action_space.seed(0)
    returns = []
    for episode in range(episodes):
        env.reset(seed=episode)
        total, done = 0.0, False
        while not done:
            _, reward, terminated, truncated, _ = env.step(env.action_space.sample())
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    return float(np.mean(returns))


def doorkey_fewest_steps(env) -> int:
    """Fewest actions from the reset state to the goal: turn, move, pick up the key, open the door."""
    key = next((x, y) for x in range(env.width) for y in range(env.height) if isinstance(env.grid.get(x, y), Key))
    door = next((x, y) for x in range(env.width) for y in range(env.height) if isinstance(env.grid.get(x, y), Door))
    goal = next((x, y) for x in range(env.width) for y in range(env.height)
                if env.grid.get(x, y) is not None and env.grid.get(x, y).type == "goal")  # fmt: skip
    start = (tuple(env.agent_pos), env.agent_dir, False, False)  # position, direction, has key, door open
    frontier, visited = collections.deque([(start, 0)]), set()
    while frontier:
        node, steps = frontier.popleft()
        if node in visited:
            continue
        visited.add(node)
        position, direction, has_key, door_open = node
        if position == goal:
            return steps
        ahead = (position[0] + MOVES[direction][0], position[1] + MOVES[direction][1])
        cell = env.grid.get(*ahead)
        if ahead == key:
            passable = has_key  # picked up, the key's cell is empty
        elif ahead == door:
            passable = door_open
        else:
            passable = cell is None or cell.can_overlap()
        successors = [(position, (direction - 1) % 4, has_key, door_open), (position, (direction + 1) % 4, has_key,
                      door_open), (ahead if passable else position, direction, has_key, door_open)]  # fmt: skip
        if ahead == key and not has_key:
            successors.append((position, direction, True, door_open))  # pickup
        if ahead == door and has_key and not door_open:
            successors.append((position, direction, has_key, True))  # toggle
        frontier.extend((successor, steps + 1) for successor in successors)
    raise RuntimeError("the goal is unreachable")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=1000)
    parser.add_argument("--layouts", type=int, default=400)
    options = parser.parse_args()
    minigrid_kwargs = {"agent_view_size": 3, "max_episode_steps": TIME_LIMIT}  # gym.make adds the TimeLimit
    print("| task | random policy | reference |\n|---|---|---|")
    print(f"| CartPoleNoVel-v1 | {random_return('CartPole-v1', options.episodes):.1f} | 500 (time limit) |")
    print(f"| LunarLanderNoVel-v3 | {random_return('LunarLander-v3', options.episodes):.1f} | 200 ('solved') |")
    env = gym.make("MiniGrid-DoorKey-8x8-v0", **minigrid_kwargs).unwrapped
    steps = []
    for seed in range(options.layouts):
        env.reset(seed=seed)
        steps.append(doorkey_fewest_steps(env))
    bound = np.mean([1 - 0.9 * n / env.max_steps for n in steps])
    random_doorkey = random_return("MiniGrid-DoorKey-8x8-v0", options.episodes, **minigrid_kwargs)
    print(f"| MiniGrid-DoorKey-8x8-v0 | {random_doorkey:.3f} | {bound:.4f} (shortest path {np.mean(steps):.1f} steps, "
          f"{min(steps)}-{max(steps)}) |")  # fmt: skip
    random_memory = random_return("MiniGrid-MemoryS11-v0", options.episodes, **minigrid_kwargs)
    env = gym.make("MiniGrid-MemoryS11-v0", agent_view_size=3).unwrapped
    steps = []
    for seed in range(options.layouts):
        env.reset(seed=seed)
        steps.append(fewest_steps(env))
    optimum = np.mean([1 - 0.9 * n / env.max_steps for n in steps])
    print(f"| MiniGrid-MemoryS11-v0 | {random_memory:.3f} | {optimum:.4f} (memory_optimum.py) |")


if __name__ == "__main__":
    main()
