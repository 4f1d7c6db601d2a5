"""The process entry point: `simcse-jax` and `python -m simcse_jax.cli` go through `cli.entry`."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# A process whose command returns CODE, with an exit handler standing for an abandoned async
# save's threads (which print at interpreter exit).
PROGRAM = """
import atexit, sys
from simcse_jax import cli
atexit.register(lambda: print("late output from an exit handler", file=sys.stderr))
def command():
    print("error: train: interrupted: the last line", file=sys.stderr)
    return {code}
cli.main = command
cli.entry()
"""


def run_entry(code: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROGRAM.format(code=code)], capture_output=True, text=True,
                          cwd=REPO, timeout=120)


def test_a_run_stopped_at_once_ends_on_its_own_last_line_without_exit_handlers():
    proc = run_entry(130)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "error: train: interrupted: the last line", proc.stderr


@pytest.mark.parametrize("code", [0, 1, 2])
def test_every_other_exit_runs_the_exit_handlers_and_keeps_its_code(code):
    proc = run_entry(code)
    assert proc.returncode == code, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "late output from an exit handler", proc.stderr
