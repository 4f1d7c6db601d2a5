"""Each SimCSE pooler equals a straightforward PyTorch computation on the same hidden states, and
every pooler name has a JAX computation, a torch twin, an export mapping and an evaluation rule."""

from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from simcse_jax import poolers
from simcse_jax.encoder import Encoder, EncoderConfig, EncoderOutput
from simcse_jax.poolers import POOLERS, eval_pooler, needs_hidden_states, pool, spec, st_pooling_mode


def torch_pool(name, hidden_states, mask, dense_w, dense_b):
    """The reference `simcse.models.Pooler.forward`, written out in torch."""
    hs = [torch.tensor(h) for h in hidden_states]
    last, m = hs[-1], torch.tensor(mask, dtype=torch.float32)
    if name == "cls_before_pooler":
        return last[:, 0]
    if name == "cls":
        return torch.tanh(torch.nn.functional.linear(last[:, 0], torch.tensor(dense_w), torch.tensor(dense_b)))
    if name == "avg":
        return (last * m.unsqueeze(-1)).sum(1) / m.sum(-1).unsqueeze(-1)
    if name == "avg_first_last":
        return ((hs[1] + last) / 2.0 * m.unsqueeze(-1)).sum(1) / m.sum(-1).unsqueeze(-1)
    if name == "avg_top2":
        return ((hs[-2] + last) / 2.0 * m.unsqueeze(-1)).sum(1) / m.sum(-1).unsqueeze(-1)
    raise AssertionError(name)


@pytest.mark.parametrize("name", POOLERS)
def test_pooler_matches_torch(name):
    rng = np.random.default_rng(0)
    cfg = EncoderConfig(vocab_size=10, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=8)
    model = Encoder(cfg, rngs=nnx.Rngs(0))
    hidden = [rng.normal(size=(4, 7, 16)).astype(np.float32) for _ in range(4)]
    mask = np.array([[1] * 7, [1] * 3 + [0] * 4, [0, 0, 1, 1, 1, 1, 0], [1] + [0] * 6], np.int32)
    # Padding garbage must not leak into the averages.
    for h in hidden:
        h[mask == 0] = 1e3
    out = EncoderOutput(jnp.asarray(hidden[-1]), tuple(jnp.asarray(h) for h in hidden))
    ours = np.asarray(pool(name, out, jnp.asarray(mask), model))
    w = np.asarray(model.pooler.dense.kernel[...]).T
    b = np.asarray(model.pooler.dense.bias[...])
    theirs = torch_pool(name, hidden, mask, w, b).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)


def test_cls_without_mlp_is_cls_before_pooler():
    cfg = EncoderConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    model = Encoder(cfg, rngs=nnx.Rngs(0))
    h = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3, 8)), jnp.float32)
    out = EncoderOutput(h, None)
    mask = jnp.ones((2, 3), jnp.int32)
    np.testing.assert_array_equal(pool("cls", out, mask, model, apply_mlp=False), pool("cls_before_pooler", out, mask))


def test_unknown_pooler_and_missing_hidden_states_are_errors():
    out = EncoderOutput(jnp.zeros((1, 2, 4)), None)
    with pytest.raises(ValueError, match="unknown pooler 'max'"):
        pool("max", out, jnp.ones((1, 2)))
    with pytest.raises(ValueError, match="output_hidden_states=True"):
        pool("avg_top2", out, jnp.ones((1, 2)))


@pytest.mark.parametrize("name", POOLERS)
def test_every_pooler_has_a_torch_twin_an_export_mapping_and_an_evaluation_rule(name):
    """A pooler is one row of poolers.py: this runs each row through everything that reads it."""
    rng = np.random.default_rng(2)
    cfg = EncoderConfig(vocab_size=10, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=8)
    model = Encoder(cfg, rngs=nnx.Rngs(0))
    hidden = [rng.normal(size=(3, 5, 16)).astype(np.float32) for _ in range(4)]
    mask = np.array([[1] * 5, [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]], np.int32)
    out = EncoderOutput(jnp.asarray(hidden[-1]), tuple(jnp.asarray(h) for h in hidden))
    ours = np.asarray(pool(name, out, jnp.asarray(mask), model))

    # The torch twin (evaluation of a Hugging Face folder): transformers' pooler_output is the MLP.
    w, b = (torch.tensor(np.asarray(v)) for v in (model.pooler.dense.kernel[...], model.pooler.dense.bias[...]))
    last = torch.tensor(hidden[-1])
    outputs = SimpleNamespace(last_hidden_state=last, hidden_states=tuple(torch.tensor(h) for h in hidden),
                              pooler_output=torch.tanh(last[:, 0] @ w + b))
    np.testing.assert_allclose(poolers.torch_pool(name, outputs, torch.tensor(mask)).numpy(), ours, rtol=1e-6, atol=1e-6)

    # The export: sentence-transformers pools the same token(s), or the export says it cannot.
    mode = st_pooling_mode(name)
    assert mode in (spec(name).token, None)
    assert (mode is None) == needs_hidden_states(name)  # ST pools the last layer only

    # The evaluation rule: mlp_only_train evaluates the same pooling without the MLP.
    plain = eval_pooler(name, mlp_only_train=True)
    assert eval_pooler(name, mlp_only_train=False) == name and not spec(plain).mlp
    np.testing.assert_array_equal(np.asarray(pool(plain, out, jnp.asarray(mask), model)),
                                  np.asarray(pool(name, out, jnp.asarray(mask), model, apply_mlp=False)))
    assert eval_pooler(name, mlp_only_train=True, explicit="avg") == "avg"
