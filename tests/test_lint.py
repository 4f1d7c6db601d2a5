"""House rules that hold for the whole tree: `ruff check` is clean (pyproject's configuration),
and `simcse_jax.config` imports without jax (the sweep's parent process relies on that)."""

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ruff_check_is_clean():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert ruff, "ruff is part of the test extra: pip install -e '.[test]'"
    res = subprocess.run([ruff, "check", "--no-cache", str(REPO)], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stdout + res.stderr


def test_config_imports_without_jax():
    code = ("import sys, simcse_jax.config, simcse_jax.errors; "
            "bad = sorted(m for m in ('jax', 'flax', 'optax', 'orbax', 'torch') if m in sys.modules); "
            "print(bad); sys.exit(1 if bad else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stdout + res.stderr
