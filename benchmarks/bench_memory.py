"""Peak memory of the compiled train step vs global batch, with and without gradient caching.

all-MiniLM-L6-v2's architecture (random weights: memory does not depend on their values), unsup
batches [B, 2, seq], one CPU device. Nothing is executed: every step is lowered on abstract
shapes and compiled, and XLA's buffer assignment is read back (`compiled.memory_analysis()`).

    peak = arguments + outputs - aliased (donated state) + temporaries

With caching, the temporaries should grow with B only by the [B, 2, H] embeddings (and their
gradient) and the [B, B] logits (and softmax / gradient), not by the encoder's activations.

    .venv/bin/python benchmarks/bench_memory.py [--batches 64,128,256,512,1024] [--chunk 64] [--seq 32]
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
from flax import nnx

from simcse_jax.encoder import Encoder, EncoderConfig
from simcse_jax.hf_io import minilm_dir, read_config
from simcse_jax.objective import ObjectiveConfig
from simcse_jax.optim import OptimConfig, make_optimizer
from simcse_jax.sharding import make_mesh
from simcse_jax.train_step import TrainState, make_train_step, state_shardings

MiB = 2**20


def measure(cfg: EncoderConfig, batch: int, seq: int, chunk: int | None) -> dict:
    mesh = make_mesh({"data": 1}, devices=jax.devices()[:1])
    optim = OptimConfig(total_steps=1000)
    optimizer = make_optimizer(optim)
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Encoder(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    shardings = state_shardings(params, optimizer, mesh)
    state = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32), params=params, opt_state=jax.eval_shape(optimizer.init, params)
    )
    spec = jax.ShapeDtypeStruct((batch, 2, seq), jnp.int32)
    abstract_batch = {"input_ids": spec, "attention_mask": spec, "token_type_ids": spec}
    key = jax.eval_shape(lambda: jax.random.key(0))
    step = make_train_step(graphdef, optimizer, mesh, shardings, ObjectiveConfig(grad_cache_chunk_size=chunk), optim)
    mem = step.lower(state, abstract_batch, key).compile().memory_analysis()
    peak = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
    h = cfg.hidden_size
    return {
        "global_batch": batch,
        "seq": seq,
        "grad_cache_chunk": chunk,
        "temp_mib": mem.temp_size_in_bytes / MiB,
        "argument_mib": mem.argument_size_in_bytes / MiB,
        "peak_mib": peak / MiB,
        # The batch-dependent floor of gradient caching: z and dL/dz [B, 2, H], logits [B, B].
        "embeddings_mib": 2 * batch * 2 * h * 4 / MiB,
        "logits_mib": batch * batch * 4 / MiB,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="64,128,256,512,1024")
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--seq", type=int, default=32)
    args = p.parse_args(argv)
    cfg = EncoderConfig.from_hf_dict(read_config(minilm_dir()))
    rows = []
    for b in (int(x) for x in args.batches.split(",")):
        for chunk in (None, args.chunk):
            row = measure(cfg, b, args.seq, chunk)
            print(json.dumps(row), flush=True)
            rows.append(row)
    print(f"\nall-MiniLM-L6-v2, seq {args.seq}, unsup (2 views), one CPU device; MiB from compiled.memory_analysis()")
    print(f"{'batch':>6} | {'peak, no cache':>14} | {'peak, chunk ' + str(args.chunk):>15} | "
          f"{'temp, no cache':>14} | {'temp, cached':>12} | {'z+dz, logits':>13}")
    by = {(r["global_batch"], r["grad_cache_chunk"]): r for r in rows}
    for b in sorted({r["global_batch"] for r in rows}):
        full, cached = by[(b, None)], by[(b, args.chunk)]
        print(
            f"{b:>6} | {full['peak_mib']:>14.1f} | {cached['peak_mib']:>15.1f} | {full['temp_mib']:>14.1f} | "
            f"{cached['temp_mib']:>12.1f} | {full['embeddings_mib']:>5.1f}, {full['logits_mib']:>5.1f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
