"""The errors a user can cause or meet, one family.

Every module raises a subclass of `SimcseError` for a problem the user can act on (a bad config
key, a file that does not parse, a damaged checkpoint, a run that diverged); the message names
the key, file, line or step. `simcse_jax.cli.main` is the one place that turns them into a
one-line `error: ...` and an exit code (`exit_code`: 2 for usage and configuration, 1 for the
rest). Library callers catch `SimcseError` or a subclass; programming errors stay ordinary
exceptions with tracebacks.

The subclasses also derive from the builtin they replaced (ValueError, RuntimeError), so callers
that caught those keep working.
"""

from __future__ import annotations

# What `train` returns after a second Ctrl-C (128 + SIGINT, as a shell reports an interrupted
# command); `cli.entry` then leaves the process without exit handlers.
INTERRUPTED_EXIT_CODE = 130


class SimcseError(Exception):
    """A problem the user can act on; the message says what and where."""

    exit_code = 1


class UsageError(SimcseError, ValueError):
    """A bad command-line argument (the message names the flag)."""

    exit_code = 2


class ConfigError(SimcseError, ValueError):
    """A bad configuration value; the message starts with the key."""

    exit_code = 2


class DataError(SimcseError, ValueError):
    """Training data that cannot be used; the message names the file (and line)."""


class StsDataError(SimcseError, ValueError):
    """STS evaluation data that is missing or malformed; the message names the file."""


class CheckpointError(SimcseError, ValueError):
    """A model folder or checkpoint that cannot be read; the message names the path."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint that cannot be written (a full disk, permissions); names the folder and the OS error."""


class ExportError(SimcseError, RuntimeError):
    """An export that cannot be written or does not reload to the same model."""


class TrainingError(SimcseError, RuntimeError):
    """A run that cannot continue (non-finite loss, ...); the message names the step."""
