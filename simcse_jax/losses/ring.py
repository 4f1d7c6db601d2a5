"""The blockwise SimCSE loss with the keys passed around a ring of devices (`shard_map`).

Under `shard_map` over the batch axes (data, fsdp: those of size > 1), device d of n keeps its
b = B/n query rows and, at first, its own b keys (z2 rows, and z3 rows with hard negatives).
Each of the n steps sweeps the visiting keys `block_size` columns at a time (`blockwise.py`),
then hands them to device d+1 by `ppermute`; the send is issued before the sweep so that XLA
can overlap the transfer with the compute. After n steps every row has met every key; no device
ever held more than its own and one visiting key shard, or more than [b, block] logits.

Backward (custom VJP, saving the normalised embeddings and the per-row LSE): the keys go round
again, now with their gradient accumulator; each device adds its rows' contribution to the
visiting keys' gradient before passing both on, and a last hop returns each completed key
gradient to its owner. The query gradient stays where its rows are.

Devices along the tensor axis hold the same rows and compute the same thing (the loss is tiny
next to the encoder). Without a mesh, or with every batch axis of size 1, the ring is one device
and this is `blockwise.py`. Column indices are global (device d's rows are d*b .. d*b + b - 1,
the order `shard_map`'s P(axes) lays them out in), so the hard-negative bonus, the labels and
the tie-breaking of the accuracy's top-1 are those of the dense loss.

Uniformity (`uniformity_ring`) is the same ring with the uniformity score: exact, all pairs.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from simcse_jax.losses.blockwise import (
    RowState,
    Score,
    check_block_size,
    contrastive_score,
    positive_logits,
    simcse_loss_and_accuracy_blockwise,
    sweep_backward,
    sweep_forward,
    uniformity_blockwise,
    uniformity_from_row_lse,
    uniformity_score,
)
from simcse_jax.losses.dense import _check, normalize_rows
from simcse_jax.sharding import batch_axes

shard_map = getattr(jax, "shard_map", None)
if shard_map is None:  # pragma: no cover - jax releases before jax.shard_map
    from jax.experimental.shard_map import shard_map


def ring_axes(rows: int, mesh=None) -> tuple[tuple[str, ...], int, object]:
    """(batch axes of size > 1, ring length n, mesh) of `mesh` (default: the one set by
    `jax.set_mesh`); n = 1 without a mesh. `rows` must split evenly over the ring."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    if mesh is None or mesh.empty:
        return (), 1, mesh
    axes = tuple(a for a in batch_axes() if a in mesh.axis_names and mesh.shape[a] > 1)
    n = math.prod(mesh.shape[a] for a in axes)
    if rows % n:
        raise ValueError(f"contrastive_impl='ring': the batch of {rows} rows does not split over the {n} devices of {axes}")
    return axes, n, mesh


def _ring_fns(score: Score, block: int, axes, n: int, batch: int, num_key_sets: int):
    """The per-device forward and backward of the ring (inside shard_map)."""
    perm = [(i, (i + 1) % n) for i in range(n)]

    def layout(q):
        b = q.shape[0]
        d = jax.lax.axis_index(axes)
        rows = (d * b + jnp.arange(b)).astype(jnp.int32)

        def cols_of(step):
            # The keys visiting at `step` came from device (d - step) mod n; z2 columns, then z3.
            src = (d - step) % n
            local = src * b + jnp.arange(b)
            return jnp.concatenate([j * batch + local for j in range(num_key_sets)]).astype(jnp.int32)

        return rows, cols_of

    def forward(q, *key_sets):
        rows, cols_of = layout(q)
        keys = jnp.concatenate(key_sets, axis=0)  # [sets * b, H]: this device's keys travel together

        def step(carry, i):
            keys, st = carry
            nxt = jax.lax.ppermute(keys, axes, perm)  # sent before the sweep: overlaps with it
            return (nxt, sweep_forward(st, q, rows, keys, cols_of(i), score, block)), None

        (keys, st), _ = jax.lax.scan(step, (keys, RowState.empty(q.shape[0])), jnp.arange(n - 1))
        st = sweep_forward(st, q, rows, keys, cols_of(n - 1), score, block)
        m, log_l = st.lse_parts()
        return m, log_l, (st.best == rows).astype(jnp.float32)

    def backward(q, m, log_l, ct, *key_sets):
        rows, cols_of = layout(q)
        keys = jnp.concatenate(key_sets, axis=0)

        def visit(dq, dk, keys, i):
            dq_i, dk_i = sweep_backward(q, rows, keys, cols_of(i), (m, log_l), ct, score, block)
            return dq + dq_i, dk + dk_i

        def step(carry, i):
            keys, dk, dq = carry
            nxt = jax.lax.ppermute(keys, axes, perm)
            dq, dk = visit(dq, dk, keys, i)
            return (nxt, jax.lax.ppermute(dk, axes, perm), dq), None

        (keys, dk, dq), _ = jax.lax.scan(step, (keys, jnp.zeros_like(keys), jnp.zeros_like(q)), jnp.arange(n - 1))
        dq, dk = visit(dq, dk, keys, n - 1)
        dk = jax.lax.ppermute(dk, axes, perm)  # the last hop: each key gradient back to its owner
        return (dq, *jnp.split(dk, num_key_sets, axis=0))

    return forward, backward


