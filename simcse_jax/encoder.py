"""A BERT / RoBERTa encoder in Flax NNX whose parameter tree mirrors Hugging Face PyTorch.

Submodules carry Hugging Face's attribute names (`embeddings.word_embeddings`,
`encoder.layer.{i}.attention.self.query`, `pooler.dense`, `cls.predictions.*`, `lm_head.*`) so the
weight import/export in `hf_io.py` is three renaming rules: Dense `kernel` is `weight`
transposed, LayerNorm `scale` is `weight`, Embedding `embedding` is `weight`.

Every parameter carries `logical_axes` metadata (`vocab`, `embed`, `heads`, `mlp`, `norm`, ...);
`sharding.py` maps them onto mesh axes with a rules table.

Dropout is driven by an explicit `dropout_key`: `None` means deterministic (eval mode), and each
dropout site derives its own key by `fold_in` from the caller's key, so a caller that replays a
key (gradient caching) replays the masks exactly.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from simcse_jax.sharding import constrain_rows

SUPPORTED_MODEL_TYPES = ("bert", "roberta")

_ACTIVATIONS = {
    # Hugging Face "gelu" is the exact erf GELU; "gelu_new"/"gelu_pytorch_tanh" the tanh approximation.
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """The architecture fields of a Hugging Face BERT/RoBERTa `config.json`, plus compute dtype."""

    model_type: str = "bert"
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    initializer_range: float = 0.02
    # Parameters are always float32; matmuls run in `compute_dtype` ("bfloat16" on TPU/GPU).
    # LayerNorm statistics and the attention softmax stay in float32 whatever this is.
    compute_dtype: str = "float32"
    # Build the masked-language-model head (BERT `cls.predictions`, RoBERTa `lm_head`).
    with_mlm_head: bool = False

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type {self.model_type!r} is not supported; simcse-jax implements "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}"
            )
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not one of {sorted(_ACTIVATIONS)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def max_length(self) -> int:
        """The longest input (tokens, specials included) the position table serves.

        RoBERTa numbers positions from padding_idx + 1 = 2, so two rows of its table are unused.
        """
        return self.max_position_embeddings - (2 if self.model_type == "roberta" else 0)

    @property
    def dtype(self):
        return jnp.dtype(self.compute_dtype)

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], **overrides) -> EncoderConfig:
        """Reads the fields we use from a Hugging Face config dict; other keys are ignored."""
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in hf.items() if k in fields}
        kwargs["model_type"] = hf.get("model_type", "bert")
        if kwargs.get("pad_token_id") is None:
            kwargs["pad_token_id"] = 1 if kwargs["model_type"] == "roberta" else 0
        kwargs.update(overrides)
        return cls(**kwargs)


# ----------------------------------------------------------------------------- building blocks


def _normal(key, shape, std):
    return std * jax.random.normal(key, shape, jnp.float32)


class Dense(nnx.Module):
    """y = x @ kernel + bias, kernel [in, out] (Hugging Face stores weight [out, in])."""

    def __init__(self, d_in, d_out, *, axes, std, dtype, rngs: nnx.Rngs):
        self.kernel = nnx.Param(_normal(rngs.params(), (d_in, d_out), std), logical_axes=axes)
        # The bias follows the output axis, except on the residual stream ("embed"), where a
        # [H] vector is cheaper replicated than gathered for every layer.
        bias_axis = "norm" if axes[1] == "embed" else axes[1]
        self.bias = nnx.Param(jnp.zeros((d_out,), jnp.float32), logical_axes=(bias_axis,))
        self.dtype = dtype

    def __call__(self, x):
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        return y + self.bias[...].astype(self.dtype)


class LayerNorm(nnx.Module):
    def __init__(self, dim, *, eps, dtype):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), logical_axes=("norm",))
        self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32), logical_axes=("norm",))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x):
        # Statistics in float32 even under bf16 compute: the 1e-12 epsilon and the variance of
        # 768-wide rows are not representable in bf16.
        x = x.astype(jnp.float32)
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...] + self.bias[...]).astype(self.dtype)


class Embedding(nnx.Module):
    def __init__(self, num, dim, *, axes, std, rngs: nnx.Rngs):
        self.embedding = nnx.Param(_normal(rngs.params(), (num, dim), std), logical_axes=axes)

    def __call__(self, ids):
        return jnp.take(self.embedding[...], ids, axis=0)


def dropout(x, rate: float, key):
    """Inverted dropout; identity when `key` is None (deterministic) or rate is 0."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype)).astype(x.dtype)


