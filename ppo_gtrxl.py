"""PPO with a Gated Transformer-XL (GTrXL) trunk whose attention window is the last M steps of the episode.

Observations are encoded (MLP for vectors, a CNN for Atari and MiniGrid RGB, an embedding for MiniGrid
symbols), passed through `num_layers` GTrXL layers, and read out by a policy head and a value head. GTrXL is
Parisotto et al. 2019, "Stabilizing Transformers for Reinforcement Learning" (arXiv 1910.06764):
Transformer-XL layers (Dai et al. 2019: memory of earlier layer inputs held without gradient, relative
positions) with the LayerNorm moved onto each sublayer's input and a ReLU on its output (their section 3.1,
"Identity Map Reordering"), and a GRU-type gate in place of each residual connection, its bias set so that
every layer starts close to the identity (section 3.2, "Gating Layers"). The paper we reproduce called a
sigmoid highway gate "GTrXL"; this is Parisotto's gate. Each layer attends over the last `memory_length` steps
of the current episode and the current step; the state kept per environment is exactly those M cached layer
inputs (the paper's TrXL kept 1024 steps per environment). Training replays each environment's whole rollout
in one batched attention call per layer, with a mask that is causal, M steps long and blind to everything
before the episode's start.
Reference: Smirnov and Gu, "RLBenchNet: The Right Network for the Right Reinforcement Learning Task"
(arXiv 2505.15040); the PPO details follow CleanRL's `ppo.py`, `ppo_atari_lstm.py` and
`ppo_continuous_action.py`.

Run:
    python ppo_gtrxl.py --env-id CartPoleNoVel-v1
    python ppo_gtrxl.py --env-id MiniGrid-MemoryS11-v0 --minigrid-obs symbolic
    python ppo_gtrxl.py --env-id CartPoleNoVel-v1 --no-state-reset   # the paper's leak, for ablation
    python ppo_gtrxl.py --help

Its default sizes are smaller than a Transformer-XL's at the same parameter count: each layer's two GRU-type
gates cost 12 x size^2 parameters, and section 3 keeps the count equal to the MLP's.
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
    memory_length: int | None = None
    """M: each layer attends over the last M steps of the current episode plus the current one"""
    num_layers: int | None = None
    """number of GTrXL layers"""
    num_heads: int = 4
    """attention heads per layer"""
    head_size: int | None = None
    """width of each attention head"""
    ffn_size: int | None = None
    """width of the position-wise MLP inside each layer"""
    gate_bias: float | None = None
    """initial b_g of every GRU-type gate (Parisotto et al.'s 2: each layer starts close to the identity)"""
    attention_backend: str = "auto"
    """auto or torch. auto runs the attention and the GRU-type gates on a CPU in this file's C++ loops (built
    on the first run, about 30 s, where a C++ compiler is found; else torch, saying why), on a GPU and under
    --compile in torch; torch runs the torch path everywhere (bit for bit the runs made before the C++
    loops)"""
    no_state_reset: bool = False
    """never reset the memory at episode starts (the paper's leaky behaviour, for ablation)"""


ARCH = "gtrxl"
TRUNK_SIZE_FIELDS = ("hidden_size", "memory_length", "num_layers", "num_heads", "head_size", "ffn_size")
TRUNK_CHOICE_FIELDS = {"attention_backend": ("auto", "torch")}  # trunk flags with a fixed set of values
TRUNK_RANGE_FIELDS = ()  # trunk flags that are (low, high) ranges of positive numbers
TRUNK_FINITE_FIELDS = ("gate_bias",)  # trunk flags that take any finite number
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
        hidden_size=40,
        head_size=10,
        ffn_size=80,
        memory_length=32,
        gate_bias=2.0,
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
        hidden_size=192,
        head_size=48,
        ffn_size=384,
        memory_length=64,
        gate_bias=2.0,
    ),
    "classic": dict(
        total_timesteps=1_000_000,  # GTrXL reaches 450 on CartPoleNoVel at 541-603 k steps
        learning_rate=1e-3,  # with 2 minibatches: 450 on both seeds; with 1, seed 2 never did
        num_envs=8,
        num_steps=128,
        num_minibatches=2,  # gates start each layer near the identity: it needs 20 steps an update
        update_epochs=10,
        clip_coef=0.2,
        ent_coef=0.0,
        gamma=0.99,
        gae_lambda=0.95,
        num_layers=1,
        hidden_size=40,
        head_size=10,
        ffn_size=80,
        memory_length=32,
        gate_bias=2.0,
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
        hidden_size=96,
        head_size=24,
        ffn_size=192,
        memory_length=64,
        gate_bias=2.0,
    ),
    "minigrid-symbolic": dict(hidden_size=64, head_size=16, ffn_size=128),  # the embedding encoder is smaller
    # MiniGrid-MemoryS11-v0: the paper's 16 gradient steps per rollout starve the update (approximate KL 1e-4 by
    # 350 k steps) before the trunk learns to compare the remembered cue with the object ahead; 64 (8 epochs of
    # 8 minibatches) build that comparison, and entropy 0.03 keeps the agent turning back to look for the cue
    # (TrXL, symbolic: return 0.94 at 1.1 M steps; with entropy 0.01 it never turned back by 885 k)
    "MiniGrid-MemoryS11-v0": dict(
        num_minibatches=8,
        update_epochs=8,
        ent_coef=0.03,
        # gates that start open: with b_g = 2 (each layer near the identity) seed 1 ended at 0.751, with b_g = 0
        # it solved the task (0.973, success 1.00, 0.9 at 1.39 M steps)
        gate_bias=0.0,
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


# The sliding-window attention as C++ loops on the CPU: each query scores only the keys of its window (the M
# steps before it and itself, in its episode) where the torch path scores a block's M + block keys and masks
# half of them, and one autograd node per layer where the torch path has a dozen ops over [blocks, heads,
# block, M + block] tensors. Written by hand because no library runs a per-query window with episode starts
# (PyTorch's CPU flash attention takes a dense mask); tested equal to the torch path in float64 and to finite
# differences. GTrXL's GRU-type gates too: one autograd node per gate, their element-wise work fused around
# torch's matrix products.
CPU_KERNEL_SOURCE = r"""
#include <torch/extension.h>
#include <math.h>
#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

template <typename F> using In = const F* __restrict__;
template <typename F> using Out = F* __restrict__;

// Context position p < M is memory slot p, p >= M is step p - M. Query i (step i, at position M + i) sees the
// keys p from first[b, i] to M + i: not later, at most M steps back, and in its episode; it scores key p
// scale * (q . k) - slope[h] * (M + i - p) (ALiBi), and the softmax runs over the keys it sees.
// q [B, T, H * D]; kv [B, M + T, 2 * H * D] (keys of heads 0..H-1, then their values); starts [T, B] (1 at an
// episode's first step); in_episode [B] (how many memory slots belong to step 0's episode, at most M).
// probs [B, H, T, M + 1]: query i's softmax weights, column j for key i + j (0 outside its window).

// first[b, i]: the first context position query i sees: its episode's first position if the episode started
// in the memory or in these steps, else i (at most M steps back)
void first_keys(In<float> starts, const int64_t* in_episode, int64_t* first, int64_t T, int64_t B,
                int64_t M) {
  for (int64_t b = 0; b < B; ++b) {
    int64_t episode_first = M - in_episode[b];
    for (int64_t i = 0; i < T; ++i) {
      if (starts[i * B + b] != 0) episode_first = M + i;
      first[b * T + i] = episode_first > i ? episode_first : i;
    }
  }
}

template <int64_t N> struct Size {
  constexpr int64_t operator()() const { return N; }
};
template <typename Run> void with_head_size(int64_t head_size, Run run) {
  if (head_size == 10) run(Size<10>{});
  else if (head_size == 16) run(Size<16>{});
  else if (head_size == 24) run(Size<24>{});
  else if (head_size == 32) run(Size<32>{});
  else if (head_size == 64) run(Size<64>{});
  else run(Size<0>{});
}

// A block of keys scored at once: one vector register of the build's instruction set (64 bytes with
// AVX-512, 32 with AVX2, 16 without), kept in a register while the sum over the head's dimensions runs.
// (64-byte blocks on AVX2, two registers each, made the attention 1.4x slower forward and 1.15x backward
// at the MemoryS11 row's sizes, and 3.2x and 2.2x with heads of 24.)
#if defined(__AVX512F__)
constexpr int64_t BLOCK_BYTES = 64;
#elif defined(__AVX__)
constexpr int64_t BLOCK_BYTES = 32;
#else
constexpr int64_t BLOCK_BYTES = 16;
#endif
template <typename F> struct Block {
  typedef F Vector __attribute__((vector_size(BLOCK_BYTES)));
  static constexpr int64_t LANES = BLOCK_BYTES / sizeof(F);
  static Vector load(const F* from) {
    Vector v;
    std::memcpy(&v, from, sizeof v);
    return v;
  }
};

// out[j] = sum_d a[d] * rows[d * stride + j] for j in [lo, W) (rows padded with LANES readable entries past
// W; out with room for LANES - 1 entries past W)
template <typename F, int64_t SIZE>
void block_dots(In<F> a, In<F> rows, int64_t stride, int64_t lo, int64_t W, int64_t D, Out<F> out) {
  using V = typename Block<F>::Vector;
  for (int64_t j0 = lo; j0 < W; j0 += Block<F>::LANES) {
    V acc = {};
    for (int64_t d = 0; d < (SIZE ? SIZE : D); ++d) acc += a[d] * Block<F>::load(rows + d * stride + j0);
    std::memcpy(out + j0, &acc, sizeof acc);
  }
}

// The largest of x[0..n), n >= 1, x readable up to n rounded up to a whole block (the rest no larger)
template <typename F> F block_max(In<F> x, int64_t n) {
  using V = typename Block<F>::Vector;
  V top = Block<F>::load(x);
  for (int64_t j = Block<F>::LANES; j < n; j += Block<F>::LANES) {
    const V v = Block<F>::load(x + j);
    top = top > v ? top : v;
  }
  F largest = top[0];
  for (int64_t u = 1; u < Block<F>::LANES; ++u) largest = std::max(largest, F(top[u]));
  return largest;
}

// One (environment, head): its keys or values as [D, M + T + LANES] (zero padding at the end of each row),
// so that a query's scores are vector operations over blocks of keys
template <typename F> void transposed(In<F> kv, Out<F> out, int64_t rows, int64_t stride, int64_t D) {
  const int64_t padded = rows + Block<F>::LANES;
  for (int64_t p = 0; p < rows; ++p)
    for (int64_t d = 0; d < D; ++d) out[d * padded + p] = kv[p * stride + d];
  for (int64_t d = 0; d < D; ++d) std::fill(out + d * padded + rows, out + (d + 1) * padded, F(0));
}

// out[d] = sum_k weight[k * weight_stride] * rows[k * row_stride + d] for k in [0, n): four running sums, so
// that the adds do not wait on each other
template <typename F, int64_t SIZE>
void weighted_rows(In<F> weight, int64_t weight_stride, In<F> rows, int64_t row_stride, int64_t n, int64_t D,
                   Out<F> out) {
  constexpr int64_t MAX = SIZE ? SIZE : 1024;  // CPU_MAX_HEAD_SIZE: the Trunk sends larger heads to torch
  F acc[4][MAX];
  for (int64_t k = 0; k < 4; ++k) std::fill(acc[k], acc[k] + D, F(0));
  int64_t k = 0;
  for (; k + 4 <= n; k += 4)
    for (int64_t u = 0; u < 4; ++u) {
      const F w = weight[(k + u) * weight_stride];
      In<F> row = rows + (k + u) * row_stride;
#pragma omp simd
      for (int64_t d = 0; d < (SIZE ? SIZE : D); ++d) acc[u][d] += w * row[d];
    }
  for (; k < n; ++k) {
    const F w = weight[k * weight_stride];
    In<F> row = rows + k * row_stride;
#pragma omp simd
    for (int64_t d = 0; d < (SIZE ? SIZE : D); ++d) acc[0][d] += w * row[d];
  }
  for (int64_t d = 0; d < D; ++d) out[d] = (acc[0][d] + acc[1][d]) + (acc[2][d] + acc[3][d]);
}

template <typename F, int64_t SIZE>
void attention_forward_loop(In<F> q, In<F> kv, In<F> slopes, const int64_t* first, Out<F> out, Out<F> probs,
                            int64_t B, int64_t T, int64_t M, int64_t H, int64_t head_size, F scale) {
  const int64_t I = H * head_size, W = M + 1, L = M + T, D = SIZE ? SIZE : head_size;
  const int64_t padded = L + Block<F>::LANES;
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    const F query_scale = scale;  // a local: the lambda's reference could alias the stores below
    std::vector<F> keys(D * padded), scores(W + Block<F>::LANES), alibi(W);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      for (int64_t j = 0; j < W; ++j) alibi[j] = -slopes[h] * F(M - j);  // column j is M - j steps back
      transposed(kv + b * L * 2 * I + h * D, keys.data(), L, 2 * I, D);
      for (int64_t i = 0; i < T; ++i) {
        Out<F> p_row = probs + (bh * T + i) * W;  // column j: key i + j, at distance M - j
        const int64_t lo = first[b * T + i] - i;  // the first column seen
        F* s = scores.data();
        block_dots<F, SIZE>(q + (b * T + i) * I + h * D, keys.data() + i, padded, lo, W, D, s);
#pragma omp simd
        for (int64_t j = lo; j < W; ++j) s[j] = s[j] * query_scale + alibi[j];
        std::fill(s + W, s + W + Block<F>::LANES, std::numeric_limits<F>::lowest());  // past the window
        const F top = block_max<F>(s + lo, W - lo);
        F total = 0;
#pragma omp simd reduction(+ : total)
        for (int64_t j = lo; j < W; ++j) {
          s[j] = std::exp(s[j] - top);
          total += s[j];
        }
        const F inverse = F(1) / total;
        for (int64_t j = 0; j < lo; ++j) p_row[j] = 0;
#pragma omp simd
        for (int64_t j = lo; j < W; ++j) p_row[j] = s[j] * inverse;
        In<F> values = kv + (b * L + i + lo) * 2 * I + I + h * D;  // key i + lo's values, then i + lo + 1's
        weighted_rows<F, SIZE>(p_row + lo, 1, values, 2 * I, W - lo, D, out + (b * T + i) * I + h * D);
      }
    }
  });
}

template <typename F, int64_t SIZE>
void attention_backward_loop(In<F> grad_out, In<F> q, In<F> kv, In<F> probs, const int64_t* first,
                             Out<F> grad_q, Out<F> grad_kv, int64_t B, int64_t T, int64_t M, int64_t H,
                             int64_t head_size, F scale) {
  const int64_t I = H * head_size, W = M + 1, L = M + T, D = SIZE ? SIZE : head_size;
  const int64_t padded = L + Block<F>::LANES;
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    const F query_scale = scale;  // a local: the lambda's reference could alias the stores below
    std::vector<F> values(D * padded), grad_scores(T * W + Block<F>::LANES);  // dL/d(q . k), [T, W] as probs
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      In<F> p_rows = probs + bh * T * W;
      transposed(kv + b * L * 2 * I + I + h * D, values.data(), L, 2 * I, D);
      for (int64_t i = 0; i < T; ++i) {  // query by query: its scores' gradients, then its own gradient
        In<F> gi = grad_out + (b * T + i) * I + h * D;
        In<F> p_row = p_rows + i * W;
        const int64_t lo = first[b * T + i] - i;
        F* gs = grad_scores.data() + i * W;  // its blocks write past W, into the next row (written later)
        block_dots<F, SIZE>(gi, values.data() + i, padded, lo, W, D, gs);  // dL/dp_j
        F weighted = 0;  // sum_j p_j dL/dp_j
#pragma omp simd reduction(+ : weighted)
        for (int64_t j = lo; j < W; ++j) weighted += p_row[j] * gs[j];
#pragma omp simd
        for (int64_t j = lo; j < W; ++j) gs[j] = p_row[j] * (gs[j] - weighted) * query_scale;
        std::fill(gs, gs + lo, F(0));  // outside the window
        In<F> keys = kv + (b * L + i + lo) * 2 * I + h * D;
        weighted_rows<F, SIZE>(gs + lo, 1, keys, 2 * I, W - lo, D, grad_q + (b * T + i) * I + h * D);
      }
      // Key by key: key p is column p - i of query i's row, for the queries i from max(0, p - M) to
      // min(T - 1, p) (a diagonal of the [T, W] rows: stride W - 1); a query whose window misses it weighs
      // it 0
      for (int64_t p = 0; p < L; ++p) {
        const int64_t i0 = std::max<int64_t>(0, p - M), n = std::min(T - 1, p) - i0 + 1;
        Out<F> row = grad_kv + (b * L + p) * 2 * I + h * D;
        In<F> queries = q + (b * T + i0) * I + h * D, grads = grad_out + (b * T + i0) * I + h * D;
        weighted_rows<F, SIZE>(grad_scores.data() + i0 * W + p - i0, W - 1, queries, I, n, D, row);
        weighted_rows<F, SIZE>(p_rows + i0 * W + p - i0, W - 1, grads, I, n, D, row + I);
      }
    }
  });
}

std::vector<torch::Tensor> attention_forward(torch::Tensor q, torch::Tensor kv, torch::Tensor starts,
                                             torch::Tensor in_episode, torch::Tensor slopes, int64_t M,
                                             int64_t H, double scale) {
  const int64_t B = q.size(0), T = q.size(1), D = q.size(2) / H;
  TORCH_CHECK(D <= 1024, "head size over 1024");
  auto first = torch::empty({B, T}, in_episode.options());
  first_keys(starts.data_ptr<float>(), in_episode.data_ptr<int64_t>(), first.data_ptr<int64_t>(), T, B, M);
  auto out = torch::empty_like(q), probs = torch::empty({B, H, T, M + 1}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "attention_forward", [&] {
    auto p = [](const torch::Tensor& t) { return t.data_ptr<scalar_t>(); };
    with_head_size(D, [&](auto size) {
      attention_forward_loop<scalar_t, size()>(p(q), p(kv), p(slopes), first.data_ptr<int64_t>(), p(out),
                                               p(probs), B, T, M, H, D, scalar_t(scale));
    });
  });
  return {out, probs, first};
}

std::vector<torch::Tensor> attention_backward(torch::Tensor grad_out, torch::Tensor q, torch::Tensor kv,
                                              torch::Tensor probs, torch::Tensor first, int64_t M, int64_t H,
                                              double scale) {
  const int64_t B = q.size(0), T = q.size(1), D = q.size(2) / H;
  auto grad_q = torch::empty_like(q), grad_kv = torch::empty_like(kv);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "attention_backward", [&] {
    auto p = [](const torch::Tensor& t) { return t.data_ptr<scalar_t>(); };
    with_head_size(D, [&](auto size) {
      attention_backward_loop<scalar_t, size()>(p(grad_out), p(q), p(kv), p(probs), first.data_ptr<int64_t>(),
                                                p(grad_q), p(grad_kv), B, T, M, H, D, scalar_t(scale));
    });
  });
  return {grad_q, grad_kv};
}

// GTrXL's GRU-type gate (GRUGate): its element-wise work in one pass on each side of the matrix product
// between, the products themselves torch's. x, y [N, S]; w_y [3S, S] (W_r, W_z, W_g); w_x [2S, S] (U_r, U_z);
// u_g [S, S]; bias [S] (b_g). Per row n: from_y = w_y y [3S], from_x = w_x x [2S] and
// from_reset_x = u_g (r * x).
template <typename F> F sigmoid(F a) { return F(1) / (F(1) + std::exp(-a)); }

template <typename F>
void gate_reset_and_update(In<F> from_y, In<F> from_x, In<F> x, In<F> bias, Out<F> reset, Out<F> update,
                           Out<F> reset_x, int64_t N, int64_t S) {
  for (int64_t n = 0; n < N; ++n)
#pragma omp simd
    for (int64_t s = 0; s < S; ++s) {
      const int64_t i = n * S + s;
      reset[i] = sigmoid(from_y[n * 3 * S + s] + from_x[n * 2 * S + s]);
      update[i] = sigmoid(from_y[n * 3 * S + S + s] + from_x[n * 2 * S + S + s] - bias[s]);
      reset_x[i] = reset[i] * x[i];
    }
}

template <typename F>
void gate_output(In<F> from_y, In<F> from_reset_x, In<F> x, In<F> update, Out<F> candidate, Out<F> out,
                 int64_t N, int64_t S) {
  for (int64_t n = 0; n < N; ++n)
#pragma omp simd
    for (int64_t s = 0; s < S; ++s) {
      const int64_t i = n * S + s;
      candidate[i] = std::tanh(from_y[n * 3 * S + 2 * S + s] + from_reset_x[i]);
      out[i] = (1 - update[i]) * x[i] + update[i] * candidate[i];
    }
}

// The gradients of from_y and from_x (grad_y3, grad_x2) but for their reset parts, and x's direct gradient
template <typename F>
void gate_output_backward(In<F> grad_out, In<F> x, In<F> update, In<F> candidate, Out<F> grad_y3,
                          Out<F> grad_x2, Out<F> grad_x, int64_t N, int64_t S) {
  for (int64_t n = 0; n < N; ++n)
#pragma omp simd
    for (int64_t s = 0; s < S; ++s) {
      const int64_t i = n * S + s;
      const F g = grad_out[i], z = update[i], h = candidate[i];
      const F grad_update = g * (h - x[i]) * z * (1 - z);
      grad_y3[n * 3 * S + S + s] = grad_x2[n * 2 * S + S + s] = grad_update;
      grad_y3[n * 3 * S + 2 * S + s] = g * z * (1 - h * h);
      grad_x[i] = g * (1 - z);
    }
}

template <typename F>
void gate_reset_backward(In<F> grad_reset_x, In<F> x, In<F> reset, Out<F> grad_y3, Out<F> grad_x2,
                         Out<F> grad_x, int64_t N, int64_t S) {
  for (int64_t n = 0; n < N; ++n)
#pragma omp simd
    for (int64_t s = 0; s < S; ++s) {
      const int64_t i = n * S + s;
      const F r = reset[i];
      grad_y3[n * 3 * S + s] = grad_x2[n * 2 * S + s] = grad_reset_x[i] * x[i] * r * (1 - r);
      grad_x[i] += grad_reset_x[i] * r;
    }
}

std::vector<torch::Tensor> gate_forward(torch::Tensor x, torch::Tensor y, torch::Tensor w_y,
                                        torch::Tensor w_x, torch::Tensor u_g, torch::Tensor bias) {
  const int64_t N = x.size(0), S = x.size(1);
  auto from_y = torch::mm(y, w_y.t()), from_x = torch::mm(x, w_x.t());
  auto reset = torch::empty_like(x), update = torch::empty_like(x), reset_x = torch::empty_like(x);
  auto candidate = torch::empty_like(x), out = torch::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gate_forward", [&] {
    auto p = [](const torch::Tensor& t) { return t.data_ptr<scalar_t>(); };
    gate_reset_and_update<scalar_t>(p(from_y), p(from_x), p(x), p(bias), p(reset), p(update), p(reset_x), N,
                                    S);
    auto from_reset_x = torch::mm(reset_x, u_g.t());
    gate_output<scalar_t>(p(from_y), p(from_reset_x), p(x), p(update), p(candidate), p(out), N, S);
  });
  return {out, reset, update, candidate, reset_x};
}

std::vector<torch::Tensor> gate_backward(torch::Tensor grad_out, torch::Tensor x, torch::Tensor y,
                                         torch::Tensor w_y, torch::Tensor w_x, torch::Tensor u_g,
                                         torch::Tensor reset, torch::Tensor update, torch::Tensor candidate,
                                         torch::Tensor reset_x) {
  const int64_t N = x.size(0), S = x.size(1);
  auto grad_y3 = torch::empty({N, 3 * S}, x.options()), grad_x2 = torch::empty({N, 2 * S}, x.options());
  auto grad_x = torch::empty_like(x), grad_u_g = torch::empty_like(u_g);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gate_backward", [&] {
    auto p = [](const torch::Tensor& t) { return t.data_ptr<scalar_t>(); };
    gate_output_backward<scalar_t>(p(grad_out), p(x), p(update), p(candidate), p(grad_y3), p(grad_x2),
                                   p(grad_x), N, S);
    auto grad_candidate = grad_y3.narrow(1, 2 * S, S);  // also the gradient of from_reset_x
    auto grad_reset_x = torch::mm(grad_candidate, u_g);
    torch::mm_out(grad_u_g, grad_candidate.t(), reset_x);
    gate_reset_backward<scalar_t>(p(grad_reset_x), p(x), p(reset), p(grad_y3), p(grad_x2), p(grad_x), N, S);
  });
  grad_x.addmm_(grad_x2, w_x);
  auto grad_bias = -grad_y3.narrow(1, S, S).sum(0);
  return {grad_x, torch::mm(grad_y3, w_y), torch::mm(grad_y3.t(), y), torch::mm(grad_x2.t(), x), grad_u_g,
          grad_bias};
}
"""


CPU_MAX_HEAD_SIZE = 1024  # the C++ loops keep a head's row in a fixed array of this size (MAX)


def cpu_kernels():
    """This file's C++ loops (a module with attention_forward, attention_backward, gate_forward and
    gate_backward), built the first time on this CPU type (about 30 s; torch caches the build), or None and
    why. -ffast-math (when compiling only: the process's float mode stays as it is) lets gcc call glibc's
    vectorised exp; the build's name holds the instruction set, so one cache can serve mixed nodes."""
    from torch.utils.cpp_extension import load_inline

    capability = torch.backends.cpu.get_cpu_capability()  # DEFAULT, AVX2, AVX512, ...
    isa_flags = {"AVX2": ["-mavx2", "-mfma"], "AVX512": ["-mavx512f", "-mavx512vl", "-mavx512dq", "-mfma"]}
    name, tic = f"ppo_{ARCH}_cpu_{capability.lower()}", time.time()
    try:
        flags = ["-O3", "-ffast-math", "-fopenmp-simd", *isa_flags.get(capability, [])]
        functions = ["attention_forward", "attention_backward", "gate_forward", "gate_backward"]
        kernels = load_inline(name, cpp_sources=CPU_KERNEL_SOURCE, functions=functions, extra_cflags=flags)
        if time.time() - tic > 5:  # a build, not the cached module
            seconds = time.time() - tic
            print(f"built the C++ attention and gate loops {name} in {seconds:.0f} s (cached for later runs)")
        return kernels, None
    except Exception as error:  # no compiler or no ninja: the torch path does the same work
        first_line = (str(error).splitlines() or [""])[0][:200]
        return None, f"the C++ loops did not build ({type(error).__name__}: {first_line})"


class CpuAttention(torch.autograd.Function):
    """Sliding-window attention from the C++ loops (`kernels`: `cpu_kernels`'s module): queries [B, T, inner]
    and key_values [B, M + T, 2 * inner] -> [B, T, inner], each query's window found from starts [T, B] and
    in_episode [B] as Trunk.forward's mask finds it; the backward reuses the forward's softmax weights. Eager
    only: under torch.compile the torch path runs, which the compiler fuses."""

    @staticmethod
    def forward(ctx, queries, key_values, kernels, starts, in_episode, slopes, memory_length, heads):
        queries, key_values = queries.contiguous(), key_values.contiguous()
        ctx.kernels, ctx.sizes = kernels, (memory_length, heads, (queries.shape[-1] // heads) ** -0.5)
        starts, in_episode = starts.to(torch.float32).contiguous(), in_episode.contiguous()
        out, weights, first_keys = kernels.attention_forward(
            queries, key_values, starts, in_episode, slopes.to(queries.dtype), *ctx.sizes
        )
        ctx.save_for_backward(queries, key_values, weights, first_keys)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad_queries, grad_key_values = ctx.kernels.attention_backward(
            grad_out.contiguous(), *ctx.saved_tensors, *ctx.sizes
        )
        return grad_queries, grad_key_values, None, None, None, None, None, None


class CpuGate(torch.autograd.Function):
    """GRUGate's g(x, y) from the C++ loops (`kernels`: `cpu_kernels`'s module) for x, y [..., size] and the
    gate's weights: one autograd node where the torch path has a dozen ops each way, the matrix products the
    same. Eager only, like CpuAttention."""

    @staticmethod
    def forward(ctx, x, y, w_y, w_x, u_g, bias, kernels):
        shape, size = x.shape, x.shape[-1]
        x, y = x.reshape(-1, size).contiguous(), y.reshape(-1, size).contiguous()
        out, *saved = kernels.gate_forward(x, y, w_y, w_x, u_g, bias)
        ctx.kernels, ctx.shape = kernels, shape
        ctx.save_for_backward(x, y, w_y, w_x, u_g, *saved)
        return out.view(shape)

    @staticmethod
    def backward(ctx, grad_out):
        grad_out = grad_out.reshape(-1, ctx.shape[-1]).contiguous()
        grad_x, grad_y, *grad_weights = ctx.kernels.gate_backward(grad_out, *ctx.saved_tensors)
        return grad_x.view(ctx.shape), grad_y.view(ctx.shape), *grad_weights, None


class GRUGate(nn.Module):
    """GTrXL's GRU-type gating layer g(x, y) in place of a residual connection x + y (Parisotto et al. 2019,
    section 3.2, "Gating Layers": the gates replace the residual connections of their Eqs. 2 and 4):
        r = sigmoid(W_r y + U_r x),  z = sigmoid(W_z y + U_z x - b_g),  h = tanh(W_g y + U_g (r * x)),
        g(x, y) = (1 - z) * x + z * h.
    The bias b_g starts at `gate_bias` (2): z is small, g(x, y) is close to x, and every layer starts close to
    the identity map (their "gated identity initialization"; b_g = 2 is the value they report for GRU
    gates)."""

    def __init__(self, size: int, gate_bias: float):
        super().__init__()
        self.from_y = nn.Linear(size, 3 * size, bias=False)  # W_r, W_z, W_g
        self.from_x = nn.Linear(size, 2 * size, bias=False)  # U_r, U_z
        self.from_reset_x = nn.Linear(size, size, bias=False)  # U_g
        self.gate_bias = nn.Parameter(torch.full((size,), gate_bias))

    def forward(self, x: torch.Tensor, y: torch.Tensor, kernels=None) -> torch.Tensor:
        """g(x, y) for x, y [..., size]; kernels: this file's C++ loops, or None for the torch path."""
        if kernels is not None:
            weights = self.from_y.weight, self.from_x.weight, self.from_reset_x.weight, self.gate_bias
            return CpuGate.apply(x, y, *weights, kernels)
        y_r, y_z, y_g = self.from_y(y).chunk(3, -1)
        x_r, x_z = self.from_x(x).chunk(2, -1)
        reset = torch.sigmoid(y_r + x_r)
        update = torch.sigmoid(y_z + x_z - self.gate_bias)
        candidate = torch.tanh(y_g + self.from_reset_x(reset * x))
        return (1 - update) * x + update * candidate


class TransformerLayer(nn.Module):
    """A GTrXL layer (Parisotto et al. 2019): Transformer-XL attention and MLP with the identity-map
    reordering (LayerNorm on each sublayer's input only, ReLU on its output; section 3.1) and a GRU-type gate
    in place of each residual connection (section 3.2)."""

    def __init__(self, args: Args):
        super().__init__()
        size, inner = args.hidden_size, args.num_heads * args.head_size
        self.num_heads, self.head_size = args.num_heads, args.head_size
        self.memory_length = args.memory_length
        self.query = nn.Linear(size, inner)
        self.key_value = nn.Linear(size, 2 * inner)
        self.out = nn.Linear(inner, size)
        self.mlp = nn.Sequential(nn.Linear(size, args.ffn_size), nn.ReLU(), nn.Linear(args.ffn_size, size))
        self.norm_attention, self.norm_mlp = nn.LayerNorm(size), nn.LayerNorm(size)
        self.gate_attention, self.gate_mlp = GRUGate(size, args.gate_bias), GRUGate(size, args.gate_bias)

    def attend(self, queries: torch.Tensor, key_values: torch.Tensor, mask) -> torch.Tensor:
        """queries [B, T, size] attend to key_values [B, M + T, 2 * inner] over each query's window (see
        Trunk.forward). mask: the torch path's scores_bias [B * blocks, heads, block, M + block], for one
        batched attention over every block of every env; or the C++ loops' arguments (kernels, starts,
        in_episode, slopes), which find each query's window from the starts themselves."""
        if isinstance(mask, tuple):
            sizes = self.memory_length, self.num_heads
            return self.out(CpuAttention.apply(self.query(queries), key_values, *mask, *sizes))
        (batch, steps), (block, window) = queries.shape[:2], mask.shape[-2:]
        q = self.query(queries).view(-1, block, self.num_heads, self.head_size).transpose(1, 2)
        # Each block's window, sliced and stacked: [B, blocks, M + block, 2 * inner]. (An overlapping `unfold`
        # gives the same values, but torch.compile's CPU backward of it wrote out of bounds in torch 2.13)
        windows = torch.stack([key_values[:, start : start + window] for start in range(0, steps, block)], 1)
        k, v = windows.reshape(q.shape[0], window, 2, self.num_heads, self.head_size).permute(2, 0, 3, 1, 4)
        # Written out rather than scaled_dot_product_attention: on the CPU that checks every row for being
        # fully masked, which costs more than the attention at these sizes; here no row is (a step sees
        # itself)
        weights = (q @ k.transpose(-1, -2) * self.head_size**-0.5 + mask).softmax(-1)
        return self.out((weights @ v).transpose(1, 2).reshape(batch, steps, -1))

    def key_values(self, inputs: torch.Tensor) -> torch.Tensor:
        """Layer inputs [B, L, size] -> their keys and values [B, L, 2 * inner]."""
        return self.key_value(self.norm_attention(inputs))

    def forward(self, x: torch.Tensor, memory: torch.Tensor, mask, key_values=None) -> torch.Tensor:
        """x [B, T, size]: the layer inputs of the T current steps; memory [B, M, size]: those of the M steps
        before them; key_values: the keys and values of both, where already projected (a rollout step)."""
        if key_values is None:  # the memory is normalised too: LayerNorm([StopGrad(M), E])
            # x as the context's view: its gradient then sums in the order it did before the C++ loops
            context = torch.cat([memory, x], 1)
            x, normed = context[:, self.memory_length :], self.norm_attention(context)
            queries, key_values = normed[:, self.memory_length :], self.key_value(normed)
        else:
            queries = self.norm_attention(x)
        kernels = mask[0] if isinstance(mask, tuple) else None  # the gates run where the attention runs
        y = self.gate_attention(x, torch.relu(self.attend(queries, key_values, mask)), kernels)
        return self.gate_mlp(y, torch.relu(self.mlp(self.norm_mlp(y))), kernels)


class Trunk(nn.Module):
    """`num_layers` attention layers, each over a sliding window: the last `memory_length` (M) steps of the
    current episode plus the current step. The state is, per environment, the last M inputs of every layer
    ([B, layers, M, size], no gradient flows into it from training) and how many of them belong to the current
    episode ([B], at most M): a fixed size, whatever the episode length or num_steps.

    One call over T steps (T = 1 in the rollout, num_steps in training) is one batched attention per layer:
    queries are the T steps, keys and values the M memory steps followed by the T steps, and a query sees a
    key only if the key is not later, at most M steps earlier, and in the same episode. That mask reproduces
    the rollout's window exactly, so training recomputes the very outputs (and log-probabilities) the rollout
    saw. A query sees at most M + 1 keys: in the torch path queries go in blocks of min(T, M) steps, each
    scored against its own M + block keys only; with `--attention-backend auto` on a CPU, this file's C++
    loops score each query against the keys of its window alone (tested equal).

    Positions are relative, as in Transformer-XL, in ALiBi's form (Press et al. 2022, "Train Short, Test
    Long"): head h subtracts slope_h x distance from its attention scores, with fixed slopes 2^(-8h / heads),
    from recency-bound heads to nearly flat ones. Distance is what a sliding window needs; an absolute
    position in the episode is unbounded (Atari episodes run for thousands of steps, past anything seen in
    training). ALiBi adds no parameters and folds into the attention mask.
    """

    def __init__(self, input_size: int, args: Args):
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(args) for _ in range(args.num_layers))
        self.memory_length = args.memory_length
        self.output_size = args.hidden_size
        self.state_reset = not args.no_state_reset
        self.cpu_kernels, self.why_torch = None, None
        on_gpu = args.cuda and torch.cuda.is_available()
        if args.attention_backend == "auto" and not (on_gpu or args.compile):  # compiled graphs run torch
            if args.head_size > CPU_MAX_HEAD_SIZE:
                self.why_torch = f"the C++ loops take heads up to {CPU_MAX_HEAD_SIZE} wide"
                self.why_torch += f", got {args.head_size}"
            else:
                self.cpu_kernels, self.why_torch = cpu_kernels()
            if self.why_torch:
                print(f"--attention-backend auto: {self.why_torch}; using the torch path", file=sys.stderr)
        heads = torch.arange(1, args.num_heads + 1)
        self.register_buffer("slopes", 2.0 ** (-8.0 * heads / args.num_heads), persistent=False)
        self.windows = {}  # (block, device) -> a block's ALiBi scores, -inf outside its window
        # The last two rollout calls' (memory, weight versions, keys and values): a time-limit bootstrap
        # steps from the same state as the next rollout step, and must not evict that state's window
        self.rollout_cache = []
        # Listed once, as the optimizer holds them: walking the modules costs 0.1 ms, at every rollout step
        self.layer_parameters = list(self.layers.parameters())

    def __getstate__(self):  # torch.save(agent), copy.deepcopy: whether the C++ loops ran, not their module
        # and no cache: a loaded copy's weights count their versions from 0 again
        caches = {"rollout_cache": [], "windows": {}}
        return {**super().__getstate__(), "cpu_kernels": self.cpu_kernels is not None, **caches}

    def __setstate__(self, state):
        super().__setstate__({**state, "cpu_kernels": None})
        if state["cpu_kernels"]:  # they ran: the same module within a process, built once on a new machine
            self.cpu_kernels, self.why_torch = cpu_kernels()
            if self.why_torch:
                print(f"loaded without the C++ loops: {self.why_torch}; the torch path", file=sys.stderr)

    @property
    def kernel(self) -> str:
        if self.cpu_kernels is not None and self.slopes.device.type == "cpu":
            return "C++ sliding-window attention and gates on the CPU"
        reason = f"; auto backend: {self.why_torch}" if self.why_torch else ""
        return f"block-local attention, one batched call per layer{reason}"

    def window(self, block: int, device: torch.device) -> torch.Tensor:
        """Query i of a block attends to key j of its window at distance M + i - j (query time minus key
        time): ALiBi's score [heads, block, M + block], -inf where the key is later or more than M steps
        earlier."""
        if torch.compiler.is_compiling():  # built inside the graph: a dict filled there would be guarded on
            return self.build_window(block, device)
        if (block, device) not in self.windows:
            self.windows[block, device] = self.build_window(block, device)
        return self.windows[block, device]

    def build_window(self, block: int, device: torch.device) -> torch.Tensor:
        distance = self.memory_length + torch.arange(block, device=device)[:, None]
        distance = distance - torch.arange(self.memory_length + block, device=device)
        outside = (distance < 0) | (distance > self.memory_length)
        return (-self.slopes[:, None, None] * distance).masked_fill(outside, -math.inf)

    def initial_state(self, num_envs: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (num_envs, len(self.layers), self.memory_length, self.output_size)
        memory = torch.zeros(shape, dtype=self.slopes.dtype, device=device)  # .double() for gradient checks
        return memory, torch.zeros(num_envs, dtype=torch.long, device=device)

    def forward(self, x: torch.Tensor, state, starts: torch.Tensor):
        """x [T, B, size], starts [T, B] -> y [T, B, size], state after step T - 1."""
        memory, in_episode = state
        steps, memory_length = x.shape[0], self.memory_length
        if not self.state_reset:
            starts = torch.zeros_like(starts)
        if self.cpu_kernels is not None and x.device.type == "cpu" and not torch.compiler.is_compiling():
            # The C++ loops find each query's window from the starts: no blocks, no padding
            mask, padding = (self.cpu_kernels, starts, in_episode, self.slopes), 0
        else:
            mask, padding = self.scores_bias(starts, in_episode)

        # A rollout step (one step, no gradient) projects only its own input to keys and values; the memory's
        # come from the call that returned it, which projected the same M inputs under the same weights
        rollout_step = steps == 1 and not torch.is_grad_enabled()
        memory_key_values = self.memory_key_values(memory) if rollout_step else None
        h, last_inputs, new_key_values = nn.functional.pad(x.transpose(0, 1), (0, 0, 0, padding)), [], []
        for index, layer in enumerate(self.layers):  # h: [B, T + padding, size]
            last_inputs.append(h[:, max(steps - memory_length, 0) : steps].detach())  # at most M real steps
            key_values = None  # training: the layer projects its memory and inputs itself
            if rollout_step:  # the window moves on by one: the oldest memory step leaves it
                key_values = torch.cat([memory_key_values[index][:, 1:], layer.key_values(h)], 1)
                new_key_values.append(key_values)
            h = layer(h, memory[:, index], mask, key_values)
        # Steps of the current episode after this call: since the last start, or added to those before
        last_start = torch.where(starts.T.bool(), torch.arange(steps, device=x.device), -1).amax(1)
        in_episode = torch.where(last_start >= 0, steps - last_start, in_episode + steps)
        in_episode = in_episode.clamp(max=memory_length)
        # The last M inputs of every layer, in one copy: the memory's latest M - T steps (none when T >= M),
        # then the inputs' last steps
        new_memory = torch.cat([memory[:, :, steps:], torch.stack(last_inputs, 1)], 2)
        if rollout_step:
            self.remember_key_values(new_memory, new_key_values)
        return h[:, :steps].transpose(0, 1), (new_memory, in_episode)

    def scores_bias(self, starts: torch.Tensor, in_episode: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The torch path's mask for steps with starts [T, B]: each block's ALiBi scores with -inf outside
        each query's window ([B * blocks, heads, block, M + block]), and the steps padded to fill the last
        block."""
        (steps, envs), memory_length, device = starts.shape, self.memory_length, starts.device
        # Queries go in blocks of `block` steps; a block's keys are the M steps before it and the block itself
        # (M + block keys, not M + T: most of a full T x (M + T) score matrix would be masked). Steps padded
        # at the end to fill the last block come after every real step, so no real step sees them.
        block = min(steps, memory_length)
        blocks = -(-steps // block)
        padding = blocks * block - steps
        # Episode index of every key: memory slot j holds the input from M - j steps before step 0, and
        # belongs to step 0's episode (index 0) if it is among the last `in_episode`; a start moves the index
        # on by one.
        # Floats (exact up to 2^24), and a float window: compiled, inductor rebuilds this mask inside every
        # layer's softmax, and with 64-bit integer indices and a bool window it took 2.5x as long (AVX2)
        slots = torch.arange(memory_length, device=device)
        memory_episode = torch.where(slots >= memory_length - in_episode[:, None], 0.0, -1.0)
        step_episode = nn.functional.pad(starts.T, (0, padding)).cumsum(1)  # [B, T + padding]
        key_episode = torch.cat([memory_episode, step_episode], 1).unfold(1, memory_length + block, block)
        query_episode = step_episode.view(envs, blocks, block)
        window = self.window(block, device)  # built once per block size (rollout: 1, training: M)
        other_episode = query_episode[..., None] != key_episode[:, :, None]
        scores_bias = torch.where(other_episode[:, :, None], -math.inf, window)
        return scores_bias.flatten(0, 1), padding  # [B * blocks, heads, block, M + block]

    def weight_versions(self) -> list[int]:
        """In-place change counters of the layers' weights (autograd's own): an optimizer step and
        load_state_dict raise them; a write through `.data` does not (clear `rollout_cache` after one)."""
        return [parameter._version for parameter in self.layer_parameters]

    # The cache is Python bookkeeping (object identity, version counters): under --compile these two run
    # eagerly between the compiled pieces, so no graph tests it and one graph serves a hit and a miss
    @torch.compiler.disable
    def memory_key_values(self, memory: torch.Tensor) -> list[torch.Tensor]:
        """Per layer, [B, 1 + M, 2 * inner]: a slot the step drops, then the keys and values of the M inputs
        in `memory`. The window of one of the last two rollout calls if it returned this very memory and no
        weight has changed since, else projected now (after an update, or a state from elsewhere: a replay's);
        the same shape and strides either way, so a compiled graph serves both."""
        versions = self.weight_versions()
        for cached_memory, cached_versions, key_values in self.rollout_cache:
            if cached_memory is memory and cached_versions == versions:
                return key_values
        layer_inputs = zip(self.layers, memory.unbind(1), strict=True)
        return [nn.functional.pad(layer.key_values(inputs), (0, 0, 1, 0)) for layer, inputs in layer_inputs]

    @torch.compiler.disable
    def remember_key_values(self, memory: torch.Tensor, key_values: list[torch.Tensor]):
        self.rollout_cache = [*self.rollout_cache[-1:], (memory, self.weight_versions(), key_values)]


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
