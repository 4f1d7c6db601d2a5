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


def _readme_layout_tree() -> list[str]:
    """The names the README's Layout tree lists under `simcse_jax/` (its first word per line)."""
    text = (REPO / "README.md").read_text()
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    lines = block.splitlines()[2:]  # past "```" and "simcse_jax/"
    return [line.split()[0].rstrip("/") for line in lines if line.startswith("  ") and line.strip()]


def test_readme_layout_lists_exactly_the_package():
    listed = _readme_layout_tree()
    package = REPO / "simcse_jax"
    present = sorted(p.name.removesuffix(".py") for p in package.iterdir()
                     if not p.name.startswith(("_", ".")) and (p.suffix == ".py" or p.is_dir()) and p.name != "corpus_data")
    assert sorted(n.removesuffix(".py") for n in listed) == present


def test_the_core_never_imports_the_planner_or_the_studies():
    """planner/ and studies/ are tools on top of the core (README, Layout); only cli.py names them."""
    import ast

    for path in sorted((REPO / "simcse_jax").glob("*.py")):
        if path.name == "cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            bad = [n for n in names if n.startswith(("simcse_jax.planner", "simcse_jax.studies"))]
            assert not bad, f"{path.name} imports {bad}"


def test_no_function_is_over_a_hundred_lines():
    """A phase of the trainer, a command, a loss: each fits on a screen (docstring included)."""
    import ast

    long = []
    for path in sorted((REPO / "simcse_jax").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 100:
                long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long
