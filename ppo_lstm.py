"""PPO with a single-layer LSTM trunk that forgets exactly at every episode start.

Observations are encoded (MLP for vectors, a CNN for Atari and MiniGrid RGB, an embedding for MiniGrid
symbols), passed through one `nn.LSTM` layer, and read out by a policy head and a value head. Its state
(h, c) is zeroed at every episode start, in the rollout (one step per call) and in training (whole rollout
sequences replayed from the state stored at the rollout's start, starts anywhere inside). On a CPU its
steps run in this file's C++ loops, forward and backward, one call per sequence (`--lstm-backend auto`);
on a GPU training calls `nn.LSTM` once per piece between episode starts: no Python loop over time steps.
Reference: Smirnov and Gu, "RLBenchNet: The Right Network for the Right Reinforcement Learning Task"
(arXiv 2505.15040); the PPO details follow CleanRL's `ppo.py`, `ppo_atari_lstm.py` and
`ppo_continuous_action.py`.

Run:
    python ppo_lstm.py --env-id CartPoleNoVel-v1
    python ppo_lstm.py --env-id MiniGrid-MemoryS11-v0 --minigrid-obs symbolic
    python ppo_lstm.py --env-id CartPoleNoVel-v1 --no-state-reset   # the paper's leak, for ablation
    python ppo_lstm.py --help

The file reads top to bottom in eight sections: 1. imports, 2. arguments (`Args`; every field is a `--help`
line), 3. the domain-defaults table, 4. parsing and checking the command line, 5. environments, 6. the network
(encoder, trunk, heads), 7. profiling helpers, 8. training (`main`). The code between `# >>> shared: <name>`
and `# <<< shared: <name>` is the same in every script of the set, ppo_mlp.py included; the trunk (section 6)
and the domain-defaults table (section 3) are what this script changes.
"""

# ---------------------------------------------------------------------------------------------------------
# 1. Imports
# ---------------------------------------------------------------------------------------------------------
# >>> shared: imports
import csv
import dataclasses
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import random
import resource
import signal
import statistics
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import ale_py
import gymnasium as gym
import minigrid
import numpy as np
import torch
import torch.nn as nn
import tyro
from minigrid.core.constants import COLOR_TO_IDX, OBJECT_TO_IDX, STATE_TO_IDX
from minigrid.wrappers import ImgObsWrapper, RGBImgPartialObsWrapper
from stable_baselines3.common.atari_wrappers import EpisodicLifeEnv, FireResetEnv
from torch.distributions import Categorical, Normal
from torch.utils.tensorboard import SummaryWriter

try:
    import wandb
except ImportError:
    wandb = None

gym.register_envs(ale_py)
gym.register_envs(minigrid)
# <<< shared: imports


# ---------------------------------------------------------------------------------------------------------
# 2. Arguments
# ---------------------------------------------------------------------------------------------------------
# >>> shared: args
@dataclass
class Args:
    env_id: str = "CartPoleNoVel-v1"
    """the environment id: a Gymnasium/ale-py/MiniGrid id, CartPoleNoVel-v1 or LunarLanderNoVel-v3"""
    exp_name: str = Path(__file__).stem
    """the name of this experiment (the middle of the run name)"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """if toggled, cuDNN is deterministic and TF32 is off, so rollout and training agree exactly on GPUs"""
    cuda: bool = True
    """if toggled, cuda will be used when available"""
    torch_threads: int | None = None
    """CPU threads for torch; default 1 for vector and symbolic observations, so that runs go one per core (a
    second thread made one run 0.95-1.3x as fast on 2 cores); torch's own default (one per core) for images"""
    compile: bool = False
    """compile the agent's rollout step and the PPO loss with torch.compile before training starts, and
    step Adam fused (seconds to minutes on a CPU: summary.json's compile_s, outside its steps/s); results
    match eager to float rounding; C++ loops run eager only, so a trunk that has them may run slower
    compiled on some configs; scripts whose trunk ran slower compiled on every config refuse it and say why"""
    track: bool = False
    """if toggled, this experiment will be tracked with Weights and Biases (needs `pip install wandb`)"""
    wandb_project_name: str = "rlbenchnet"
    """the wandb's project name"""
    capture_video: bool = False
    """whether to capture videos of the agent performances to `videos/<run_name>` (needs moviepy)"""
    resume: str | None = None
    """continue an interrupted run of this script from its directory `runs/<run_name>`, with its arguments"""
    checkpoint_interval: int = 50
    """save a checkpoint and summary.json every this many updates (and always at the end)"""

    # Environment
    frame_stack: int = 1
    """stack this many consecutive observations (1 is the paper's MLP-1, 4 its MLP-4)"""
    masked_indices: tuple[int, ...] | None = None
    """zero these entries of a vector observation (MuJoCo, classic control); default: the masked env's own"""
    minigrid_obs: str = "rgb"
    """MiniGrid input: `rgb` (84x84 partial view, as in the paper) or `symbolic` (3x3 grid of indices)"""
    minigrid_max_steps: int = 96
    """cut MiniGrid episodes after this many steps (the paper's 96); rewards keep MiniGrid's own scale"""
    async_envs: bool = False
    """step each env in its own process (Gymnasium's AsyncVectorEnv) instead of one after another in this one:
    faster where an env step costs more than the round trip to a process and there is a core per env"""

    # PPO; `None` takes the value of the domain-defaults table (section 3)
    total_timesteps: int | None = None
    """total timesteps of the experiment"""
    learning_rate: float | None = None
    """the learning rate of the optimizer (> 0)"""
    trunk_learning_rate: float | None = None
    """the learning rate of the trunk's parameters (> 0; default: the table's, else --learning-rate), annealed
    with it (the paper trains its Mamba trunks at 1e-4 and the rest at 2.5e-4)"""
    num_envs: int | None = None
    """the number of parallel game environments"""
    num_steps: int | None = None
    """the number of steps to run in each environment per policy rollout"""
    anneal_lr: bool = True
    """toggle learning rate annealing for policy and value networks"""
    gamma: float | None = None
    """the discount factor gamma, in (0, 1]"""
    gae_lambda: float | None = None
    """the lambda for the general advantage estimation, in [0, 1]"""
    num_minibatches: int | None = None
    """the number of mini-batches (each holds whole environments' sequences)"""
    update_epochs: int | None = None
    """the K epochs to update the policy"""
    norm_adv: bool = True
    """toggles advantages normalization"""
    clip_coef: float | None = None
    """the surrogate clipping coefficient (> 0)"""
    clip_vloss: bool = True
    """toggles whether or not to use a clipped loss for the value function, as per the paper"""
    ent_coef: float | None = None
    """coefficient of the entropy (>= 0)"""
    vf_coef: float = 0.5
    """coefficient of the value function (> 0: the value head learns only through it)"""
    max_grad_norm: float = 0.5
    """the maximum norm for the gradient clipping (> 0: a norm of 0 would zero every gradient)"""
    target_kl: float | None = None
    """the target KL divergence threshold (> 0; stops the update epochs early)"""

    # Network
    hidden_size: int | None = None
    """width of the encoder output and of the trunk"""
    view_pool: bool = False
    """images and MiniGrid views: the encoder also reads its features pooled over the view's positions (what
    is in view, wherever it lies) beside the per-position ones"""

    # Filled in by parse_args
    domain: tyro.conf.Suppress[str] = ""
    """mujoco, atari, classic or minigrid"""
    batch_size: tyro.conf.Suppress[int] = 0
    """num_envs * num_steps"""
    minibatch_size: tyro.conf.Suppress[int] = 0
    """batch_size // num_minibatches"""
    num_iterations: tyro.conf.Suppress[int] = 0
    """number of PPO updates: ceil(total_timesteps / batch_size), at least 1"""
    # <<< shared: args

    # Trunk
    lstm_backend: str = "auto"
    """auto or torch. auto runs the LSTM on a CPU in this file's C++ loops over time (built on the first
    run, about 25 s, where a C++ compiler is found; else nn.LSTM, saying why), on a GPU in nn.LSTM (cuDNN);
    torch runs nn.LSTM everywhere (bit for bit the runs made before the C++ loops)"""
    no_state_reset: bool = False
    """never reset the memory at episode starts (the paper's leaky behaviour, for ablation)"""


ARCH = "lstm"
TRUNK_SIZE_FIELDS = ("hidden_size",)
TRUNK_CHOICE_FIELDS = {"lstm_backend": ("auto", "torch")}  # trunk flags with a fixed set of values
TRUNK_RANGE_FIELDS = ()  # trunk flags that are (low, high) ranges of positive numbers
TRUNK_FINITE_FIELDS = ()  # trunk flags that take any finite number
# why --compile is refused for this trunk (None: it compiles and gains)
NO_COMPILE = (
    "ppo_lstm.py's trunk runs its steps in C++ loops on a CPU and cuts each sequence at its episode starts"
    " (which depend on the data) on a GPU: compiled, it breaks into pieces and trained slower than eager"
)


