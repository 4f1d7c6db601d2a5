"""The update step's time with each contrastive loss (dense, blockwise, ring) at a batch where dense fits.

    .venv/bin/python benchmarks/bench_loss.py                      # MiniLM shape, B=256, 8 CPU devices
    .venv/bin/python benchmarks/bench_loss.py --batch 512 --chunk 128 --rounds 12
    .venv/bin/python benchmarks/bench_loss.py --devices 1 --impls dense,blockwise

Setup: all-MiniLM-L6-v2's architecture (random weights: the time does not depend on them),
unsupervised batches [B, 2, seq] of random token ids, dropout on, gradient caching with `--chunk`
rows per chunk (0: off), the trainer's step (`make_train_step`, oneDNN dot options on CPU as the
trainer sets them), on a mesh of `--devices` simulated CPU devices (data axis; the ring's length).

Method: the steps are compiled once, then run in rounds; each round times one step of every
implementation (the order rotates each round), and the ratio impl/dense is taken within the
round, so that the drift of a shared machine cancels. The median ratio over the rounds is
reported (<= 1.15 is the issue's bar on CPU), with the median step times. One JSON line per impl.
On an accelerator (`--platform gpu`) the same script runs on the real devices.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--chunk", type=int, default=64, help="grad_cache_chunk_size (0: off)")
    p.add_argument("--block", type=int, default=1024, help="contrastive_block_size")
    p.add_argument("--devices", type=int, default=8, help="simulated CPU devices (ignored on an accelerator)")
    p.add_argument("--platform", default="cpu")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--impls", default="dense,blockwise,ring")
    p.add_argument("--no-onednn", action="store_true", help="XLA's own CPU dots (the trainer's cpu_onednn=false)")
    args = p.parse_args(argv)
    if args.platform == "cpu":
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={args.devices}"
        os.environ["JAX_PLATFORMS"] = "cpu"

    import jax
    import numpy as np
    from flax import nnx

    from simcse_jax.encoder import Encoder, EncoderConfig
    from simcse_jax.hf_io import minilm_dir, read_config
    from simcse_jax.objective import ObjectiveConfig
    from simcse_jax.optim import OptimConfig, make_optimizer
    from simcse_jax.sharding import batch_sharding, make_mesh
    from simcse_jax.train_step import init_train_state, make_train_step
    from simcse_jax.xla_options import compiler_options

    platform = jax.devices()[0].platform
    mesh = make_mesh({"data": -1})
    cfg = EncoderConfig.from_hf_dict(read_config(minilm_dir()))
    optim = OptimConfig(total_steps=1000, learning_rate=1e-5)
    optimizer = make_optimizer(optim)
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, cfg.vocab_size, (args.batch, 1, args.seq)).astype(np.int32).repeat(2, axis=1)
    batch = jax.device_put(dict(input_ids=ids, attention_mask=np.ones_like(ids), token_type_ids=np.zeros_like(ids)),
                           batch_sharding(mesh, 3))
    impls = args.impls.split(",")
    steps, states = {}, {}
    for impl in impls:
        graphdef, state, sh = init_train_state(Encoder(cfg, rngs=nnx.Rngs(0)), optimizer, mesh)
        objective = ObjectiveConfig(grad_cache_chunk_size=args.chunk or None, contrastive_impl=impl,
                                    contrastive_block_size=args.block)
        steps[impl] = make_train_step(graphdef, optimizer, mesh, sh, objective, optim,
                                      compiler_options=compiler_options(not args.no_onednn, platform))
        state, meas = steps[impl](state, batch, jax.random.key(0))  # compile and warm up
        jax.block_until_ready(meas)
        states[impl] = state
        print(f"# {impl}: compiled, first loss {float(meas['loss']):.6f}", file=sys.stderr)

    times = {impl: [] for impl in impls}
    for r in range(args.rounds):
        order = impls[r % len(impls):] + impls[: r % len(impls)]
        for impl in order:
            t0 = time.perf_counter()
            states[impl], meas = steps[impl](states[impl], batch, jax.random.key(r + 1))
            jax.block_until_ready(meas)
            times[impl].append(time.perf_counter() - t0)
    for impl in impls:
        ratios = [t / d for t, d in zip(times[impl], times["dense"])] if "dense" in times else []
        print(json.dumps({
            "impl": impl, "platform": platform, "devices": len(jax.devices()), "global_batch": args.batch,
            "seq": args.seq, "grad_cache_chunk": args.chunk, "block": args.block, "rounds": args.rounds,
            "median_step_s": round(statistics.median(times[impl]), 4),
            "median_ratio_to_dense": round(statistics.median(ratios), 3) if ratios else None,
        }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