def _site_key(key, *indices):
    if key is None:
        return None
    for i in indices:
        key = jax.random.fold_in(key, i)
    return key


# ----------------------------------------------------------------------------- the model


class Embeddings(nnx.Module):
    def __init__(self, cfg: EncoderConfig, rngs: nnx.Rngs):
        std = cfg.initializer_range
        self.word_embeddings = Embedding(cfg.vocab_size, cfg.hidden_size, axes=("vocab", "embed"), std=std, rngs=rngs)
        self.position_embeddings = Embedding(
            cfg.max_position_embeddings, cfg.hidden_size, axes=(None, "embed"), std=std, rngs=rngs
        )
        self.token_type_embeddings = Embedding(cfg.type_vocab_size, cfg.hidden_size, axes=(None, "embed"), std=std, rngs=rngs)
        self.LayerNorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=cfg.dtype)
        self.cfg = cfg

    def position_ids(self, input_ids):
        if self.cfg.model_type == "roberta":
            # RoBERTa numbers real tokens from padding_idx + 1 and gives padding padding_idx,
            # whichever side the padding is on (create_position_ids_from_input_ids).
            not_pad = (input_ids != self.cfg.pad_token_id).astype(jnp.int32)
            return jnp.cumsum(not_pad, axis=1) * not_pad + self.cfg.pad_token_id
        return jnp.broadcast_to(jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape)

    def __call__(self, input_ids, token_type_ids, dropout_key):
        x = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(self.position_ids(input_ids))
            + self.token_type_embeddings(token_type_ids)
        )
        x = self.LayerNorm(x)
        return dropout(x, self.cfg.hidden_dropout_prob, dropout_key)


class SelfAttention(nnx.Module):
    def __init__(self, cfg: EncoderConfig, rngs: nnx.Rngs):
        kw = dict(std=cfg.initializer_range, dtype=cfg.dtype, rngs=rngs)
        self.query = Dense(cfg.hidden_size, cfg.hidden_size, axes=("embed", "heads"), **kw)
        self.key = Dense(cfg.hidden_size, cfg.hidden_size, axes=("embed", "heads"), **kw)
        self.value = Dense(cfg.hidden_size, cfg.hidden_size, axes=("embed", "heads"), **kw)
        self.cfg = cfg

    def __call__(self, x, mask_bias, dropout_key):
        b, s, _ = x.shape
        n, d = self.cfg.num_attention_heads, self.cfg.head_dim
        q = self.query(x).reshape(b, s, n, d)
        k = self.key(x).reshape(b, s, n, d)
        v = self.value(x).reshape(b, s, n, d)
        # (b, s, n, d) . (b, t, n, d) -> (b, n, s, t); softmax in float32 for bf16 compute.
        scores = jnp.einsum("bsnd,btnd->bnst", q, k, preferred_element_type=jnp.float32) / math.sqrt(d)
        probs = jax.nn.softmax(scores + mask_bias, axis=-1).astype(x.dtype)
        probs = dropout(probs, self.cfg.attention_probs_dropout_prob, dropout_key)
        # (b, n, s, t) . (b, t, n, d) -> (b, s, n, d)
        ctx = jnp.einsum("bnst,btnd->bsnd", probs, v)
        return ctx.reshape(b, s, n * d)


class SelfOutput(nnx.Module):
    def __init__(self, cfg: EncoderConfig, rngs: nnx.Rngs):
        self.dense = Dense(cfg.hidden_size, cfg.hidden_size, axes=("heads", "embed"), std=cfg.initializer_range, dtype=cfg.dtype, rngs=rngs)
        self.LayerNorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=cfg.dtype)
        self.rate = cfg.hidden_dropout_prob

    def __call__(self, h, residual, dropout_key):
        return self.LayerNorm(dropout(self.dense(h), self.rate, dropout_key) + residual)