# ---------------------------------------------------------------------------------------------------------
# 3. Domain defaults: a flag the user passes always wins over this table
# ---------------------------------------------------------------------------------------------------------
DOMAIN_DEFAULTS = {
    "mujoco": dict(
        total_timesteps=1_000_000,
        learning_rate=3e-4,
        num_envs=16,
        num_steps=128,
        num_minibatches=8,
        update_epochs=10,
        clip_coef=0.2,
        ent_coef=0.0,
        hidden_size=64,
        gamma=0.99,
        gae_lambda=0.95,
    ),
    "atari": dict(
        total_timesteps=10_000_000,
        learning_rate=2.5e-4,
        num_envs=16,
        num_steps=128,
        num_minibatches=8,
        update_epochs=4,
        clip_coef=0.1,
        ent_coef=0.01,
        hidden_size=352,
        gamma=0.99,
        gae_lambda=0.95,
    ),
    "classic": dict(
        total_timesteps=500_000,
        learning_rate=1e-3,  # with 1 minibatch: 475 on CartPoleNoVel soonest (LSTM 217 k, GRU 156 k)
        num_envs=8,
        num_steps=128,
        num_minibatches=1,  # all 8 sequences: 10 recurrent passes an update, not 40; steadier too
        update_epochs=10,
        clip_coef=0.2,
        ent_coef=0.0,
        hidden_size=64,
        gamma=0.99,
        gae_lambda=0.95,
    ),
    "minigrid": dict(
        total_timesteps=1_000_000,
        learning_rate=2.5e-4,
        num_envs=16,
        num_steps=128,
        num_minibatches=4,
        update_epochs=4,
        clip_coef=0.2,
        ent_coef=0.01,
        hidden_size=176,
        gamma=0.99,
        gae_lambda=0.95,
    ),
    "minigrid-symbolic": dict(hidden_size=144),  # the embedding encoder is smaller than the CNN
    # LunarLanderNoVel-v3: 1000-step episodes and a landing bonus far ahead want a longer horizon and more
    # exploration: GRU 227 at 3 M, against at most 124 with the classic row
    "LunarLanderNoVel-v3": dict(
        total_timesteps=3_000_000,
        learning_rate=3e-4,
        ent_coef=0.01,
        gamma=0.999,
        gae_lambda=0.98,
    ),
    # MiniGrid-MemoryS11-v0: the paper's 16 gradient steps per rollout starve the update (approximate KL 1e-4 by
    # 350 k steps) before the trunk learns to compare the remembered cue with the object ahead; 64 (8 epochs of
    # 8 minibatches) build that comparison, and entropy 0.03 keeps the agent turning back to look for the cue
    # (TrXL, symbolic: return 0.94 at 1.1 M steps; with entropy 0.01 it never turned back by 885 k)
    "MiniGrid-MemoryS11-v0": dict(
        num_minibatches=8,
        update_epochs=8,
        ent_coef=0.03,
    ),
}


# ---------------------------------------------------------------------------------------------------------
# 4. Parsing and checking the command line: bad input is one line on stderr and exit status 2
# ---------------------------------------------------------------------------------------------------------
# >>> shared: parse_args
# Velocity-masked classic control (the paper's POMDP variants): base env id and the indices zeroed.
MASKED_ENVS = {
    "CartPoleNoVel-v1": ("CartPole-v1", (1, 3)),
    "LunarLanderNoVel-v3": ("LunarLander-v3", (2, 3, 5)),
}
SIZE_FIELDS = (
    "total_timesteps",
    "num_envs",
    "num_steps",
    "num_minibatches",
    "update_epochs",
    "checkpoint_interval",
    "minigrid_max_steps",
)


def fail(message: str):
    """Bad input: one line on stderr, exit status 2, nothing written."""
    print(f"{Path(sys.argv[0]).name}: error: {message}", file=sys.stderr)
    sys.exit(2)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def base_env_id(env_id: str) -> str:
    """The registered env behind an id: CartPoleNoVel-v1 -> CartPole-v1; any other id is its own."""
    return MASKED_ENVS[env_id][0] if env_id in MASKED_ENVS else env_id


def env_domain(env_id: str) -> str:
    """The domain is read from the env's registration, never guessed from an observation shape."""
    try:
        entry_point = str(gym.spec(base_env_id(env_id)).entry_point)
    except gym.error.Error:
        fail(f"unknown env id {env_id!r}")
    for domain, marker in (("mujoco", "mujoco"), ("atari", "ale_py"), ("minigrid", "minigrid")):
        if marker in entry_point:
            return domain
    return "classic"


