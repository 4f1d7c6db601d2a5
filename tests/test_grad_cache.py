"""Gradient caching gives the full-batch gradient: exactly the same function of the parameters as
the one-graph objective (dropout off), and the same as the one-graph objective with per-chunk
dropout keys (dropout on). Sharded over a (data=2, fsdp=2) mesh of 4 devices (every chunk spans
all of them), with the MLM term."""

import jax
import numpy as np
import pytest
from flax import nnx

from simcse_jax.encoder import Encoder, EncoderConfig
from simcse_jax.grad_cache import grad_cache_value_and_grad
from simcse_jax.objective import ObjectiveConfig, num_chunks_for, objective_fn
from simcse_jax.sharding import batch_sharding, data_parallel_size, make_mesh, param_shardings

FAST_COMPILE = dict(xla_backend_optimization_level=0, xla_llvm_disable_expensive_passes=True)
TINY = dict(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
B, L = 16, 8


def _setup(dropout):
    cfg = EncoderConfig(**TINY, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, with_mlm_head=True)
    graphdef, params = nnx.split(Encoder(cfg, rngs=nnx.Rngs(1)), nnx.Param)
    rng = np.random.default_rng(2)
    ids = rng.integers(5, 100, (B, 1, L)).astype(np.int32).repeat(2, axis=1)
    mask = np.ones_like(ids)
    mask[::3, :, -2:] = 0
    chosen = (rng.random(ids.shape) < 0.3) & (mask > 0)
    batch = dict(
        input_ids=ids, attention_mask=mask, token_type_ids=np.zeros_like(ids),
        mlm_input_ids=np.where(chosen, 3, ids).astype(np.int32), mlm_labels=np.where(chosen, ids, -100).astype(np.int32),
    )
    mesh = make_mesh({"data": 2, "fsdp": 2}, devices=jax.devices()[:4])
    params = jax.device_put(params, param_shardings(params, mesh))
    batch = jax.device_put(batch, batch_sharding(mesh, 3))
    return graphdef, params, batch, mesh


def _close(tree, ref, rtol=1e-5):
    floor = 1e-4 * max(np.abs(np.asarray(b)).max() for b in jax.tree.leaves(ref))  # zero-gradient leaves hold noise
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(tree), jax.tree.leaves(ref)):
        err = np.abs(np.asarray(a) - np.asarray(b)).max()
        assert err <= rtol * max(np.abs(np.asarray(b)).max(), floor), f"{jax.tree_util.keystr(path)}: {err}"


CFG = dict(do_mlm=True, mlm_weight=0.1, temperature=0.05)


def _full(graphdef, cfg, num_chunks, dp):
    f = lambda p, b, k: objective_fn(graphdef, p, b, k, cfg, num_chunks=num_chunks, data_parallel=dp)  # noqa: E731
    return jax.jit(jax.value_and_grad(f, has_aux=True), compiler_options=FAST_COMPILE)


def _cached(graphdef, cfg, num_chunks, dp):
    f = lambda p, b, k: grad_cache_value_and_grad(graphdef, p, b, k, cfg, num_chunks=num_chunks, data_parallel=dp)  # noqa: E731
    return jax.jit(f, compiler_options=FAST_COMPILE)


@pytest.mark.slow
def test_cached_gradient_equals_full_batch_gradient_without_dropout():
    graphdef, params, batch, mesh = _setup(dropout=0.0)
    dp = data_parallel_size(mesh)
    with jax.set_mesh(mesh):
        (ref_obj, ref_meas), ref_grads = _full(graphdef, ObjectiveConfig(**CFG), 1, dp)(params, batch, None)
        for chunk in (4, 8):  # both multiples of the 4 data-parallel devices, dividing B = 16
            cfg = ObjectiveConfig(**CFG, grad_cache_chunk_size=chunk)
            n = num_chunks_for(cfg, B, dp)
            assert n == B // chunk
            (obj, meas), grads = _cached(graphdef, cfg, n, dp)(params, batch, None)
            np.testing.assert_allclose(float(obj), float(ref_obj), rtol=1e-6)
            for k in ("loss", "simcse_loss", "mlm_loss", "accuracy", "alignment", "uniformity"):
                np.testing.assert_allclose(float(meas[k]), float(ref_meas[k]), rtol=1e-5, err_msg=k)
            _close(grads, ref_grads)


@pytest.mark.slow
def test_cached_gradient_with_dropout_equals_one_graph_gradient_with_the_same_chunk_keys():
    graphdef, params, batch, mesh = _setup(dropout=0.1)
    dp = data_parallel_size(mesh)
    cfg = ObjectiveConfig(**CFG, grad_cache_chunk_size=8)
    key = jax.random.key(11)
    with jax.set_mesh(mesh):
        (ref_obj, _), ref_grads = _full(graphdef, cfg, 2, dp)(params, batch, key)
        (obj, _), grads = _cached(graphdef, cfg, 2, dp)(params, batch, key)
        (other_obj, _), _ = _cached(graphdef, cfg, 2, dp)(params, batch, jax.random.key(12))
    np.testing.assert_allclose(float(obj), float(ref_obj), rtol=1e-6)
    _close(grads, ref_grads)
    # Dropout is really on: another step key gives another loss.
    assert abs(float(other_obj) - float(obj)) > 1e-4


def test_chunk_size_must_divide_batch_and_span_devices():
    with pytest.raises(ValueError, match=r"grad_cache_chunk_size: must divide global_batch_size 16.*\(got 6\)"):
        num_chunks_for(ObjectiveConfig(grad_cache_chunk_size=6), 16, 2)