class Attention(nnx.Module):
    def __init__(self, cfg: EncoderConfig, rngs: nnx.Rngs):
        self.self = SelfAttention(cfg, rngs)  # Hugging Face's attribute name
        self.output = SelfOutput(cfg, rngs)

    def __call__(self, x, mask_bias, key_probs, key_out):
        return self.output(self.self(x, mask_bias, key_probs), x, key_out)


class Intermediate(nnx.Module):
    def __init__(self, cfg: EncoderConfig, rngs: nnx.Rngs):
        self.dense = Dense(cfg.hidden_size, cfg.intermediate_size, axes=("embed", "mlp"), std=cfg.initializer_range,
                           dtype=cfg.dtype, rngs=rngs)
        self.act = _ACTIVATIONS[cfg.hidden_act]

    def __call__(self, x):
        return self.act(self.dense(x))


class Output(nnx.Module):
    def __init__(self, cfg: EncoderConfig, rngs: nnx.Rngs):
        self.dense = Dense(cfg.intermediate_size, cfg.hidden_size, axes=("mlp", "embed"), std=cfg.initializer_range,
                           dtype=cfg.dtype, rngs=rngs)
        self.LayerNorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=cfg.dtype)
        self.rate = cfg.hidden_dropout_prob

    def __call__(self, h, residual, dropout_key):
        return self.LayerNorm(dropout(self.dense(h), self.rate, dropout_key) + residual)


class Layer(nnx.Module):
    def __init__(self, cfg: EncoderConfig, rngs: nnx.Rngs):
        self.attention = Attention(cfg, rngs)
        self.intermediate = Intermediate(cfg, rngs)
        self.output = Output(cfg, rngs)

    def __call__(self, x, mask_bias, dropout_key):
        x = self.attention(x, mask_bias, _site_key(dropout_key, 0), _site_key(dropout_key, 1))
        return self.output(self.intermediate(x), x, _site_key(dropout_key, 2))


class Stack(nnx.Module):
    def __init__(self, cfg: EncoderConfig, rngs: nnx.Rngs):
        # A Python loop over layers, not lax.scan: XLA-CPU runs it 5-14 % faster (measured on a
        # 2-core machine), and the tree keeps Hugging Face's `encoder.layer.{i}` paths.
        self.layer = nnx.List([Layer(cfg, rngs) for _ in range(cfg.num_hidden_layers)])


class Pooler(nnx.Module):
    """BERT's pooler (dense + tanh). In simcse-jax it *is* the SimCSE MLP over [CLS]."""

    def __init__(self, cfg: EncoderConfig, rngs: nnx.Rngs):
        self.dense = Dense(cfg.hidden_size, cfg.hidden_size, axes=("embed", None), std=cfg.initializer_range, dtype=cfg.dtype, rngs=rngs)

    def __call__(self, cls_hidden):
        return jnp.tanh(self.dense(cls_hidden))


class BertPredictionTransform(nnx.Module):
    def __init__(self, cfg: EncoderConfig, rngs: nnx.Rngs):
        self.dense = Dense(cfg.hidden_size, cfg.hidden_size, axes=("embed", None), std=cfg.initializer_range, dtype=cfg.dtype, rngs=rngs)
        self.LayerNorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=cfg.dtype)
        self.act = _ACTIVATIONS[cfg.hidden_act]

    def __call__(self, x):
        return self.LayerNorm(self.act(self.dense(x)))


class BertPredictions(nnx.Module):
    def __init__(self, cfg: EncoderConfig, rngs: nnx.Rngs):
        self.transform = BertPredictionTransform(cfg, rngs)
        self.bias = nnx.Param(jnp.zeros((cfg.vocab_size,), jnp.float32), logical_axes=("vocab",))


class BertMLMHead(nnx.Module):
    """Hugging Face `cls.predictions`; the decoder is tied to the word embeddings."""

    def __init__(self, cfg: EncoderConfig, rngs: nnx.Rngs):
        self.predictions = BertPredictions(cfg, rngs)

    def __call__(self, x, word_embeddings):
        h = self.predictions.transform(x)
        # (b, s, H) . (V, H) -> (b, s, V), float32 logits for the cross-entropy.
        logits = jnp.einsum("bsh,vh->bsv", h, word_embeddings.astype(h.dtype), preferred_element_type=jnp.float32)
        return logits + self.predictions.bias[...]


