"""`contrastive_impl` through the whole update step: with gradient caching, MLM, supervised hard
negatives and dropout, three blockwise or ring steps leave the parameters of three dense steps
(to 1e-5); in bfloat16 too; and with gradient caching the compiled step's temporaries grow
linearly with the batch for blockwise and ring, quadratically for dense."""

import jax
import numpy as np
import pytest
from flax import nnx

from simcse_jax.encoder import Encoder, EncoderConfig
from simcse_jax.objective import ObjectiveConfig
from simcse_jax.optim import OptimConfig, make_optimizer
from simcse_jax.sharding import batch_sharding, make_mesh
from simcse_jax.train_step import init_train_state, make_train_step

FAST_COMPILE = dict(xla_backend_optimization_level=0, xla_llvm_disable_expensive_passes=True)
TINY = dict(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64, with_mlm_head=True)
L = 8


def _batch(b, mesh, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, 100, (b, 3, L)).astype(np.int32)  # sent0, sent1, hard negative
    mask = np.ones_like(ids)
    mask[::3, :, -2:] = 0
    chosen = (rng.random(ids.shape) < 0.3) & (mask > 0)
    batch = dict(input_ids=ids, attention_mask=mask, token_type_ids=np.zeros_like(ids),
                 mlm_input_ids=np.where(chosen, 3, ids).astype(np.int32), mlm_labels=np.where(chosen, ids, -100).astype(np.int32))
    return jax.device_put(batch, batch_sharding(mesh, 3))


def _step(mesh, objective, compute_dtype="float32", dropout=0.1):
    cfg = EncoderConfig(**TINY, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, compute_dtype=compute_dtype)
    optim = OptimConfig(total_steps=10, learning_rate=1e-3)
    optimizer = make_optimizer(optim)
    graphdef, state, sh = init_train_state(Encoder(cfg, rngs=nnx.Rngs(1)), optimizer, mesh)
    return make_train_step(graphdef, optimizer, mesh, sh, objective, optim, compiler_options=FAST_COMPILE), state


def _train(mesh, impl, steps=3, compute_dtype="float32", **objective):
    cfg = ObjectiveConfig(hard_negative_weight=1.0, do_mlm=True, grad_cache_chunk_size=16, contrastive_impl=impl,
                          contrastive_block_size=12, **objective)
    step, state = _step(mesh, cfg, compute_dtype)
    batch, losses = _batch(48, mesh), []
    for s in range(steps):
        state, meas = step(state, batch, jax.random.key(s))
        losses.append({k: float(v) for k, v in meas.items()})
    return state.params, losses


def _close(tree, ref, rtol):
    """Every leaf within rtol of its own largest entry, except the attention key bias: its gradient
    is zero in exact arithmetic (a constant added to a query's logits), so it holds rounding noise
    that Adam scales up, in any two implementations alike; it is held to rtol of the largest parameter."""
    scale = max(np.abs(np.asarray(b)).max() for b in jax.tree.leaves(ref))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(tree), jax.tree.leaves(ref), strict=True):
        a, b, name = np.asarray(a), np.asarray(b), jax.tree_util.keystr(path)
        err = np.abs(a - b).max()
        assert err <= rtol * (scale if "['key']['bias']" in name else np.abs(b).max()), f"{name}: {err}"


@pytest.mark.parametrize("axes", [{"data": 4, "fsdp": 2}, {"data": 2, "fsdp": 2, "tensor": 2}],
                         ids=lambda a: ",".join(f"{k}={v}" for k, v in a.items()))
def test_three_grad_cached_steps_equal_the_dense_steps(axes):
    mesh = make_mesh(axes)
    ref_params, ref_losses = _train(mesh, "dense")
    for impl in ("blockwise", "ring"):
        params, losses = _train(mesh, impl)
        for got, want in zip(losses, ref_losses):
            for k in ("loss", "simcse_loss", "mlm_loss", "alignment", "uniformity", "grad_norm"):
                assert got[k] == pytest.approx(want[k], rel=1e-5), (impl, k)
            assert got["accuracy"] == want["accuracy"]
        _close(params, ref_params, 1e-5)
    assert ref_losses[2]["loss"] != ref_losses[0]["loss"]  # the steps did move the parameters


def test_bfloat16_compute_trains_alike_with_every_impl():
    """bf16 encoder (float32 parameters, loss in float32): blockwise and ring give the dense step's
    measurements and parameters to bf16 rounding."""
    mesh = make_mesh({"data": 8})
    ref_params, ref_losses = _train(mesh, "dense", steps=2, compute_dtype="bfloat16")
    for impl in ("blockwise", "ring"):
        params, losses = _train(mesh, impl, steps=2, compute_dtype="bfloat16")
        for got, want in zip(losses, ref_losses):
            assert got["loss"] == pytest.approx(want["loss"], rel=1e-3), impl
        _close(params, ref_params, 1e-2)


def _temp_bytes(impl, b, mesh):
    cfg = ObjectiveConfig(grad_cache_chunk_size=64, contrastive_impl=impl, contrastive_block_size=128)
    step, state = _step(mesh, cfg, dropout=0.0)
    ids = jax.ShapeDtypeStruct((b, 2, L), np.int32, sharding=batch_sharding(mesh, 3))
    batch = dict(input_ids=ids, attention_mask=ids, token_type_ids=ids)
    compiled = step.lower(state, batch, jax.random.key(0)).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_step_temporaries_grow_linearly_with_the_batch_for_blockwise_and_ring():
    """cpu:8, gradient caching with a fixed chunk, a tiny encoder and batches where the logits
    dominate: 4x the batch costs <= 4.5x the temporaries for blockwise and ring, ~16x for dense."""
    mesh = make_mesh({"data": 8})
    b = 1024
    growth = {impl: _temp_bytes(impl, 4 * b, mesh) / _temp_bytes(impl, b, mesh) for impl in ("dense", "blockwise", "ring")}
    assert growth["dense"] > 12, growth  # the B/8 x B logits and their gradient
    assert growth["blockwise"] <= 4.5 and growth["ring"] <= 4.5, growth
