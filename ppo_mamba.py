"""PPO with a Mamba trunk (selective state-space model) that forgets exactly at every episode start.

Observations are encoded (MLP for vectors, a CNN for Atari and MiniGrid RGB, an embedding for MiniGrid
symbols), passed through `num_layers` Mamba blocks (Gu and Dao, "Mamba: Linear-Time Sequence Modeling with
Selective State Spaces", arXiv 2312.00752), and read out by a policy head and a value head. Each block's
state (its convolution window and its SSM state) restarts from zero at every episode start, in the rollout
(one step per call) and in training (whole rollout sequences replayed from the state stored at the rollout's
start, starts anywhere inside); the paper we reproduce trained its Mamba without either, so memory leaked
across episodes (`--no-state-reset` reproduces that, for ablation).
Reference: Smirnov and Gu, "RLBenchNet: The Right Network for the Right Reinforcement Learning Task"
(arXiv 2505.15040); the PPO details follow CleanRL's `ppo.py`, `ppo_atari_lstm.py` and
`ppo_continuous_action.py`.

Run:
    python ppo_mamba.py --env-id CartPoleNoVel-v1
    python ppo_mamba.py --env-id MiniGrid-MemoryS11-v0 --minigrid-obs symbolic
    python ppo_mamba.py --env-id CartPoleNoVel-v1 --no-state-reset   # the paper's leak, for ablation
    python ppo_mamba.py --help

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
    num_layers: int | None = None
    """number of Mamba blocks"""
    expand: int = 2
    """the blocks' inner width is expand * hidden_size (Mamba's E)"""
    state_size: int | None = None
    """N: SSM state size per inner channel (Mamba's d_state; the table: 8 for vector observations, else 16)"""
    conv_size: int = 4
    """width of the causal depthwise convolution (Mamba's d_conv)"""
    mamba_backend: str = "auto"
    """auto or torch. auto runs the convolution and the selective scan (with dt's softplus, the D skip and
    the gate) on a CPU in this file's C++ loops (built on the first run, about 30 s, where a C++ compiler is
    found; else torch, saying why), on a GPU and under --compile in torch; torch runs them in torch
    everywhere (bit for bit the runs made before the C++ loops). No cuda: mamba-ssm's Mamba-1 scan takes no
    initial state and no resets"""
    no_state_reset: bool = False
    """never reset the memory at episode starts (the paper's leaky behaviour, for ablation)"""


ARCH = "mamba"
TRUNK_SIZE_FIELDS = ("hidden_size", "num_layers", "expand", "state_size", "conv_size")
TRUNK_CHOICE_FIELDS = {"mamba_backend": ("auto", "torch")}  # trunk flags with a fixed set of values
TRUNK_RANGE_FIELDS = ()  # trunk flags that are (low, high) ranges of positive numbers
TRUNK_FINITE_FIELDS = ()  # trunk flags that take any finite number
NO_COMPILE = None  # why --compile is refused for this trunk; None: it compiles and gains


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
        gamma=0.99,
        gae_lambda=0.95,
        num_layers=1,
        hidden_size=68,
        state_size=8,
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
        gamma=0.99,
        gae_lambda=0.95,
        num_layers=2,
        hidden_size=296,
        state_size=16,
    ),
    "classic": dict(
        total_timesteps=1_000_000,  # target 450 on CartPoleNoVel within 1 M: met at 89 k and 112 k
        learning_rate=1e-3,  # the LSTM/GRU/TrXL classic row: 500 at 1 M on both seeds
        num_envs=8,
        num_steps=128,
        num_minibatches=1,  # all 8 sequences at once (with the learning rate above)
        update_epochs=10,
        clip_coef=0.2,
        ent_coef=0.0,
        gamma=0.99,
        gae_lambda=0.95,
        num_layers=1,
        hidden_size=68,
        state_size=8,
    ),
    "minigrid": dict(
        total_timesteps=3_000_000,  # the budget these trunks' MemoryS11 target was set at
        learning_rate=2.5e-4,
        num_envs=16,
        num_steps=128,
        num_minibatches=4,
        update_epochs=4,
        clip_coef=0.2,
        ent_coef=0.01,
        gamma=0.99,
        gae_lambda=0.95,
        num_layers=2,
        hidden_size=148,
        state_size=16,
    ),
    "minigrid-symbolic": dict(hidden_size=104),  # the embedding encoder is smaller than the CNN
    # LunarLanderNoVel-v3: 1000-step episodes and a landing bonus far ahead want a longer horizon and more
    # exploration. This is the GRU's row (227 at 3 M, at most 124 with the classic row), not tuned for Mamba
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


def causal_conv(x: torch.Tensor, window: torch.Tensor, conv: nn.Conv1d, starts: torch.Tensor):
    """Depthwise causal convolution that never reaches back past an episode start.

    x [T, B, C]; window [B, K - 1, C]: the K - 1 inputs before x, zeros where they belong to an earlier
    episode. Returns the output [T, B, C] and the next window. Each of the K taps is one batched multiply,
    masked where the tap's input lies before the output step's episode start: exact at starts anywhere, no
    loop over time.
    """
    taps = conv.weight.shape[-1]
    if len(x) == 1:  # the rollout's one step: forget the window at a start, then one dot product per channel
        inputs = torch.cat([window * (1 - starts[0])[:, None, None], x.transpose(0, 1)], 1)  # [B, K, C]
        return ((inputs * conv.weight[:, 0].T).sum(1) + conv.bias)[None], inputs[:, 1:]
    padded = torch.cat([window.transpose(0, 1), x])  # [K - 1 + T, B, C]
    episode = torch.cat([starts.new_zeros(taps - 1, starts.shape[1]), starts.cumsum(0)])  # index per step
    out = conv.bias
    for tap in range(taps):  # nn.Conv1d's cross-correlation: tap k reads the input K - 1 - k steps back
        same_episode = (episode[tap : tap + len(x)] == episode[taps - 1 :])[..., None]
        out = out + conv.weight[:, 0, tap] * padded[tap : tap + len(x)] * same_episode
    last = len(padded) - (taps - 1)  # the window after this call: the last K - 1 inputs, this episode's only
    keep = (episode[last:] == episode[-1])[..., None]
    return out, (padded[last:] * keep).transpose(0, 1)


