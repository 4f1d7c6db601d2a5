"""Input-pipeline throughput vs what the MiniLM SimCSE update step consumes.

    .venv/bin/python benchmarks/bench_data.py [--skip-model] [--global-batch 128]

Measures, on the sample training files (../shared/data/train_samples):
- uncached: read + tokenize + write the cache (a first run), in sentences/s;
- cached: open the memory-mapped cache (a rerun / another host);
- batches: one epoch of host batches (gather + duplicate views + masks), plain and with MLM
  inputs, and as global jax.Arrays (`make_array_from_process_local_data`, 1-device mesh);
- the target: one jitted forward+backward of all-MiniLM-L6-v2 on a [2*64, 32] batch (64 sentences,
  two dropout views, SimCSE loss), as sentences/s. The pipeline must be >= 10x faster.
A "sentence" is one training example's text (one line; a CSV row counts once per column read).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO.parent / "shared" / "data" / "train_samples"


def timed(fn, repeats=3):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def pipeline_rates(path: Path, tok, global_batch: int) -> dict[str, float]:
    import jax

    from simcse_jax.data import DataIterator, load_tokenized
    from simcse_jax.sharding import make_mesh

    rates = {}
    with tempfile.TemporaryDirectory() as cache:
        counter = iter(range(10**6))

        def build():  # a fresh cache folder each time: a true first run
            return load_tokenized(path, tok, cache_dir=Path(cache) / str(next(counter)), progress=False)

        t, data = timed(build)
        sentences = len(data) * data.input_ids.shape[1]
        rates["uncached: read+tokenize+write cache"] = sentences / t
        t, data = timed(lambda: load_tokenized(path, tok, cache_dir=Path(cache) / "0", progress=False))
        rates["cached: open memory-mapped cache"] = sentences / t

        def epoch(**kw):
            it = DataIterator(data, global_batch, seed=0, **kw)
            for _ in range(it.batches_per_epoch):
                b = next(it)
            jax.block_until_ready(b) if kw.get("mesh") is not None else None
            return it.batches_per_epoch * global_batch * data.input_ids.shape[1]

        for name, kw in [
            ("batches: host numpy", {}),
            ("batches: host numpy + MLM", {"mlm_probability": 0.15}),
            ("batches: global jax.Array", {"mesh": make_mesh({"data": 1}, devices=jax.devices()[:1])}),
        ]:
            t, n = timed(lambda kw=kw: epoch(**kw))
            rates[name] = n / t
    return rates


def minilm_step_rate(batch_sentences: int = 64, seq: int = 32) -> float:
    """Sentences/s of one jitted SimCSE forward+backward of MiniLM on [2*b, seq] (b sentences)."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from simcse_jax.hf_io import load_pretrained, minilm_dir

    model = load_pretrained(minilm_dir()).model
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(1000, 30000, size=(2 * batch_sentences, seq)), jnp.int32)
    mask, types = jnp.ones_like(ids), jnp.zeros_like(ids)

    @nnx.jit
    def grads(model, ids, key):
        def loss_fn(model):
            h = model(ids, mask, types, dropout_key=key).last_hidden_state[:, 0]  # (2b, H)
            z = h / jnp.linalg.norm(h, axis=-1, keepdims=True)
            z1, z2 = z[0::2], z[1::2]  # the two views of each sentence are adjacent rows
            logits = z1 @ z2.T / 0.05  # (b, H) . (H, b) -> (b, b)
            return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.arange(z1.shape[0])).mean()

        return nnx.grad(loss_fn)(model)

    key = jax.random.key(0)
    jax.block_until_ready(grads(model, ids, key))  # compile
    t, _ = timed(lambda: jax.block_until_ready(grads(model, ids, key)), repeats=3)
    return batch_sentences / t


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--global-batch", type=int, default=128)
    parser.add_argument("--skip-model", action="store_true", help="assume 100 sentences/s for the step")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from simcse_jax.hf_io import load_tokenizer, minilm_dir

    tok = load_tokenizer(minilm_dir())
    worst = float("inf")
    for name in ("wiki1m_for_simcse.head11914.txt", "snli_dev_triples_simcse_format.csv"):
        print(f"\n{name} (global batch {args.global_batch}, max_seq_length 32, median of 3)")
        for what, rate in pipeline_rates(SAMPLES / name, tok, args.global_batch).items():
            print(f"  {what:40s} {rate:12,.0f} sentences/s")
            worst = min(worst, rate)
    if args.skip_model:
        target, how = 100.0, "assumed (upper end of the issue's 50-100 sentences/s)"
    else:
        target, how = minilm_step_rate(), "measured: jitted MiniLM forward+backward on [2*64, 32]"
    print(f"\nMiniLM update step consumes {target:,.0f} sentences/s ({how})")
    print(f"slowest pipeline stage / step = {worst / target:,.0f}x (need >= 10x)")
    return 0 if worst >= 10 * target else 1


if __name__ == "__main__":
    sys.exit(main())
