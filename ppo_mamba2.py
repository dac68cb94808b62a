"""PPO with a Mamba-2 trunk (state-space duality) that forgets exactly at every episode start.

Observations are encoded (MLP for vectors, a CNN for Atari and MiniGrid RGB, an embedding for MiniGrid
symbols), passed through `num_layers` Mamba-2 blocks (Dao and Gu, "Transformers are SSMs: Generalized Models
and Efficient Algorithms Through Structured State Space Duality", arXiv 2405.21060), and read out by a policy
head and a value head. Each block's state (its convolution window and its SSM state) restarts from zero at
every episode start, in the rollout (one step per call) and in training (whole rollout sequences replayed
from the state stored at the rollout's start, starts anywhere inside); the paper we reproduce trained its
Mamba-2 without either, so memory leaked across episodes (`--no-state-reset` reproduces that, for ablation).
On a CPU the convolution, the SSD and the gated norm run in this file's C++ loops (built at the first
run), elsewhere in torch (the SSD in chunks, no loop over time steps); `--mamba-backend cuda` uses
mamba-ssm's kernel.
Reference: Smirnov and Gu, "RLBenchNet: The Right Network for the Right Reinforcement Learning Task"
(arXiv 2505.15040); the PPO details follow CleanRL's `ppo.py`, `ppo_atari_lstm.py` and
`ppo_continuous_action.py`.

Run:
    python ppo_mamba2.py --env-id CartPoleNoVel-v1
    python ppo_mamba2.py --env-id MiniGrid-MemoryS11-v0 --minigrid-obs symbolic
    python ppo_mamba2.py --env-id CartPoleNoVel-v1 --no-state-reset   # the paper's leak, for ablation
    python ppo_mamba2.py --help

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
    """number of Mamba-2 blocks"""
    num_heads: int | None = None
    """SSM heads per block, each with its own scalar decay A; the inner width is num_heads * head_size"""
    head_size: int = 32
    """channels per head (Mamba-2's headdim P)"""
    state_size: int = 16
    """N: SSM state size (Mamba-2's d_state), B and C shared by all heads"""
    conv_size: int = 4
    """width of the causal depthwise convolution (Mamba-2's d_conv)"""
    chunk_size: int = 64
    """SSD chunk length in steps: quadratic within a chunk, a recurrence across chunks (the torch path's and
    mamba-ssm's multi-step calls; the C++ loops and one-step rollout calls run the recurrence step by step)"""
    # `None` takes the value of the domain-defaults table: Mamba-2's own start except on MiniGrid-MemoryS11
    dt_init: tuple[float, float] | None = None
    """range of the step sizes dt at initialisation, log-uniform (Mamba-2's dt_min, dt_max: 1e-3 1e-1)"""
    a_init: tuple[float, float] | None = None
    """range of each head's decay rate -A at initialisation, uniform (Mamba-2's A_init_range: 1 16)"""
    d_init: float | None = None
    """initial value of the skip D x (Mamba-2's 1)"""
    post_mlp: tyro.conf.DisallowNone[bool | None] = None
    """after the blocks, a residual ReLU MLP (width -> width / 2 -> width) before the final norm, as in the
    paper's Mamba-2 policy (its post_mamba_mlp): a nonlinear read of the blocks' output for the heads"""
    mamba_backend: str = "auto"
    """auto, torch or cuda. auto runs the convolution, the SSD and the gated norm on a CPU in this file's C++
    loops (built on the first run, about 30 s, where a C++ compiler is found; else torch, saying why), on a
    GPU and under --compile in torch; torch runs the torch path everywhere (bit for bit the runs made before
    the C++ loops); cuda runs mamba-ssm's kernel on a CUDA device where mamba-ssm imports, else torch, saying
    why"""
    no_state_reset: bool = False
    """never reset the memory at episode starts (the paper's leaky behaviour, for ablation)"""


ARCH = "mamba2"
TRUNK_SIZE_FIELDS = (
    "hidden_size",
    "num_layers",
    "num_heads",
    "head_size",
    "state_size",
    "conv_size",
    "chunk_size",
)
TRUNK_CHOICE_FIELDS = {"mamba_backend": ("auto", "torch", "cuda")}
TRUNK_RANGE_FIELDS = ("dt_init", "a_init")  # trunk flags that are (low, high) ranges of positive numbers
TRUNK_FINITE_FIELDS = ("d_init",)  # trunk flags that take any finite number
NO_COMPILE = None  # why --compile is refused for this trunk; None: it compiles and gains


# ---------------------------------------------------------------------------------------------------------
# 3. Domain defaults: a flag the user passes always wins over this table
# ---------------------------------------------------------------------------------------------------------
REFERENCE_START = dict(dt_init=(1e-3, 1e-1), a_init=(1.0, 16.0), d_init=1.0, post_mlp=False)  # Mamba-2's own
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
        hidden_size=64,
        num_heads=5,
        **REFERENCE_START,
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
        hidden_size=320,
        num_heads=20,
        **REFERENCE_START,
    ),
    "classic": dict(
        total_timesteps=1_000_000,  # target 450 on CartPoleNoVel within 1 M: met at 168 k and 281 k
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
        hidden_size=64,
        num_heads=5,
        **REFERENCE_START,
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
        hidden_size=160,
        num_heads=9,  # parameters within 10% of the MLP's with MemoryS11's post-MLP (+6.6%; +2.0% without)
        **REFERENCE_START,
    ),
    "minigrid-symbolic": dict(hidden_size=112, num_heads=7),  # the embedding encoder is smaller than the CNN
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
    # Mamba-2 there: its own start keeps no cue (an input 10 steps back reaches the output at 1e-3 of a
    # current one); slow decays (dt 0.1-1, -A 0.05-1) and no skip (D 0) carry it about 100x further. With the
    # paper's trunk learning rate and post-MLP too (symbolic, 3 M steps): 1 seed of 5 reached 0.9 (0.967, then
    # 0.439-0.617; the reference start with those two stayed at 0.536). Rollouts of 256 steps instead of 128
    # (a 96-step episode cut by a rollout's end half as often; half as many updates): 0.971, 0.971 and 0.518
    # on seeds 2, 3 and 1
    "MiniGrid-MemoryS11-v0": dict(
        num_steps=256,
        num_minibatches=8,
        update_epochs=8,
        ent_coef=0.03,
        trunk_learning_rate=1e-4,  # the paper's rate for its Mamba trunks; at 2.5e-4 the KL was 3x TrXL's
        dt_init=(0.1, 1.0),
        a_init=(0.05, 1.0),
        d_init=0.0,
        post_mlp=True,
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


def segment_sums(a: torch.Tensor) -> torch.Tensor:
    """a [..., L] -> [..., L, L]: out[..., i, j] = a[j + 1] + ... + a[i] for j <= i, -inf above the diagonal.

    Built by cumulative sums of masked copies, never by differences of cumulative sums: a log-decay of -inf at
    an episode start then gives -inf (decay 0) across the start and never inf - inf (Dao and Gu 2024,
    Listing 1).
    """
    length = a.shape[-1]
    below = torch.tril(torch.ones(length, length, dtype=torch.bool, device=a.device), diagonal=-1)
    # sums[..., i, j] = a[j + 1] + ... + a[i]: the copy [..., k, j] holds a[k] below the diagonal, else 0
    sums = a[..., :, None].expand(*a.shape, length).masked_fill(~below, 0).cumsum(-2)
    return sums.masked_fill(~torch.tril(torch.ones_like(below)), -torch.inf)


def ssd(x, dt, A, B, C, starts, initial_state, chunk_size: int):
    """Mamba-2's state-space duality (Dao and Gu 2024; the paper's Listing 1) with exact episode starts.

    x [T, N_env, H, P], dt [T, N_env, H] (after softplus), A [H] (negative), B and C [T, N_env, S],
    starts [T, N_env] bool, initial_state [N_env, H, P, S]. The recurrence is h_t = exp(dt_t A) h_{t-1} +
    dt_t B_t x_t, y_t = C_t h_t; a start sets the decay into its step to 0 (log-decay -inf), so no state
    crosses it, whether it came from an earlier step or from initial_state. Quadratic within chunks of
    chunk_size steps, a recurrence over chunks, in the inputs' precision. Returns y [T, N_env, H, P] and h
    after step T - 1.
    """
    steps, num_envs, heads, _ = x.shape
    length = min(chunk_size, steps)
    pad = -steps % length  # padded steps: decay 1 and input 0, so they leave the state as it is
    log_decay = (dt * A).masked_fill(starts[..., None], -torch.inf)
    x = x * dt[..., None]
    if pad:
        x, B, C = (nn.functional.pad(t, (0, 0) * (t.dim() - 1) + (0, pad)) for t in (x, B, C))
        log_decay = nn.functional.pad(log_decay, (0, 0, 0, 0, 0, pad))
    chunks = (steps + pad) // length
    x = x.reshape(chunks, length, num_envs, heads, -1).permute(2, 0, 1, 3, 4)  # [E, c, l, H, P]
    B, C = (t.reshape(chunks, length, num_envs, -1).permute(2, 0, 1, 3) for t in (B, C))  # [E, c, l, S]
    a = log_decay.reshape(chunks, length, num_envs, heads).permute(2, 3, 0, 1)  # [E, H, c, l]
    a_cumsum = a.cumsum(-1)

    # Within each chunk: y_t = sum over s <= t of C_t . B_s * decay(s -> t) * x_s
    y = torch.einsum("eclS,ecsS,ehcls,ecshp->eclhp", C, B, segment_sums(a).exp(), x)
    # Each chunk's own contribution to the state at its end: decay from s + 1 to the chunk's last step
    to_end = torch.cat([a[..., 1:], torch.zeros_like(a[..., :1])], -1).flip(-1).cumsum(-1).flip(-1)
    states = torch.einsum("eclS,ehcl,eclhp->echpS", B, to_end.exp(), x)
    # Across chunks: the state entering each chunk, starting from initial_state
    states = torch.cat([initial_state[:, None], states], 1)
    across = segment_sums(nn.functional.pad(a_cumsum[..., -1], (1, 0))).exp()  # [E, H, c + 1, c + 1]
    states = torch.einsum("ehzc,echpS->ezhpS", across, states)
    entering, final_state = states[:, :-1], states[:, -1]
    y = y + torch.einsum("eclS,echpS,ehcl->eclhp", C, entering, a_cumsum.exp())
    return y.reshape(num_envs, chunks * length, heads, -1)[:, :steps].transpose(0, 1), final_state


# Mamba-2's causal convolution (with its SiLU), SSD recurrence and gated norm as C++ loops on the CPU: one
# pass over time per environment (the convolution) or per (environment, head) (the SSD, its state in the
# cache), exact at episode starts, and one pass per row (the gated norm); one autograd node each where the
# torch path has dozens of small ops. Written by hand because no library runs them on the CPU (mamba-ssm's
# kernels are CUDA-only); tested equal to the torch path in float64 and to finite differences.
CPU_KERNEL_SOURCE = r"""
#include <torch/extension.h>
#include <math.h>
#include <vector>

template <typename F> using In = const F* __restrict__;
template <typename F> using Out = F* __restrict__;

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

// The SSD's recurrence, one (environment n, head) forward in time: h_t = keep_t exp(dt_t A) h_{t-1} +
// dt_t x_t B_t^T ([P, S]) and y_t = h_t C_t. x [T, N, H, P]; dt [T, N, H]; A [H]; B, C [T, N, S]; keep [T, N]
// (0 at an episode start). h [P, S] is updated in place; y (if not null) gets y_t; states (if not null) gets
// h_0 .. h_{T-1} [T, P, S]. The state size is a compile-time constant where it is a common one (SIZE > 0),
// so that the loops over it are vectorised whole.
template <typename F, int64_t SIZE>
void ssd_head(int64_t n, int64_t head, In<F> x, In<F> dt, In<F> A, In<F> B, In<F> C, In<F> keep, F* h, F* y,
              F* states, int64_t T, int64_t N, int64_t H, int64_t P, int64_t state_size) {
  const int64_t S = SIZE > 0 ? SIZE : state_size;
  for (int64_t t = 0; t < T; ++t) {
    const int64_t i = (t * N + n) * H + head, row = (t * N + n) * S;
    const F step = dt[i], decay = exp(step * A[head]) * keep[t * N + n];
    In<F> b = B + row;
    In<F> c = C + row;
    for (int64_t p = 0; p < P; ++p) {
      const F input = step * x[i * P + p];
      F* hp = h + p * S;
      F out = 0;
#pragma omp simd reduction(+ : out)
      for (int64_t s = 0; s < S; ++s) {
        hp[s] = decay * hp[s] + input * b[s];
        out += hp[s] * c[s];
      }
      if (y) y[i * P + p] = out;
    }
    if (states) std::copy(h, h + P * S, states + t * P * S);
  }
}

template <int64_t SIZE> using Size = std::integral_constant<int64_t, SIZE>;
template <typename Run> void with_state_size(int64_t state_size, Run run) {
  if (state_size == 16) run(Size<16>{});
  else if (state_size == 64) run(Size<64>{});
  else run(Size<0>{});
}

template <typename F, int64_t SIZE>
void ssd_forward_loop(In<F> x, In<F> dt, In<F> A, In<F> B, In<F> C, In<F> keep, In<F> h0, Out<F> y,
                      Out<F> final, int64_t T, int64_t N, int64_t H, int64_t P, int64_t S) {
  at::parallel_for(0, N * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t nh = begin; nh < end; ++nh) {
      std::copy(h0 + nh * P * S, h0 + (nh + 1) * P * S, final + nh * P * S);
      ssd_head<F, SIZE>(nh / H, nh % H, x, dt, A, B, C, keep, final + nh * P * S, y, nullptr, T, N, H, P, S);
    }
  });
}

// Backward in time from dL/dh_{T-1} = grad_final, the states recomputed per (environment, head) into this
// task's buffer. One environment per task, so the sums over heads (grad_B, grad_C) never share a thread;
// grad_A is kept per (environment, head) and summed after.
template <typename F, int64_t SIZE>
void ssd_backward_loop(In<F> grad_y, In<F> grad_final, In<F> x, In<F> dt, In<F> A, In<F> B, In<F> C,
                       In<F> keep, In<F> h0, Out<F> grad_x, Out<F> grad_dt, Out<F> grad_A, Out<F> grad_B,
                       Out<F> grad_C, Out<F> grad_h0, int64_t T, int64_t N, int64_t H, int64_t P,
                       int64_t state_size) {
  const int64_t S = SIZE > 0 ? SIZE : state_size, PS = P * S;
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    std::vector<F> states(T * PS), g(PS);
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t head = 0; head < H; ++head) {
        const int64_t nh = n * H + head;
        std::copy(h0 + nh * PS, h0 + (nh + 1) * PS, g.begin());  // g holds h while the states are recomputed
        ssd_head<F, SIZE>(n, head, x, dt, A, B, C, keep, g.data(), nullptr, states.data(), T, N, H, P, S);
        std::copy(grad_final + nh * PS, grad_final + (nh + 1) * PS, g.begin());  // now dL/dh
        F grad_a = 0;
        for (int64_t t = T - 1; t >= 0; --t) {
          const int64_t i = (t * N + n) * H + head, row = (t * N + n) * S;
          const F step = dt[i], decay = exp(step * A[head]) * keep[t * N + n];
          In<F> h = states.data() + t * PS;
          In<F> before = t > 0 ? states.data() + (t - 1) * PS : h0 + nh * PS;  // h_{t-1}
          In<F> b = B + row;
          In<F> c = C + row;
          Out<F> gb = grad_B + row;
          Out<F> gc = grad_C + row;
          F grad_decay = 0, grad_step = 0;
          for (int64_t p = 0; p < P; ++p) {
            const F gy = grad_y[i * P + p], input = step * x[i * P + p];
            F grad_input = 0, grad_decay_p = 0;
            F* gp = g.data() + p * S;
#pragma omp simd reduction(+ : grad_input, grad_decay_p)
            for (int64_t s = 0; s < S; ++s) {
              gc[s] += gy * h[p * S + s];
              const F grad_h = gp[s] + gy * c[s];  // dL/dh_t
              grad_decay_p += grad_h * before[p * S + s];
              grad_input += grad_h * b[s];  // dL/d(dt_t x_t)
              gb[s] += grad_h * input;
              gp[s] = grad_h * decay;  // dL/dh_{t-1} through this step
            }
            grad_x[i * P + p] = grad_input * step;
            grad_step += grad_input * x[i * P + p];
            grad_decay += grad_decay_p;
          }
          const F through_decay = grad_decay * decay;  // dL/d(dt_t A)
          grad_dt[i] = through_decay * A[head] + grad_step;
          grad_a += through_decay * step;
        }
        grad_A[nh] = grad_a;
        std::copy(g.begin(), g.end(), grad_h0 + nh * PS);
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

std::vector<torch::Tensor> ssd_forward(torch::Tensor x, torch::Tensor dt, torch::Tensor A, torch::Tensor B,
                                       torch::Tensor C, torch::Tensor keep, torch::Tensor h0) {
  const int64_t T = x.size(0), N = x.size(1), H = x.size(2), P = x.size(3), S = B.size(2);
  auto y = torch::empty_like(x), final = torch::empty_like(h0);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ssd_forward", [&] {
    auto p = [](const torch::Tensor& t) { return t.data_ptr<scalar_t>(); };
    with_state_size(S, [&](auto size) {
      ssd_forward_loop<scalar_t, size()>(p(x), p(dt), p(A), p(B), p(C), p(keep), p(h0), p(y), p(final),
                                         T, N, H, P, S);
    });
  });
  return {y, final};
}

std::vector<torch::Tensor> ssd_backward(torch::Tensor grad_y, torch::Tensor grad_final, torch::Tensor x,
                                        torch::Tensor dt, torch::Tensor A, torch::Tensor B, torch::Tensor C,
                                        torch::Tensor keep, torch::Tensor h0) {
  const int64_t T = x.size(0), N = x.size(1), H = x.size(2), P = x.size(3), S = B.size(2);
  auto grad_x = torch::empty_like(x), grad_dt = torch::empty_like(dt), grad_h0 = torch::empty_like(h0);
  auto grad_A = torch::empty({N, H}, x.options());
  auto grad_B = torch::zeros_like(B), grad_C = torch::zeros_like(C);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ssd_backward", [&] {
    auto p = [](const torch::Tensor& t) { return t.data_ptr<scalar_t>(); };
    with_state_size(S, [&](auto size) {
      ssd_backward_loop<scalar_t, size()>(p(grad_y), p(grad_final), p(x), p(dt), p(A), p(B), p(C), p(keep),
                                          p(h0), p(grad_x), p(grad_dt), p(grad_A), p(grad_B), p(grad_C),
                                          p(grad_h0), T, N, H, P, S);
    });
  });
  return {grad_x, grad_dt, grad_A.sum(0), grad_B, grad_C, grad_h0};
}

// The mixer's output before out_proj: the skip, SiLU(z)'s gate and the RMSNorm in one pass per row,
// g = (y + D x) * silu(z), out = g / rms(g) * weight. y, x [N, H, P] (rows of C = H * P); D [H]; z [N, C];
// weight [C]. Returns out and each row's 1 / rms(g) for the backward, which recomputes g.
template <typename F> F sigmoid(F a) { return F(1) / (F(1) + std::exp(-a)); }

template <typename F>
void gated_row(In<F> y, In<F> x, In<F> D, In<F> z, Out<F> g, int64_t H, int64_t P) {
  for (int64_t h = 0; h < H; ++h) {
    const F d = D[h];
#pragma omp simd
    for (int64_t p = 0; p < P; ++p) {
      const int64_t c = h * P + p;
      g[c] = (y[c] + d * x[c]) * z[c] * sigmoid(z[c]);
    }
  }
}

template <typename F>
void gated_norm_forward_loop(In<F> y, In<F> x, In<F> D, In<F> z, In<F> weight, Out<F> out, Out<F> inv_rms,
                             int64_t N, int64_t H, int64_t P, F eps) {
  const int64_t C = H * P;
  std::vector<F> g(C);
  for (int64_t n = 0; n < N; ++n) {
    gated_row(y + n * C, x + n * C, D, z + n * C, g.data(), H, P);
    F squares = 0;
#pragma omp simd reduction(+ : squares)
    for (int64_t c = 0; c < C; ++c) squares += g[c] * g[c];
    const F r = F(1) / std::sqrt(squares / C + eps);
    inv_rms[n] = r;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) out[n * C + c] = g[c] * r * weight[c];
  }
}

template <typename F>
void gated_norm_backward_loop(In<F> grad_out, In<F> y, In<F> x, In<F> D, In<F> z, In<F> weight, In<F> inv_rms,
                              Out<F> grad_y, Out<F> grad_x, Out<F> grad_D, Out<F> grad_z, Out<F> grad_weight,
                              int64_t N, int64_t H, int64_t P) {
  const int64_t C = H * P;
  std::vector<F> g(C), grad_g(C);
  std::fill(grad_D, grad_D + H, F(0));
  std::fill(grad_weight, grad_weight + C, F(0));
  for (int64_t n = 0; n < N; ++n) {
    In<F> yn = y + n * C, xn = x + n * C, zn = z + n * C, gn = grad_out + n * C;
    gated_row(yn, xn, D, zn, g.data(), H, P);
    const F r = inv_rms[n];
    F dot = 0;  // sum_c d(normed)_c normed_c, normed = g r
#pragma omp simd reduction(+ : dot)
    for (int64_t c = 0; c < C; ++c) {
      const F grad_normed = gn[c] * weight[c];
      grad_weight[c] += gn[c] * g[c] * r;
      grad_g[c] = grad_normed;
      dot += grad_normed * g[c] * r;
    }
    for (int64_t h = 0; h < H; ++h) {
      const F d = D[h];
      F grad_d = 0;
#pragma omp simd reduction(+ : grad_d)
      for (int64_t p = 0; p < P; ++p) {
        const int64_t c = h * P + p, i = n * C + c;
        const F dg = r * (grad_g[c] - g[c] * r * dot / C), s = sigmoid(zn[c]);
        const F gate = zn[c] * s, grad_a = dg * gate;  // a = y + D x
        grad_y[i] = grad_a;
        grad_x[i] = grad_a * d;
        grad_d += grad_a * xn[c];
        grad_z[i] = dg * (yn[c] + d * xn[c]) * s * (1 + zn[c] * (1 - s));
      }
      grad_D[h] += grad_d;
    }
  }
}

std::vector<torch::Tensor> gated_norm_forward(torch::Tensor y, torch::Tensor x, torch::Tensor D,
                                              torch::Tensor z, torch::Tensor weight, double eps) {
  const int64_t H = y.size(-2), P = y.size(-1), N = y.numel() / (H * P);
  auto out = torch::empty_like(z), inv_rms = torch::empty({N}, y.options());
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "gated_norm_forward", [&] {
    auto p = [](const torch::Tensor& t) { return t.data_ptr<scalar_t>(); };
    gated_norm_forward_loop<scalar_t>(p(y), p(x), p(D), p(z), p(weight), p(out), p(inv_rms), N, H, P,
                                      scalar_t(eps));
  });
  return {out, inv_rms};
}

std::vector<torch::Tensor> gated_norm_backward(torch::Tensor grad_out, torch::Tensor y, torch::Tensor x,
                                               torch::Tensor D, torch::Tensor z, torch::Tensor weight,
                                               torch::Tensor inv_rms) {
  const int64_t H = y.size(-2), P = y.size(-1), N = y.numel() / (H * P);
  auto grad_y = torch::empty_like(y), grad_x = torch::empty_like(x), grad_D = torch::empty_like(D);
  auto grad_z = torch::empty_like(z), grad_weight = torch::empty_like(weight);
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "gated_norm_backward", [&] {
    auto p = [](const torch::Tensor& t) { return t.data_ptr<scalar_t>(); };
    gated_norm_backward_loop<scalar_t>(p(grad_out), p(y), p(x), p(D), p(z), p(weight), p(inv_rms), p(grad_y),
                                       p(grad_x), p(grad_D), p(grad_z), p(grad_weight), N, H, P);
  });
  return {grad_y, grad_x, grad_D, grad_z, grad_weight};
}
"""


def cpu_kernels():
    """This file's C++ loops (a module with conv_, ssd_ and gated_norm_forward/backward), built the first
    time on this CPU type (about 30 s; torch caches the build), or None and why. -ffast-math (when compiling
    only: the process's float mode stays as it is) lets gcc call glibc's vectorised exp; the build's name
    holds the instruction set, so one cache can serve mixed nodes."""
    from torch.utils.cpp_extension import load_inline

    capability = torch.backends.cpu.get_cpu_capability()  # DEFAULT, AVX2, AVX512, ...
    isa_flags = {"AVX2": ["-mavx2", "-mfma"], "AVX512": ["-mavx512f", "-mavx512vl", "-mavx512dq", "-mfma"]}
    name, tic = f"ppo_mamba2_cpu_{capability.lower()}", time.time()
    try:
        flags = ["-O3", "-ffast-math", "-fopenmp-simd", *isa_flags.get(capability, [])]
        functions = ["conv_forward", "conv_backward", "ssd_forward", "ssd_backward", "gated_norm_forward"]
        functions += ["gated_norm_backward"]
        kernels = load_inline(name, cpp_sources=CPU_KERNEL_SOURCE, functions=functions, extra_cflags=flags)
        if time.time() - tic > 5:  # a build, not the cached module
            seconds = time.time() - tic
            what = "the C++ convolution, SSD and gated norm"
            print(f"built {what} {name} in {seconds:.0f} s (cached for later runs)")
        return kernels, None
    except Exception as error:  # no compiler or no ninja: the torch path does the same work
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


class CpuSSD(torch.autograd.Function):
    """`ssd`'s arguments (keep [T, N_env]: 0 at an episode start, else 1, for starts) and results, from the
    C++ loops (`kernels`: `cpu_kernels`'s module); the backward recomputes the states. Eager only, like
    CpuConvSiLU."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, keep, initial_state, kernels):
        inputs = [t.contiguous() for t in (x, dt, A, B, C, keep, initial_state)]
        y, final_state = kernels.ssd_forward(*inputs)
        ctx.kernels = kernels
        ctx.save_for_backward(*inputs)
        return y, final_state

    @staticmethod
    def backward(ctx, grad_y, grad_final):
        grad_x, grad_dt, grad_A, grad_B, grad_C, grad_h0 = ctx.kernels.ssd_backward(
            grad_y.contiguous(), grad_final.contiguous(), *ctx.saved_tensors
        )
        return grad_x, grad_dt, grad_A, grad_B, grad_C, None, grad_h0, None


class CpuGatedNorm(torch.autograd.Function):
    """The mixer's norm(flatten(y + D x) * silu(z)) (an nn.RMSNorm's weight and eps) from the C++ loops, for
    y, x [..., heads, head_size] and z [..., heads * head_size]: one pass per row each way where the torch
    path has about ten ops each way. Eager only, like CpuConvSiLU."""

    @staticmethod
    def forward(ctx, y, x, D, z, weight, eps, kernels):
        inputs = [t.contiguous() for t in (y, x, D, z, weight)]
        out, inv_rms = kernels.gated_norm_forward(*inputs, eps)
        ctx.kernels = kernels
        ctx.save_for_backward(*inputs, inv_rms)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grads = ctx.kernels.gated_norm_backward(grad_out.contiguous(), *ctx.saved_tensors)
        return *grads, None, None


def mamba_ssm_kernel():
    """mamba-ssm's Triton SSD kernel, or None and why (it installs only against CUDA builds of torch)."""
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except ImportError as error:
        return None, f"mamba-ssm is not importable ({error})"
    return mamba_chunk_scan_combined, None


