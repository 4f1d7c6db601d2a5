"""The SimCSE contrastive loss, the MLM auxiliary loss and the batch alignment/uniformity.

`simcse_loss` is written on *global* arrays: z1, z2 (and z3) are [B, H] embeddings of the whole
global batch, possibly row-sharded over the data axes. Inside it, everything is float32 whatever
the encoder's compute dtype. When a mesh is set (`jax.set_mesh`), the [B, B(+B)] logits are
constrained to stay row-sharded (B/devices x B per device), so the partitioner gathers only the
[B, H] key embeddings, never the logits. `simcse_loss_shard_map` is the same computation with
the communication spelled out (`all_gather` of the keys, labels offset by the device index); the
tests hold the two equal, values and gradients.

The formula is the reference's (`simcse/models.py: cl_forward`):

    logits[i, j]     = cos(z1_i, z2_j) / temperature                       j < B
    logits[i, B + j] = cos(z1_i, z3_j) / temperature + w * [i == j]        (hard negatives)
    loss             = mean_i CE(logits[i], label i)

`hard_negative_weight` w is added to the logit (a log-weight): 0 means the hard negative counts
like any other negative, as in the paper (which reports log w; its best is w = 0).

Cosine: torch's CosineSimilarity divides by max(|x||y|, 1e-8); we normalise each row by
max(|z|, 1e-8) and take dot products. The two agree to float32 rounding for any vector whose norm
is above 1e-8 (always the case for pooled encoder outputs); normalising first makes the [B, B]
matmul the only B^2 work and lets the keys be normalised once before they are gathered.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import scipy.special
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from simcse_jax.sharding import batch_axes, constrain_rows

IGNORE_INDEX = -100
COSINE_EPS = 1e-8


def _xp(*arrays):
    """numpy for host arrays (evaluation: float64), jax.numpy otherwise (the step: float32)."""
    return np if all(isinstance(a, np.ndarray) for a in arrays) else jnp


def normalize_rows(z: jax.Array) -> jax.Array:
    """Rows scaled to unit L2 norm (norm floored at 1e-8, as torch's cosine): float32 for jax
    arrays, float64 for numpy arrays."""
    xp = _xp(z)
    z = z.astype(xp.float64 if xp is np else jnp.float32)
    norm = xp.sqrt(xp.sum(z * z, axis=-1, keepdims=True))
    return z / xp.maximum(norm, COSINE_EPS)


def _hard_negative_bonus(rows: int, offset, num_keys: int, weight: float) -> jax.Array:
    """[rows, num_keys] with `weight` at column B_total + (offset + i) of row i, zero elsewhere.

    `num_keys` = 2 * B_total (z2 columns then z3 columns); `offset` is the global index of the
    first local row (0 on global arrays).
    """
    b_total = num_keys // 2
    cols = jnp.arange(num_keys)[None, :]
    target = b_total + offset + jnp.arange(rows)[:, None]
    return jnp.where(cols == target, jnp.float32(weight), jnp.float32(0.0))


def _check(z1, z2, z3):
    if z1.ndim != 2 or z2.shape != z1.shape or (z3 is not None and z3.shape != z1.shape):
        shapes = [None if z is None else tuple(z.shape) for z in (z1, z2, z3)]
        raise ValueError(f"simcse_loss: z1, z2 (, z3) must all be [B, H]; got {shapes}")


def simcse_logits(
    z1: jax.Array, z2: jax.Array, z3: jax.Array | None = None, *, temperature: float = 0.05, hard_negative_weight: float = 0.0
) -> jax.Array:
    """[B, B] (or [B, 2B] with hard negatives) float32 logits; row-sharded under a set mesh."""
    _check(z1, z2, z3)
    q = normalize_rows(z1)
    keys = normalize_rows(z2) if z3 is None else jnp.concatenate([normalize_rows(z2), normalize_rows(z3)], axis=0)
    # (B, H) . (K, H) -> (B, K): K = B, or 2B with the hard negatives as extra columns.
    logits = jnp.einsum("bh,kh->bk", q, keys, precision=jax.lax.Precision.HIGHEST) / temperature
    logits = constrain_rows(logits)
    if z3 is not None and hard_negative_weight != 0.0:
        logits = logits + _hard_negative_bonus(q.shape[0], 0, keys.shape[0], hard_negative_weight)
    return logits


def _ce_and_hits(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-row cross-entropy and top-1 hit (float) for integer labels."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    ce = -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]
    hits = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    return ce, hits


def simcse_loss_and_accuracy(
    z1: jax.Array, z2: jax.Array, z3: jax.Array | None = None, *, temperature: float = 0.05, hard_negative_weight: float = 0.0
) -> tuple[jax.Array, jax.Array]:
    """(loss, accuracy): accuracy = share of rows whose top-1 logit is their positive."""
    logits = simcse_logits(z1, z2, z3, temperature=temperature, hard_negative_weight=hard_negative_weight)
    ce, hits = _ce_and_hits(logits, jnp.arange(logits.shape[0]))
    return ce.mean(), jax.lax.stop_gradient(hits.mean())


def simcse_loss(
    z1: jax.Array, z2: jax.Array, z3: jax.Array | None = None, *, temperature: float = 0.05, hard_negative_weight: float = 0.0
) -> jax.Array:
    """The SimCSE loss (scalar float32) of global [B, H] embeddings; see the module docstring."""
    return simcse_loss_and_accuracy(z1, z2, z3, temperature=temperature, hard_negative_weight=hard_negative_weight)[0]


def simcse_loss_shard_map(
    z1: jax.Array,
    z2: jax.Array,
    z3: jax.Array | None = None,
    *,
    mesh: Mesh,
    temperature: float = 0.05,
    hard_negative_weight: float = 0.0,
) -> jax.Array:
    """`simcse_loss` with explicit collectives: each device holds B/dev query rows, gathers the keys.

    The gradient through `all_gather(tiled=True)` is exact: its transpose is a reduce-scatter,
    which sums every device's contribution to a key row back onto the row's owner.
    """
    _check(z1, z2, z3)
    axes = tuple(a for a in batch_axes() if mesh.shape[a] > 1) or batch_axes()[:1]
    b_total = z1.shape[0]
    row = P(axes, None)

    def local(q, k2, *k3):
        q = normalize_rows(q)
        keys = jax.lax.all_gather(normalize_rows(k2), axes, axis=0, tiled=True)  # [B, H]
        if k3:
            keys = jnp.concatenate([keys, jax.lax.all_gather(normalize_rows(k3[0]), axes, axis=0, tiled=True)], 0)
        # (b, H) . (K, H) -> (b, K): this device's query rows against every key.
        logits = jnp.einsum("bh,kh->bk", q, keys, precision=jax.lax.Precision.HIGHEST) / temperature
        rows = q.shape[0]
        offset = jax.lax.axis_index(axes) * rows
        if k3 and hard_negative_weight != 0.0:
            logits = logits + _hard_negative_bonus(rows, offset, keys.shape[0], hard_negative_weight)
        ce, _ = _ce_and_hits(logits, offset + jnp.arange(rows))
        return jax.lax.psum(ce.sum(), axes) / b_total

    args = (z1, z2) if z3 is None else (z1, z2, z3)
    return jax.shard_map(local, mesh=mesh, in_specs=(row,) * len(args), out_specs=P(), check_vma=False)(*args)


def masked_lm_loss_sum(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of token cross-entropies, number of labelled tokens); label -100 = ignore.

    Returned as a sum and a count so chunks (gradient caching) and devices combine exactly:
    the reference's CrossEntropyLoss mean is sum / count over the whole batch.
    """
    logits = logits.astype(jnp.float32)
    valid = labels != IGNORE_INDEX
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
    return -jnp.sum(jnp.where(valid, picked, 0.0)), jnp.sum(valid).astype(jnp.float32)


# Alignment and uniformity: the one implementation, for the training step's measurements (jax
# arrays, float32, in the graph) and for evaluation (numpy arrays, float64: sts.py on STS-B and
# the trainer's held-out statistics), so every reported number is the same formula.


def alignment(z1: jax.Array, z2: jax.Array) -> jax.Array:
    """Wang & Isola alignment (alpha = 2): mean |f(x) - f(x+)|^2 over positive pairs, normalised."""
    xp = _xp(z1, z2)
    d = normalize_rows(z1) - normalize_rows(z2)
    return xp.mean(xp.sum(d * d, axis=-1))


def uniformity(z: jax.Array, t: float = 2.0) -> jax.Array:
    """Wang & Isola uniformity: log mean_{i != j} exp(-t |f(x_i) - f(x_j)|^2), normalised rows."""
    xp = _xp(z)
    zn = normalize_rows(z)
    # (B, H) . (H, B) -> (B, B); |a - b|^2 = 2 - 2 a.b for unit vectors.
    if xp is np:
        gram = zn @ zn.T
        logsumexp = scipy.special.logsumexp
    else:
        gram = constrain_rows(jnp.einsum("bh,ch->bc", zn, zn, precision=jax.lax.Precision.HIGHEST))
        logsumexp = jax.nn.logsumexp
    sq = xp.maximum(2.0 - 2.0 * gram, 0.0)
    n = z.shape[0]
    off_diag = ~xp.eye(n, dtype=bool)
    # log-sum-exp over the n(n-1) distinct ordered pairs (the same mean as over unordered pairs).
    return logsumexp(xp.where(off_diag, -t * sq, -xp.inf)) - xp.log(float(n * (n - 1)))
