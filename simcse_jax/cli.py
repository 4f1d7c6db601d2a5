"""`simcse-jax` command line: one subcommand per module, each module exposing `add_parser`.

`main` is the one place that turns a `SimcseError` (bad input, a damaged checkpoint, a run that
diverged) into a one-line message and an exit code: 2 for usage and configuration errors, 1 for
the rest. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from simcse_jax.compile_cache import enable_compilation_cache
from simcse_jax.errors import INTERRUPTED_EXIT_CODE, SimcseError

# Subcommand modules, in the order `--help` lists them. Each defines add_parser(subparsers),
# which registers its command and sets `func` (args -> exit code).
COMMAND_MODULES = (
    "simcse_jax.train",
    "simcse_jax.encode",
    "simcse_jax.hf_export",
    "simcse_jax.evaluate",
    "simcse_jax.sts_download",
    "simcse_jax.studies.sweep",
    "simcse_jax.studies.report",
    "simcse_jax.studies.launch_local",
    "simcse_jax.planner.plan",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="simcse-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Before any compile; child processes (sweep points, launch_local) inherit the same folder.
    enable_compilation_cache()
    try:
        return int(args.func(args) or 0)
    except SimcseError as e:
        print(f"error: {args.command}: {e}", file=sys.stderr)
        return e.exit_code


def entry() -> None:
    """The process's entry point (`simcse-jax`, `python -m simcse_jax.cli`); `main` is the in-process one."""
    code = main()
    if code == INTERRUPTED_EXIT_CODE:
        # A run stopped at once may leave an orbax async save in flight. It is abandoned by design
        # (an unfinished save leaves no visible step), but at interpreter exit its threads would find
        # their executors shut down and print tracebacks after the run's last line, the one that names
        # the step to resume from. Leave without exit handlers; everything written is flushed.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
