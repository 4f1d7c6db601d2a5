"""JAX's persistent compilation cache, on by default for every `simcse-jax` command.

Without it each process compiles again: ~9 s for the embedding programs (one per length
bucket) and ~10 s for the update step on 2 CPU cores, paid on every resume, every sweep point
and every `eval`. With it a second process loads the executables the first one wrote.

Where: `$SIMCSE_COMPILE_CACHE` if set, else `~/.cache/simcse-jax/xla`. `SIMCSE_COMPILE_CACHE=off`
(or `0`, `false`, `none`) turns it off. A `$JAX_COMPILATION_CACHE_DIR` the user set is respected
as is (jax reads it itself). The cache key covers the program, the compiler options, the XLA
flags, the devices and the jax/jaxlib version, so a stale entry is never used; entries are plain
files and the folder can be deleted at any time.

One exception on jaxlib 0.10.2: an executable holding oneDNN fusions (the CPU update step with
`cpu_onednn`, the default) cannot be serialized ("ToProto is not implemented for thunk kind:
onednn-fusion"), so that one program is compiled in every process; everything else is cached.
With `--set cpu_onednn=false` a resumed run compiles nothing (tests/test_compile_cache.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

CACHE_ENV = "SIMCSE_COMPILE_CACHE"
DEFAULT_CACHE_DIR = Path("~/.cache/simcse-jax/xla")
OFF_VALUES = frozenset({"off", "0", "false", "no", "none"})
# Least recently used entries are evicted past this size: MiniLM's programs are a few MB each,
# so this holds many models and sweeps without filling a home directory.
MAX_CACHE_BYTES = 4 * 2**30


def cache_dir_from_env(environ=None) -> Path | None:
    """The folder the environment asks for; None when the cache is switched off."""
    value = (os.environ if environ is None else environ).get(CACHE_ENV)
    if value is None or value.strip() == "":
        return DEFAULT_CACHE_DIR.expanduser()
    if value.strip().lower() in OFF_VALUES:
        return None
    return Path(value).expanduser()


def enable_compilation_cache(directory: str | Path | None = None) -> Path | None:
    """Points jax's persistent cache at `directory` (None: `cache_dir_from_env()`); returns the
    folder in use, or None when off. Must run before the process's first compile: jax decides
    once per process whether the cache is used."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return Path(os.environ["JAX_COMPILATION_CACHE_DIR"])
    if directory is None:
        path = cache_dir_from_env()
    else:
        path = None if str(directory).strip().lower() in OFF_VALUES else Path(directory).expanduser()
    if path is None:
        return None
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    # jax only caches programs that took >= 1 s to compile by default; on CPU the many small
    # programs (parameter copies, optimizer init, each length bucket of a tiny model) add up to
    # seconds too, and a second process should compile nothing the first one did.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    jax.config.update("jax_compilation_cache_max_size", MAX_CACHE_BYTES)
    return path
