"""Gradient caching (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory
Limited Setup"): the exact full-batch gradient of the contrastive loss with activation memory of
one chunk.

The contrastive loss couples every row with every other, so it cannot be split into micro-batch
losses (see `objective.py`). But its dependence on the parameters goes through the [B, H]
embeddings only:

    dL/dtheta = sum_rows (dL/dz_row) . (dz_row/dtheta)

1. Pass 1 embeds every chunk (`lax.map`, nothing differentiated, so no activations are kept).
2. The loss and its gradient w.r.t. the whole [B, num_sent, H] embedding array are computed on
   the full global batch (row-sharded logits, as without caching).
3. Pass 2 re-runs each chunk with the *same* dropout key (so the same masks and the same
   embeddings) under `jax.vjp` and pulls the cached embedding-gradient chunk back to the
   parameters, summing over chunks in a `lax.scan` carry. The MLM term is a per-token sum, so
   it is differentiated inside pass 2 chunk by chunk (cotangent mlm_weight / labelled tokens).

Memory beyond the parameters, gradients and optimiser state is then one chunk's activations plus
the [B, num_sent, H] embeddings and their gradient and the B/dev x B(+B) logits per device; it no
longer grows with activations of the global batch. Cost: one extra forward (~1.3x the step).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from simcse_jax.losses import IGNORE_INDEX
from simcse_jax.objective import (
    ObjectiveConfig,
    check_batch,
    chunk_key,
    combine,
    contrastive_terms,
    embed_views,
    from_chunks,
    mlm_sums,
    to_chunks,
)


def grad_cache_value_and_grad(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    batch: dict,
    key: jax.Array | None,
    cfg: ObjectiveConfig,
    *,
    num_chunks: int,
    data_parallel: int = 1,
    contrastive_scale: float = 1.0,
) -> tuple[tuple[jax.Array, dict], nnx.State]:
    """((objective, measurements), grads) equal to `jax.value_and_grad(objective_fn, has_aux=True)`
    with the same `num_chunks` key scheme, computed chunk by chunk."""
    check_batch(batch, cfg)
    chunks = {k: to_chunks(v, num_chunks, data_parallel) for k, v in batch.items()}
    idx = jnp.arange(num_chunks)

    def embed(p, c, chunk):
        k = None if key is None else chunk_key(key, c)
        return embed_views(nnx.merge(graphdef, p), chunk, cfg, k)

    def forward(p, c, chunk):
        """Embeddings and MLM sums of one chunk: the same keys as `objective_fn`."""
        z = embed(p, c, chunk)
        if not cfg.do_mlm:
            return z, (jnp.float32(0), jnp.float32(0))
        return z, mlm_sums(nnx.merge(graphdef, p), chunk, None if key is None else chunk_key(key, c))

    # Pass 1: embeddings only. stop_gradient marks the params as constants here, so nothing of
    # this pass is saved for a backward pass even if a caller differentiates through us.
    frozen = jax.lax.stop_gradient(params)
    zc = jax.lax.map(lambda a: embed(frozen, a[0], a[1]), (idx, chunks))  # [n, C, num_sent, H]
    z = from_chunks(zc, data_parallel)  # [B, num_sent, H]

    # The loss on the full global batch and its gradient w.r.t. the embeddings.
    def on_embeddings(z):
        simcse, stats = contrastive_terms(z, cfg)
        return contrastive_scale * simcse, (simcse, stats)

    (_, (simcse, stats)), gz = jax.value_and_grad(on_embeddings, has_aux=True)(z)
    gz_chunks = to_chunks(gz, num_chunks, data_parallel)
    mlm_count = (batch["mlm_labels"] != IGNORE_INDEX).sum().astype(jnp.float32) if cfg.do_mlm else jnp.float32(1)

    # Pass 2: replay each chunk under vjp and back-propagate its cached embedding gradient.
    def body(acc, a):
        c, chunk, g = a
        (zk, (ms, mc)), pull = jax.vjp(lambda p: forward(p, c, chunk), params)
        del zk, mc
        mlm_ct = jnp.float32(cfg.mlm_weight) / jnp.maximum(mlm_count, 1.0) if cfg.do_mlm else jnp.float32(0)
        (gp,) = pull((g, (mlm_ct, jnp.float32(0))))
        return jax.tree.map(jnp.add, acc, gp), ms

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, ms = jax.lax.scan(body, zeros, (idx, chunks, gz_chunks))
    objective, measurements = combine(simcse, stats, ms.sum(), mlm_count, cfg, contrastive_scale)
    return (objective, measurements), grads
