"""The blockwise and ring SimCSE losses equal the dense one: loss, accuracy and the gradients with
respect to z1, z2, z3 within 1e-6 relative in float32, with and without hard negatives and their
weight, with a batch that is not a multiple of the block size, on the four meshes of
test_sharding.py; uniformity likewise; and neither forms a B x B array."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from simcse_jax.losses import (
    simcse_loss_and_accuracy,
    simcse_loss_and_accuracy_blockwise,
    simcse_loss_and_accuracy_ring,
    uniformity,
    uniformity_blockwise,
    uniformity_ring,
)
from simcse_jax.sharding import make_mesh

B, H = 40, 24  # 40 = 2 blocks of 16 + 8, and 5 rows per device on 8 devices (blocks of 3: 3 + 2)
MESHES = [{"data": 8}, {"data": 4, "tensor": 2}, {"fsdp": 8}, {"data": 2, "fsdp": 2, "tensor": 2}]
CASES = {"pairs": (2, 0.0), "hard-negatives": (3, 0.0), "weighted-hard-negatives": (3, 1.5)}
IMPLS = {
    "blockwise": lambda *z, **kw: simcse_loss_and_accuracy_blockwise(*z, **kw, block_size=16),
    "ring": lambda *z, **kw: simcse_loss_and_accuracy_ring(*z, **kw, block_size=3),
}


def _embeddings(n, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(B, H))
    # Positives near their anchor so the loss is neither trivial nor saturated.
    return [jnp.asarray(z, dtype) for z in [base] + [base + rng.normal(scale=1.5, size=(B, H)) for _ in range(n - 1)]]


def _value_and_grads(fn, zs, **kw):
    return jax.jit(jax.value_and_grad(lambda *z: fn(*z, **kw), argnums=tuple(range(len(zs))), has_aux=True))(*zs)


def assert_equal_to_dense(result, expected, rtol=1e-6):
    (loss, acc), grads = result
    (e_loss, e_acc), e_grads = expected
    assert abs(float(loss) - float(e_loss)) <= rtol * abs(float(e_loss))
    assert float(acc) == float(e_acc)
    for g, e in zip(grads, e_grads, strict=True):
        g, e = np.asarray(g, np.float32), np.asarray(e, np.float32)
        assert np.abs(g - e).max() <= rtol * np.abs(e).max(), np.abs(g - e).max() / np.abs(e).max()


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("impl", IMPLS)
def test_equal_to_dense_on_one_device(impl, case):
    n, weight = CASES[case]
    zs = _embeddings(n, seed=n + int(weight))
    kw = dict(temperature=0.05, hard_negative_weight=weight)
    expected = _value_and_grads(simcse_loss_and_accuracy, zs, **kw)
    assert 0.0 < float(expected[0][1]) < 1.0  # some rows right and some wrong: accuracy is tested
    assert_equal_to_dense(_value_and_grads(IMPLS[impl], zs, **kw), expected)


@pytest.mark.parametrize("axes", MESHES, ids=lambda a: ",".join(f"{k}={v}" for k, v in a.items()))
@pytest.mark.parametrize("impl", IMPLS)
def test_equal_to_dense_on_meshes(impl, axes):
    mesh = make_mesh(axes)
    zs = _embeddings(3, seed=7)
    kw = dict(temperature=0.05, hard_negative_weight=1.5)
    expected = _value_and_grads(simcse_loss_and_accuracy, zs, **kw)
    with jax.set_mesh(mesh):
        sharded = jax.device_put(zs, NamedSharding(mesh, P(("data", "fsdp"))))
        result = _value_and_grads(IMPLS[impl], sharded, **kw)
    assert_equal_to_dense(result, expected)
    assert result[1][0].sharding.is_equivalent_to(sharded[0].sharding, 2)  # gradients stay row-sharded


def test_ring_without_hard_negatives_on_a_mesh():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    zs = _embeddings(2, seed=11)
    expected = _value_and_grads(simcse_loss_and_accuracy, zs, temperature=0.1)
    with jax.set_mesh(mesh):
        result = _value_and_grads(IMPLS["ring"], jax.device_put(zs, NamedSharding(mesh, P(("data", "fsdp")))), temperature=0.1)
    assert_equal_to_dense(result, expected)


@pytest.mark.parametrize("impl", IMPLS)
def test_accuracy_breaks_ties_as_argmax_does(impl):
    """Identical keys make every logit of a row equal: argmax takes the first column, so only row 0
    is counted right, whichever order the blocks (or the ring) visit the columns in."""
    z1 = _embeddings(1)[0]
    same = jnp.tile(z1[:1], (B, 1))
    mesh = make_mesh({"data": 8})
    with jax.set_mesh(mesh):
        args = jax.device_put([z1, same, same], NamedSharding(mesh, P("data")))
        _, acc = jax.jit(lambda *z: IMPLS[impl](*z, temperature=0.05))(*args)
    assert float(acc) == pytest.approx(1.0 / B)
    assert float(simcse_loss_and_accuracy(z1, same, same)[1]) == pytest.approx(1.0 / B)


@pytest.mark.parametrize("axes", MESHES[:1] + MESHES[-1:], ids=lambda a: ",".join(f"{k}={v}" for k, v in a.items()))
def test_uniformity_blockwise_and_ring_equal_dense(axes):
    z = _embeddings(1, seed=3)[0]
    expected = float(uniformity(z))
    assert float(uniformity_blockwise(z, block_size=7)) == pytest.approx(expected, rel=1e-6)
    mesh = make_mesh(axes)
    with jax.set_mesh(mesh):
        sharded = jax.device_put(z, NamedSharding(mesh, P(("data", "fsdp"))))
        ring = jax.jit(lambda x: uniformity_ring(x, block_size=3))(sharded)
        blockwise = jax.jit(lambda x: uniformity_blockwise(x, block_size=16))(sharded)
    assert float(ring) == pytest.approx(expected, rel=1e-6)
    assert float(blockwise) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_bfloat16_embeddings_give_the_dense_loss_and_gradients(impl):
    """bf16 embeddings (compute_dtype bfloat16) are normalised in float32 by every implementation:
    the loss is the dense one's to float32 rounding, gradients come back in bf16 like dense's."""
    zs = _embeddings(3, seed=5, dtype=jnp.bfloat16)
    kw = dict(temperature=0.05, hard_negative_weight=1.5)
    expected = _value_and_grads(simcse_loss_and_accuracy, zs, **kw)
    mesh = make_mesh({"data": 4, "tensor": 2})
    with jax.set_mesh(mesh):
        result = _value_and_grads(IMPLS[impl], jax.device_put(zs, NamedSharding(mesh, P("data"))), **kw)
    assert all(g.dtype == jnp.bfloat16 for g in result[1])
    # Gradients are rounded to bf16 at the end (8 bits of mantissa): equal up to one bf16 step.
    assert_equal_to_dense(((result[0][0], result[0][1]), ()), (expected[0], ()))
    for g, e in zip(result[1], expected[1]):
        g, e = np.asarray(g, np.float32), np.asarray(e, np.float32)
        assert np.abs(g - e).max() <= 2**-7 * np.abs(e).max()


@pytest.mark.parametrize("impl", IMPLS)
def test_no_batch_by_batch_array_is_ever_formed(impl):
    """The compiled forward and backward hold [rows, block] logits at most, never [B, B] or [B, 2B]."""
    zs = _embeddings(3)
    f = jax.jit(jax.grad(lambda *z: IMPLS[impl](*z, temperature=0.05, hard_negative_weight=1.5)[0], argnums=(0, 1, 2)))
    hlo = f.lower(*zs).compile().as_text()
    shapes = {tuple(int(d) for d in m.split(",")) for m in re.findall(r"f32\[(\d+,\d+)\]", hlo)}
    assert (B, H) in shapes  # the pattern does read the HLO's shapes
    assert not [s for s in shapes if s[0] >= B and s[1] >= B], shapes
    dense = jax.jit(jax.grad(lambda *z: simcse_loss_and_accuracy(*z, temperature=0.05)[0])).lower(*zs[:2]).compile().as_text()
    assert f"f32[{B},{B}]" in dense  # ... and would see the dense loss's logits


def test_bad_block_size_and_ring_split_are_refused_naming_the_key():
    zs = _embeddings(2)
    with pytest.raises(ValueError, match="contrastive_block_size"):
        simcse_loss_and_accuracy_blockwise(*zs, block_size=0)
    mesh = make_mesh({"data": 8})
    with jax.set_mesh(mesh), pytest.raises(ValueError, match="contrastive_impl='ring'.*36 rows"):
        jax.jit(lambda a, b: simcse_loss_and_accuracy_ring(a[:36], b[:36]))(*zs)


@pytest.mark.parametrize("impl", IMPLS)
def test_gradient_runs_under_the_trainers_cpu_onednn_options(impl):
    """The trainer compiles the step with oneDNN dots on CPU (cpu_onednn). A ring visit of one
    block once let XLA fuse the gradient accumulation into a oneDNN dot that died with SIGILL;
    here every visit would be one block of 128 > 16 columns (see blockwise._blocks)."""
    from simcse_jax.xla_options import CPU_ONEDNN_OPTIONS

    rng = np.random.default_rng(0)
    zs = [jnp.asarray(rng.normal(size=(128, 32)), jnp.float32) for _ in range(2)]
    mesh = make_mesh({"data": 8})
    loss = {"blockwise": simcse_loss_and_accuracy_blockwise, "ring": simcse_loss_and_accuracy_ring}[impl]
    grad = jax.grad(lambda *z: loss(*z, temperature=0.05, block_size=128)[0], argnums=(0, 1))
    expected = jax.jit(jax.grad(lambda *z: simcse_loss_and_accuracy(*z, temperature=0.05)[0], argnums=(0, 1)))(*zs)
    with jax.set_mesh(mesh):
        sharded = jax.device_put(zs, NamedSharding(mesh, P("data")))
        got = jax.jit(grad, compiler_options=CPU_ONEDNN_OPTIONS)(*sharded)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=0, atol=1e-4 * np.abs(np.asarray(e)).max())
