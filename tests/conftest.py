"""Every `ppo_*.py` at the top level is tested: a new script is picked up by the glob, with no new test code."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(ROOT.glob("ppo_*.py"))
TEMPLATE = ROOT / "ppo_mlp.py"

# One small config per kind of task (DESIGN section 4); `id` names the case in pytest's output.
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


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    if not request.config.getoption("--cuda"):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        pytest.exit("--cuda: torch sees no CUDA device", returncode=2)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    return torch.device("cuda")


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


def run_script(script: Path, *argv: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(script), *argv], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
