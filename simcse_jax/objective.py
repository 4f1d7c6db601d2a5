"""The training objective: encoder + pooler over a batch dict -> embeddings and loss.

Batch contract (data pipeline -> here): int32 arrays `[B, num_sent, L]` named `input_ids`,
`attention_mask`, `token_type_ids` and, for the MLM auxiliary loss, `mlm_input_ids`,
`mlm_labels` (-100 = ignore). num_sent = 2 (unsupervised: the sentence twice; or pairs) or 3
(sent0, sent1, hard negative).

One encoder forward over the flattened `[B * num_sent, L]` rows (the reference's view(-1, L):
rows 2i and 2i+1 are the two views of sentence i) with ONE dropout key: every element of every
row draws its own dropout bit, so the two views of a sentence never share a mask (sharing one is
the paper's "fixed 0.1" ablation, which collapses). jax's threefry is partitionable (the default,
checked below), so the masks do not depend on how the rows are sharded.

The `cls` pooler applies the SimCSE MLP to every view in training; `mlp_only_train` drops it at
evaluation (`poolers.eval_pooler`). The MLM loss is a second forward over `mlm_input_ids` without the
pooler, as in the reference; total = simcse + mlm_weight * mlm.

Dropout keys: the caller passes one key per step. The batch is embedded in `num_chunks` chunks
(1 without gradient caching); chunk c uses `fold_in(step_key, c)`, and inside a chunk the
contrastive forward uses `fold_in(chunk_key, 0)` and the MLM forward `fold_in(chunk_key, 1)`.
Chunk c holds local rows [c*k, (c+1)*k) of *every* data-parallel device (k = chunk/devices), so
every chunk stays spread over all devices; `grad_cache.py` replays exactly these keys.

Micro-batch gradient accumulation is refused (`gradient_accumulation_steps > 1`): the contrastive
loss of a batch is not the mean of its micro-batches' losses (each row's negatives are the whole
batch), so accumulating micro-batch gradients silently trains a different objective with B/k
negatives. Gradient caching (`grad_cache_chunk_size`) gives the exact full-batch gradient.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from simcse_jax.config import check_objective, grad_cache_chunks
from simcse_jax.encoder import Encoder
from simcse_jax.losses import (
    alignment,
    masked_lm_loss_sum,
    simcse_loss_and_accuracy,
    simcse_loss_and_accuracy_blockwise,
    simcse_loss_and_accuracy_ring,
    uniformity,
    uniformity_blockwise,
    uniformity_ring,
)
from simcse_jax.poolers import eval_pooler, needs_hidden_states, pool

REQUIRED_KEYS = ("input_ids", "attention_mask", "token_type_ids")
MLM_KEYS = ("mlm_input_ids", "mlm_labels")


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """What is optimised. Defaults are the reference's (princeton-nlp/SimCSE: `simcse/models.py`, `train.py`)."""

    temperature: float = 0.05
    hard_negative_weight: float = 0.0  # added to the hard-negative logit; 0 = weight 1
    pooler: str = "cls"
    mlp_only_train: bool = False  # unsup recipe: MLP in training only
    do_mlm: bool = False
    mlm_weight: float = 0.1
    # Gradient caching: global rows per chunk (0 or None = one forward/backward over the whole
    # batch). Field names are TrainConfig's; `train_step.objective_config` sets each one.
    grad_cache_chunk_size: int | None = None
    # Refused above 1: see the module docstring (use grad_cache_chunk_size instead).
    gradient_accumulation_steps: int = 1
    # dense | blockwise | ring: the same loss and gradients (simcse_jax/losses/); the last two
    # never form the B x B logits (memory linear in B), ring not the [B, H] keys either.
    contrastive_impl: str = "dense"
    contrastive_block_size: int = 1024

    def __post_init__(self):
        check_objective(self, "objective.")  # the same rules as config.validate's

    @property
    def eval_pooler(self) -> str:
        return eval_pooler(self.pooler, self.mlp_only_train)


if not jax.config.jax_threefry_partitionable:  # pragma: no cover - default since jax 0.5
    raise RuntimeError("simcse-jax needs jax_threefry_partitionable=True (dropout masks independent of sharding)")


