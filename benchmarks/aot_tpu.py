"""Pod readiness without a pod, as JSON lines: `simcse-jax plan` (simcse_jax/planner/plan.py) for unsup
BERT-base on a TPU topology, one `{"figure", "value", "unit", ...}` line per figure.

    # libtpu: the `plan` extra (pip install -e '.[plan]'), or the version the installed jax pins
    # (`importlib.metadata.requires('jax')` -> libtpu==0.0.42.* for jax 0.10.2) in a folder:
    .venv/bin/pip download --no-deps 'libtpu==0.0.42.*' -d /tmp/libtpu_dl
    .venv/bin/pip install --no-deps --target /tmp/libtpu_target /tmp/libtpu_dl/libtpu-*.whl
    .venv/bin/python benchmarks/aot_tpu.py --libtpu-path /tmp/libtpu_target \
        --topology v5e:2x2 --mesh data=-1 --global-batch 512

The step is the trainer's (plan.build_step: the config's mesh, BERT-base shapes, bf16 compute,
the same make_train_step), compiled by libtpu's TPU compiler on this CPU. When libtpu is
missing or the compile fails, one line with `"value": null` and the error says why. The compile
is slow on a small CPU (BERT-base, 12 layers: 7-10 min on 2 busy cores); `--layers 2` checks a
set-up quickly. For the table, `--max-batch` and sweeps use `simcse-jax plan` itself.
"""

from __future__ import annotations

import argparse
import json
import sys


def emit(figure: str, value, unit: str, **extra) -> None:
    print(json.dumps({"figure": figure, "value": value, "unit": unit, **extra}), flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--libtpu-path", default=None, help="folder holding the `libtpu` package (pip install --target)")
    p.add_argument("--topology", default="v5e:2x2", help="TPU topology name, e.g. v5e:2x2, v4:2x2x1, v5e-16")
    p.add_argument("--mesh", default="data=-1", help="mesh axis sizes, e.g. data=-1 or data=2,fsdp=2")
    p.add_argument("--global-batch", type=int, default=512, help="sentences per step (2 views each)")
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--dtype", default="bfloat16")
    args = p.parse_args(argv)
    tag = {"topology": args.topology, "mesh": args.mesh, "global_batch": args.global_batch, "seq": args.seq}

    from simcse_jax.config import TrainConfig
    from simcse_jax.planner.plan import make_plan
    from simcse_jax.planner.topology import TopologyError, devices_for

    mesh = {name.strip(): int(size) for name, _, size in (part.partition("=") for part in args.mesh.split(","))}
    config = TrainConfig(model="bert-base-uncased", compute_dtype=args.dtype, train_file="data/wiki1m_for_simcse.txt",
                         max_seq_length=args.seq, global_batch_size=args.global_batch, mlp_only_train=True,
                         mesh_data=mesh.get("data", 1), mesh_fsdp=mesh.get("fsdp", 1), mesh_tensor=mesh.get("tensor", 1))
    try:
        devices = devices_for(args.topology, libtpu_path=args.libtpu_path)
        plan = make_plan(config, devices, layers=args.layers, topology=args.topology)
    except TopologyError as e:
        emit("aot_tpu_compile", None, "", error=str(e), **tag)
        return 1
    except Exception as e:  # a compile failure: say which, as one line
        emit("aot_tpu_compile", None, "", error=f"{type(e).__name__}: {str(e)[:2000]}", **tag)
        return 1
    tag.update(devices=plan["devices"], device_kind=plan["device_kind"])
    emit("aot_tpu_compile_time", plan["compile_seconds"], "s", params=plan["num_params"], **tag)
    mem = plan["memory"]
    emit("aot_tpu_memory_per_chip", round(mem["peak_bytes"] / 2**30, 3), "GiB",
         **{k: mem[k] for k in ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes", "code_bytes")}, **tag)
    c = plan["collectives"]
    emit("aot_tpu_collectives", {"distinct": c["distinct"], "instructions": c["instructions"]}, "count", **tag)
    emit("aot_tpu_collective_bytes_sent_per_chip", c["total_sent_bytes"], "B", **tag)
    emit("aot_tpu_flops_per_step_per_chip", plan["flops"], "FLOP", **tag)
    if plan["roofline"]:
        emit("aot_tpu_roofline_step", plan["roofline"]["step_s"], "s", bound=plan["roofline"]["bound"], **tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
