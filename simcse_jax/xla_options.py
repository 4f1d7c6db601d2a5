"""Per-jit XLA compiler options: oneDNN matmuls on CPU, with a fallback for jaxlibs that reject them.

On the 2-core AVX-512 development machine oneDNN's dot kernels make the SimCSE update step
1.47x PyTorch's speed instead of 1.17x (benchmarks/bench_train_step.py) and speed up the
embedding forward too (benchmarks/bench_embed.py). They are set per jit, never in `XLA_FLAGS`:
set globally, oneDNN crashed an unrelated inference compile on jaxlib 0.10.2 (see encode.py).
Results move by rounding only (another summation order inside the dots): ~3e-5 relative on the
loss, bounded in tests/test_xla_options.py.
"""

from __future__ import annotations

import warnings

CPU_ONEDNN_OPTIONS = {"xla_cpu_use_onednn": True, "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}


def compiler_options(enabled: bool, platform: str) -> dict | None:
    """The options for a jit on `platform` ("cpu", "gpu", "tpu"); None: XLA's defaults."""
    return dict(CPU_ONEDNN_OPTIONS) if enabled and platform == "cpu" else None


def compile_with_fallback(lowered, options: dict | None, *, on_fallback=None):
    """`(executable, options used)`: `lowered.compile(compiler_options=options)`, or, when this
    jaxlib rejects the options (unknown flag, unsupported fusion type), the plain compile with
    None as the options used. `on_fallback(message)` hears why (e.g. a log line)."""
    if not options:
        return lowered.compile(), None
    try:
        with warnings.catch_warnings():
            # jaxlib 0.10.2 cannot serialize oneDNN fusions into the persistent cache; said once
            # in compile_cache.py rather than as a warning in every process.
            warnings.filterwarnings("ignore", message="Error writing persistent compilation cache entry")
            return lowered.compile(compiler_options=options), options
    except Exception as e:  # jaxlib raises XlaRuntimeError or ValueError, depending on the version
        if on_fallback is not None:
            on_fallback(f"this jaxlib rejects the XLA options {sorted(options)} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200] if str(e) else ''}); compiling without them")
        return lowered.compile(), None