def check_batch(batch: dict, cfg: ObjectiveConfig) -> int:
    """Validates the batch dict; returns num_sent."""
    missing = [k for k in REQUIRED_KEYS + (MLM_KEYS if cfg.do_mlm else ()) if k not in batch]
    if missing:
        raise KeyError(f"training batch lacks {missing} (has {sorted(batch)}); objective.do_mlm={cfg.do_mlm}")
    shape = batch["input_ids"].shape
    if len(shape) != 3 or shape[1] not in (2, 3):
        raise ValueError(f"training batch input_ids must be [B, num_sent in (2, 3), L], got {tuple(shape)}")
    for k in REQUIRED_KEYS + (MLM_KEYS if cfg.do_mlm else ()):
        if batch[k].shape != shape:
            raise ValueError(f"training batch {k} has shape {tuple(batch[k].shape)}, input_ids {tuple(shape)}")
    return shape[1]


def chunk_key(step_key: jax.Array, chunk: int | jax.Array) -> jax.Array:
    return jax.random.fold_in(step_key, chunk)


def _sub(key, i):
    return None if key is None else jax.random.fold_in(key, i)


def embed_views(model: Encoder, batch: dict, cfg: ObjectiveConfig, key: jax.Array | None) -> jax.Array:
    """Sentence embeddings [B, num_sent, H] float32 of one (chunk of a) batch; key None = no dropout."""
    b, s, length = batch["input_ids"].shape
    flat = {k: batch[k].reshape(b * s, length) for k in REQUIRED_KEYS}
    out = model(
        flat["input_ids"], flat["attention_mask"], flat["token_type_ids"],
        dropout_key=_sub(key, 0), output_hidden_states=needs_hidden_states(cfg.pooler),
    )
    z = pool(cfg.pooler, out, flat["attention_mask"], model)
    return z.reshape(b, s, z.shape[-1])