# The causal convolution (with its SiLU) as one C++ loop per environment, exact at episode starts, and the
# selective scan with the softplus before it and the D skip and gate after it (what mamba-ssm's
# selective_scan_fn fuses) as one per (environment, block of channels), the channels in vector lanes: one
# autograd node each. Written by hand because no library runs these on the CPU (mamba-ssm's kernels are
# CUDA-only); tested equal to `causal_conv` and to SelectiveScan with the torch ops around it in float64, and
# to finite differences.
CPU_KERNEL_SOURCE = r"""
#include <torch/extension.h>
#include <math.h>
#include <cstring>
#include <type_traits>
#include <vector>

constexpr int64_t MAX_STATE = 256;  // CPU_SCAN_MAX_STATE: the Trunk sends larger states to the torch scan
template <typename F> using In = const F* __restrict__;
template <typename F> using Out = F* __restrict__;
// The state size as a compile-time constant where it is a common one (SIZE > 0), so that the compiler unrolls
// the loops over it (the scan 3-6% faster at the MemoryS11 row's sizes), else `state_size`.
template <int64_t SIZE> using Size = std::integral_constant<int64_t, SIZE>;
template <typename Run> void with_state_size(int64_t state_size, Run run) {
  if (state_size == 8) run(Size<8>{});
  else if (state_size == 16) run(Size<16>{});
  else run(Size<0>{});
}

// The causal depthwise convolution, then SiLU. x [T, B, C]; window [B, K - 1, C] (the K - 1 inputs before x);
// weight [K, C] (tap k reads the input K - 1 - k steps back); starts [T, B] (1 at an episode's first step).
// Step t reads the input `back` steps before it while back <= since(t), the steps since its episode started
// (capped at K - 1; the window belongs to the episode of the steps before the first start).
// The window, then x: index j < K - 1 is window[:, j], else x[j - K + 1]
template <typename Pointer> struct Padded {
  Pointer window, x;
  int64_t K, B, C;
  Pointer at(int64_t j, int64_t b) const {
    return j < K - 1 ? window + (b * (K - 1) + j) * C : x + ((j - K + 1) * B + b) * C;
  }
};

template <typename F> int64_t next_since(int64_t since, F start, int64_t K) {  // since(-1) is K - 2
  return start != 0 ? 0 : std::min(since + 1, K - 1);
}

// Writes act = SiLU(pre), pre (the convolution, for the backward) and the next window: the last K - 1 inputs,
// zero where they lie before the last step's episode.
template <typename F>
void conv_forward_loop(Padded<const F*> in, In<F> weight, In<F> bias, In<F> starts, Out<F> act, Out<F> pre,
                       Out<F> next_window, int64_t T) {
  const int64_t K = in.K, B = in.B, C = in.C;
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      int64_t since = K - 2;
      for (int64_t t = 0; t < T; ++t) {
        since = next_since(since, starts[t * B + b], K);
        Out<F> out = pre + (t * B + b) * C;
        Out<F> a = act + (t * B + b) * C;
        for (int64_t c = 0; c < C; ++c) out[c] = bias[c];
        for (int64_t back = 0; back <= since; ++back) {
          In<F> v = in.at(t + K - 1 - back, b);
          In<F> w = weight + (K - 1 - back) * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) out[c] += w[c] * v[c];
        }
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) a[c] = out[c] / (1 + exp(-out[c]));
      }
      for (int64_t j = 0; j < K - 1; ++j) {
        In<F> v = in.at(T + j, b);
        Out<F> o = next_window + (b * (K - 1) + j) * C;
        for (int64_t c = 0; c < C; ++c) o[c] = K - 2 - j <= since ? v[c] : 0;
      }
    }
  });
}

// grad_x and grad_window start at zero; grad_weight [B, K, C] and grad_bias [B, C] are kept per environment
// (one environment per task, so no two threads add into one entry) and summed after.
template <typename F>
void conv_backward_loop(Padded<const F*> in, In<F> weight, In<F> starts, In<F> pre, In<F> grad_act,
                        In<F> grad_next_window, Padded<F*> grad, Out<F> grad_weight, Out<F> grad_bias,
                        int64_t T) {
  const int64_t K = in.K, B = in.B, C = in.C;
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> since(T);
    std::vector<F> grad_pre(C);
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t t = 0, s = K - 2; t < T; ++t) since[t] = s = next_since(s, starts[t * B + b], K);
      for (int64_t j = 0; j < K - 1; ++j) {
        if (K - 2 - j > since[T - 1]) continue;
        Out<F> g = grad.at(T + j, b);
        In<F> o = grad_next_window + (b * (K - 1) + j) * C;
        for (int64_t c = 0; c < C; ++c) g[c] += o[c];
      }
      Out<F> gb = grad_bias + b * C;
      for (int64_t t = 0; t < T; ++t) {
        In<F> u = pre + (t * B + b) * C;
        In<F> ga = grad_act + (t * B + b) * C;
        Out<F> gp = grad_pre.data();
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const F sigmoid = 1 / (1 + exp(-u[c]));
          gp[c] = ga[c] * sigmoid * (1 + u[c] * (1 - sigmoid));  // SiLU's derivative
          gb[c] += gp[c];
        }
        for (int64_t back = 0; back <= since[t]; ++back) {
          const int64_t k = K - 1 - back;
          In<F> v = in.at(t + k, b);
          In<F> w = weight + k * C;
          Out<F> g = grad.at(t + k, b);
          Out<F> gw = grad_weight + (b * K + k) * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            g[c] += gp[c] * w[c];
            gw[c] += gp[c] * v[c];
          }
        }
      }
    }
  });
}

// The scan takes one environment's channels in blocks of one vector register of the build's instruction set
// (64 bytes with AVX-512, 32 with AVX2, 16 without), a block one GCC vector: the channels are the lanes and
// the state entries a loop, so y_t = C_t . h_t is a running sum in a register, not a sum across lanes.
// (64-byte blocks on AVX2, two registers each, made the scan 1.4x slower forward and 2.2x backward.) The
// channels are padded to whole blocks with zeros (x = 0, A = 0, h0 = 0; dt = softplus(0): the padding's state
// stays 0, adds exactly 0 to every sum over channels, and A = 0 zeroes its dt gradient).
#if defined(__AVX512F__)
constexpr int64_t BLOCK_BYTES = 64;
#elif defined(__AVX__)
constexpr int64_t BLOCK_BYTES = 32;
#else
constexpr int64_t BLOCK_BYTES = 16;
#endif
template <typename F> struct Block {
  static constexpr int64_t LANES = BLOCK_BYTES / sizeof(F);
  typedef F V __attribute__((vector_size(BLOCK_BYTES)));
  typedef std::conditional_t<sizeof(F) == 4, int32_t, int64_t> Int __attribute__((vector_size(BLOCK_BYTES)));
  static V load(const F* from) {
    V v;
    std::memcpy(&v, from, sizeof v);
    return v;
  }
  static void store(F* to, V v) { std::memcpy(to, &v, sizeof v); }
};

// exp(x), x <= 0, for a block, inline: glibc's vector exp is a call, and each call sent the loop's running
// values to memory and back. exp(x) = 2^n exp(r) with n = round(x / ln 2) and r = x - n ln 2 in
// [-ln2/2, ln2/2]; exp(r) by its Taylor series to r^7 (float) or r^13 (double), whose next term is below the
// type's rounding; 2^n from its exponent bits. r takes ln 2's rounding times n (-ffast-math would merge a
// two-part ln 2 into one), a relative error of about |x| times the type's rounding: 6e-7 at x = -10, where
// the decay is 5e-5. Below -87 (float; -708, double) x is taken as -87: an error under 1e-38 (1e-307), where
// 2^n has no normal number.
template <typename F> typename Block<F>::V exp_nonpositive(typename Block<F>::V x) {
  using V = typename Block<F>::V;
  constexpr bool single = sizeof(F) == 4;
  constexpr int terms = single ? 7 : 13, mantissa = single ? 23 : 52, bias = single ? 127 : 1023;
  const V lowest = V{} + F(single ? -87 : -708);
  x = x > lowest ? x : lowest;
  // x / ln 2 - 1/2 truncated towards zero: x / ln 2 rounded, as it is <= 0
  const typename Block<F>::Int n = __builtin_convertvector(x * F(1.44269504088896340736) - F(0.5),
                                                            typename Block<F>::Int);
  const V whole = __builtin_convertvector(n, V);
  const V r = x - whole * F(0.693147180559945309417);
  F coefficient[terms + 1] = {1};  // 1 / k!
  for (int k = 1; k <= terms; ++k) coefficient[k] = coefficient[k - 1] / k;
  V p = V{} + coefficient[terms];
  for (int k = terms - 1; k >= 0; --k) p = p * r + coefficient[k];
  return p * (V)((n + bias) << mantissa);  // a cast between vectors of one size keeps the bits
}

// h[s][l] = h0[n, d0 + l, s] and back; zero past the D channels
template <typename F> void load_state(In<F> h0, int64_t n, int64_t d0, int64_t D, int64_t S, F* h) {
  constexpr int64_t L = Block<F>::LANES;
  for (int64_t s = 0; s < S; ++s)
    for (int64_t l = 0; l < L; ++l) h[s * L + l] = d0 + l < D ? h0[(n * D + d0 + l) * S + s] : 0;
}
template <typename F> void store_state(const F* h, Out<F> out, int64_t n, int64_t d0, int64_t D, int64_t S) {
  constexpr int64_t L = Block<F>::LANES;
  for (int64_t l = 0; l < L && d0 + l < D; ++l)
    for (int64_t s = 0; s < S; ++s) out[(n * D + d0 + l) * S + s] = h[s * L + l];
}

// softplus(raw) as torch computes it (raw itself above 20), and its derivative sigmoid(raw)
template <typename F> F softplus(F raw) { return raw > 20 ? raw : log1p(exp(raw)); }
template <typename F> F softplus_slope(F raw) { return raw > 20 ? F(1) : exp(raw) / (exp(raw) + 1); }

// The mixer's scan with the operations around it, fused as mamba-ssm's selective_scan_fn fuses them:
// dt = softplus(raw), h_t = keep_t exp(dt_t A) h_{t-1} + dt_t x_t B_t, out_t = (C_t . h_t + D x_t) SiLU(z_t).
// x, raw, z, out, dt [T, N, P] (P: the channels padded); At [S, P] (A transposed); skip [P] (D);
// B, C [T, N, S]; keep [T, N]; h0 and the final state h_{T-1} [N, D, S]. Writes dt for the backward.
template <typename F, int64_t SIZE>
void forward_loop(In<F> x, In<F> raw, In<F> At, In<F> B, In<F> C, In<F> keep, In<F> h0, In<F> skip, In<F> z,
                  Out<F> out, Out<F> final_state, Out<F> dt, int64_t T, int64_t N, int64_t D, int64_t P,
                  int64_t state_size) {
  using V = typename Block<F>::V;
  constexpr int64_t L = Block<F>::LANES;
  const int64_t S = SIZE > 0 ? SIZE : state_size, blocks = P / L;
  at::parallel_for(0, N * blocks, 1, [&](int64_t begin, int64_t end) {
    alignas(BLOCK_BYTES) F h[MAX_STATE * L];  // [S, L]
    for (int64_t nb = begin; nb < end; ++nb) {
      const int64_t n = nb / blocks, d0 = nb % blocks * L;
      load_state<F>(h0, n, d0, D, S, h);
      for (int64_t t = 0; t < T; ++t) {
        const int64_t i = (t * N + n) * P + d0, row = (t * N + n) * S;
        const F k = keep[t * N + n];
        alignas(BLOCK_BYTES) F input[L], y[L];
#pragma omp simd
        for (int64_t l = 0; l < L; ++l) {
          dt[i + l] = softplus(raw[i + l]);
          input[l] = dt[i + l] * x[i + l];
        }
        const V step = Block<F>::load(dt + i), step_input = Block<F>::load(input);
        V y_sum = {};
        for (int64_t s = 0; s < S; ++s) {
          const V decay = exp_nonpositive<F>(step * Block<F>::load(At + s * P + d0)) * k;
          const V state = decay * Block<F>::load(h + s * L) + step_input * B[row + s];
          Block<F>::store(h + s * L, state);
          y_sum += state * C[row + s];
        }
        Block<F>::store(y, y_sum);
#pragma omp simd
        for (int64_t l = 0; l < L; ++l) {
          const F gate = z[i + l] / (1 + exp(-z[i + l]));  // SiLU(z)
          out[i + l] = (y[l] + skip[d0 + l] * x[i + l]) * gate;
        }
      }
      store_state<F>(h, final_state, n, d0, D, S);
    }
  });
}

// Backward in time from dL/dh_{T-1} = grad_final. Per block, the forward runs again first, keeping that
// block's decays and states only (in cache: storing every state in the forward cost more than recomputing
// them). One environment per task, so the sums over channels (grad_B, grad_C, kept per lane until the
// environment's last block) and over environments (grad_At [N, S, P] and grad_skip [N, P], summed after)
// never share a thread.
template <typename F, int64_t SIZE>
void backward_loop(In<F> grad_out, In<F> grad_final, In<F> x, In<F> raw, In<F> dt, In<F> At, In<F> B, In<F> C,
                   In<F> keep, In<F> h0, In<F> skip, In<F> z, Out<F> grad_x, Out<F> grad_raw, Out<F> grad_At,
                   Out<F> grad_B, Out<F> grad_C, Out<F> grad_h0, Out<F> grad_skip, Out<F> grad_z, int64_t T,
                   int64_t N, int64_t D, int64_t P, int64_t state_size) {
  using V = typename Block<F>::V;
  constexpr int64_t L = Block<F>::LANES;
  const int64_t S = SIZE > 0 ? SIZE : state_size;
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    // [T, S, L]: the decays, grad_B and grad_C per lane; the states h_{-1} .. h_{T-1} [T + 1, S, L];
    // dL/dy_t [T, L] (y_t = C_t . h_t)
    std::vector<F> decays(T * S * L), lanes_B(T * S * L), lanes_C(T * S * L), states((T + 1) * S * L);
    std::vector<F> grads_y(T * L);
    alignas(BLOCK_BYTES) F g[MAX_STATE * L], grad_a[MAX_STATE * L];  // [S, L]
    for (int64_t n = begin; n < end; ++n) {
      std::fill(lanes_B.begin(), lanes_B.end(), F(0));
      std::fill(lanes_C.begin(), lanes_C.end(), F(0));
      for (int64_t d0 = 0; d0 < P; d0 += L) {
        load_state<F>(h0, n, d0, D, S, states.data());
        alignas(BLOCK_BYTES) F grad_d[L] = {};
        for (int64_t t = 0; t < T; ++t) {  // the forward again
          const int64_t i = (t * N + n) * P + d0, row = (t * N + n) * S, at = t * S * L;
          const F k = keep[t * N + n];
          Out<F> gy = grads_y.data() + t * L;
          alignas(BLOCK_BYTES) F input[L], y[L], sigmoid[L];
#pragma omp simd
          for (int64_t l = 0; l < L; ++l) {
            input[l] = dt[i + l] * x[i + l];
            sigmoid[l] = 1 / (1 + exp(-z[i + l]));
            gy[l] = grad_out[i + l] * z[i + l] * sigmoid[l];  // through the gate SiLU(z)
          }
          const V step = Block<F>::load(dt + i), step_input = Block<F>::load(input);
          const V grad_y = Block<F>::load(gy);
          V y_sum = {};
          for (int64_t s = 0; s < S; ++s) {
            const V decay = exp_nonpositive<F>(step * Block<F>::load(At + s * P + d0)) * k;
            const V state = decay * Block<F>::load(states.data() + at + s * L) + step_input * B[row + s];
            Block<F>::store(decays.data() + at + s * L, decay);
            Block<F>::store(states.data() + at + (S + s) * L, state);
            y_sum += state * C[row + s];
            F* lane_C = lanes_C.data() + at + s * L;
            Block<F>::store(lane_C, Block<F>::load(lane_C) + grad_y * state);  // dL/dC_t through y_t
          }
          Block<F>::store(y, y_sum);
#pragma omp simd
          for (int64_t l = 0; l < L; ++l) {
            const F gated = y[l] + skip[d0 + l] * x[i + l];
            grad_z[i + l] = grad_out[i + l] * gated * sigmoid[l] * (1 + z[i + l] * (1 - sigmoid[l]));
            grad_d[l] += gy[l] * x[i + l];
          }
        }
        for (int64_t s = 0; s < S; ++s)
          for (int64_t l = 0; l < L; ++l) {
            g[s * L + l] = d0 + l < D ? grad_final[(n * D + d0 + l) * S + s] : 0;
            grad_a[s * L + l] = 0;
          }
        for (int64_t t = T - 1; t >= 0; --t) {
          const int64_t i = (t * N + n) * P + d0, row = (t * N + n) * S, at = t * S * L;
          alignas(BLOCK_BYTES) F input[L], grad_dtA[L], grad_input[L];
#pragma omp simd
          for (int64_t l = 0; l < L; ++l) input[l] = dt[i + l] * x[i + l];
          const V step = Block<F>::load(dt + i), step_input = Block<F>::load(input);
          const V grad_y = Block<F>::load(grads_y.data() + t * L);
          V grad_dtA_sum = {}, grad_input_sum = {};
          for (int64_t s = 0; s < S; ++s) {
            const V decay = Block<F>::load(decays.data() + at + s * L);
            const V grad_h = Block<F>::load(g + s * L) + grad_y * C[row + s];  // dL/dh_t
            // dL/d(dt_t A_s), with h_{t-1}
            const V through_decay = grad_h * Block<F>::load(states.data() + at + s * L) * decay;
            grad_dtA_sum += through_decay * Block<F>::load(At + s * P + d0);
            Block<F>::store(grad_a + s * L, Block<F>::load(grad_a + s * L) + through_decay * step);
            grad_input_sum += grad_h * B[row + s];  // dL/d(dt_t x_t)
            F* lane_B = lanes_B.data() + at + s * L;
            Block<F>::store(lane_B, Block<F>::load(lane_B) + grad_h * step_input);
            Block<F>::store(g + s * L, grad_h * decay);  // dL/dh_{t-1} through this step
          }
          Block<F>::store(grad_dtA, grad_dtA_sum);
          Block<F>::store(grad_input, grad_input_sum);
#pragma omp simd
          for (int64_t l = 0; l < L; ++l) {
            grad_x[i + l] = grad_input[l] * dt[i + l] + grads_y[t * L + l] * skip[d0 + l];
            grad_raw[i + l] = (grad_dtA[l] + grad_input[l] * x[i + l]) * softplus_slope(raw[i + l]);
          }
        }
        for (int64_t s = 0; s < S; ++s)
          for (int64_t l = 0; l < L; ++l) grad_At[(n * S + s) * P + d0 + l] = grad_a[s * L + l];
        for (int64_t l = 0; l < L; ++l) grad_skip[n * P + d0 + l] = grad_d[l];
        store_state<F>(g, grad_h0, n, d0, D, S);
      }
      for (int64_t t = 0; t < T; ++t)
        for (int64_t s = 0; s < S; ++s) {
          F sum_B = 0, sum_C = 0;
          for (int64_t l = 0; l < L; ++l) {
            sum_B += lanes_B[(t * S + s) * L + l];
            sum_C += lanes_C[(t * S + s) * L + l];
          }
          grad_B[(t * N + n) * S + s] = sum_B;
          grad_C[(t * N + n) * S + s] = sum_C;
        }
    }
  });
}

std::vector<torch::Tensor> conv_forward(torch::Tensor x, torch::Tensor window, torch::Tensor weight,
                                        torch::Tensor bias, torch::Tensor starts) {
  const int64_t T = x.size(0), B = x.size(1), C = x.size(2), K = weight.size(0);
  auto act = torch::empty_like(x), pre = torch::empty_like(x), next_window = torch::empty_like(window);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_forward", [&] {
    auto p = [](const torch::Tensor& t) { return t.data_ptr<scalar_t>(); };
    Padded<const scalar_t*> in{p(window), p(x), K, B, C};
    conv_forward_loop<scalar_t>(in, p(weight), p(bias), p(starts), p(act), p(pre), p(next_window), T);
  });
  return {act, pre, next_window};
}

std::vector<torch::Tensor> conv_backward(torch::Tensor grad_act, torch::Tensor grad_next_window,
                                         torch::Tensor x, torch::Tensor window, torch::Tensor weight,
                                         torch::Tensor starts, torch::Tensor pre) {
  const int64_t T = x.size(0), B = x.size(1), C = x.size(2), K = weight.size(0);
  auto grad_x = torch::zeros_like(x), grad_window = torch::zeros_like(window);
  auto grad_weight = torch::zeros({B, K, C}, x.options()), grad_bias = torch::zeros({B, C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_backward", [&] {
    auto p = [](const torch::Tensor& t) { return t.data_ptr<scalar_t>(); };
    Padded<const scalar_t*> in{p(window), p(x), K, B, C};
    Padded<scalar_t*> grad{p(grad_window), p(grad_x), K, B, C};
    conv_backward_loop<scalar_t>(in, p(weight), p(starts), p(pre), p(grad_act), p(grad_next_window), grad,
                                 p(grad_weight), p(grad_bias), T);
  });
  return {grad_x, grad_window, grad_weight.sum(0), grad_bias.sum(0)};
}

// The last dimension padded with zeros to whole blocks of channels: P of them
int64_t padded_size(const torch::Tensor& x) {
  const int64_t lanes = BLOCK_BYTES / x.element_size();
  return (x.size(-1) + lanes - 1) / lanes * lanes;
}
torch::Tensor padded(const torch::Tensor& t, int64_t P) {
  return t.size(-1) == P ? t.contiguous() : at::constant_pad_nd(t, {0, P - t.size(-1)}).contiguous();
}
torch::Tensor unpadded(const torch::Tensor& t, int64_t D) {
  return t.size(-1) == D ? t : t.narrow(-1, 0, D).contiguous();
}

// Returns out, the final state and dt (padded: the backward's input)
std::vector<torch::Tensor> scan_forward(torch::Tensor x, torch::Tensor raw, torch::Tensor A, torch::Tensor B,
                                        torch::Tensor C, torch::Tensor keep, torch::Tensor h0,
                                        torch::Tensor skip, torch::Tensor z) {
  const int64_t T = x.size(0), N = x.size(1), D = x.size(2), S = A.size(1), P = padded_size(x);
  TORCH_CHECK(S <= MAX_STATE, "the CPU scan takes a state size up to ", MAX_STATE, ", got ", S);
  std::vector<torch::Tensor> in;  // x, raw, At, skip, z
  for (const auto& t : {x, raw, A.t(), skip, z}) in.push_back(padded(t, P));
  auto out = torch::empty({T, N, P}, x.options()), dt = torch::empty_like(out);
  auto final_state = torch::empty_like(h0);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "scan_forward", [&] {
    auto p = [](const torch::Tensor& t) { return t.data_ptr<scalar_t>(); };
    with_state_size(S, [&](auto size) {
      forward_loop<scalar_t, size()>(p(in[0]), p(in[1]), p(in[2]), p(B), p(C), p(keep), p(h0), p(in[3]),
                                     p(in[4]), p(out), p(final_state), p(dt), T, N, D, P, S);
    });
  });
  return {unpadded(out, D), final_state, dt};
}

std::vector<torch::Tensor> scan_backward(torch::Tensor grad_out, torch::Tensor grad_final, torch::Tensor x,
                                         torch::Tensor raw, torch::Tensor A, torch::Tensor B, torch::Tensor C,
                                         torch::Tensor keep, torch::Tensor h0, torch::Tensor skip,
                                         torch::Tensor z, torch::Tensor dt) {
  const int64_t T = x.size(0), N = x.size(1), D = x.size(2), S = A.size(1), P = padded_size(x);
  std::vector<torch::Tensor> in;  // grad_out, x, raw, At, skip, z
  for (const auto& t : {grad_out, x, raw, A.t(), skip, z}) in.push_back(padded(t, P));
  auto grad_x = torch::empty_like(in[1]), grad_raw = torch::empty_like(in[1]);
  auto grad_z = torch::empty_like(in[1]);
  auto grad_At = torch::empty({N, S, P}, x.options()), grad_skip = torch::empty({N, P}, x.options());
  auto grad_B = torch::empty_like(B), grad_C = torch::empty_like(C), grad_h0 = torch::empty_like(h0);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "scan_backward", [&] {
    auto p = [](const torch::Tensor& t) { return t.data_ptr<scalar_t>(); };
    with_state_size(S, [&](auto size) {
      backward_loop<scalar_t, size()>(p(in[0]), p(grad_final), p(in[1]), p(in[2]), p(dt), p(in[3]), p(B),
                                      p(C), p(keep), p(h0), p(in[4]), p(in[5]), p(grad_x), p(grad_raw),
                                      p(grad_At), p(grad_B), p(grad_C), p(grad_h0), p(grad_skip), p(grad_z),
                                      T, N, D, P, S);
    });
  });
  return {unpadded(grad_x, D), unpadded(grad_raw, D), unpadded(grad_At.sum(0), D).t().contiguous(), grad_B,
          grad_C, grad_h0, unpadded(grad_skip.sum(0), D), unpadded(grad_z, D)};
}
"""


