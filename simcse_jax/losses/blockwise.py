"""The SimCSE loss without the B x B logits: an online log-sum-exp over column blocks.

The loss of `dense.py` splits per row i as (Inf-CL, Cheng et al. 2024):

    CE_i = LSE_j(logits[i, j]) - logits[i, i]

The positive logit is a dot product of two rows. The log-sum-exp is accumulated over column
blocks of `block_size` keys with a running max (as flash attention does): for each block,
m' = max(m, max_j s_j) and l' = l * exp(m - m') + sum_j exp(s_j - m'); LSE = m + log l. The
top-1 column (accuracy) is tracked in the same pass, ties going to the smaller column as
`argmax` does. No more than [rows, block] logits exist at once.

The gradient is a `jax.custom_vjp`: the forward saves only the normalised embeddings and the
per-row LSE; the backward recomputes each block's logits and takes the softmax as
exp((s - m) - log l) * (the row's cotangent). The LSE is kept as its two parts m and log l (two
[rows] vectors): with logits of ~1/temperature = 20, m + log l rounds at 20's float32 spacing
(2e-6) while s - m is exact for the large logits, so the softmax keeps the precision of the dense
loss's `log_softmax` (which also subtracts the max first). Each block's own pull-back is `jax.vjp` of the same score
function the forward used, so the chain rule through the 1/temperature and the hard-negative
bonus is jax's, as in the dense loss. The L2 normalisation is outside the custom VJP and
differentiated by jax, exactly as in `dense.py`.

Columns past the keys (when the key count is not a multiple of `block_size`) are padded with
zero keys and masked to -inf: any B works. On global arrays under a set mesh the block logits
are kept row-sharded (B/devices x block per device) and the [K, H] keys replicated, as the dense
loss does; `ring.py` avoids holding the keys.

Uniformity (`uniformity_blockwise`) is the same sweep with the score -t |x_i - x_j|^2 and the
diagonal masked: the exact Wang & Isola statistic over all B(B-1) ordered pairs, no subsample.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from simcse_jax.losses.dense import _check, normalize_rows
from simcse_jax.sharding import constrain_rows

HIGHEST = jax.lax.Precision.HIGHEST

# score(q [r, H], rows [r], keys [c, H], cols [c]) -> [r, c] float32: one block's logits.
# rows / cols are global indices (cols -1 = padding, masked by the sweep).
Score = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


def contrastive_score(temperature: float, hard_negative_weight: float, batch: int) -> Score:
    """The dense loss's logits, one block: cos / temperature (+ w at column batch + row)."""

    def score(q, rows, keys, cols):
        # (r, H) . (c, H) -> (r, c)
        s = jnp.einsum("rh,ch->rc", q, keys, precision=HIGHEST) / temperature
        if hard_negative_weight != 0.0:
            s = s + jnp.where(cols[None, :] == batch + rows[:, None], jnp.float32(hard_negative_weight), jnp.float32(0.0))
        return s

    return score


def uniformity_score(t: float) -> Score:
    """-t |x_i - x_j|^2 of unit rows (= -t (2 - 2 x_i . x_j), floored at 0 as dense), diagonal masked."""

    def score(q, rows, keys, cols):
        # (r, H) . (c, H) -> (r, c)
        sq = jnp.maximum(2.0 - 2.0 * jnp.einsum("rh,ch->rc", q, keys, precision=HIGHEST), 0.0)
        return jnp.where(cols[None, :] == rows[:, None], -jnp.inf, -t * sq)

    return score


class RowState(NamedTuple):
    """Running per-row state of the sweep over column blocks."""

    m: jax.Array  # [r] the largest logit so far (-inf before any column)
    l: jax.Array  # [r] sum of exp(logit - m) so far  # noqa: E741
    best: jax.Array  # [r] int32 column of the largest logit (smallest column on ties)

    @classmethod
    def empty(cls, rows: int) -> RowState:
        return cls(jnp.full((rows,), -jnp.inf, jnp.float32), jnp.zeros((rows,), jnp.float32),
                   jnp.full((rows,), jnp.iinfo(jnp.int32).max, jnp.int32))

    def lse_parts(self) -> tuple[jax.Array, jax.Array]:
        """(m, log l): LSE = m + log l, kept apart for the backward's precision (module doc)."""
        return self.m, jnp.log(self.l)