def mlm_sums(model: Encoder, batch: dict, key: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """(cross-entropy sum, labelled-token count) of the MLM forward over `mlm_input_ids`."""
    b, s, length = batch["input_ids"].shape
    out = model(
        batch["mlm_input_ids"].reshape(b * s, length),
        batch["attention_mask"].reshape(b * s, length),
        batch["token_type_ids"].reshape(b * s, length),
        dropout_key=_sub(key, 1),
    )
    return masked_lm_loss_sum(model.mlm_logits(out.last_hidden_state), batch["mlm_labels"].reshape(b * s, length))


# ----------------------------------------------------------------------------- chunk layout


def to_chunks(x: jax.Array, num_chunks: int, data_parallel: int) -> jax.Array:
    """[B, ...] -> [num_chunks, B/num_chunks, ...]; chunk c = local rows block c of every device."""
    if num_chunks == 1:
        return x[None]
    b = x.shape[0]
    per = b // (data_parallel * num_chunks)
    y = x.reshape(data_parallel, num_chunks, per, *x.shape[1:])
    return jnp.swapaxes(y, 0, 1).reshape(num_chunks, data_parallel * per, *x.shape[1:])


def from_chunks(y: jax.Array, data_parallel: int) -> jax.Array:
    """Inverse of `to_chunks`: [num_chunks, C, ...] -> [B, ...] in the original row order."""
    n, c = y.shape[:2]
    if n == 1:
        return y[0]
    per = c // data_parallel
    x = jnp.swapaxes(y.reshape(n, data_parallel, per, *y.shape[2:]), 0, 1)
    return x.reshape(n * c, *y.shape[2:])


def num_chunks_for(cfg: ObjectiveConfig, global_batch: int, data_parallel: int) -> int:
    """How many chunks `grad_cache_chunk_size` makes of this batch (`config.grad_cache_chunks`,
    the rule `validate` applies); errors name the config key."""
    return grad_cache_chunks(cfg.grad_cache_chunk_size, global_batch, data_parallel)


# ----------------------------------------------------------------------------- the objective


def contrastive_terms(z: jax.Array, cfg: ObjectiveConfig) -> tuple[jax.Array, dict]:
    """SimCSE loss of embeddings [B, num_sent, H] and the batch statistics of the measurements.

    `cfg.contrastive_impl` chooses how the loss and the uniformity (all B(B-1) pairs, exact in
    every implementation) are computed; `ring` takes the mesh set by the train step.
    """
    z1, z2 = z[:, 0], z[:, 1]
    z3 = z[:, 2] if z.shape[1] == 3 else None
    kw = dict(temperature=cfg.temperature, hard_negative_weight=cfg.hard_negative_weight)
    if cfg.contrastive_impl == "dense":
        loss, acc = simcse_loss_and_accuracy(z1, z2, z3, **kw)
        unif = uniformity(z1)
    else:
        block = dict(block_size=cfg.contrastive_block_size)
        loss_fn, unif_fn = {
            "blockwise": (simcse_loss_and_accuracy_blockwise, uniformity_blockwise),
            "ring": (simcse_loss_and_accuracy_ring, uniformity_ring),
        }[cfg.contrastive_impl]
        loss, acc = loss_fn(z1, z2, z3, **kw, **block)
        unif = unif_fn(z1, **block)
    stats = {
        "simcse_loss": loss,
        "accuracy": acc,
        "alignment": jax.lax.stop_gradient(alignment(z1, z2)),
        "uniformity": jax.lax.stop_gradient(unif),
    }
    return loss, stats


def combine(simcse: jax.Array, stats: dict, mlm_sum, mlm_count, cfg: ObjectiveConfig, contrastive_scale: float):
    """(objective to differentiate, measurements). `contrastive_scale` scales the SimCSE term's
    gradient only (optim.OptimConfig.reference_world_size); reported losses are unscaled."""
    stats = dict(stats)
    total = simcse
    objective = contrastive_scale * simcse
    if cfg.do_mlm:
        mlm = mlm_sum / jnp.maximum(mlm_count, 1.0)
        stats["mlm_loss"] = mlm
        total = total + cfg.mlm_weight * mlm
        objective = objective + cfg.mlm_weight * mlm
    stats["loss"] = total
    return objective, jax.tree.map(jax.lax.stop_gradient, stats)


def objective_fn(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    batch: dict,
    key: jax.Array | None,
    cfg: ObjectiveConfig,
    *,
    num_chunks: int = 1,
    data_parallel: int = 1,
    contrastive_scale: float = 1.0,
) -> tuple[jax.Array, dict]:
    """(objective, measurements) with everything in one differentiable graph.

    `num_chunks > 1` embeds the batch chunk by chunk with the per-chunk keys of the module
    docstring (the non-cached twin of gradient caching, used to test it); the loss is always the
    full-batch loss. key None = deterministic (no dropout).
    """
    check_batch(batch, cfg)
    model = nnx.merge(graphdef, params)
    chunks = {k: to_chunks(v, num_chunks, data_parallel) for k, v in batch.items()}

    def one(c, chunk):
        k = None if key is None else chunk_key(key, c)
        z = embed_views(model, chunk, cfg, k)
        m = mlm_sums(model, chunk, k) if cfg.do_mlm else (jnp.float32(0), jnp.float32(0))
        return z, m

    if num_chunks == 1:
        z, (ms, mc) = one(0, jax.tree.map(lambda v: v[0], chunks))
    else:
        zc, (ms, mc) = jax.lax.map(lambda a: one(a[0], a[1]), (jnp.arange(num_chunks), chunks))
        z, ms, mc = from_chunks(zc, data_parallel), ms.sum(), mc.sum()
    simcse, stats = contrastive_terms(z, cfg)
    return combine(simcse, stats, ms, mc, cfg, contrastive_scale)


def eval_embeddings(model: Encoder, input_ids, attention_mask, token_type_ids, cfg: ObjectiveConfig) -> jax.Array:
    """Deterministic sentence embeddings [b, H] as used at evaluation (mlp_only_train honoured)."""
    pooler = cfg.eval_pooler
    out = model(input_ids, attention_mask, token_type_ids, output_hidden_states=needs_hidden_states(pooler))
    return pool(pooler, out, attention_mask, model)
