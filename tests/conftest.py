"""Every `ppo_*.py` at the top level is tested: a new script is picked up by the glob, with no new test code.

What is byte-identical across the scripts (the shared sections: parse_args, the environments, main) is tested
once, on the template `ppo_mlp.py`; tests/test_shared_sections.py proves the other six hold the same code.
What differs (trunks, sizes, defaults, a tiny run per domain) is tested for every script.
"""

import contextlib
import dataclasses
import importlib.util
import io
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))  # the benchmarks import their `common` module, tests import them
SCRIPTS = sorted(ROOT.glob("ppo_*.py"))
TEMPLATE = ROOT / "ppo_mlp.py"

# One small config per kind of task; the key names the case in pytest's output.
DOMAINS = {
    "mujoco": ["--env-id", "HalfCheetah-v4"],
    "atari": ["--env-id", "ALE/Breakout-v5"],
    "classic": ["--env-id", "CartPoleNoVel-v1"],
    "minigrid-rgb": ["--env-id", "MiniGrid-MemoryS11-v0"],
    "minigrid-symbolic": ["--env-id", "MiniGrid-MemoryS11-v0", "--minigrid-obs", "symbolic"],
}
# A budget that runs two full updates in seconds.
TINY = ["--num-envs", "2", "--num-steps", "16", "--num-minibatches", "2", "--update-epochs", "2"]
TINY += ["--total-timesteps", "64"]

_modules = {}


def pytest_addoption(parser):
    parser.addoption("--cuda", action="store_true", help="run the device-aware tests on the GPU, TF32 off")


@pytest.fixture(autouse=True)
def global_state_as_the_session_began():
    """A training run in the test process (`main()`) seeds every generator and sets torch's thread count and
    cuDNN/TF32 flags for the process: each test starts from, and leaves, the state the session began with, so
    no result depends on which tests ran before."""
    backends = torch.backends.cudnn, torch.backends.cuda.matmul
    flags = [torch.backends.cudnn.deterministic, *(backend.allow_tf32 for backend in backends)]
    generators = torch.get_rng_state(), np.random.get_state(), random.getstate()
    threads = torch.get_num_threads()
    yield
    torch.backends.cudnn.deterministic, backends[0].allow_tf32, backends[1].allow_tf32 = flags
    torch.set_rng_state(generators[0])
    np.random.set_state(generators[1])
    random.setstate(generators[2])
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def device(request):
    """The CPU, or with --cuda the GPU with TF32 off for the session (restored afterwards)."""
    if not request.config.getoption("--cuda"):
        yield torch.device("cpu")
        return
    if not torch.cuda.is_available():
        pytest.exit("--cuda: torch sees no CUDA device", returncode=2)
    with tf32_off():
        yield torch.device("cuda")


@contextlib.contextmanager
def tf32_off():
    """TF32 off for cuDNN and cuBLAS inside the block; the global flags as they were afterwards."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture
def without_tf32():
    """For one test: TF32 off, the global flags restored when it ends."""
    with tf32_off():
        yield


@pytest.fixture
def no_cpp_compiler(monkeypatch) -> str:
    """The scripts' C++ loops cannot build (load_inline raises as it does without g++): the reason a trunk
    then gives for running its torch path."""
    error = "Error building extension 'ppo_cpu': g++: not found"

    def no_compiler(*args, **kwargs):
        raise RuntimeError(error)

    monkeypatch.setattr("torch.utils.cpp_extension.load_inline", no_compiler)
    return f"the C++ loops did not build (RuntimeError: {error})"


def assert_agree_to_float32_rounding(got, expected, name=None):
    """Equal to 1e-4 relative or 1e-5 of the largest entry: the C++ loops and the torch path add in other orders."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * scale, msg=name)


def trunk_on(module, argv: list[str], backend: str, dtype=torch.float64, std=None, mean=0.0):
    """The script's trunk with `--*-backend backend` (`auto`: its C++ loops on a CPU, which must build wherever the
    tests run; `torch`: its torch path), built from seed 0, so with the same weights on either path; with `std`
    they are drawn again from N(mean, std), away from the initialisation's zero biases."""
    (field,) = [field.name for field in dataclasses.fields(module.Args) if field.name.endswith("_backend")]
    args = module.parse_args([*argv, f"--{field.replace('_', '-')}", backend])
    torch.manual_seed(0)
    trunk = module.Trunk(args.hidden_size, args).to(dtype)
    if std is not None:
        for param in trunk.parameters():
            torch.nn.init.normal_(param, mean=mean, std=std)
    assert (trunk.cpu_kernels is not None) == (backend == "auto"), trunk.kernel  # CI's CPU has a compiler
    return trunk


