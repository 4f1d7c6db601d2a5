"""Pod readiness without a pod: compile the SimCSE train step ahead of time for a named TPU
topology on this CPU machine (as MaxText's `train_compile.py` does) and report per-chip memory
and the collectives XLA put in the compiled step.

    # libtpu is NOT a project dependency; install the version the installed jax pins
    # (`importlib.metadata.requires('jax')` -> libtpu==0.0.42.* for jax 0.10.2) into a scratch folder:
    .venv/bin/pip download --no-deps 'libtpu==0.0.42.*' -d /tmp/libtpu_dl
    .venv/bin/pip install --no-deps --target /tmp/libtpu_target /tmp/libtpu_dl/libtpu-*.whl
    .venv/bin/python benchmarks/aot_tpu.py --libtpu-path /tmp/libtpu_target \
        --topology v5e:2x2 --mesh data=-1 --global-batch 512

No TPU and no weights are needed: the encoder is built abstractly (`nnx.eval_shape`, BERT-base
shapes from `EncoderConfig()`), the state and batch are `ShapeDtypeStruct`s carrying the mesh
shardings, and `TrainStep.lower(...).compile()` runs the TPU compiler from libtpu on the CPU.
Each result is one JSON line `{"figure", "value", "unit", ...}`; when libtpu is missing or the
compile fails, one line with `"value": null` and the error says why. The compile is slow on a
small CPU (BERT-base, 12 layers: 7-10 min on 2 busy cores); `--layers 2` checks a set-up quickly.

Collectives are counted in `compiled.as_text()` both as HLO instructions and as distinct
collectives (by channel id): XLA:TPU clones one collective into many async fusions, lowers a
reduce-scatter to an `%all-reduce-scatter` fusion (counted as a reduce-scatter) and may turn
FSDP weight-gradient reductions into collective-permute rings overlapped with the matmuls.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import Counter

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "collective-permute", "all-to-all")
# An HLO instruction `%name = type op(...)`: count the op (sync or the `-start` of an async pair),
# not the `-done` half, so every collective counts once.
_OP_RE = re.compile(r"=\s*[^=]*?\b(" + "|".join(COLLECTIVES) + r")(-start)?\(")


def emit(figure: str, value, unit: str, **extra) -> None:
    print(json.dumps({"figure": figure, "value": value, "unit": unit, **extra}), flush=True)


_CHANNEL_RE = re.compile(r"channel_id=(\d+)")
# XLA:TPU lowers a reduce-scatter to a custom fusion calling `%all-reduce-scatter[.N]`, whose body
# is an all-reduce of the full array: count the call sites as reduce-scatters, skip the bodies.
_TPU_REDUCE_SCATTER_CALL = re.compile(r"calls=%all-reduce-scatter(\.\d+)?\b")


def count_collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """Collectives in an HLO module text: `distinct` (by channel_id: one logical collective) and
    `instructions` (HLO lines; async start/done pairs count once). The TPU compiler clones one
    collective into many `async_collective_fusion` computations (overlapped with compute), so the
    instruction count can be far above the number of collectives the program performs."""
    instructions, channels = Counter(), {c: set() for c in COLLECTIVES}
    computation = ""
    for line in hlo_text.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            computation = line.split()[0]  # `%name` or `ENTRY`
            continue
        if _TPU_REDUCE_SCATTER_CALL.search(line):
            instructions["reduce-scatter"] += 1
            channels["reduce-scatter"].add(line.split("=")[0].strip())
            continue
        m = _OP_RE.search(line)
        if m and not computation.startswith("%all-reduce-scatter"):
            instructions[m.group(1)] += 1
            ch = _CHANNEL_RE.search(line)
            channels[m.group(1)].add(ch.group(1) if ch else line)
    return {
        "distinct": {c: len(channels[c]) for c in COLLECTIVES},
        "instructions": {c: instructions.get(c, 0) for c in COLLECTIVES},
    }


def parse_mesh(text: str) -> dict[str, int]:
    out = {}
    for part in text.split(","):
        name, _, size = part.partition("=")
        if not size:
            raise SystemExit(f"--mesh: expected axis=size pairs like data=-1,fsdp=4, got {text!r}")
        out[name.strip()] = int(size)
    return out


def abstract_train_setup(args, devices):
    """(train_step, abstract state, abstract batch, abstract key, n_params) on `devices`."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from simcse_jax.encoder import Encoder, EncoderConfig
    from simcse_jax.objective import ObjectiveConfig
    from simcse_jax.optim import OptimConfig, make_optimizer
    from simcse_jax.sharding import batch_sharding, make_mesh
    from simcse_jax.train_step import TrainState, make_train_step, state_shardings

    mesh = make_mesh(parse_mesh(args.mesh), devices=devices)
    # BERT-base (EncoderConfig defaults are bert-base-uncased's config.json), bf16 compute.
    cfg = EncoderConfig(compute_dtype=args.dtype, num_hidden_layers=args.layers)
    abstract_model = nnx.eval_shape(lambda: Encoder(cfg, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(abstract_model, nnx.Param)
    optim = OptimConfig(total_steps=1000, learning_rate=3e-5)
    optimizer = make_optimizer(optim)
    shardings = state_shardings(params, optimizer, mesh)

    def with_sharding(x, s):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)

    abstract = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32),
        params=params,
        opt_state=jax.eval_shape(optimizer.init, params),
    )
    state = jax.tree.map(with_sharding, abstract, shardings)
    bsh = batch_sharding(mesh, 3)
    shape = (args.global_batch, 2, args.seq)  # unsup: the sentence twice
    batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=bsh) for k in ("input_ids", "attention_mask", "token_type_ids")}
    key = jax.eval_shape(lambda: jax.random.key(0))
    key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    objective = ObjectiveConfig(pooler="cls", mlp_only_train=True, temperature=0.05)
    step = make_train_step(graphdef, optimizer, mesh, shardings, objective, optim)
    n_params = sum(int(x.size) for x in jax.tree.leaves(params))
    return step, state, batch, key, n_params, mesh


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--libtpu-path", default=None, help="folder holding the `libtpu` package (pip install --target)")
    p.add_argument("--topology", default="v5e:2x2", help="TPU topology name, e.g. v5e:2x2, v4:2x2x1, v5e:4x4")
    p.add_argument("--mesh", default="data=-1", help="mesh axis sizes, e.g. data=-1 or data=2,fsdp=2")
    p.add_argument("--global-batch", type=int, default=512, help="sentences per step (2 views each)")
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--dump-hlo", default=None, help="write the compiled HLO text here")
    args = p.parse_args(argv)
    tag = {"topology": args.topology, "mesh": args.mesh, "global_batch": args.global_batch, "seq": args.seq}

    if args.libtpu_path:
        sys.path.insert(0, args.libtpu_path)
    try:
        import libtpu  # noqa: F401  (jax loads libtpu.so from this package)
    except ImportError as e:
        emit("aot_tpu_compile", None, "", error=f"libtpu is not importable ({e}); see the module docstring", **tag)
        return 1

    import jax
    from jax.experimental import topologies

    try:
        topo = topologies.get_topology_desc(topology_name=args.topology, platform="tpu")
    except Exception as e:  # libtpu/jax version mismatch, unknown topology name, ...
        emit("aot_tpu_compile", None, "", error=f"get_topology_desc: {type(e).__name__}: {e}", **tag)
        return 1
    devices = list(topo.devices)
    tag["devices"] = len(devices)
    tag["device_kind"] = devices[0].device_kind

    t0 = time.perf_counter()
    try:
        step, state, batch, key, n_params, mesh = abstract_train_setup(args, devices)
        lowered = step.lower(state, batch, key)
        compiled = lowered.compile()
    except Exception as e:
        emit("aot_tpu_compile", None, "", error=f"{type(e).__name__}: {str(e)[:2000]}", **tag)
        return 1
    emit("aot_tpu_compile_time", round(time.perf_counter() - t0, 2), "s", params=n_params, **tag)

    mem = compiled.memory_analysis()
    if mem is not None:
        fields = {
            f: int(getattr(mem, f))
            for f in ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
                      "generated_code_size_in_bytes")
            if hasattr(mem, f)
        }
        # Live at the peak: inputs + outputs not aliased to a donated input + scratch.
        peak = fields.get("argument_size_in_bytes", 0) + fields.get("output_size_in_bytes", 0) \
            - fields.get("alias_size_in_bytes", 0) + fields.get("temp_size_in_bytes", 0)
        emit("aot_tpu_memory_per_chip", round(peak / 2**30, 3), "GiB", **fields, **tag)
    else:
        emit("aot_tpu_memory_per_chip", None, "GiB", error="memory_analysis() returned None", **tag)

    text = compiled.as_text()
    if args.dump_hlo:
        with open(args.dump_hlo, "w") as f:
            f.write(text)
    emit("aot_tpu_collectives", count_collectives(text), "count", **tag)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    if cost and "flops" in cost:
        emit("aot_tpu_flops_per_step_per_chip", float(cost["flops"]), "FLOP", **tag)
    del jax, mesh
    return 0


if __name__ == "__main__":
    sys.exit(main())
