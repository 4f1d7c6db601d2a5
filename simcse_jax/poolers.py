"""Sentence poolers of the SimCSE reference (`simcse/models.py: Pooler`): the one place for them.

Everything about a pooler lives here: its name (a config's `pooler` / `eval_pooler`, a
checkpoint's meta and every `--pooler` flag choose among `POOLERS`), its JAX computation
(`pool`), its PyTorch twin for evaluating Hugging Face folders (`torch_pool`), its
sentence-transformers form for export (`st_pooling_mode`), and the evaluation rule (`eval_pooler`:
the unsupervised recipe trains `cls` through the MLP and evaluates without it).

A pooler is a row of `_SPECS`: which hidden states it averages (`layers`, indices into the
encoder's hidden_states; the last one is `last_hidden_state`), whether it takes the [CLS] token or
the masked mean over real tokens, and whether the SimCSE MLP (dense + tanh over [CLS], stored as
the encoder's `pooler.dense`, Hugging Face's `pooler_output`) follows. The JAX and torch code read
the row, so a new pooler of this shape is one row; `tests/test_poolers.py` checks every row in
both libraries, against its export mapping and its evaluation rule.

Both computations are float32. `avg_first_last` uses hidden_states[1] (the first Transformer
layer's output), as the reference fixed it, not the embedding output hidden_states[0].

This module imports neither jax nor torch at the top: the names and rules are read by the
config, the command line and checkpoints; each computation imports its library when called,
so training never needs torch.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from simcse_jax.errors import ConfigError

if TYPE_CHECKING:
    import jax

    from simcse_jax.encoder import Encoder, EncoderOutput


@dataclasses.dataclass(frozen=True)
class PoolerSpec:
    token: str  # "cls": the [CLS] (first) token; "mean": the mean over real tokens
    layers: tuple[int, ...] = (-1,)  # hidden_states averaged before pooling; (-1,) = the last layer only
    mlp: bool = False  # the SimCSE MLP (pooler.dense + tanh) after the [CLS] token
    # sentence-transformers' Pooling mode for the export ("cls", "mean"); None: not expressible.
    st_mode: str | None = None


_SPECS = {
    "cls": PoolerSpec("cls", mlp=True, st_mode="cls"),  # exported as CLS pooling + a tanh Dense
    "cls_before_pooler": PoolerSpec("cls", st_mode="cls"),
    "avg": PoolerSpec("mean", st_mode="mean"),
    "avg_top2": PoolerSpec("mean", layers=(-1, -2)),
    "avg_first_last": PoolerSpec("mean", layers=(1, -1)),
}
POOLERS = tuple(_SPECS)


def check_pooler(pooler: str, where: str = "pooler") -> str:
    """`pooler` if it is a known name; otherwise ConfigError naming `where` (the key or flag)."""
    if pooler not in _SPECS:
        raise ConfigError(f"{where}: unknown pooler {pooler!r}; choose one of {', '.join(POOLERS)}")
    return pooler


def spec(pooler: str) -> PoolerSpec:
    return _SPECS[check_pooler(pooler)]


def needs_hidden_states(pooler: str) -> bool:
    """Whether the encoder must be called with output_hidden_states=True for this pooler."""
    return spec(pooler).layers != (-1,)


def without_mlp(pooler: str) -> str:
    """The pooler that computes `pooler` with its MLP dropped (itself when it has none)."""
    s = spec(pooler)
    if not s.mlp:
        return pooler
    plain = dataclasses.replace(s, mlp=False)
    return next(name for name, other in _SPECS.items() if other == plain)


def eval_pooler(pooler: str, mlp_only_train: bool, explicit: str | None = None) -> str:
    """The pooler that evaluates and exports a model trained with `pooler`.

    The one place this is decided. The unsupervised recipe (`cls` with `mlp_only_train`) trains
    through the MLP and drops it at evaluation: `cls_before_pooler`. `explicit` (a config's
    `eval_pooler`, a `--pooler` flag) wins.
    """
    if explicit:
        return check_pooler(explicit, "eval_pooler")
    return without_mlp(pooler) if mlp_only_train else check_pooler(pooler)


def st_pooling_mode(pooler: str) -> str | None:
    """sentence-transformers' Pooling mode of an exported `pooler` ("cls" or "mean"), None when
    sentence-transformers cannot express it; an MLP pooler adds a tanh Dense (`spec(p).mlp`)."""
    return spec(pooler).st_mode


# ----------------------------------------------------------------------------- JAX


def pool(
    pooler: str,
    output: EncoderOutput,
    attention_mask: jax.Array,
    model: Encoder | None = None,
    *,
    apply_mlp: bool = True,
) -> jax.Array:
    """Sentence vectors [b, H] in float32.

    For `cls`, `apply_mlp=False` gives the [CLS] vector without the MLP (`without_mlp`): the
    unsupervised recipe's `mlp_only_train` uses the MLP in training and drops it at evaluation.
    """
    import jax.numpy as jnp

    s = spec(pooler if apply_mlp else without_mlp(pooler))
    if s.layers == (-1,):
        h = output.last_hidden_state.astype(jnp.float32)
    else:
        hs = output.hidden_states
        if hs is None:
            raise ValueError(f"pooler {pooler!r} needs the encoder called with output_hidden_states=True")
        h = (hs[s.layers[0]].astype(jnp.float32) + sum(hs[i].astype(jnp.float32) for i in s.layers[1:])) / float(len(s.layers))
    if s.token == "cls":
        if not s.mlp:
            return h[:, 0]
        if model is None:
            raise ValueError("the cls pooler needs the encoder (its pooler.dense is the SimCSE MLP)")
        return model.pooler(output.last_hidden_state[:, 0]).astype(jnp.float32)
    m = attention_mask.astype(jnp.float32)[..., None]  # [b, s, 1]
    return (h * m).sum(1) / m.sum(1)


# ----------------------------------------------------------------------------- PyTorch twin


def torch_pool(pooler: str, outputs, attention_mask):
    """`pool` on a transformers model output (float32 torch tensor [b, H]): the evaluation of a
    Hugging Face folder through transformers, whose `pooler_output` is the SimCSE MLP."""
    import torch

    s = spec(pooler)
    if s.layers == (-1,):
        h = outputs.last_hidden_state.float()
    else:
        hs = outputs.hidden_states
        h = (hs[s.layers[0]].float() + sum(hs[i].float() for i in s.layers[1:])) / float(len(s.layers))
    if s.token == "cls":
        if not s.mlp:
            return h[:, 0]
        if outputs.pooler_output is None:
            raise ValueError("the cls pooler needs the model's pooler layer (the SimCSE MLP); this model has none")
        return outputs.pooler_output.float()
    m = attention_mask.to(torch.float32).unsqueeze(-1)  # [b, s, 1]
    return (h * m).sum(1) / m.sum(1)
