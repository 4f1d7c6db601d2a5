"""CPU embedding benchmark: `simcse_jax.encode.SentenceEncoder` vs sentence-transformers.

    .venv/bin/python benchmarks/bench_embed.py                      # ~1-2 min on 2 idle cores
    .venv/bin/python benchmarks/bench_embed.py --sentences 2048 --rounds 6

Both embed the same wiki1m lines with all-MiniLM-L6-v2 as sentence-transformers defines it
(mean pooling over tokens, L2-normalised), batch 128, truncation at `--max-length` tokens,
`torch.set_num_threads(2)`. Rounds alternate the two (order flipped each round) in one process;
the figure is the median per-round ratio st_time / jax_time (>1: JAX faster). The first JAX call
compiles one program per length bucket and is reported separately as the compile/warm-up time.
The embeddings are checked against each other (minimum cosine) so the comparison is of equal work.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WIKI = REPO.parent / "shared" / "data" / "train_samples" / "wiki1m_for_simcse.head11914.txt"


def emit(figure: str, value, unit: str, **extra) -> None:
    print(json.dumps({"figure": figure, "value": value, "unit": unit, **extra}), flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sentences", type=int, default=512)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads; 1 also makes XLA single-threaded")
    args = p.parse_args(argv)
    if args.threads == 1:  # both single-threaded (see bench_train_step.py --threads 1)
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        ).strip()

    import jax
    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer

    from simcse_jax.encode import SentenceEncoder
    from simcse_jax.hf_io import load_pretrained, load_tokenizer, minilm_dir

    torch.set_num_threads(args.threads)
    emit("load_average_start", [round(x, 2) for x in os.getloadavg()], "1/5/15 min",
         sentences=args.sentences, batch_size=args.batch_size, max_length=args.max_length, torch_threads=args.threads)
    lines = [x.strip() for x in WIKI.read_text(encoding="utf-8").splitlines() if x.strip()][: args.sentences]

    path = minilm_dir()
    ours = SentenceEncoder(
        load_pretrained(path).model, load_tokenizer(path), pooler="avg", apply_mlp=False,
        batch_size=args.batch_size, max_length=args.max_length, normalize=True,
    )
    st = SentenceTransformer(str(path), device="cpu")
    st.max_seq_length = args.max_length

    def run_st():
        return st.encode(lines, batch_size=args.batch_size, normalize_embeddings=True, convert_to_numpy=True)

    t0 = time.perf_counter()
    z_jax = ours(lines)
    emit("jax_embed_first_call", round(time.perf_counter() - t0, 2), "s", what="tokenize + compile every length bucket + embed")
    z_st = run_st()
    cos = np.sum(z_jax * z_st, axis=1)  # both unit rows
    emit("embedding_agreement_min_cosine", round(float(cos.min()), 6), "cosine", vs="sentence-transformers")

    t_jax, t_st = [], []
    for r in range(args.rounds):
        for who in ("jax", "st") if r % 2 == 0 else ("st", "jax"):
            t0 = time.perf_counter()
            if who == "jax":
                jax.block_until_ready(ours(lines))
                t_jax.append(time.perf_counter() - t0)
            else:
                run_st()
                t_st.append(time.perf_counter() - t0)
    ratios = [s / j for s, j in zip(t_st, t_jax)]
    n = len(lines)
    emit("jax_embed_throughput", round(n / statistics.median(t_jax), 1), "sentences/s")
    emit("sentence_transformers_embed_throughput", round(n / statistics.median(t_st), 1), "sentences/s")
    emit("embed_ratio_st_over_jax", round(statistics.median(ratios), 3), "x", min=round(min(ratios), 3),
         max=round(max(ratios), 3), rounds=len(ratios), meaning=">1: simcse-jax embeds faster")
    emit("load_average_end", [round(x, 2) for x in os.getloadavg()], "1/5/15 min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