def _blocks(keys: jax.Array, cols: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
    """keys [c, H], cols [c] -> [n, block, H], [n, block]; the last block padded (cols -1).

    At least two blocks (of about c/2 columns when c <= block): a one-step loop is inlined by
    XLA, and XLA-CPU's oneDNN dot fusion then folds the ring's gradient accumulation into the
    dot, which dies with SIGILL on this project's AVX-512 hosts (jaxlib 0.10.2, cpu_onednn).
    """
    c = keys.shape[0]
    if 1 < c <= block:
        block = math.ceil(c / 2)
    n = max(1, math.ceil(c / block))
    pad = n * block - c
    keys = jnp.pad(keys, ((0, pad), (0, 0))).reshape(n, block, keys.shape[1])
    cols = jnp.pad(cols, (0, pad), constant_values=-1).reshape(n, block)
    return keys, cols


def _masked(s: jax.Array, cols: jax.Array) -> jax.Array:
    return jnp.where(cols[None, :] >= 0, s, -jnp.inf)


def _identity(x):
    return x


def sweep_forward(state: RowState, q, rows, keys, cols, score: Score, block: int, constrain=_identity) -> RowState:
    """`state` updated with the columns `keys` (global indices `cols`), `block` at a time."""
    keys_b, cols_b = _blocks(keys, cols, block)

    def body(st: RowState, kc):
        k, c = kc
        s = _masked(constrain(score(q, rows, k, c)), c)  # [r, block]
        top = jnp.max(s, axis=1)
        top_col = c[jnp.argmax(s, axis=1)]
        m = jnp.maximum(st.m, top)
        # A row with no finite logit yet (uniformity's diagonal alone) keeps m = -inf; exp(-inf - 0) = 0.
        shift = jnp.where(jnp.isfinite(m), m, 0.0)
        total = st.l * jnp.exp(st.m - shift) + jnp.sum(jnp.exp(s - shift[:, None]), axis=1)
        take = (top > st.m) | ((top == st.m) & (top_col < st.best))
        return RowState(m, total, jnp.where(take, top_col, st.best)), None

    state, _ = jax.lax.scan(body, state, (keys_b, cols_b))
    return state


def sweep_backward(q, rows, keys, cols, lse_parts, ct, score: Score, block: int, constrain=_identity):
    """(dq [r, H], dkeys [c, H]) of sum_i ct_i * LSE_i over the columns `keys`, recomputed blockwise."""
    keys_b, cols_b = _blocks(keys, cols, block)
    m, log_l = lse_parts

    def body(dq, kc):
        k, c = kc
        s, pull = jax.vjp(lambda q_, k_: constrain(score(q_, rows, k_, c)), q, k)
        # d LSE_i / d s_ij = softmax_ij = exp(s_ij - LSE_i); padded columns (-inf) get 0.
        p = jnp.exp((_masked(s, c) - m[:, None]) - log_l[:, None]) * ct[:, None]
        dq_b, dk_b = pull(constrain(p))
        return dq + dq_b, dk_b

    dq, dk = jax.lax.scan(body, jnp.zeros_like(q), (keys_b, cols_b))
    return dq, dk.reshape(-1, dk.shape[-1])[: keys.shape[0]]


def _replicated(x: jax.Array) -> jax.Array:
    """Under a set mesh: `x` gathered onto every device (the keys every row block meets)."""
    if jax.sharding.get_abstract_mesh().empty:
        return x
    return jax.lax.with_sharding_constraint(x, P())


def _lse_parts_and_hits(q, keys, score: Score, block: int):
    """((m, log l), top-1-is-own-positive as float) per row of q against all `keys`, on global arrays."""
    rows = jnp.arange(q.shape[0], dtype=jnp.int32)
    cols = jnp.arange(keys.shape[0], dtype=jnp.int32)
    st = sweep_forward(RowState.empty(q.shape[0]), q, rows, _replicated(keys), cols, score, block, constrain_rows)
    return st.lse_parts(), (st.best == rows).astype(jnp.float32)


def _contrastive_ce(score: Score, block: int):
    """(LSE_i - pos_i, hits_i) with the recomputing custom VJP (hits: no gradient).

    The positive logit `pos` comes in from outside (differentiated by jax) and is subtracted
    from m before log l is added, as `log_softmax` orders it: the rounding stays at the scale of
    the cross-entropy, not of the logits.
    """

    def fwd(q, keys, pos):
        (m, log_l), hits = _lse_parts_and_hits(q, keys, score, block)
        return ((m - pos) + log_l, hits), (q, keys, (m, log_l))

    @jax.custom_vjp
    def ce(q, keys, pos):
        return fwd(q, keys, pos)[0]

    def bwd(res, cts):
        q, keys, parts = res
        rows = jnp.arange(q.shape[0], dtype=jnp.int32)
        cols = jnp.arange(keys.shape[0], dtype=jnp.int32)
        dq, dk = sweep_backward(q, rows, _replicated(keys), cols, parts, cts[0], score, block, constrain_rows)
        return dq, dk, -cts[0]

    ce.defvjp(fwd, bwd)
    return ce


def check_block_size(block_size: int) -> int:
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"contrastive_block_size must be a positive integer, got {block_size!r}")
    return block_size


def positive_logits(q: jax.Array, k2: jax.Array, temperature: float) -> jax.Array:
    """[rows] cos(z1_i, z2_i) / temperature of unit rows."""
    return jnp.sum(q * k2, axis=-1) / temperature


def simcse_loss_and_accuracy_blockwise(
    z1: jax.Array,
    z2: jax.Array,
    z3: jax.Array | None = None,
    *,
    temperature: float = 0.05,
    hard_negative_weight: float = 0.0,
    block_size: int = 1024,
) -> tuple[jax.Array, jax.Array]:
    """`dense.simcse_loss_and_accuracy` computed `block_size` key columns at a time."""
    _check(z1, z2, z3)
    check_block_size(block_size)
    q, k2 = normalize_rows(z1), normalize_rows(z2)
    keys = k2 if z3 is None else jnp.concatenate([k2, normalize_rows(z3)], axis=0)  # [K, H], K = B or 2B
    score = contrastive_score(temperature, hard_negative_weight, q.shape[0])
    ce, hits = _contrastive_ce(score, block_size)(q, keys, positive_logits(q, k2, temperature))
    loss = jnp.mean(ce)
    return loss, jax.lax.stop_gradient(jnp.mean(hits))


def uniformity_from_row_lse(row_lse: jax.Array) -> jax.Array:
    """log mean over the n(n-1) ordered pairs, from each row's LSE over its n-1 others."""
    n = row_lse.shape[0]
    return jax.nn.logsumexp(row_lse) - jnp.log(float(n * (n - 1)))


def uniformity_blockwise(z: jax.Array, t: float = 2.0, *, block_size: int = 1024) -> jax.Array:
    """`dense.uniformity` (exact, all pairs) blockwise; a statistic: no gradient flows through it."""
    zn = normalize_rows(jax.lax.stop_gradient(z))
    (m, log_l), _ = _lse_parts_and_hits(zn, zn, uniformity_score(t), check_block_size(block_size))
    return uniformity_from_row_lse(m + log_l)