class Mamba2Mixer(nn.Module):
    """The Mamba-2 mixer (Dao and Gu 2024, the Mamba-2 block): one input projection gives the gate z,
    x with B and C (through a causal depthwise convolution and SiLU) and the step sizes dt; A is a scalar per
    head (times the identity), B and C are shared by all heads (one group); the SSD output plus D x is gated
    by SiLU(z), normalised (gated RMSNorm) and projected back. Its state: the convolution's window of the
    last K - 1 inputs and the SSM state h [heads, head_size, state_size]."""

    def __init__(self, size: int, args: Args):
        super().__init__()
        heads, head_size, state_size = args.num_heads, args.head_size, args.state_size
        inner, conv_channels = heads * head_size, heads * head_size + 2 * state_size
        self.shape = (heads, head_size, state_size)
        self.in_proj = nn.Linear(size, inner + conv_channels + heads, bias=False)
        self.conv = nn.Conv1d(conv_channels, conv_channels, args.conv_size, groups=conv_channels)
        # dt starts log-uniform in --dt-init and -A uniform in --a-init (REFERENCE_START's [1e-3, 1e-1] and
        # [1, 16] are the reference implementation's)
        dt = torch.empty(heads).uniform_(*(math.log(bound) for bound in args.dt_init)).exp().clamp(min=1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus(dt_bias) = dt
        self.A_log = nn.Parameter(torch.empty(heads).uniform_(*args.a_init).log())
        self.D = nn.Parameter(torch.full((heads,), args.d_init))
        self.norm = nn.RMSNorm(inner, eps=1e-5)
        self.out_proj = nn.Linear(inner, size, bias=False)
        self.chunk_size = args.chunk_size

    def initial_state(self, num_envs: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        dtype, taps = self.A_log.dtype, self.conv.kernel_size[0]  # the state follows the module: .double()
        window = torch.zeros(num_envs, taps - 1, self.conv.in_channels, dtype=dtype, device=device)
        return window, torch.zeros(num_envs, *self.shape, dtype=dtype, device=device)

    def forward(self, u: torch.Tensor, state, starts: torch.Tensor, kernel=None, cpu_kernels=None):
        """`kernel`: mamba-ssm's SSD on a CUDA device; `cpu_kernels`: this file's C++ loops on a CPU; neither:
        the torch path."""
        (heads, head_size, state_size), (window, ssm_state) = self.shape, state
        inner = heads * head_size
        z, xBC, dt = self.in_proj(u).split([inner, inner + 2 * state_size, heads], -1)
        if cpu_kernels is not None:
            conv = (self.conv.weight, self.conv.bias)
            xBC, window = CpuConvSiLU.apply(xBC, window, *conv, starts, cpu_kernels)
        else:
            xBC, window = causal_conv(xBC, window, self.conv, starts)
            xBC = nn.functional.silu(xBC)
        x, B, C = xBC.split([inner, state_size, state_size], -1)
        x = x.unflatten(-1, (heads, head_size))
        dt = nn.functional.softplus(dt + self.dt_bias)
        A = -self.A_log.exp()
        if cpu_kernels is not None:  # one loop over time each way, in the rollout and in training alike
            y, ssm_state = CpuSSD.apply(x, dt, A, B, C, (1 - starts).to(x.dtype), ssm_state, cpu_kernels)
        elif kernel is None and len(u) == 1:  # the rollout's one step: the recurrence itself
            decay = torch.exp(dt[0] * A).masked_fill(starts[0, :, None].bool(), 0)
            dt_x = (dt[0, ..., None] * x[0])[..., None]
            ssm_state = torch.addcmul(decay[..., None, None] * ssm_state, dt_x, B[0, :, None, None])
            y = (ssm_state @ C[0, :, None, :, None]).squeeze(-1)[None]
        elif kernel is None:
            y, ssm_state = ssd(x, dt, A, B, C, starts.bool(), ssm_state, self.chunk_size)
        else:  # seq_idx numbers the episodes; initial_states applies only before the first start
            y, ssm_state = kernel(
                x.transpose(0, 1).contiguous(),
                dt.transpose(0, 1).contiguous(),
                A,
                B.transpose(0, 1)[:, :, None].contiguous(),
                C.transpose(0, 1)[:, :, None].contiguous(),
                self.chunk_size,
                initial_states=ssm_state.contiguous(),
                seq_idx=starts.T.cumsum(1).to(torch.int32).contiguous(),
                return_final_states=True,
            )
            y = y.transpose(0, 1)
        if cpu_kernels is not None:
            y = CpuGatedNorm.apply(y, x, self.D, z, self.norm.weight, self.norm.eps, cpu_kernels)
        else:
            y = y + x * self.D[:, None]
            y = self.norm(y.flatten(-2) * nn.functional.silu(z))
        return self.out_proj(y), (window, ssm_state)


class Trunk(nn.Module):
    """`num_layers` Mamba-2 blocks (pre-norm residual: x + mixer(RMSNorm(x))), with `--post-mlp` a residual
    MLP, and a final RMSNorm.

    The state of each layer (convolution window, SSM state) restarts from zero at every episode start, in
    the rollout (one step per call) and in training (whole rollout sequences from the state stored at the
    rollout's start, starts anywhere inside): the convolution masks the taps that reach across a start and
    the SSD sets the decay into a start to zero. Three paths compute this. The torch path has no loop over
    time steps: the SSD is a few einsums per chunk (the rollout's single step runs the recurrence itself),
    which torch.compile fuses. On a CPU, `--mamba-backend auto` runs the convolution, the SSD and the gated
    norm in this file's C++ loops instead (one autograd node each where the torch path has dozens of small
    ops: the trunk's gradient steps 2x as fast at the table's sizes). `--mamba-backend cuda` runs mamba-ssm's
    `mamba_chunk_scan_combined` (seq_idx and initial_states, exact resets; it computes in TF32) on a CUDA
    device, in the rollout and in training alike so the two agree; `auto` takes the torch path there: on an
    H200, forward and backward over 128 steps took 3.5-5.2 ms for a torch SSD in one chunk against 3.7-5.0 ms
    in the kernel, for 8 to 64 environments (this script's 64-step chunks are not measured there yet).
    """

    def __init__(self, input_size: int, args: Args):
        super().__init__()
        self.norms = nn.ModuleList(nn.RMSNorm(input_size, eps=1e-5) for _ in range(args.num_layers))
        self.mixers = nn.ModuleList(Mamba2Mixer(input_size, args) for _ in range(args.num_layers))
        self.post_mlp = None
        if args.post_mlp:  # pre-norm like the blocks; PyTorch's default initialisation, as in the paper
            size, half = input_size, input_size // 2
            norm = nn.RMSNorm(size, eps=1e-5)
            self.post_mlp = nn.Sequential(norm, nn.Linear(size, half), nn.ReLU(), nn.Linear(half, size))
        self.final_norm = nn.RMSNorm(input_size, eps=1e-5)
        self.output_size = input_size
        self.state_reset = not args.no_state_reset
        self.backend, self.cuda_kernel, self.cpu_kernels = args.mamba_backend, None, None
        self.why_torch = None
        on_gpu = args.cuda and torch.cuda.is_available()
        if args.mamba_backend == "cuda":
            self.cuda_kernel, self.why_torch = mamba_ssm_kernel() if on_gpu else (None, "no CUDA device")
        elif args.mamba_backend == "auto" and not (on_gpu or args.compile):  # compiled graphs run torch
            self.cpu_kernels, self.why_torch = cpu_kernels()
        if self.why_torch:
            print(f"--mamba-backend {self.backend}: {self.why_torch}; using the torch path", file=sys.stderr)

    def __getstate__(self):  # torch.save(agent), copy.deepcopy: which kernels ran, not the kernels themselves
        ran = {"cuda_kernel": self.cuda_kernel is not None, "cpu_kernels": self.cpu_kernels is not None}
        return {**super().__getstate__(), **ran}

    def __setstate__(self, state):
        super().__setstate__({**state, "cuda_kernel": None, "cpu_kernels": None})
        if state["cuda_kernel"]:  # they ran: load them again (where mamba-ssm is missing, the torch path)
            self.cuda_kernel, self.why_torch = mamba_ssm_kernel()
        if state["cpu_kernels"]:  # the same module within a process, built once on a new machine
            self.cpu_kernels, self.why_torch = cpu_kernels()
        if self.why_torch and (state["cuda_kernel"] or state["cpu_kernels"]):
            print(f"loaded without the {self.backend} kernels: {self.why_torch}; the torch path", file=sys.stderr)

    def kernel_for(self, device: torch.device):
        return self.cuda_kernel if device.type == "cuda" else None

    @property
    def kernel(self) -> str:
        device = self.final_norm.weight.device
        if self.kernel_for(device) is not None:
            return "mamba-ssm mamba_chunk_scan_combined (Triton, TF32)"
        if self.cpu_kernels is not None and device.type == "cpu":
            return "C++ convolution, SSD and gated norm on the CPU"
        reason = f"; {self.backend} backend: {self.why_torch}" if self.why_torch else ""
        return f"torch chunked SSD (chunk {self.mixers[0].chunk_size}){reason}"

    def initial_state(self, num_envs: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(convolution windows [num_envs, layers, K - 1, channels],
        SSM states [num_envs, layers, H, P, N])."""
        states = [mixer.initial_state(num_envs, device) for mixer in self.mixers]
        return torch.stack([w for w, _ in states], 1), torch.stack([h for _, h in states], 1)

    def forward(self, x: torch.Tensor, state, starts: torch.Tensor):
        """x [T, B, input_size], starts [T, B] -> y [T, B, input_size], state after step T - 1."""
        starts = starts.long() if self.state_reset else torch.zeros_like(starts, dtype=torch.long)
        kernel, windows, ssm_states = self.kernel_for(x.device), [], []
        compiled = torch.compiler.is_compiling()  # the torch path, which the compiler fuses
        cpu_kernels = self.cpu_kernels if x.device.type == "cpu" and not compiled else None
        for layer, (norm, mixer) in enumerate(zip(self.norms, self.mixers, strict=True)):
            layer_state = (state[0][:, layer], state[1][:, layer])
            out, (window, ssm_state) = mixer(norm(x), layer_state, starts, kernel, cpu_kernels)
            x = x + out
            windows.append(window)
            ssm_states.append(ssm_state)
        if self.post_mlp is not None:
            x = x + self.post_mlp(x)
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