def built_cpu_kernels(module):
    """A script module's C++ loops of this machine's build; they must build wherever the tests run (CI's CPU has a
    compiler)."""
    kernels, why_torch = module.cpu_kernels()
    assert kernels is not None, why_torch
    return kernels


def load(script: Path):
    """Import a script as a module (once per test session)."""
    if script not in _modules:
        spec = importlib.util.spec_from_file_location(f"script_{script.stem}", script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _modules[script] = module
    return _modules[script]


@pytest.fixture(params=SCRIPTS, ids=lambda path: path.stem)
def script(request) -> Path:
    return request.param


@pytest.fixture
def module(script):
    return load(script)


@pytest.fixture
def template():
    """ppo_mlp.py, standing for all seven wherever the code under test is a shared section."""
    return load(TEMPLATE)


def run_script(script: Path, *argv: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(script), *argv], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


# ---- Agents on real trajectories (the invariant and attention tests) ----
STEPS, ENVS = 12, 3


def rollout_batch(module, domain: str, device: torch.device, seed: int = 0, argv: tuple[str, ...] = ()):
    """An agent and a real [STEPS, ENVS] trajectory with starts anywhere inside (and at 0)."""
    torch.manual_seed(seed)
    argv = argv or DOMAINS[domain]
    args = module.parse_args([*argv, *TINY, "--num-envs", str(ENVS), "--num-minibatches", "1"])
    envs = module.make_envs(args, "test")
    agent = module.Agent(envs.single_observation_space, envs.single_action_space, args)
    obs_np, _ = envs.reset(seed=seed)
    envs.action_space.seed(seed)  # the same trajectory on every run
    observations, actions = [], []
    for _ in range(STEPS):
        observations.append(obs_np)
        action = envs.action_space.sample()
        actions.append(action)
        obs_np, *_ = envs.step(action)
    envs.close()
    generator = torch.Generator().manual_seed(seed)
    starts = (torch.rand(STEPS, ENVS, generator=generator) < 0.25).float()
    starts[0] = 1
    batch = torch.as_tensor(np.stack(observations)), starts, torch.as_tensor(np.stack(actions))
    return agent.to(device), *(tensor.to(device) for tensor in batch)


def assert_one_step_calls_equal_one_call(agent, obs, starts, actions, atol=1e-5):
    """The rollout's view (T calls of one step, each from the state the last returned) equals training's (one
    call over T steps): outputs and the final state."""
    num_steps, num_envs = starts.shape
    whole, whole_state = outputs(agent, obs, agent.initial_state(num_envs, obs.device), starts, actions)
    state, steps = agent.initial_state(num_envs, obs.device), []
    for t in range(num_steps):
        step, state = outputs(agent, obs[t : t + 1], state, starts[t : t + 1], actions[t : t + 1])
        steps.append(step)
    torch.testing.assert_close(torch.cat(steps, dim=1), whole, atol=atol, rtol=0)
    leaves = [torch.utils._pytree.tree_leaves(s) for s in (state, whole_state)]  # [None] for the MLP's
    for part, whole_part in zip(*leaves, strict=True):
        torch.testing.assert_close(part, whole_part, atol=atol, rtol=0)


def outputs(agent, obs, state, starts, actions):
    """Log-probabilities, entropies and values stacked [3, T, B], and the state after the call."""
    with torch.no_grad():
        _, logprob, entropy, value, state = agent.get_action_and_value(obs, state, starts, actions)
    return torch.stack([logprob, entropy, value]), state


def saved_and_loaded(module, monkeypatch, agent, before_loading=lambda: None):
    """torch.save of a whole agent or trunk of a script module, then torch.load of it (after `before_loading`)."""
    monkeypatch.setitem(sys.modules, module.__name__, module)  # pickle finds classes by their module's name
    buffer = io.BytesIO()
    torch.save(agent, buffer)
    buffer.seek(0)
    before_loading()
    return torch.load(buffer, weights_only=False)


def interrupted_run(argv: list[str], cwd: Path, signum=signal.SIGTERM, process_group=False):
    """Runs ppo_mlp.py with argv, sends it `signum` after its first progress line (which comes after the first
    full update) and waits; with `process_group` the signal goes to every process of its own group, as Ctrl-C
    in a shell or SLURM's SIGTERM would. Returns the process, its stderr and its run directory."""
    process = subprocess.Popen(
        [sys.executable, str(TEMPLATE), *argv],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=process_group,
    )
    for line in process.stdout:
        if line.startswith("step"):
            break
    if process_group:
        os.killpg(process.pid, signum)
    else:
        process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    (run_dir,) = (Path(cwd) / "runs").iterdir()
    return process, stderr, run_dir