def read_checkpoint(run_dir: str) -> dict:
    """The checkpoint an interrupted run of this script left in its directory; anything else is bad input."""
    path = Path(run_dir) / "checkpoint.pt"
    if not path.is_file():
        fail(f"--resume: no checkpoint at {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # a truncated or foreign file fails in the unpickler, the zip reader or at EOF
        fail(f"--resume: cannot read {path} ({type(error).__name__})")
    # Every checkpoint names the script that wrote it: another script's agent would not load into this one.
    script = Path(__file__).name
    written_by = checkpoint.get("script") if isinstance(checkpoint, dict) else None
    if written_by != script:
        fail(f"--resume: {path} was written by {written_by or 'an unknown program'}, not by {script}")
    if not isinstance(checkpoint.get("env_statistics", {}), dict):  # a list of wrapper chains, in earlier versions
        fail(f"--resume: {path} was written by an earlier version of {script}: its env statistics do not load")
    if len(checkpoint.get("optimizer", {}).get("param_groups", ())) == 1:  # one for all, in earlier versions
        fail(f"--resume: {path} is from an earlier version of {script}: its optimizer state does not load")
    return checkpoint


def parse_args(argv: list[str] | None = None) -> Args:
    """Parse the command line, apply the domain defaults and validate; bad input exits with status 2."""
    args = tyro.cli(Args, args=argv)
    if args.resume is not None:
        saved = read_checkpoint(args.resume)["args"]
        unknown = sorted(set(saved) - {field.name for field in dataclasses.fields(Args)})
        if unknown:
            fail(f"--resume: {args.resume} was saved with arguments this version lacks: {', '.join(unknown)}")
        return dataclasses.replace(Args(**saved), resume=args.resume)
    args.domain = env_domain(args.env_id)
    # Finer rows refine the domain's: MiniGrid's observation kind ("minigrid-symbolic"), then the env id
    defaults = DOMAIN_DEFAULTS[args.domain]
    for key in (f"minigrid-{args.minigrid_obs}" if args.domain == "minigrid" else None, args.env_id):
        defaults = {**defaults, **DOMAIN_DEFAULTS.get(key, {})}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.masked_indices is None:
        args.masked_indices = MASKED_ENVS[args.env_id][1] if args.env_id in MASKED_ENVS else ()
    if args.trunk_learning_rate is None:
        args.trunk_learning_rate = args.learning_rate

    for name in SIZE_FIELDS + TRUNK_SIZE_FIELDS:
        if getattr(args, name) <= 0:
            fail(f"{flag(name)} must be positive, got {getattr(args, name)}")
    if args.torch_threads is not None and args.torch_threads <= 0:
        fail(f"--torch-threads must be positive, got {args.torch_threads}")
    if args.compile and NO_COMPILE:
        fail(f"--compile: {NO_COMPILE}")
    for name, choices in TRUNK_CHOICE_FIELDS.items():
        if getattr(args, name) not in choices:
            fail(f"{flag(name)} must be one of {', '.join(choices)}, got {getattr(args, name)!r}")
    for name in TRUNK_RANGE_FIELDS:  # (low, high) of an initialisation draw
        low, high = getattr(args, name)
        if not 0 < low <= high < math.inf:
            fail(f"{flag(name)} must be two finite numbers with 0 < low <= high, got {low} {high}")
    for name in TRUNK_FINITE_FIELDS:
        if not math.isfinite(getattr(args, name)):
            fail(f"{flag(name)} must be finite, got {getattr(args, name)}")
    # A NaN fails every comparison, so it is caught with the values out of range.
    coefficient_ranges = {
        "learning_rate": (args.learning_rate > 0, "> 0"),
        "trunk_learning_rate": (args.trunk_learning_rate > 0, "> 0"),
        "gamma": (0 < args.gamma <= 1, "in (0, 1]"),
        "gae_lambda": (0 <= args.gae_lambda <= 1, "in [0, 1]"),
        "clip_coef": (args.clip_coef > 0, "> 0"),
        "ent_coef": (args.ent_coef >= 0, ">= 0"),
        "vf_coef": (args.vf_coef > 0, "> 0"),
        "max_grad_norm": (args.max_grad_norm > 0, "> 0"),
        "target_kl": (args.target_kl is None or args.target_kl > 0, "> 0"),
    }
    for name, (in_range, allowed) in coefficient_ranges.items():
        value = getattr(args, name)
        if value is not None and not (in_range and math.isfinite(value)):
            fail(f"{flag(name)} must be finite and {allowed}, got {value}")
    if args.frame_stack < 1:
        fail(f"--frame-stack must be at least 1, got {args.frame_stack}")
    if args.num_envs % args.num_minibatches:
        fail(f"--num-envs {args.num_envs} is not divisible by --num-minibatches {args.num_minibatches}")
    if args.minigrid_obs not in ("rgb", "symbolic"):
        fail(f"--minigrid-obs must be rgb or symbolic, got {args.minigrid_obs!r}")
    if args.view_pool and args.domain not in ("atari", "minigrid"):
        fail(f"--view-pool pools over an image or grid, which {args.domain} observations are not")
    if args.masked_indices and args.domain not in ("mujoco", "classic"):
        fail(f"--masked-indices zeroes entries of vector observations, which {args.domain} envs do not give")
    if args.track and wandb is None:
        fail("--track needs Weights and Biases: pip install wandb")
    if args.capture_video and importlib.util.find_spec("moviepy") is None:
        fail("--capture-video needs moviepy: pip install moviepy")

    try:  # one env, built and closed, answers what the spaces are
        env = make_env(args, 0, "")()
    except (ValueError, gym.error.Error) as error:  # an option or an observation space the env cannot take
        fail(str(error).splitlines()[0])
    action_space = env.action_space
    env.close()
    action_kind = type(action_space).__name__
    if not isinstance(action_space, (gym.spaces.Discrete, gym.spaces.Box)):
        fail(f"{args.env_id} has a {action_kind} action space; only Discrete and Box are served")
    if isinstance(action_space, gym.spaces.Discrete) and action_space.start != 0:
        fail(f"{args.env_id} has Discrete actions from {action_space.start}; the policy's actions start at 0")
    if isinstance(action_space, gym.spaces.Box) and len(action_space.shape) != 1:
        fail(f"{args.env_id} has Box actions of shape {action_space.shape}; only vectors are served")
    args.batch_size = args.num_envs * args.num_steps
    args.minibatch_size = args.batch_size // args.num_minibatches
    args.num_iterations = max(1, math.ceil(args.total_timesteps / args.batch_size))
    return args
    # <<< shared: parse_args


# ---------------------------------------------------------------------------------------------------------
# 5. Environments
# ---------------------------------------------------------------------------------------------------------
# >>> shared: environments
def make_env(args: Args, index: int, run_name: str):
    """A thunk building one wrapped env. Episode statistics are recorded before any reward clipping or
    normalisation, and before Atari's life loss, so the logged return is the real game's."""

    def thunk():
        render_mode = "rgb_array" if args.capture_video and index == 0 and run_name else None
        if args.domain == "atari":  # frame skip is applied once, by AtariPreprocessing
            env = gym.make(args.env_id, frameskip=1, repeat_action_probability=0.0, render_mode=render_mode)
        elif args.domain == "minigrid":
            env = gym.make(args.env_id, agent_view_size=3, render_mode=render_mode)
            # The paper's cut: a TimeLimit, with MiniGrid's own max_steps (5 x size^2) left in place, so a
            # success still pays 1 - 0.9 x steps / max_steps (about 0.97 on MemoryS11), the paper's scale.
            env = gym.wrappers.TimeLimit(env, args.minigrid_max_steps)
        else:
            env = gym.make(base_env_id(args.env_id), render_mode=render_mode)
            space = env.observation_space
            if not (isinstance(space, gym.spaces.Box) and len(space.shape) == 1):
                kind = f"shape {space.shape}" if isinstance(space, gym.spaces.Box) else type(space).__name__
                raise ValueError(f"{args.env_id} has {kind} observations; this domain needs a vector")
        if render_mode:
            env = gym.wrappers.RecordVideo(env, f"videos/{run_name}")
        env = gym.wrappers.RecordEpisodeStatistics(env)
        if args.masked_indices:  # vector observations only (parse_args checks): the raw entries are zeroed
            env = mask_observation(env, args.masked_indices)
        if args.domain == "atari":
            env = gym.wrappers.AtariPreprocessing(env, noop_max=30, frame_skip=4, screen_size=84)
            env = EpisodicLifeEnv(env)  # a lost life ends the training episode, not the game
            if "FIRE" in env.unwrapped.get_action_meanings():
                env = FireResetEnv(env)
            env = gym.wrappers.ClipReward(env, -1.0, 1.0)
        elif args.domain == "minigrid":
            if args.minigrid_obs == "rgb":
                env = RGBImgPartialObsWrapper(env, tile_size=28)  # 3x3 view -> 84x84 pixels
            env = ImgObsWrapper(env)
            if args.minigrid_obs == "rgb":
                env = channels_first(env)
        elif args.domain == "mujoco":
            env = gym.wrappers.ClipAction(env)
            env = gym.wrappers.NormalizeObservation(env)
            space = env.observation_space
            env = gym.wrappers.TransformObservation(env, lambda obs: np.clip(obs, -10, 10), space)
        if args.frame_stack > 1 or args.domain == "atari":
            env = gym.wrappers.FrameStackObservation(env, args.frame_stack)  # Atari: [frames, 84, 84]
            shape = env.observation_space.shape
            if len(shape) == 4 and args.minigrid_obs == "rgb":  # MiniGrid RGB: [frames * 3, 84, 84]
                env = gym.wrappers.ReshapeObservation(env, (shape[0] * shape[1], *shape[2:]))
            elif len(shape) == 2 and args.domain != "atari":  # vectors: [frames * size]
                env = gym.wrappers.FlattenObservation(env)
        if args.domain in ("mujoco", "classic"):
            env = gym.wrappers.DtypeObservation(env, np.float32)
        return env

    return thunk


def mask_observation(env: gym.Env, indices: tuple[int, ...]) -> gym.Env:
    """Zero the entries at `indices` of a vector observation, keeping its shape (a velocity-masked POMDP)."""
    size = env.observation_space.shape[0]
    if any(not 0 <= i < size for i in indices):
        raise ValueError(f"--masked-indices {indices} out of range for {size} observation entries")
    mask = np.ones(size, dtype=env.observation_space.dtype)
    mask[list(indices)] = 0
    return gym.wrappers.TransformObservation(env, lambda obs: obs * mask, env.observation_space)


def channels_first(env: gym.Env) -> gym.Env:
    """[H, W, C] images -> [C, H, W], as torch's convolutions expect."""
    space = env.observation_space
    new_space = gym.spaces.Box(0, 255, (space.shape[2], *space.shape[:2]), np.uint8)
    return gym.wrappers.TransformObservation(env, lambda obs: np.transpose(obs, (2, 0, 1)), new_space)


def make_envs(args: Args, run_name: str) -> gym.vector.VectorEnv:
    """Same-step autoreset: the observation returned with a done is already the next episode's first, so
    `starts[t + 1] = terminated | truncated`, and the last observation is in `info["final_obs"]`."""
    thunks = [make_env(args, i, run_name) for i in range(args.num_envs)]
    same_step = gym.vector.AutoresetMode.SAME_STEP
    if args.async_envs:
        # The worker processes inherit these ignored signals: a Ctrl-C to the process group or a SIGTERM to
        # every process (SLURM) reaches this process alone, which checkpoints and then closes the workers.
        signals = (signal.SIGINT, signal.SIGTERM)
        handlers = {signum: signal.signal(signum, signal.SIG_IGN) for signum in signals}
        try:
            envs = gym.vector.AsyncVectorEnv(thunks, autoreset_mode=same_step, context="fork")
        finally:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
    else:
        envs = gym.vector.SyncVectorEnv(thunks, autoreset_mode=same_step)
    if args.domain in ("mujoco", "classic"):
        # Returns of hundreds would swamp the trunk that the policy shares with the value head: scale them to
        # about 1. The vector wrapper updates its statistics once per step for all envs, not once per env.
        envs = gym.wrappers.vector.NormalizeReward(envs, gamma=args.gamma)
        envs = gym.wrappers.vector.ClipReward(envs, -10.0, 10.0)
    return envs


def reward_normalisers(envs: gym.vector.VectorEnv) -> list[gym.vector.VectorWrapper]:
    """The vector wrappers that keep running statistics of the returns (NormalizeReward)."""
    found = []
    while isinstance(envs, gym.vector.VectorWrapper):
        if hasattr(envs, "return_rms"):
            found.append(envs)
        envs = envs.env
    return found


def env_statistics(envs: gym.vector.VectorEnv, args: Args) -> dict:
    """The running normalisation statistics, so a resumed run sees the same scaling: the returns' and, on
    MuJoCo, each env's observations, asked through the vector env so that under --async-envs each worker
    process answers for its env."""
    stats = {"return_rms": [wrapper.return_rms for wrapper in reward_normalisers(envs)]}
    if args.domain == "mujoco":
        stats["obs_rms"] = list(envs.unwrapped.get_attr("obs_rms"))
    return stats


def load_env_statistics(envs: gym.vector.VectorEnv, stats: dict):
    for wrapper, return_rms in zip(reward_normalisers(envs), stats["return_rms"], strict=True):
        wrapper.return_rms = return_rms
    if "obs_rms" in stats:
        envs.unwrapped.set_attr("obs_rms", stats["obs_rms"])
    # <<< shared: environments


# ---------------------------------------------------------------------------------------------------------
# 6. Network: encoder (by domain) -> trunk (the only part that differs between scripts) -> heads
# ---------------------------------------------------------------------------------------------------------
# >>> shared: encoders
def layer_init(layer: nn.Module, std: float = math.sqrt(2), bias_const: float = 0.0) -> nn.Module:
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


class VectorEncoder(nn.Module):
    def __init__(self, obs_size: int, hidden_size: int):
        super().__init__()
        self.net = nn.Sequential(layer_init(nn.Linear(obs_size, hidden_size)), nn.Tanh())

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs.float().flatten(1))