class RobertaLMHead(nnx.Module):
    """Hugging Face `lm_head` (dense, gelu, layer_norm, tied decoder + bias)."""

    def __init__(self, cfg: EncoderConfig, rngs: nnx.Rngs):
        self.dense = Dense(cfg.hidden_size, cfg.hidden_size, axes=("embed", None), std=cfg.initializer_range, dtype=cfg.dtype, rngs=rngs)
        self.layer_norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=cfg.dtype)
        self.bias = nnx.Param(jnp.zeros((cfg.vocab_size,), jnp.float32), logical_axes=("vocab",))

    def __call__(self, x, word_embeddings):
        h = self.layer_norm(jax.nn.gelu(self.dense(x), approximate=False))
        logits = jnp.einsum("bsh,vh->bsv", h, word_embeddings.astype(h.dtype), preferred_element_type=jnp.float32)
        return logits + self.bias[...]


@dataclasses.dataclass
class EncoderOutput:
    last_hidden_state: jax.Array  # [b, s, H]
    hidden_states: tuple[jax.Array, ...] | None  # embeddings output + one per layer, when asked


jax.tree_util.register_dataclass(EncoderOutput, data_fields=["last_hidden_state", "hidden_states"], meta_fields=[])


class Encoder(nnx.Module):
    """Hugging Face `BertModel` / `RobertaModel` (plus the MLM head when `with_mlm_head`)."""

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.embeddings = Embeddings(cfg, rngs)
        self.encoder = Stack(cfg, rngs)
        self.pooler = Pooler(cfg, rngs)
        if cfg.with_mlm_head:
            if cfg.model_type == "roberta":
                self.lm_head = RobertaLMHead(cfg, rngs)
            else:
                self.cls = BertMLMHead(cfg, rngs)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        *,
        dropout_key: jax.Array | None = None,
        output_hidden_states: bool = False,
    ) -> EncoderOutput:
        """input_ids [b, s] int; attention_mask [b, s] 1 for tokens, 0 for padding.

        dropout_key None runs in eval mode (no dropout), which equals PyTorch `model.eval()`.
        """
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        # Additive bias over keys: 0 for tokens, a large negative for padding. float32 min (as
        # Hugging Face's eager path) so padded keys get exactly zero probability after softmax.
        mask_bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min)
        x = self.embeddings(input_ids, token_type_ids, _site_key(dropout_key, self.config.num_hidden_layers))
        x = constrain_rows(x)
        states = [x]
        for i, layer in enumerate(self.encoder.layer):
            x = constrain_rows(layer(x, mask_bias, _site_key(dropout_key, i)))
            states.append(x)
        return EncoderOutput(x, tuple(states) if output_hidden_states else None)

    def mlm_logits(self, hidden: jax.Array) -> jax.Array:
        """Vocabulary logits [b, s, V] in float32 from the MLM head (needs `with_mlm_head`)."""
        word = self.embeddings.word_embeddings.embedding[...]
        if self.config.model_type == "roberta":
            return self.lm_head(hidden, word)
        return self.cls(hidden, word)


def encoder_graphdef(cfg: EncoderConfig) -> nnx.GraphDef:
    """The encoder's graph for `cfg` (structure and static settings such as the compute dtype),
    without allocating a weight: merged with any parameter state of the same architecture."""
    return nnx.split(nnx.eval_shape(lambda: Encoder(cfg, rngs=nnx.Rngs(0))), nnx.Param)[0]


def with_compute_dtype(model: Encoder, compute_dtype: str) -> Encoder:
    """The same (float32) parameters computing in `compute_dtype`; `model` itself if it already does.

    Why: a model trained in bfloat16 is evaluated and exported in float32 (what transformers,
    sentence-transformers and SentEval compute on the exported folder), see train.py.
    """
    if model.config.compute_dtype == compute_dtype:
        return model
    cfg = dataclasses.replace(model.config, compute_dtype=compute_dtype)
    return nnx.merge(encoder_graphdef(cfg), nnx.state(model, nnx.Param))