CPU_SCAN_MAX_STATE = 256  # the C++ loop keeps a state in a fixed array of this size (MAX_STATE)


def cpu_kernels():
    """This file's C++ loops (a module with conv_forward/backward and scan_forward/backward), built the first
    time on this CPU
    type (about 30 s; torch caches the build), or None and why. -ffast-math (when compiling only: the
    process's float mode stays as it is) lets gcc call glibc's vectorised exp; the build's name holds the
    instruction set, so one cache can serve mixed nodes."""
    from torch.utils.cpp_extension import load_inline

    capability = torch.backends.cpu.get_cpu_capability()  # DEFAULT, AVX2, AVX512, ...
    isa_flags = {"AVX2": ["-mavx2", "-mfma"], "AVX512": ["-mavx512f", "-mavx512vl", "-mavx512dq", "-mfma"]}
    name, tic = f"ppo_mamba_cpu_{capability.lower()}", time.time()
    try:
        flags = ["-O3", "-ffast-math", "-fopenmp-simd", *isa_flags.get(capability, [])]
        functions = ["conv_forward", "conv_backward", "scan_forward", "scan_backward"]
        kernels = load_inline(name, cpp_sources=CPU_KERNEL_SOURCE, functions=functions, extra_cflags=flags)
        if time.time() - tic > 5:  # a build, not the cached module
            seconds = time.time() - tic
            print(f"built the C++ convolution and scan {name} in {seconds:.0f} s (cached for later runs)")
        return kernels, None
    except Exception as error:  # no compiler or no ninja: the torch scan does the same work
        first_line = (str(error).splitlines() or [""])[0][:200]
        return None, f"the C++ loops did not build ({type(error).__name__}: {first_line})"


