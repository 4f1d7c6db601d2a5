"""Sentence poolers of the SimCSE reference (`simcse/models.py: Pooler`), masked and in float32.

`cls` applies the SimCSE MLP (dense + tanh over [CLS], stored as the encoder's `pooler.dense`);
`cls_before_pooler` is the raw [CLS] vector. The averaging poolers divide by the number of real
tokens. `avg_first_last` uses hidden_states[1] (the first Transformer layer's output), as the
reference fixed it, not the embedding output hidden_states[0].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from simcse_jax.config import POOLERS, check_pooler
from simcse_jax.encoder import Encoder, EncoderOutput

__all__ = ["POOLERS", "check_pooler", "needs_hidden_states", "pool"]


def needs_hidden_states(pooler: str) -> bool:
    return pooler in ("avg_top2", "avg_first_last")


def _masked_mean(h: jax.Array, attention_mask: jax.Array) -> jax.Array:
    m = attention_mask.astype(jnp.float32)[..., None]  # [b, s, 1]
    return (h.astype(jnp.float32) * m).sum(1) / m.sum(1)


def pool(
    pooler: str,
    output: EncoderOutput,
    attention_mask: jax.Array,
    model: Encoder | None = None,
    *,
    apply_mlp: bool = True,
) -> jax.Array:
    """Sentence vectors [b, H] in float32.

    For `cls`, `apply_mlp=False` gives the [CLS] vector without the MLP: the unsupervised
    recipe's `mlp_only_train` uses the MLP in training and drops it at evaluation.
    """
    check_pooler(pooler)
    last = output.last_hidden_state
    if pooler in ("cls", "cls_before_pooler"):
        cls = last[:, 0]
        if pooler == "cls" and apply_mlp:
            if model is None:
                raise ValueError("the cls pooler needs the encoder (its pooler.dense is the SimCSE MLP)")
            cls = model.pooler(cls)
        return cls.astype(jnp.float32)
    if pooler == "avg":
        return _masked_mean(last, attention_mask)
    hs = output.hidden_states
    if hs is None:
        raise ValueError(f"pooler {pooler!r} needs the encoder called with output_hidden_states=True")
    if pooler == "avg_top2":
        return _masked_mean((hs[-1].astype(jnp.float32) + hs[-2].astype(jnp.float32)) / 2.0, attention_mask)
    # avg_first_last
    return _masked_mean((hs[1].astype(jnp.float32) + hs[-1].astype(jnp.float32)) / 2.0, attention_mask)
