"""The training objective: one forward over interleaved views with independent dropout, sharded ==
unsharded on four meshes, the MLP-only-in-training pooler, and the refusal of micro-batching."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from simcse_jax.encoder import Encoder, EncoderConfig
from simcse_jax.losses import simcse_loss_shard_map
from simcse_jax.objective import (
    ObjectiveConfig,
    check_batch,
    embed_views,
    eval_embeddings,
    from_chunks,
    num_chunks_for,
    objective_fn,
    to_chunks,
)
from simcse_jax.sharding import batch_sharding, make_mesh, param_shardings

# Test jits compile with LLVM's cheap pipeline: compiles dominate these tests on 2 cores, and the
# backend optimisation level does not change what is computed (tolerances are unchanged).
FAST_COMPILE = dict(xla_backend_optimization_level=0, xla_llvm_disable_expensive_passes=True)
TINY = dict(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)


def tiny_model(dropout=0.1, mlm=True, seed=0):
    cfg = EncoderConfig(**TINY, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, with_mlm_head=mlm)
    return Encoder(cfg, rngs=nnx.Rngs(seed))


def make_batch(b=16, num_sent=2, length=8, seed=0, mlm=True):
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, 100, (b, num_sent, length)).astype(np.int32)
    if num_sent == 2:
        ids[:, 1] = ids[:, 0]  # unsup: the sentence twice, as the reference collator does
    mask = np.ones_like(ids)
    mask[: b // 2, :, length - 3 :] = 0  # some padding
    ids = np.where(mask > 0, ids, 0)
    batch = dict(input_ids=ids, attention_mask=mask, token_type_ids=np.zeros_like(ids))
    if mlm:
        chosen = (rng.random(ids.shape) < 0.3) & (mask > 0)
        batch["mlm_input_ids"] = np.where(chosen, 3, ids).astype(np.int32)
        batch["mlm_labels"] = np.where(chosen, ids, -100).astype(np.int32)
    return {k: jnp.asarray(v) for k, v in batch.items()}


def test_unsup_views_get_independent_dropout_and_equal_when_deterministic():
    model = tiny_model(dropout=0.1, mlm=False)
    batch = make_batch(num_sent=2, mlm=False)
    cfg = ObjectiveConfig()
    graphdef, params = nnx.split(model, nnx.Param)
    f = jax.jit(lambda p, b, k: embed_views(nnx.merge(graphdef, p), b, cfg, k), compiler_options=FAST_COMPILE)
    train = np.asarray(f(params, batch, jax.random.key(0)))
    det = np.asarray(f(params, batch, None))
    # Deterministic: the two views of a sentence are the same input, hence the same vector.
    np.testing.assert_allclose(det[:, 0], det[:, 1], rtol=1e-6, atol=1e-6)
    # Training: every sentence's two views differ (their dropout masks differ), on every row.
    diff = np.linalg.norm(train[:, 0] - train[:, 1], axis=-1)
    assert (diff > 1e-3 * np.linalg.norm(train[:, 0], axis=-1)).all()
    assert not np.allclose(train, det, atol=1e-3)


def test_dropout_masks_do_not_depend_on_sharding():
    model = tiny_model(dropout=0.1, mlm=False)
    batch = make_batch(num_sent=2, mlm=False)
    cfg = ObjectiveConfig()
    graphdef, params = nnx.split(model, nnx.Param)
    f = jax.jit(lambda p, b, k: embed_views(nnx.merge(graphdef, p), b, cfg, k), compiler_options=FAST_COMPILE)
    single = f(params, batch, jax.random.key(3))
    mesh = make_mesh({"data": 4, "tensor": 2})
    with jax.set_mesh(mesh):
        sharded = f(jax.device_put(params, param_shardings(params, mesh)), jax.device_put(batch, batch_sharding(mesh, 3)),
                    jax.random.key(3))
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), rtol=1e-5, atol=1e-6)


def test_cls_pooler_uses_mlp_in_training_and_mlp_only_train_drops_it_at_eval():
    model = tiny_model(dropout=0.0, mlm=False)
    batch = make_batch(num_sent=2, mlm=False)
    ids, mask, tt = (batch[k][:, 0] for k in ("input_ids", "attention_mask", "token_type_ids"))
    cls_vec = model(ids, mask, tt).last_hidden_state[:, 0]
    with_mlp = np.asarray(model.pooler(cls_vec))
    cfg = ObjectiveConfig(pooler="cls", mlp_only_train=True)
    np.testing.assert_allclose(np.asarray(embed_views(model, batch, cfg, None))[:, 0], with_mlp, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(eval_embeddings(model, ids, mask, tt, cfg)), np.asarray(cls_vec), rtol=1e-5, atol=1e-6)
    keep = ObjectiveConfig(pooler="cls", mlp_only_train=False)
    np.testing.assert_allclose(np.asarray(eval_embeddings(model, ids, mask, tt, keep)), with_mlp, rtol=1e-5, atol=1e-6)


MESHES = [{"data": 8}, {"data": 4, "tensor": 2}, {"fsdp": 8}, {"data": 2, "fsdp": 2, "tensor": 2}]


def _rel_close(tree, ref, rtol):
    """Per leaf, max error <= rtol x the leaf's max |ref|. Leaves whose exact gradient is zero (the
    attention key bias: softmax is invariant to it) hold rounding noise, hence the floor at 1e-4 of
    the largest gradient entry."""
    floor = 1e-4 * max(np.abs(np.asarray(b)).max() for b in jax.tree.leaves(ref))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(tree), jax.tree.leaves(ref)):
        a, b = np.asarray(a), np.asarray(b)
        err = np.abs(a - b).max()
        assert err <= rtol * max(np.abs(b).max(), floor), f"{jax.tree_util.keystr(path)}: max err {err}, max |ref| {np.abs(b).max()}"


@pytest.mark.slow
def test_sharded_objective_equals_single_device_on_meshes():
    """Loss and gradient of the full objective (hard negatives, MLM, encoder; dropout off)."""
    model = tiny_model(dropout=0.1, mlm=True)
    batch = make_batch(num_sent=3, mlm=True)
    cfg = ObjectiveConfig(hard_negative_weight=1.5, do_mlm=True, mlm_weight=0.1)
    graphdef, params = nnx.split(model, nnx.Param)

    def loss_fn(p, b):
        return objective_fn(graphdef, p, b, None, cfg)

    grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True), compiler_options=FAST_COMPILE)
    (ref_loss, ref_meas), ref_grads = grad_fn(params, batch)
    assert float(ref_meas["mlm_loss"]) > 0 and float(ref_meas["simcse_loss"]) > 0
    z = embed_views(model, batch, cfg, None)
    for axes in MESHES:
        mesh = make_mesh(axes)
        p = jax.device_put(params, param_shardings(params, mesh))
        b = jax.device_put(batch, batch_sharding(mesh, 3))
        with jax.set_mesh(mesh):
            (loss, meas), grads = grad_fn(p, b)
            twin = jax.jit(lambda z, mesh=mesh: simcse_loss_shard_map(z[:, 0], z[:, 1], z[:, 2], mesh=mesh, hard_negative_weight=1.5))(
                jax.device_put(z, batch_sharding(mesh, 3))
            )
        np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5, err_msg=str(axes))
        np.testing.assert_allclose(float(twin), float(ref_meas["simcse_loss"]), rtol=1e-5, err_msg=str(axes))
        _rel_close(grads, ref_grads, 1e-5)


def test_chunk_layout_spreads_every_chunk_over_all_devices():
    x = jnp.arange(16)
    chunks = np.asarray(to_chunks(x, num_chunks=2, data_parallel=4))  # device d holds rows 4d..4d+3
    np.testing.assert_array_equal(chunks[0], [0, 1, 4, 5, 8, 9, 12, 13])
    np.testing.assert_array_equal(np.asarray(from_chunks(jnp.asarray(chunks), 4)), np.arange(16))


def test_bad_configs_and_batches_are_refused_with_the_key_named():
    with pytest.raises(ValueError, match="gradient_accumulation_steps.*not equivalent.*grad_cache_chunk_size"):
        ObjectiveConfig(gradient_accumulation_steps=4)
    with pytest.raises(ValueError, match="objective.pooler"):
        ObjectiveConfig(pooler="max")
    with pytest.raises(ValueError, match=r"grad_cache_chunk_size: .*\(got 6\)"):
        num_chunks_for(ObjectiveConfig(grad_cache_chunk_size=6), 16, 2)
    with pytest.raises(ValueError, match="multiple of the data-parallel size 4"):
        num_chunks_for(ObjectiveConfig(grad_cache_chunk_size=2), 16, 4)
    assert num_chunks_for(ObjectiveConfig(grad_cache_chunk_size=8), 32, 4) == 4
    with pytest.raises(KeyError, match="mlm_input_ids"):
        check_batch(make_batch(mlm=False), ObjectiveConfig(do_mlm=True))
    with pytest.raises(ValueError, match=r"\[B, num_sent"):
        check_batch({k: v[:, 0] for k, v in make_batch(mlm=False).items()}, ObjectiveConfig())