class CpuConvSiLU(torch.autograd.Function):
    """SiLU(causal_conv(x, window, conv, starts)) and the next window from the C++ loops (`kernels`:
    `cpu_kernels`'s module). Eager only: under torch.compile the torch path runs, which the compiler fuses."""

    @staticmethod
    def forward(ctx, x, window, weight, bias, starts, kernels):
        inputs = [t.contiguous() for t in (x, window, weight[:, 0].T, starts.to(x.dtype))]  # weight [K, C]
        act, pre, next_window = kernels.conv_forward(*inputs[:3], bias.contiguous(), inputs[3])
        ctx.kernels = kernels
        ctx.save_for_backward(*inputs, pre)
        return act, next_window

    @staticmethod
    def backward(ctx, grad_act, grad_next_window):
        grad_x, grad_window, grad_weight, grad_bias = ctx.kernels.conv_backward(
            grad_act.contiguous(), grad_next_window.contiguous(), *ctx.saved_tensors
        )
        return grad_x, grad_window, grad_weight.T[:, None], grad_bias, None, None


class CpuSelectiveScan(torch.autograd.Function):
    """The mixer's scan from the C++ loops (`kernel`: `cpu_kernels`'s module) with the operations around it
    fused, as mamba-ssm's CUDA `selective_scan_fn` fuses them: from x, dt before its softplus, A, B, C, keep,
    the initial state, D and z to (SelectiveScan's y + D x) SiLU(z) and the final state. Eager only: under
    torch.compile the torch scan runs, which the compiler fuses (called as an operator from the compiled
    graphs, the first C++ scan made whole runs 0.80-0.96x as fast on a 2-core CPU)."""

    @staticmethod
    def forward(ctx, x, dt_raw, A, B, C, keep, initial_state, D, z, kernel):
        inputs = [t.contiguous() for t in (x, dt_raw, A, B, C, keep, initial_state, D, z)]
        out, final_state, dt = kernel.scan_forward(*inputs)  # dt: the softplus, kept for the backward
        ctx.kernel = kernel
        ctx.save_for_backward(*inputs, dt)
        return out, final_state

    @staticmethod
    def backward(ctx, grad_out, grad_final):
        grad_x, grad_dt_raw, grad_A, grad_B, grad_C, grad_h0, grad_D, grad_z = ctx.kernel.scan_backward(
            grad_out.contiguous(), grad_final.contiguous(), *ctx.saved_tensors
        )
        return grad_x, grad_dt_raw, grad_A, grad_B, grad_C, None, grad_h0, grad_D, grad_z, None