class ConvEncoder(nn.Module):
    """Nature DQN CNN (Mnih et al. 2015) on 84x84 uint8 images; MiniGrid uses a narrower copy."""

    def __init__(
        self,
        in_channels: int,
        hidden_size: int,
        widths: tuple[int, int, int] = (32, 64, 64),
        pool: bool = False,
    ):
        super().__init__()
        self.pool = pool
        pooled_size = widths[2] if pool else 0
        self.net = nn.Sequential(
            layer_init(nn.Conv2d(in_channels, widths[0], 8, stride=4)),
            nn.ReLU(),
            layer_init(nn.Conv2d(widths[0], widths[1], 4, stride=2)),
            nn.ReLU(),
            layer_init(nn.Conv2d(widths[1], widths[2], 3, stride=1)),
            nn.ReLU(),
            nn.Flatten(),
            layer_init(nn.Linear(widths[2] * 7 * 7 + pooled_size, hidden_size)),
            nn.ReLU(),
        )

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        if not self.pool:
            return self.net(obs.float() / 255.0)
        maps = self.net[:6](obs.float() / 255.0)  # the convolutions' output [B, C, 7, 7]
        # global average pooling: the same features wherever in the view a pattern lies
        return self.net[7:](torch.cat([maps.flatten(1), maps.mean((-2, -1))], 1))


class SymbolicEncoder(nn.Module):
    """MiniGrid's (object, colour, state) index triples: one shared embedding table, offset per channel."""

    def __init__(self, obs_shape: tuple[int, ...], hidden_size: int, embed_size: int = 8, pool: bool = False):
        super().__init__()
        sizes = (len(OBJECT_TO_IDX), len(COLOR_TO_IDX), len(STATE_TO_IDX))
        self.register_buffer("offsets", torch.tensor([0, sizes[0], sizes[0] + sizes[1]]))
        self.embed = nn.Embedding(sum(sizes), embed_size)
        self.pool = pool
        flat_size = math.prod(obs_shape) * embed_size
        pooled_size = math.prod(obs_shape[:-3]) * obs_shape[-1] * embed_size if pool else 0  # frames x 3
        self.net = nn.Sequential(layer_init(nn.Linear(flat_size + pooled_size, hidden_size)), nn.Tanh())

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        cells = self.embed(obs.long() + self.offsets)  # [B, (frames,) height, width, 3, embed]
        features = cells.flatten(1)
        if self.pool:  # the bag of cells: an object seen from any side gives the same features
            features = torch.cat([features, cells.sum((-4, -3)).flatten(1)], 1)
        return self.net(features)


def make_encoder(obs_space: gym.spaces.Box, args: Args) -> nn.Module:
    if args.domain == "atari":
        return ConvEncoder(obs_space.shape[0], args.hidden_size, pool=args.view_pool)
    if args.domain == "minigrid" and args.minigrid_obs == "rgb":
        return ConvEncoder(obs_space.shape[0], args.hidden_size, widths=(16, 32, 32), pool=args.view_pool)
    if args.domain == "minigrid":
        return SymbolicEncoder(obs_space.shape, args.hidden_size, pool=args.view_pool)
    return VectorEncoder(math.prod(obs_space.shape), args.hidden_size)
    # <<< shared: encoders


