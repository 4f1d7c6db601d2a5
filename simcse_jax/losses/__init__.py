"""The SimCSE contrastive loss in three implementations, the MLM loss and the batch statistics.

- `dense.py`: the reference's formula on global arrays, [B, B(+B)] logits row-sharded (the
  default, `contrastive_impl = "dense"`; the paper configs use it).
- `blockwise.py`: the same loss and gradients without ever forming more than [rows, block]
  logits: an online log-sum-exp over column blocks and a custom VJP that recomputes each block.
- `ring.py`: the blockwise loss under `shard_map`, key blocks passed around the ring of
  data-parallel devices, so no device holds the [B, H] keys either.

`contrastive_impl` in the config chooses (see objective.py); the three agree to float32 rounding.
"""

from simcse_jax.losses.blockwise import simcse_loss_and_accuracy_blockwise, uniformity_blockwise
from simcse_jax.losses.dense import (
    COSINE_EPS,
    IGNORE_INDEX,
    alignment,
    masked_lm_loss_sum,
    normalize_rows,
    simcse_logits,
    simcse_loss,
    simcse_loss_and_accuracy,
    simcse_loss_shard_map,
    uniformity,
)
from simcse_jax.losses.ring import simcse_loss_and_accuracy_ring, uniformity_ring

__all__ = [
    "COSINE_EPS",
    "IGNORE_INDEX",
    "alignment",
    "masked_lm_loss_sum",
    "normalize_rows",
    "simcse_logits",
    "simcse_loss",
    "simcse_loss_and_accuracy",
    "simcse_loss_and_accuracy_blockwise",
    "simcse_loss_and_accuracy_ring",
    "simcse_loss_shard_map",
    "uniformity",
    "uniformity_blockwise",
    "uniformity_ring",
]