class SelectiveScan(torch.autograd.Function):
    """Mamba's selective scan (Gu and Dao 2023, Algorithm 2) with exact episode starts, forward and backward.

    x and dt [T, N_env, D], A [D, S] (negative), B and C [T, N_env, S], keep [T, N_env] (0 at an episode
    start, else 1), initial_state [N_env, D, S]. h_t = keep_t exp(dt_t A) h_{t-1} + dt_t x_t B_t and
    y_t = C_t . h_t: the decay into a start is 0, so nothing before it survives. Returns y [T, N_env, D] and
    h after step T - 1. Each direction is one loop over time with one fused multiply-add per step; the rest is
    batched over time. Written by hand because no library runs this recurrence on the CPU (mamba-ssm's scan
    is CUDA-only), and autograd through the loop took 1.5x as long in training at this size (measured on a
    2-core CPU, 8 environments x 128 steps).
    """

    @staticmethod
    def forward(ctx, x, dt, A, B, C, keep, initial_state):
        decay = torch.exp(dt[..., None] * A) * keep[..., None, None]  # [T, N_env, D, S]
        inputs = (dt * x)[..., None] * B[:, :, None]
        # A new tensor per step, not writes into one buffer: the same bits, and torch.compile fuses the loop
        state, states = initial_state, [initial_state]  # h_{-1} .. h_{T-1}
        for step_input, step_decay in zip(inputs.unbind(0), decay.unbind(0), strict=True):
            state = torch.addcmul(step_input, step_decay, state)
            states.append(state)
        states = torch.stack(states)
        ctx.save_for_backward(x, dt, A, B, C, decay, states)
        return (states[1:] * C[:, :, None]).sum(-1), state

    @staticmethod
    def backward(ctx, grad_y, grad_final):
        x, dt, A, B, C, decay, states = ctx.saved_tensors
        # dL/dh_t through y_t, then plus what flows back from h_{t+1}
        through_y = grad_y[..., None] * C[:, :, None]
        grad = through_y[-1] + grad_final
        grads = [grad]
        steps = zip(through_y[:-1].unbind(0)[::-1], decay[1:].unbind(0)[::-1], strict=True)
        for step_grad, next_decay in steps:
            grad = torch.addcmul(step_grad, next_decay, grad)
            grads.append(grad)
        grads = torch.stack(grads[::-1])
        through_decay = grads * states[:-1] * decay  # dL/d(dt A) at every step and state entry
        grad_dtx = (grads * B[:, :, None]).sum(-1)
        grad_dt = (through_decay * A).sum(-1) + grad_dtx * x
        grad_A = (through_decay * dt[..., None]).sum((0, 1))
        grad_B = (grads * (dt * x)[..., None]).sum(2)
        grad_C = (states[1:] * grad_y[..., None]).sum(2)
        return grad_dtx * dt, grad_dt, grad_A, grad_B, grad_C, None, decay[0] * grads[0]