# The LSTM's recurrence as C++ loops on the CPU, forward and backward, one loop over time for a whole
# sequence with its episode starts (a start multiplies h and c by 0): where nn.LSTM's CPU call costs about
# 0.2 ms besides its steps at these sizes and exact resets need a call per start time. Written by hand because
# no library runs a small LSTM's steps without that per-call overhead; tested equal to nn.LSTM in float64 and
# to finite differences.
CPU_KERNEL_SOURCE = r"""
#include <torch/extension.h>
#include <math.h>
#include <vector>

template <typename F> using In = const F* __restrict__;
template <typename F> using Out = F* __restrict__;

// out[j] = start[j] + sum_i v[i] rows[i][j] for j < width (rows [count, width], row-major): a vector-matrix
// product that keeps 64 outputs in registers while it runs down the rows, then stores them (a store per
// multiply-add would bound it). start and out may be the same array.
template <typename F>
void vector_matrix(In<F> v, In<F> rows, const F* start, F* out, int64_t count, int64_t width) {
  constexpr int64_t BLOCK = 64;
  int64_t j0 = 0;
  for (; j0 + BLOCK <= width; j0 += BLOCK) {
    F acc[BLOCK];
    for (int64_t j = 0; j < BLOCK; ++j) acc[j] = start[j0 + j];
    for (int64_t i = 0; i < count; ++i) {
      const F vi = v[i];
      In<F> w = rows + i * width + j0;
#pragma omp simd
      for (int64_t j = 0; j < BLOCK; ++j) acc[j] += vi * w[j];
    }
    for (int64_t j = 0; j < BLOCK; ++j) out[j0 + j] = acc[j];
  }
  if (j0 == width) return;
  F acc[BLOCK];
  const int64_t rest = width - j0;
  for (int64_t j = 0; j < rest; ++j) acc[j] = start[j0 + j];
  for (int64_t i = 0; i < count; ++i) {
    const F vi = v[i];
    In<F> w = rows + i * width + j0;
#pragma omp simd
    for (int64_t j = 0; j < rest; ++j) acc[j] += vi * w[j];
  }
  for (int64_t j = 0; j < rest; ++j) out[j0 + j] = acc[j];
}

// nn.LSTM's step, PyTorch's gate order (i, f, g, o), over a sequence with episode starts: for each step t
// and environment b, (h, c) = keep_t (h, c) (zero at a start), pre = gi_t + W_hh h, i, f, o = sigmoid and
// g = tanh of their blocks, c = f c + i g, h = o tanh(c). gi [T, B, 4H] (W_ih x + b_ih + b_hh, computed
// before for all steps); w_hh_t [H, 4H] (W_hh transposed); keep [T, B]; h0, c0 [B, H]. Writes y (h) and
// cells (c) [T, B, H] and the activated gates [T, B, 4H], which the backward reads.
template <typename F>
void lstm_forward_loop(In<F> gi, In<F> w_hh_t, In<F> keep, In<F> h0, In<F> c0, Out<F> y, Out<F> cells,
                       Out<F> gates, int64_t T, int64_t B, int64_t H) {
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    const int64_t envs = end - begin, G = 4 * H;
    std::vector<F> h(envs * H), c(envs * H), pre(G);
    std::copy(h0 + begin * H, h0 + end * H, h.begin());
    std::copy(c0 + begin * H, c0 + end * H, c.begin());
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t e = 0; e < envs; ++e) {
        const int64_t row = t * B + begin + e;
        const F k = keep[row];
        F* he = h.data() + e * H;
        F* ce = c.data() + e * H;
        for (int64_t j = 0; j < H; ++j) he[j] *= k, ce[j] *= k;
        vector_matrix<F>(he, w_hh_t, gi + row * G, pre.data(), H, G);
        Out<F> act = gates + row * G;
        Out<F> out = y + row * H;
        Out<F> cell = cells + row * H;
        const F* p = pre.data();
#pragma omp simd
        for (int64_t j = 0; j < H; ++j) {
          const F i = 1 / (1 + exp(-p[j])), f = 1 / (1 + exp(-p[H + j]));
          const F g = tanh(p[2 * H + j]), o = 1 / (1 + exp(-p[3 * H + j]));
          ce[j] = f * ce[j] + i * g;
          he[j] = o * tanh(ce[j]);
          act[j] = i, act[H + j] = f, act[2 * H + j] = g, act[3 * H + j] = o;
          out[j] = he[j], cell[j] = ce[j];
        }
      }
    }
  });
}

// Back in time from the gradients of the outputs (grad_y) and of the last cell (grad_c_last): dh = grad_y_t +
// carried_h, dc = carried_c + dh o (1 - tanh(c_t)^2), the pre-activations' gradients dc g i (1 - i),
// dc c_{t-1} f (1 - f), dc i (1 - g^2), dh tanh(c_t) o (1 - o) (written to dpre [T, B, 4H]), then
// carried_h = keep_t dpre W_hh and carried_c = keep_t dc f. c_before [T, B, H] is the cell each step starts
// from (after its reset). Writes grad_h0 and grad_c0 [B, H] (the last carried).
template <typename F>
void lstm_backward_loop(In<F> grad_y, In<F> grad_c_last, In<F> gates, In<F> cells, In<F> c_before, In<F> keep,
                        In<F> w_hh, Out<F> dpre, Out<F> grad_h0, Out<F> grad_c0, int64_t T, int64_t B,
                        int64_t H) {
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    const int64_t envs = end - begin, G = 4 * H;
    std::vector<F> carried_h(envs * H, 0), carried_c(grad_c_last + begin * H, grad_c_last + end * H);
    for (int64_t t = T - 1; t >= 0; --t) {
      for (int64_t e = 0; e < envs; ++e) {
        const int64_t row = t * B + begin + e;
        In<F> act = gates + row * G;
        In<F> c = cells + row * H;
        In<F> c_prev = c_before + row * H;
        In<F> gy = grad_y + row * H;
        Out<F> d = dpre + row * G;
        F* ch = carried_h.data() + e * H;
        F* cc = carried_c.data() + e * H;
#pragma omp simd
        for (int64_t j = 0; j < H; ++j) {
          const F i = act[j], f = act[H + j], g = act[2 * H + j], o = act[3 * H + j], tc = tanh(c[j]);
          const F dh = gy[j] + ch[j], dc = cc[j] + dh * o * (1 - tc * tc);
          d[j] = dc * g * i * (1 - i);
          d[H + j] = dc * c_prev[j] * f * (1 - f);
          d[2 * H + j] = dc * i * (1 - g * g);
          d[3 * H + j] = dh * tc * o * (1 - o);
          cc[j] = dc * f;
          ch[j] = 0;
        }
        vector_matrix<F>(d, w_hh, ch, ch, G, H);
        const F k = keep[row];
        for (int64_t j = 0; j < H; ++j) ch[j] *= k, cc[j] *= k;
      }
    }
    std::copy(carried_h.begin(), carried_h.end(), grad_h0 + begin * H);
    std::copy(carried_c.begin(), carried_c.end(), grad_c0 + begin * H);
  });
}

std::vector<torch::Tensor> lstm_forward(torch::Tensor gi, torch::Tensor w_hh_t, torch::Tensor keep,
                                        torch::Tensor h0, torch::Tensor c0) {
  const int64_t T = gi.size(0), B = gi.size(1), H = h0.size(1);
  auto y = torch::empty({T, B, H}, gi.options()), cells = torch::empty({T, B, H}, gi.options());
  auto gates = torch::empty_like(gi);
  AT_DISPATCH_FLOATING_TYPES(gi.scalar_type(), "lstm_forward", [&] {
    auto p = [](const torch::Tensor& t) { return t.data_ptr<scalar_t>(); };
    lstm_forward_loop<scalar_t>(p(gi), p(w_hh_t), p(keep), p(h0), p(c0), p(y), p(cells), p(gates), T, B, H);
  });
  return {y, cells, gates};
}

std::vector<torch::Tensor> lstm_backward(torch::Tensor grad_y, torch::Tensor grad_c_last, torch::Tensor gates,
                                         torch::Tensor cells, torch::Tensor c_before, torch::Tensor keep,
                                         torch::Tensor w_hh) {
  const int64_t T = grad_y.size(0), B = grad_y.size(1), H = grad_y.size(2);
  auto dpre = torch::empty_like(gates), grad_h0 = torch::empty({B, H}, grad_y.options());
  auto grad_c0 = torch::empty({B, H}, grad_y.options());
  AT_DISPATCH_FLOATING_TYPES(grad_y.scalar_type(), "lstm_backward", [&] {
    auto p = [](const torch::Tensor& t) { return t.data_ptr<scalar_t>(); };
    lstm_backward_loop<scalar_t>(p(grad_y), p(grad_c_last), p(gates), p(cells), p(c_before), p(keep), p(w_hh),
                                 p(dpre), p(grad_h0), p(grad_c0), T, B, H);
  });
  return {dpre, grad_h0, grad_c0};
}
"""


def cpu_kernels():
    """This file's C++ loops (a module with lstm_forward and lstm_backward), built the first time on this CPU
    type (about 25 s; torch caches the build), or None and why. -ffast-math (when compiling only: the
    process's float mode stays as it is) lets gcc call glibc's vectorised exp and tanh; the build's name
    holds the instruction set, so one cache can serve mixed nodes."""
    from torch.utils.cpp_extension import load_inline

    capability = torch.backends.cpu.get_cpu_capability()  # DEFAULT, AVX2, AVX512, ...
    isa_flags = {"AVX2": ["-mavx2", "-mfma"], "AVX512": ["-mavx512f", "-mavx512vl", "-mavx512dq", "-mfma"]}
    name, tic = f"ppo_lstm_cpu_{capability.lower()}", time.time()
    try:
        flags = ["-O3", "-ffast-math", "-fopenmp-simd", *isa_flags.get(capability, [])]
        functions = ["lstm_forward", "lstm_backward"]
        kernels = load_inline(name, cpp_sources=CPU_KERNEL_SOURCE, functions=functions, extra_cflags=flags)
        if time.time() - tic > 5:  # a build, not the cached module
            print(f"built the C++ LSTM loops {name} in {time.time() - tic:.0f} s (cached for later runs)")
        return kernels, None
    except Exception as error:  # no compiler or no ninja: nn.LSTM does the same work
        first_line = (str(error).splitlines() or [""])[0][:200]
        return None, f"the C++ loops did not build ({type(error).__name__}: {first_line})"


