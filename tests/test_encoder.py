"""The JAX encoder *is* the Hugging Face PyTorch model: same outputs to fp32 precision."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import REAL_SENTENCES

from simcse_jax.encoder import Encoder, EncoderConfig
from simcse_jax.hf_io import load_pretrained, load_tokenizer

ATOL = 1e-5


def torch_outputs(model_dir, input_ids, attention_mask, token_type_ids=None):
    model = transformers.AutoModel.from_pretrained(str(model_dir)).eval()
    kwargs = dict(input_ids=torch.tensor(input_ids), attention_mask=torch.tensor(attention_mask))
    if token_type_ids is not None:
        kwargs["token_type_ids"] = torch.tensor(token_type_ids)
    with torch.no_grad():
        out = model(**kwargs, output_hidden_states=True)
    return [h.numpy() for h in out.hidden_states]


def jax_outputs(model, input_ids, attention_mask, token_type_ids=None):
    out = model(
        jnp.asarray(input_ids),
        jnp.asarray(attention_mask),
        None if token_type_ids is None else jnp.asarray(token_type_ids),
        output_hidden_states=True,
    )
    return [np.asarray(h) for h in out.hidden_states], np.asarray(out.last_hidden_state)


def assert_hidden_states_equal(ours, theirs, attention_mask):
    assert len(ours) == len(theirs)
    valid = np.asarray(attention_mask, bool)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        # Padded positions are garbage in both frameworks (and unused); compare real tokens.
        diff = np.abs(a - b)[valid].max()
        assert diff <= ATOL, f"hidden_states[{i}] differs by {diff}"


def test_minilm_real_weights_equal_transformers(minilm_dir):
    loaded = load_pretrained(minilm_dir)
    tok = load_tokenizer(minilm_dir)
    batch = tok(REAL_SENTENCES, padding=True, return_tensors="np")
    assert batch["attention_mask"].min() == 0, "the batch must contain padding"
    ours, last = jax_outputs(loaded.model, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    theirs = torch_outputs(minilm_dir, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    assert len(ours) == 7  # embeddings + 6 layers
    assert_hidden_states_equal(ours, theirs, batch["attention_mask"])
    np.testing.assert_array_equal(last, ours[-1])


def _random_batch(rng, vocab, pad_id, side, special_low=3):
    lengths = [12, 7, 3, 12, 9]
    ids = np.full((len(lengths), 12), pad_id, np.int64)
    mask = np.zeros_like(ids)
    for r, n in enumerate(lengths):
        tokens = rng.integers(special_low, vocab, n)
        sl = slice(0, n) if side == "right" else slice(12 - n, 12)
        ids[r, sl], mask[r, sl] = tokens, 1
    return ids, mask


@pytest.mark.parametrize("arch", ["bert", "roberta"])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("with_token_types", [True, False])
def test_random_architectures_equal_transformers(tmp_path, arch, side, with_token_types):
    common = dict(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=40, layer_norm_eps=1e-7,
    )
    if arch == "bert":
        cfg = transformers.BertConfig(**common, type_vocab_size=3, pad_token_id=0)
        model = transformers.BertModel(cfg)
    else:
        cfg = transformers.RobertaConfig(**common, type_vocab_size=2, pad_token_id=1)
        model = transformers.RobertaModel(cfg)
    torch.manual_seed(0)
    # Non-trivial LayerNorm and bias values, so a swapped or skipped parameter cannot hide.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    rng = np.random.default_rng(0)
    ids, mask = _random_batch(rng, 99, cfg.pad_token_id, side)
    types = rng.integers(0, cfg.type_vocab_size, ids.shape) if with_token_types else None
    loaded = load_pretrained(tmp_path)
    assert loaded.model.config.model_type == arch
    assert loaded.model.config.layer_norm_eps == 1e-7
    ours, _ = jax_outputs(loaded.model, ids, mask, types)
    theirs = torch_outputs(tmp_path, ids, mask, types)
    assert_hidden_states_equal(ours, theirs, mask)


def test_roberta_position_ids_skip_padding():
    cfg = EncoderConfig(model_type="roberta", vocab_size=50, hidden_size=8, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=8, pad_token_id=1)
    model = Encoder(cfg, rngs=__import__("flax").nnx.Rngs(0))
    ids = jnp.array([[1, 1, 5, 6, 7], [5, 6, 1, 1, 1]])
    np.testing.assert_array_equal(model.embeddings.position_ids(ids), [[1, 1, 2, 3, 4], [2, 3, 1, 1, 1]])


def test_dropout_keys_control_the_noise(minilm_dir):
    loaded = load_pretrained(minilm_dir)
    tok = load_tokenizer(minilm_dir)
    batch = tok(REAL_SENTENCES[:3], padding=True, return_tensors="np")
    ids, mask = jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])
    run = jax.jit(lambda key: loaded.model(ids, mask, dropout_key=key).last_hidden_state)
    a = run(jax.random.key(1))
    b = run(jax.random.key(1))
    c = run(jax.random.key(2))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-2
    # Deterministic mode is PyTorch eval mode.
    eval_out = np.asarray(loaded.model(ids, mask).last_hidden_state)
    theirs = torch_outputs(minilm_dir, batch["input_ids"], batch["attention_mask"])[-1]
    assert np.abs(eval_out - theirs)[batch["attention_mask"].astype(bool)].max() <= ATOL
    assert np.abs(np.asarray(a) - eval_out).max() > 1e-2


def test_bf16_compute_keeps_fp32_params_and_stays_close(minilm_dir):
    loaded32 = load_pretrained(minilm_dir)
    loaded16 = load_pretrained(minilm_dir, compute_dtype="bfloat16")
    leaves = jax.tree.leaves(__import__("flax").nnx.state(loaded16.model))
    assert all(x.dtype == jnp.float32 for x in leaves)
    tok = load_tokenizer(minilm_dir)
    batch = tok(REAL_SENTENCES, padding=True, return_tensors="np")
    h32 = np.asarray(loaded32.model(jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])).last_hidden_state)
    out16 = loaded16.model(jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])).last_hidden_state
    assert out16.dtype == jnp.bfloat16
    h16 = np.asarray(out16.astype(jnp.float32))
    cos = (h16 * h32).sum(-1) / np.linalg.norm(h16, axis=-1) / np.linalg.norm(h32, axis=-1)
    assert cos[batch["attention_mask"].astype(bool)].min() > 0.99