class MambaMixer(nn.Module):
    """The Mamba mixer (Gu and Dao 2023, section 3.4): the input projection gives x and the gate
    z; x goes through a causal depthwise convolution and SiLU, then the selective SSM, whose step sizes dt and
    matrices B and C are computed from x (the selection mechanism); D x is added, SiLU(z) gates the result and
    a projection maps it back. Its state: the convolution's window of the last K - 1 inputs and the SSM
    state h [inner, state_size]."""

    def __init__(self, size: int, args: Args):
        super().__init__()
        inner, state_size = args.expand * size, args.state_size
        self.dt_rank = math.ceil(size / 16)  # the reference implementation's default
        self.in_proj = nn.Linear(size, 2 * inner, bias=False)
        self.conv = nn.Conv1d(inner, inner, args.conv_size, groups=inner)
        self.x_proj = nn.Linear(inner, self.dt_rank + 2 * state_size, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, inner)
        # dt starts log-uniform in [1e-3, 1e-1] and A_n = -n (S4D-real), as in the reference implementation
        nn.init.uniform_(self.dt_proj.weight, -(self.dt_rank**-0.5), self.dt_rank**-0.5)
        dt = torch.empty(inner).uniform_(math.log(1e-3), math.log(1e-1)).exp().clamp(min=1e-4)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus(bias) = dt
        self.A_log = nn.Parameter(torch.arange(1, state_size + 1, dtype=torch.float32).log().repeat(inner, 1))
        self.D = nn.Parameter(torch.ones(inner))
        self.out_proj = nn.Linear(inner, size, bias=False)

    def initial_state(self, num_envs: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        dtype, taps = self.A_log.dtype, self.conv.kernel_size[0]  # the state follows the module: .double()
        window = torch.zeros(num_envs, taps - 1, self.conv.in_channels, dtype=dtype, device=device)
        return window, torch.zeros(num_envs, *self.A_log.shape, dtype=dtype, device=device)

    def forward(self, u: torch.Tensor, state, starts: torch.Tensor, cpu_kernels=None):
        """`cpu_kernels`: this file's C++ loops on a CPU; None: the torch path."""
        window, ssm_state = state
        x, z = self.in_proj(u).chunk(2, -1)
        if cpu_kernels is not None:
            x, window = CpuConvSiLU.apply(x, window, self.conv.weight, self.conv.bias, starts, cpu_kernels)
        else:
            x, window = causal_conv(x, window, self.conv, starts)
            x = nn.functional.silu(x)
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.A_log.shape[1], self.A_log.shape[1]], -1)
        dt_raw, A, keep = self.dt_proj(dt), -self.A_log.exp(), (1 - starts).to(x.dtype)
        if cpu_kernels is not None:  # the softplus, the D skip and the gate in the same loops
            y, ssm_state = CpuSelectiveScan.apply(x, dt_raw, A, B, C, keep, ssm_state, self.D, z, cpu_kernels)
        else:
            y, ssm_state = SelectiveScan.apply(x, nn.functional.softplus(dt_raw), A, B, C, keep, ssm_state)
            y = (y + x * self.D) * nn.functional.silu(z)
        return self.out_proj(y), (window, ssm_state)


