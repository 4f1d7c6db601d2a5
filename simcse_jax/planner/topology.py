"""Devices to compile for without having them: a named TPU topology, or N simulated CPU devices.

    v5e:4x4, v4:2x2x1, v5p:2x2x2, v6e:2x4    TPU slices by chip grid (as `gcloud` names them)
    v5e-16, v4-8, v5p-8                      accelerator types (v4/v5p count TensorCores: 2 a chip)
    cpu:8                                    8 CPU devices of this process

TPU devices are compile-only devices from libtpu's topology description (the MaxText
`train_compile.py` approach): `jax.jit(...).lower(...).compile()` then runs the TPU compiler on
this machine. libtpu is the `simcse-jax[plan]` extra, pinned as jax pins it (`pip install
'simcse-jax[plan]'`, or `pip install 'jax[tpu]'`), or a folder given by `--libtpu-path` /
$SIMCSE_LIBTPU_PATH (`pip install --target DIR libtpu==...`), which keeps libtpu out of the
environment's site-packages: there, jax would look for a TPU at every start. The CPU devices need
nothing: they are this process's own (`--xla_force_host_platform_device_count` or
`jax_num_cpu_devices`, set before jax starts its backends).
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import sys

from simcse_jax.errors import SimcseError

LIBTPU_ENV = "SIMCSE_LIBTPU_PATH"
# v4 and v5p chips hold two TensorCores that jax drives as one "megacore" device, as on a real
# slice; libtpu's default for v4 would give one device per core.
_MEGACORE = {"v4", "v5p"}
# Chip grids of the usual slice sizes (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e).
_GRIDS_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8"}
_GRIDS_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}


class TopologyError(SimcseError, ValueError):
    """A topology name that cannot be turned into devices; the message says what to pass."""

    exit_code = 2


def libtpu_pin() -> str:
    """The libtpu requirement of the installed jax's `tpu` extra, e.g. `libtpu==0.0.42.*`."""
    for req in importlib.metadata.requires("jax") or []:
        if req.startswith("libtpu") and "extra ==" in req:
            return req.split(";")[0].strip().replace(" ", "")
    return "libtpu"


def install_hint() -> str:
    pin = libtpu_pin()
    return (f"install the `plan` extra (pip install 'simcse-jax[plan]', i.e. {pin}), or put libtpu in a folder "
            f"(pip install --no-deps --target /tmp/libtpu '{pin}') and pass --libtpu-path /tmp/libtpu or set ${LIBTPU_ENV}")


def parse_topology(name: str) -> tuple[str, str]:
    """('tpu' | 'cpu', canonical name): 'v5e-16' -> ('tpu', 'v5e:4x4'), 'cpu:8' -> ('cpu', 'cpu:8')."""
    text = name.strip().lower()
    if m := re.fullmatch(r"cpu[:\-](\d+)", text):
        return "cpu", f"cpu:{int(m.group(1))}"
    if re.fullmatch(r"v\d+[a-z]*:\d+(x\d+)+", text):
        return "tpu", text
    if m := re.fullmatch(r"(v\d+[a-z]*)-(\d+)", text.replace("litepod", "e")):
        gen, n = m.group(1), int(m.group(2))
        chips = n // 2 if gen in _MEGACORE else n
        grid = (_GRIDS_3D if gen in _MEGACORE else _GRIDS_2D).get(chips)
        if grid is None:
            raise TopologyError(f"topology {name!r}: no standard {gen} slice of {chips} chips; pass the grid, e.g. {gen}:2x2")
        return "tpu", f"{gen}:{grid}"
    raise TopologyError(f"topology {name!r}: expected e.g. v5e:4x4, v5e-16, v4-8 or cpu:8")


def load_libtpu(libtpu_path: str | None = None) -> None:
    """Makes libtpu importable (from `libtpu_path`, $SIMCSE_LIBTPU_PATH or the environment)."""
    # Planning only compiles: it never owns a TPU. Without this, a second planner on the machine
    # (a test beside a `plan`, parallel sweep points) fails on libtpu's /tmp/libtpu_lockfile.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    path = libtpu_path or os.environ.get(LIBTPU_ENV)
    if path:
        if not os.path.isdir(os.path.join(path, "libtpu")):
            raise TopologyError(f"{path}: holds no libtpu package; {install_hint()}")
        if path not in sys.path:
            sys.path.insert(0, path)
    try:
        import libtpu  # noqa: F401  (jax loads libtpu.so from this package when asked for a topology)
    except ImportError:
        raise TopologyError(f"TPU topologies need libtpu, which is not importable: {install_hint()}") from None


def devices_for(name: str, *, libtpu_path: str | None = None) -> list:
    """The devices of topology `name` (see the module docstring)."""
    import jax

    kind, canonical = parse_topology(name)
    if kind == "cpu":
        n = int(canonical.split(":")[1])
        cpus = jax.devices("cpu")
        if len(cpus) < n:
            raise TopologyError(
                f"topology {canonical}: this process has {len(cpus)} CPU devices; start it with "
                f"XLA_FLAGS=--xla_force_host_platform_device_count={n} (the `plan` command sets it when it runs first)")
        return cpus[:n]
    load_libtpu(libtpu_path)
    from jax.experimental import topologies

    gen = canonical.split(":")[0]
    kwargs = {"chip_config_name": "megacore"} if gen in _MEGACORE else {}
    try:
        return list(topologies.get_topology_desc(topology_name=canonical, platform="tpu", **kwargs).devices)
    except Exception as e:  # unknown generation or grid, a libtpu that does not match jax
        raise TopologyError(f"topology {canonical}: libtpu refused it ({type(e).__name__}: {str(e).splitlines()[0][:300]}); "
                            f"the libtpu matching this jax is {libtpu_pin()}") from e


def ensure_cpu_devices(n: int) -> None:
    """Asks for at least `n` CPU devices if jax has not started its backends yet (else a no-op:
    `devices_for` then says how many there are)."""
    import jax
    from jax._src import xla_bridge

    forced = re.search(r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
    if not xla_bridge.backends_are_initialized() and (forced is None or int(forced.group(1)) < n):
        jax.config.update("jax_num_cpu_devices", n)
