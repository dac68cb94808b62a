"""What the benchmarks share: the repository's root, and importing a `ppo_*.py` script as a module."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_script(name: str):
    """Import ROOT/<name>.py as a module (its `main()` does not run)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