class Trunk(nn.Module):
    """`num_layers` Mamba blocks (pre-norm residual: x + mixer(RMSNorm(x))) and a final RMSNorm.

    The state of each layer (convolution window, SSM state) restarts from zero at every episode start, in
    the rollout (one step per call) and in training (whole rollout sequences from the state stored at the
    rollout's start, starts anywhere inside): the convolution masks the taps that reach across a start and
    the scan sets the decay into a start to zero. The scan is this file's: on a CPU its C++ loop, the
    convolution's too (`--mamba-backend auto`; the trunk's forward and backward 4.1x as fast as the torch
    path's at the classic and MemoryS11 rows' sizes, one thread), else the torch loops, which torch.compile
    fuses. mamba-ssm's CUDA scan (`selective_scan_fn`) takes neither an initial state nor resets inside a
    sequence, so it could not be exact here.
    """

    def __init__(self, input_size: int, args: Args):
        super().__init__()
        self.norms = nn.ModuleList(nn.RMSNorm(input_size, eps=1e-5) for _ in range(args.num_layers))
        self.mixers = nn.ModuleList(MambaMixer(input_size, args) for _ in range(args.num_layers))
        self.final_norm = nn.RMSNorm(input_size, eps=1e-5)
        self.output_size = input_size
        self.state_reset = not args.no_state_reset
        self.cpu_kernels, self.why_torch = None, None  # the C++ loops' module: a CPU, --mamba-backend auto
        on_gpu = args.cuda and torch.cuda.is_available()
        if args.mamba_backend == "auto" and not (on_gpu or args.compile):  # compiled graphs run torch
            if args.state_size > CPU_SCAN_MAX_STATE:
                self.why_torch = f"the C++ scan takes a state size up to {CPU_SCAN_MAX_STATE}"
                self.why_torch += f", got {args.state_size}"
            else:
                self.cpu_kernels, self.why_torch = cpu_kernels()
            if self.why_torch:
                print(f"--mamba-backend auto: {self.why_torch}; using the torch path", file=sys.stderr)

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
        if self.cpu_kernels is not None and self.final_norm.weight.device.type == "cpu":
            return "C++ convolution and selective scan on the CPU"
        reason = f"; {self.why_torch}" if self.why_torch else ""
        return f"torch selective scan (one loop over time each way, hand-written backward){reason}"

    def initial_state(self, num_envs: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(convolution windows [num_envs, layers, K - 1, inner], SSM states [num_envs, layers, inner, N])."""
        states = [mixer.initial_state(num_envs, device) for mixer in self.mixers]
        return torch.stack([w for w, _ in states], 1), torch.stack([h for _, h in states], 1)

    def forward(self, x: torch.Tensor, state, starts: torch.Tensor):
        """x [T, B, input_size], starts [T, B] -> y [T, B, input_size], state after step T - 1."""
        starts = starts.long() if self.state_reset else torch.zeros_like(starts, dtype=torch.long)
        compiled = torch.compiler.is_compiling()  # the torch path, which the compiler fuses
        cpu_kernels = self.cpu_kernels if x.device.type == "cpu" and not compiled else None
        windows, ssm_states = [], []
        for layer, (norm, mixer) in enumerate(zip(self.norms, self.mixers, strict=True)):
            layer_state = (state[0][:, layer], state[1][:, layer])
            out, (window, ssm_state) = mixer(norm(x), layer_state, starts, cpu_kernels)
            x = x + out
            windows.append(window)
            ssm_states.append(ssm_state)
        return self.final_norm(x), (torch.stack(windows, 1), torch.stack(ssm_states, 1))


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