class Trunk(nn.Module):
    """One `nn.LSTM` layer whose state (h, c), each [num_envs, hidden_size], is zeroed at every episode start.

    `nn.LSTM` cannot reset part of a batch inside a call, so a sequence is cut at the time steps where any
    environment starts, the starting environments' state is zeroed, and each piece runs through one kernel
    call with the state carried: exact, no padding, and as many calls as there are distinct start times
    (one in the rollout, a handful per minibatch of whole environments in training). Measured on a 2-core
    CPU and an H200 (forward and backward, 128 steps): a per-step loop is 1.4-31x slower on the CPU and
    3-59x on the H200. Padding the episode segments into one call is up to 1.8x faster on the CPU and 11x on
    the H200 when episodes are short, but it leaves the returned state after the padding; exactness first,
    so this one method serves both devices (an exact padded path for CUDA is still to be written). On a CPU,
    `--lstm-backend auto` runs the steps in this file's C++ loops instead, forward and backward (`LSTMSteps`):
    one call per sequence whatever its starts, the same LSTM (tested equal), gradient steps 2.4-2.8x as fast
    at the table's sizes.
    """

    def __init__(self, input_size: int, args: Args):
        super().__init__()
        self.rnn = nn.LSTM(input_size, args.hidden_size)
        for name, param in self.rnn.named_parameters():  # CleanRL's recurrent initialisation
            if "bias" in name:
                nn.init.constant_(param, 0)
            else:
                nn.init.orthogonal_(param, 1.0)
        self.output_size = args.hidden_size
        self.state_reset = not args.no_state_reset
        self.cpu_kernels, self.why_torch = None, None
        if args.lstm_backend == "auto" and not (args.cuda and torch.cuda.is_available()):
            self.cpu_kernels, self.why_torch = cpu_kernels()
            if self.why_torch:
                print(f"--lstm-backend auto: {self.why_torch}; using nn.LSTM", file=sys.stderr)

    def __getstate__(self):  # torch.save(agent), copy.deepcopy: whether the C++ loops ran, not their module
        return {**super().__getstate__(), "cpu_kernels": self.cpu_kernels is not None}

    def __setstate__(self, state):
        super().__setstate__({**state, "cpu_kernels": None})
        if state["cpu_kernels"]:  # they ran: the same module within a process, built once on a new machine
            self.cpu_kernels, self.why_torch = cpu_kernels()
            if self.why_torch:
                print(f"loaded without the C++ loops: {self.why_torch}; the torch path", file=sys.stderr)

    @property
    def kernel(self) -> str:
        if self.rnn.weight_hh_l0.is_cuda:
            return "nn.LSTM split at starts (cuDNN)"
        if self.cpu_kernels is not None:
            return "C++ LSTM loops on the CPU, hand-written backward"
        reason = f"; auto backend: {self.why_torch}" if self.why_torch else ""
        return f"nn.LSTM split at starts (CPU){reason}"

    def initial_state(self, num_envs: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = self.rnn.weight_hh_l0.dtype  # the state follows the module: .double() for gradient checks
        return tuple(torch.zeros(num_envs, self.output_size, dtype=dtype, device=device) for _ in range(2))

    def forward(self, x: torch.Tensor, state, starts: torch.Tensor):
        """x [T, B, input_size], starts [T, B] -> y [T, B, hidden_size], state after step T - 1."""
        if not self.state_reset:
            starts = torch.zeros_like(starts)
        if self.cpu_kernels is not None and not x.is_cuda:
            y, cell = LSTMSteps.apply(x, *state, starts, self.cpu_kernels, *self.rnn.parameters())
            return y, (y[-1], cell)
        state = tuple(part[None] for part in state)  # nn.LSTM's [num_layers, B, hidden] layout
        cuts = (torch.nonzero(starts[1:].any(1)).flatten() + 1).tolist()  # where some environment starts
        pieces = []
        for begin, end in zip([0, *cuts], [*cuts, len(x)], strict=True):
            keep = (1.0 - starts[begin])[None, :, None]
            y, state = self.rnn(x[begin:end], tuple(part * keep for part in state))
            pieces.append(y)
        return torch.cat(pieces), tuple(part[0] for part in state)


class LSTMSteps(torch.autograd.Function):
    """The LSTM over a sequence with its episode starts in the C++ loops (`kernels`: `cpu_kernels`'s module):
    (x, h0, c0, starts, kernels, w_ih, w_hh, b_ih, b_hh) -> (h at every step, the last cell). The forward
    keeps each step's cell and activated gates; the backward runs the gradient through h and c back in time
    in C++ and takes the weight gradients as one matmul each over all steps. PyTorch's gate order (i, f, g,
    o). On the CPU, autograd through nn.LSTM took 2.4-2.8x as long for forward and backward together."""

    @staticmethod
    def forward(ctx, x, h0, c0, starts, kernels, w_ih, w_hh, b_ih, b_hh):
        num_steps, num_envs = starts.shape
        keep = (1 - starts).to(x.dtype).contiguous()
        gi = torch.addmm(b_ih + b_hh, x.reshape(num_steps * num_envs, -1), w_ih.t())
        inputs = (gi.view(num_steps, num_envs, -1), w_hh.t(), keep, h0, c0)
        y, cells, gates = kernels.lstm_forward(*(t.contiguous() for t in inputs))
        ctx.save_for_backward(x, keep, h0, c0, y, cells, gates, w_ih, w_hh)
        ctx.kernels = kernels
        return y, cells[-1]

    @staticmethod
    def backward(ctx, grad_y, grad_cell):
        x, keep, h0, c0, y, cells, gates, w_ih, w_hh = ctx.saved_tensors
        num_steps, num_envs, _ = y.shape
        h_before = torch.cat([h0[None], y[:-1]]) * keep[..., None]  # the state each step starts from
        c_before = torch.cat([c0[None], cells[:-1]]) * keep[..., None]
        inputs = (grad_y, grad_cell, gates, cells, c_before, keep, w_hh)
        grad_pre, grad_h0, grad_c0 = ctx.kernels.lstm_backward(*(t.contiguous() for t in inputs))
        grad_pre = grad_pre.view(num_steps * num_envs, -1)  # d loss / d (W_ih x + W_hh h + b_ih + b_hh)
        grad_x = (grad_pre @ w_ih).view_as(x)
        grad_w_ih = grad_pre.t() @ x.reshape(num_steps * num_envs, -1)
        grad_w_hh = grad_pre.t() @ h_before.reshape(num_steps * num_envs, -1)
        grad_b = grad_pre.sum(0)
        return grad_x, grad_h0, grad_c0, None, None, grad_w_ih, grad_w_hh, grad_b, grad_b


# >>> shared: agent
class Agent(nn.Module):
    """Encoder -> trunk -> policy and value heads. Inputs are [T, B, ...] with `starts` [T, B] marking each
    episode's first observation; every state tensor keeps the environment axis first."""

    def __init__(self, obs_space: gym.spaces.Box, action_space: gym.Space, args: Args):
        super().__init__()
        self.encoder = make_encoder(obs_space, args)
        self.trunk = Trunk(args.hidden_size, args)
        self.critic = layer_init(nn.Linear(self.trunk.output_size, 1), std=1.0)
        self.continuous = isinstance(action_space, gym.spaces.Box)
        num_outputs = action_space.shape[0] if self.continuous else action_space.n
        self.actor = layer_init(nn.Linear(self.trunk.output_size, num_outputs), std=0.01)
        if self.continuous:  # diagonal Gaussian with a state-independent log standard deviation
            self.actor_logstd = nn.Parameter(torch.zeros(num_outputs))

    def initial_state(self, num_envs: int, device: torch.device):
        return self.trunk.initial_state(num_envs, device)

    def features(self, obs: torch.Tensor, state, starts: torch.Tensor):
        num_steps, num_envs = obs.shape[:2]
        x = self.encoder(obs.reshape(num_steps * num_envs, *obs.shape[2:]))
        return self.trunk(x.reshape(num_steps, num_envs, -1), state, starts.float())

    def get_value(self, obs: torch.Tensor, state, starts: torch.Tensor):
        hidden, state = self.features(obs, state, starts)
        return self.critic(hidden).squeeze(-1), state

    def get_action_and_value(self, obs: torch.Tensor, state, starts: torch.Tensor, action=None):
        """Samples an action in the rollout; in training, `action` given, recomputes its log-probability."""
        hidden, state = self.features(obs, state, starts)
        if self.continuous:
            mean = self.actor(hidden)
            dist = Normal(mean, self.actor_logstd.exp().expand_as(mean), validate_args=False)
        else:
            dist = Categorical(logits=self.actor(hidden), validate_args=False)
        if action is None:
            action = dist.sample()
        logprob, entropy = dist.log_prob(action), dist.entropy()
        if self.continuous:  # independent action dimensions: sum over the last axis
            logprob, entropy = logprob.sum(-1), entropy.sum(-1)
        return action, logprob, entropy, self.critic(hidden).squeeze(-1), state

    # <<< shared: agent


# ---------------------------------------------------------------------------------------------------------
# 7. Profiling helpers
# ---------------------------------------------------------------------------------------------------------
# >>> shared: profiling
def synchronize(device: torch.device):
    """CUDA runs asynchronously: wait for it, so a timer measures the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_cpu_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux reports KiB


def peak_gpu_memory_gb(device: torch.device) -> tuple[float | None, float | None]:
    if device.type != "cuda":
        return None, None
    return torch.cuda.max_memory_allocated(device) / 1024**3, torch.cuda.max_memory_reserved(device) / 1024**3


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    processor = platform.processor() or platform.machine()
    return f"cpu ({processor}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


VERSIONED_PACKAGES = ("torch", "gymnasium", "ale-py", "minigrid", "mujoco", "mamba-ssm")


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None
    # <<< shared: profiling


# ---------------------------------------------------------------------------------------------------------
# 8. Training
# ---------------------------------------------------------------------------------------------------------
# >>> shared: main
def state_for_envs(state, env_ids: torch.Tensor):
    """Select environments from a trunk state: None, a tensor, or a tuple of tensors (environments first)."""
    if state is None:
        return None
    if isinstance(state, torch.Tensor):
        return state[env_ids]
    return tuple(part[env_ids] for part in state)


def ppo_loss(agent, args: Args, obs, state, starts, actions, logprobs, advantages, values, returns):
    """A minibatch's PPO loss (clipped surrogate, value loss, entropy bonus) and the statistics logged of it,
    from whole sequences replayed from `state`; one function so that --compile fuses all of it."""
    _, newlogprob, entropy, newvalue, _ = agent.get_action_and_value(obs, state, starts, actions)
    logratio = newlogprob - logprobs
    ratio = logratio.exp()
    with torch.no_grad():
        old_approx_kl = (-logratio).mean()
        approx_kl = ((ratio - 1) - logratio).mean()
        clipfrac = ((ratio - 1.0).abs() > args.clip_coef).float().mean()
        ratio_error = (ratio - 1.0).abs().max()

    if args.norm_adv:
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1 - args.clip_coef, 1 + args.clip_coef)
    pg_loss = torch.max(pg_loss1, pg_loss2).mean()

    if args.clip_vloss:
        v_loss_unclipped = (newvalue - returns) ** 2
        v_clipped = values + torch.clamp(newvalue - values, -args.clip_coef, args.clip_coef)
        v_loss_clipped = (v_clipped - returns) ** 2
        v_loss = 0.5 * torch.max(v_loss_unclipped, v_loss_clipped).mean()
    else:
        v_loss = 0.5 * ((newvalue - returns) ** 2).mean()

    entropy_loss = entropy.mean()
    loss = pg_loss - args.ent_coef * entropy_loss + v_loss * args.vf_coef
    return loss, (pg_loss, v_loss, entropy_loss, old_approx_kl, approx_kl, clipfrac, ratio_error)


def success_rate(returns: list[float]) -> float | None:
    """MiniGrid pays a positive reward only for reaching the goal: a success is a return > 0."""
    return sum(ret > 0 for ret in returns) / len(returns) if returns else None


def write_json(path: Path, data: dict):
    """Write to a temporary file and rename it, so a reader never sees half a summary."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def main(args: Args) -> None:
    # ---- Setup: run directory, seeds, device, envs, agent; or all of it from a checkpoint ----
    if args.resume:
        run_dir = Path(args.resume)
        checkpoint = read_checkpoint(args.resume)
    else:
        run_name = f"{args.env_id.replace('/', '_')}__{args.exp_name}__{args.seed}__{int(time.time())}"
        run_dir = Path("runs") / run_name
        checkpoint = None
    run_name = run_dir.name
    run_dir.mkdir(parents=True, exist_ok=True)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    # TF32 (cuDNN's default) moves GPU outputs by about 2e-4, enough for rollout and training to disagree
    if args.torch_deterministic:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False

    images = args.domain == "atari" or (args.domain == "minigrid" and args.minigrid_obs == "rgb")
    if args.torch_threads or not images:
        torch.set_num_threads(args.torch_threads or 1)

    envs = make_envs(args, run_name)
    agent = Agent(envs.single_observation_space, envs.single_action_space, args).to(device)
    # Two parameter groups: everything but the trunk at --learning-rate, the trunk at --trunk-learning-rate
    trunk_params = list(agent.trunk.parameters())
    groups = [[p for p in agent.parameters() if all(p is not q for q in trunk_params)], trunk_params]
    base_rates = (args.learning_rate, args.trunk_learning_rate)
    optimizer = torch.optim.Adam(
        [{"params": params, "lr": rate} for params, rate in zip(groups, base_rates, strict=True)],
        eps=1e-5,
        # one call per update rule for all tensors, the same bits as a Python loop over them; with --compile,
        # which gives up bit for bit anyway, one fused kernel for all of them (rounding differently)
        foreach=not args.compile,
        fused=args.compile or None,
    )
    num_params = sum(p.numel() for p in agent.parameters())
    device_text = device_name(device)
    print(f"{run_name}: {ARCH} on {args.env_id} ({args.domain}), {num_params:,} parameters, {device_text}")

    start_iteration, wall_before, episodes, ratio_error = 0, 0.0, [], 0.0
    if checkpoint:
        agent.load_state_dict(checkpoint["agent"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        load_env_statistics(envs, checkpoint["env_statistics"])
        torch.set_rng_state(checkpoint["torch_rng"])
        np.random.set_state(checkpoint["numpy_rng"])
        random.setstate(checkpoint["python_rng"])
        start_iteration = checkpoint["iteration"]
        wall_before = checkpoint["wall_s"]
        episodes = checkpoint["episodes"]
        ratio_error = checkpoint["first_minibatch_ratio_error"]
        print(f"resuming {run_name} at step {start_iteration * args.batch_size:,}")
    writer = SummaryWriter(run_dir, purge_step=start_iteration * args.batch_size if checkpoint else None)
    if args.track:
        wandb.init(
            project=args.wandb_project_name,
            config=vars(args),
            name=run_name,
            id=run_name,
            resume="allow",
            sync_tensorboard=True,
        )
    hyperparameters = "\n".join(f"|{key}|{value}|" for key, value in vars(args).items())
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + hyperparameters)
    writer.add_text("model", f"{ARCH}, {num_params} parameters, kernel {agent.trunk.kernel}, {device_text}")

    # ---- Rollout storage: [num_steps, num_envs, ...], observations in their own dtype ----
    obs_space, action_space = envs.single_observation_space, envs.single_action_space
    # torch has no public table from numpy dtypes to its own: converting an empty array gives the match
    obs_dtype = torch.from_numpy(np.zeros(0, obs_space.dtype)).dtype
    obs = torch.zeros((args.num_steps, args.num_envs, *obs_space.shape), dtype=obs_dtype).to(device)
    action_dtype = torch.float32 if isinstance(action_space, gym.spaces.Box) else torch.long
    actions = torch.zeros((args.num_steps, args.num_envs, *action_space.shape), dtype=action_dtype).to(device)
    logprobs = torch.zeros((args.num_steps, args.num_envs)).to(device)
    rewards = torch.zeros((args.num_steps, args.num_envs)).to(device)
    values = torch.zeros((args.num_steps, args.num_envs)).to(device)
    starts = torch.zeros((args.num_steps, args.num_envs)).to(device)

    # SLURM preemption and Ctrl-C: finish the current step, checkpoint the last full update, exit.
    stop_signals = []
    previous_handlers = {
        signum: signal.signal(signum, lambda received, _: stop_signals.append(received))
        for signum in (signal.SIGTERM, signal.SIGINT)
    }

    # Env i starts from seed + i; a resumed run moves the seeds on by the updates done, so that its envs do
    # not replay the episodes the run began with.
    next_obs_np, _ = envs.reset(seed=args.seed + start_iteration * args.num_envs)
    next_obs = torch.as_tensor(next_obs_np, device=device)
    next_starts = torch.ones(args.num_envs, device=device)
    state = agent.initial_state(args.num_envs, device)
    compile_s, loss_fn = 0.0, ppo_loss
    if args.compile:  # every graph now, so that steps/s measures training; fork_rng: no draw is used up
        tic = time.time()
        agent.get_action_and_value = torch.compile(agent.get_action_and_value, dynamic=False)
        loss_fn = torch.compile(ppo_loss, dynamic=False)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            warm_state = state
            for _ in range(2):  # the first step's state is a plain tensor, later ones are inference tensors
                with torch.inference_mode():
                    *_, warm_state = agent.get_action_and_value(next_obs[None], warm_state, next_starts[None])
            mb = torch.arange(args.num_envs // args.num_minibatches, device=device)  # a minibatch's shapes
            # log-probabilities, advantages, values, returns: four tensors (dynamo guards on aliasing)
            floats = [rewards[:, mb] for _ in range(4)]
            warm_inputs = (obs[:, mb], state_for_envs(state, mb), starts[:, mb], actions[:, mb], *floats)
            loss_fn(agent, args, *warm_inputs)[0].backward()
        optimizer.zero_grad()
        compile_s = time.time() - tic
    latencies = deque(maxlen=10_000)  # seconds per batched forward in the rollout
    timings = {"rollout": 0.0, "update": 0.0}
    start_time = last_print = time.time()
    completed = start_iteration  # updates done; a checkpoint holds exactly these

    def write_summary(status: str, reason: str | None = None):
        recent = [ret for _, ret, _ in episodes[-100:]]
        gpu_allocated, gpu_reserved = peak_gpu_memory_gb(device)
        steps_here = (completed - start_iteration) * args.batch_size
        with open(run_dir / "episodes.csv", "w", newline="") as f:
            csv.writer(f).writerows([("global_step", "episodic_return", "episodic_length"), *episodes])
        summary = {
            "script": Path(__file__).name,
            "arch": ARCH,
            "env_id": args.env_id,
            "domain": args.domain,
            "seed": args.seed,
            "args": vars(args),
            "run_name": run_name,
            "status": status,
            "reason": reason,
            "global_step": completed * args.batch_size,
            "total_timesteps": args.total_timesteps,
            "wall_s": wall_before + time.time() - start_time,
            "compile_s": compile_s,
            "sps": steps_here / max(time.time() - start_time, 1e-9),
            "rollout_sps": steps_here / max(timings["rollout"], 1e-9),
            "update_sps": steps_here / max(timings["update"], 1e-9),
            "inference_latency_ms": 1e3 * statistics.median(latencies) if latencies else None,
            "cpu_rss_gb": peak_cpu_rss_gb(),
            "gpu_mem_allocated_gb": gpu_allocated,
            "gpu_mem_reserved_gb": gpu_reserved,
            "params": num_params,
            "final_return_mean": sum(recent) / len(recent) if recent else None,
            "success_rate": success_rate(recent) if args.domain == "minigrid" else None,
            "episodes": len(episodes),
            "return_curve": "episodes.csv",
            "first_minibatch_ratio_error": ratio_error,
            "kernel": agent.trunk.kernel,
            "device": device_text,
            "versions": {name: package_version(name) for name in VERSIONED_PACKAGES},
        }
        write_json(run_dir / "summary.json", summary)

    def save_checkpoint():
        saved = {
            "script": Path(__file__).name,  # --resume refuses a checkpoint that another script wrote
            "args": vars(args),
            "iteration": completed,
            "agent": agent.state_dict(),
            "optimizer": optimizer.state_dict(),
            "env_statistics": env_statistics(envs, args),
            "episodes": episodes,
            "first_minibatch_ratio_error": ratio_error,
            "wall_s": wall_before + time.time() - start_time,
            "torch_rng": torch.get_rng_state(),
            "numpy_rng": np.random.get_state(),
            "python_rng": random.getstate(),
        }
        torch.save(saved, run_dir / "checkpoint.tmp")
        (run_dir / "checkpoint.tmp").replace(run_dir / "checkpoint.pt")

    try:
        for iteration in range(start_iteration + 1, args.num_iterations + 1):
            fraction = 1.0 - (iteration - 1.0) / args.num_iterations if args.anneal_lr else 1.0
            learning_rate = args.learning_rate * fraction
            for group, base_rate in zip(optimizer.param_groups, base_rates, strict=True):
                group["lr"] = base_rate * fraction

            # ---- Rollout: one batched forward per env step, state carried, reset at starts ----
            rollout_state = state  # the state before step 0 is where training replays each sequence from
            new_episodes = []
            tic = time.perf_counter()
            for step in range(args.num_steps):
                obs[step] = next_obs
                starts[step] = next_starts
                forward_tic = time.perf_counter()
                with torch.inference_mode():  # no_grad, and no version counters on the outputs either
                    action, logprob, _, value, state = agent.get_action_and_value(
                        next_obs[None], state, next_starts[None]
                    )
                synchronize(device)
                latencies.append(time.perf_counter() - forward_tic)
                actions[step] = action[0]
                logprobs[step] = logprob[0]
                values[step] = value[0]
                next_obs_np, reward, terminated, truncated, info = envs.step(action[0].cpu().numpy())
                time_limited = truncated & ~terminated
                if time_limited.any():  # the return goes on past a time limit: bootstrap with V(final obs)
                    final_obs_np = next_obs_np.copy()
                    final_obs_np[time_limited] = np.stack(info["final_obs"][time_limited])
                    final_obs = torch.as_tensor(final_obs_np, device=device)[None]
                    no_starts = torch.zeros_like(next_starts)[None]
                    with torch.inference_mode():  # under the pre-reset state, as if the episode continued
                        final_value, _ = agent.get_value(final_obs, state, no_starts)
                    reward = reward + args.gamma * final_value[0].cpu().numpy() * time_limited
                rewards[step] = torch.as_tensor(reward, dtype=torch.float32, device=device)
                next_obs = torch.as_tensor(next_obs_np, device=device)
                next_starts = torch.as_tensor(terminated | truncated, dtype=torch.float32, device=device)
                if "episode" in info.get("final_info", {}):
                    episode = info["final_info"]["episode"]
                    step_count = (iteration - 1) * args.batch_size + (step + 1) * args.num_envs
                    for i in np.flatnonzero(info["final_info"]["_episode"]):
                        new_episodes.append((step_count, float(episode["r"][i]), int(episode["l"][i])))
                if stop_signals:
                    break
            if stop_signals:  # a partial rollout is dropped: the checkpoint holds the last full update
                break
            rollout_time = time.perf_counter() - tic
            timings["rollout"] += rollout_time
            global_step = iteration * args.batch_size
            episodes += new_episodes
            for step_count, episodic_return, episodic_length in new_episodes:
                writer.add_scalar("charts/episodic_return", episodic_return, step_count)
                writer.add_scalar("charts/episodic_length", episodic_length, step_count)

            # ---- GAE: the boundary after step t is starts[t + 1] (termination bootstraps 0) ----
            tic = time.perf_counter()
            with torch.no_grad():
                next_value, _ = agent.get_value(next_obs[None], state, next_starts[None])
                advantages = torch.zeros_like(rewards)
                last_gae = torch.zeros(args.num_envs, device=device)
                for t in reversed(range(args.num_steps)):
                    next_nonterminal = 1.0 - (next_starts if t == args.num_steps - 1 else starts[t + 1])
                    next_values = next_value[0] if t == args.num_steps - 1 else values[t + 1]
                    delta = rewards[t] + args.gamma * next_values * next_nonterminal - values[t]
                    last_gae = delta + args.gamma * args.gae_lambda * next_nonterminal * last_gae
                    advantages[t] = last_gae
                returns = advantages + values

            # ---- PPO update: minibatches of whole environments, each replayed from rollout_state ----
            envs_per_minibatch = args.num_envs // args.num_minibatches
            clipfracs = []
            for epoch in range(args.update_epochs):
                env_order = torch.randperm(args.num_envs, device=device)
                for first in range(0, args.num_envs, envs_per_minibatch):
                    mb = env_order[first : first + envs_per_minibatch]
                    loss, stats = loss_fn(
                        agent,
                        args,
                        obs[:, mb],
                        state_for_envs(rollout_state, mb),
                        starts[:, mb],
                        actions[:, mb],
                        logprobs[:, mb],
                        advantages[:, mb],
                        values[:, mb],
                        returns[:, mb],
                    )
                    pg_loss, v_loss, entropy_loss, old_approx_kl, approx_kl, clipfrac, mb_ratio_error = stats
                    clipfracs.append(clipfrac)
                    # Before any gradient step the policy is the rollout's: every ratio should be 1
                    if epoch == 0 and first == 0:
                        first_error = mb_ratio_error.item()
                        ratio_error = max(ratio_error, first_error)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"non-finite loss at update {iteration}, step {global_step}")
                    optimizer.zero_grad()
                    loss.backward()
                    nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm, foreach=True)
                    optimizer.step()

                if args.target_kl is not None and approx_kl > args.target_kl:
                    break
            synchronize(device)
            update_time = time.perf_counter() - tic
            timings["update"] += update_time
            completed = iteration

            # ---- Logging, progress, checkpoint ----
            y_pred = values.flatten().cpu().numpy()
            y_true = returns.flatten().cpu().numpy()
            var_y = np.var(y_true)
            explained_var = np.nan if var_y == 0 else 1 - np.var(y_true - y_pred) / var_y
            sps = (global_step - start_iteration * args.batch_size) / (time.time() - start_time)
            scalars = {
                "charts/learning_rate": learning_rate,
                "charts/SPS": sps,
                "losses/value_loss": v_loss.item(),
                "losses/policy_loss": pg_loss.item(),
                "losses/entropy": entropy_loss.item(),
                "losses/old_approx_kl": old_approx_kl.item(),
                "losses/approx_kl": approx_kl.item(),
                "losses/clipfrac": torch.stack(clipfracs).mean().item(),
                "losses/explained_variance": explained_var,
                "perf/rollout_sps": args.batch_size / rollout_time,
                "perf/update_sps": args.batch_size / update_time,
                "perf/inference_latency_ms": 1e3 * statistics.median(list(latencies)[-args.num_steps :]),
                "perf/cpu_rss_gb": peak_cpu_rss_gb(),
                "debug/first_minibatch_ratio_error": first_error,
            }
            if args.domain == "minigrid" and episodes:
                scalars["charts/success_rate"] = success_rate([ret for _, ret, _ in episodes[-100:]])
            if device.type == "cuda":
                gpu_allocated, gpu_reserved = peak_gpu_memory_gb(device)
                scalars["perf/gpu_mem_allocated_gb"] = gpu_allocated
                scalars["perf/gpu_mem_reserved_gb"] = gpu_reserved
            for key, value in scalars.items():
                writer.add_scalar(key, value, global_step)
            if time.time() - last_print > 10 or iteration in (start_iteration + 1, args.num_iterations):
                last_print = time.time()
                recent = [ret for _, ret, _ in episodes[-100:]]
                recent_return = sum(recent) / len(recent) if recent else float("nan")
                done = f"step {global_step:>10,}/{args.num_iterations * args.batch_size:,}"
                time_left = time.gmtime((args.num_iterations - iteration) * args.batch_size / sps)
                eta = time.strftime("%H:%M:%S", time_left)
                print(f"{done} | {sps:7,.0f} SPS | return {recent_return:8.2f} | {eta} left", flush=True)
            if iteration % args.checkpoint_interval == 0 or iteration == args.num_iterations:
                save_checkpoint()
                write_summary("running")
            if stop_signals:
                break
    except Exception as error:  # the last good checkpoint stays; the summary says why the run stopped
        write_summary("failed", f"{type(error).__name__}: {error}")
        raise
    finally:
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)
        writer.close()
        envs.close()
        if args.track:
            wandb.finish()

    if stop_signals:
        save_checkpoint()
        write_summary("interrupted", f"received {signal.Signals(stop_signals[0]).name} at update {completed}")
        print(f"interrupted: continue with  python {Path(__file__).name} --resume {run_dir}", file=sys.stderr)
        sys.exit(128 + stop_signals[0])
    write_summary("complete")
    # <<< shared: main


if __name__ == "__main__":
    main(parse_args())