def _ring_ce(score: Score, block: int, axes, n: int, mesh, batch: int, num_key_sets: int):
    """(LSE_i - pos_i, hits_i) over the ring with the ring's custom VJP, on global row-sharded
    arrays (`pos` subtracted before log l is added, as in `blockwise._contrastive_ce`)."""
    forward, backward = _ring_fns(score, block, axes, n, batch, num_key_sets)
    row, vec = P(axes, None), P(axes)
    keys_in = (row,) * num_key_sets
    # check_vma=False: the tensor-axis replicas compute identical values (see the module doc).
    fwd_map = shard_map(forward, mesh=mesh, in_specs=(row, *keys_in), out_specs=(vec, vec, vec), check_vma=False)
    bwd_map = shard_map(backward, mesh=mesh, in_specs=(row, vec, vec, vec, *keys_in), out_specs=(row, *keys_in),
                        check_vma=False)

    def fwd(q, key_sets, pos):
        m, log_l, hits = fwd_map(q, *key_sets)
        return ((m - pos) + log_l, hits), (q, key_sets, m, log_l)

    @jax.custom_vjp
    def ce(q, key_sets, pos):
        return fwd(q, key_sets, pos)[0]

    def bwd(res, cts):
        q, key_sets, m, log_l = res
        dq, *dks = bwd_map(q, m, log_l, cts[0], *key_sets)
        return dq, tuple(dks), -cts[0]

    ce.defvjp(fwd, bwd)
    return ce


def simcse_loss_and_accuracy_ring(
    z1: jax.Array,
    z2: jax.Array,
    z3: jax.Array | None = None,
    *,
    temperature: float = 0.05,
    hard_negative_weight: float = 0.0,
    block_size: int = 1024,
    mesh=None,
) -> tuple[jax.Array, jax.Array]:
    """`dense.simcse_loss_and_accuracy` with key shards passed around the data(+fsdp) ring.

    `mesh` defaults to the one set by `jax.set_mesh` (the train step's); without one this is
    `simcse_loss_and_accuracy_blockwise`.
    """
    _check(z1, z2, z3)
    check_block_size(block_size)
    axes, n, mesh = ring_axes(z1.shape[0], mesh)
    if n == 1:
        return simcse_loss_and_accuracy_blockwise(z1, z2, z3, temperature=temperature,
                                                  hard_negative_weight=hard_negative_weight, block_size=block_size)
    q, k2 = normalize_rows(z1), normalize_rows(z2)
    key_sets = (k2,) if z3 is None else (k2, normalize_rows(z3))
    score = contrastive_score(temperature, hard_negative_weight, q.shape[0])
    ce_fn = _ring_ce(score, block_size, axes, n, mesh, q.shape[0], len(key_sets))
    ce, hits = ce_fn(q, key_sets, positive_logits(q, k2, temperature))
    loss = jnp.mean(ce)
    return loss, jax.lax.stop_gradient(jnp.mean(hits))


def uniformity_ring(z: jax.Array, t: float = 2.0, *, block_size: int = 1024, mesh=None) -> jax.Array:
    """`dense.uniformity` (exact, all pairs) around the ring; a statistic: no gradient flows through it."""
    axes, n, mesh = ring_axes(z.shape[0], mesh)
    if n == 1:
        return uniformity_blockwise(z, t, block_size=block_size)
    zn = normalize_rows(jax.lax.stop_gradient(z))
    forward, _ = _ring_fns(uniformity_score(t), check_block_size(block_size), axes, n, z.shape[0], 1)
    row, vec = P(axes, None), P(axes)
    m, log_l, _ = shard_map(forward, mesh=mesh, in_specs=(row, row), out_specs=(vec,) * 3, check_vma=False)(zn, zn)
    return uniformity_from_row_lse(m + log_l)
