"""simcse_loss equals the paper's formula written in torch; the shard_map twin equals it on meshes;
MLM loss and alignment/uniformity equal their torch definitions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from simcse_jax.losses import (
    alignment,
    masked_lm_loss_sum,
    simcse_logits,
    simcse_loss,
    simcse_loss_and_accuracy,
    simcse_loss_shard_map,
    uniformity,
)
from simcse_jax.sharding import make_mesh

B, H = 16, 24


def _embeddings(seed=0, n=3):
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(B, H)).astype(np.float32)
    # Positives near their anchor so the loss is neither trivial nor saturated.
    return [base] + [(base + rng.normal(scale=0.8, size=(B, H))).astype(np.float32) for _ in range(n - 1)]


def torch_reference_loss(z1, z2, z3, temp, hard_negative_weight):
    """The reference's cl_forward, verbatim in structure (CosineSimilarity / temp, cat, weights, CE)."""
    cos = torch.nn.CosineSimilarity(dim=-1)
    cos_sim = cos(z1.unsqueeze(1), z2.unsqueeze(0)) / temp
    if z3 is not None:
        z1_z3_cos = cos(z1.unsqueeze(1), z3.unsqueeze(0)) / temp
        cos_sim = torch.cat([cos_sim, z1_z3_cos], 1)
        n = z1_z3_cos.size(-1)
        weights = torch.tensor(
            [[0.0] * (cos_sim.size(-1) - n) + [0.0] * i + [hard_negative_weight] + [0.0] * (n - i - 1) for i in range(n)]
        )
        cos_sim = cos_sim + weights
    labels = torch.arange(cos_sim.size(0)).long()
    return torch.nn.CrossEntropyLoss()(cos_sim, labels)


@pytest.mark.parametrize("temp", [0.05, 0.1])
@pytest.mark.parametrize(("with_hard_negatives", "hard_negative_weight"), [(False, 0.0), (True, 0.0), (True, 1.5)])
def test_loss_and_gradients_equal_torch_reference(temp, hard_negative_weight, with_hard_negatives):
    arrays = _embeddings(seed=int(temp * 100) + int(hard_negative_weight * 10))
    if not with_hard_negatives:
        arrays = arrays[:2]
    tz = [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in arrays]
    t_loss = torch_reference_loss(*tz, *([None] if len(tz) == 2 else []), temp, hard_negative_weight)
    t_loss.backward()

    def f(*zs):
        return simcse_loss(*zs, temperature=temp, hard_negative_weight=hard_negative_weight)

    loss, grads = jax.value_and_grad(f, argnums=tuple(range(len(arrays))))(*map(jnp.asarray, arrays))
    assert abs(float(loss) - t_loss.item()) <= 1e-6 * max(1.0, abs(t_loss.item()))
    for g, t in zip(grads, tz):
        np.testing.assert_allclose(np.asarray(g), t.grad.numpy(), rtol=0, atol=1e-6)
    # The weight must matter when hard negatives are given (guards against a silently ignored flag).
    if with_hard_negatives and hard_negative_weight:
        assert abs(float(f(*arrays[:2], jnp.asarray(arrays[2]))) - float(simcse_loss(*arrays, temperature=temp))) > 1e-3


def test_accuracy_is_top1_of_positive():
    z1, z2, z3 = _embeddings(seed=3)
    _, acc = simcse_loss_and_accuracy(z1, z2, z3, hard_negative_weight=1.5)
    logits = np.asarray(simcse_logits(z1, z2, z3, hard_negative_weight=1.5))
    assert float(acc) == pytest.approx(np.mean(logits.argmax(1) == np.arange(B)))
    perm = np.roll(np.arange(B), 1)  # a wrong pairing gets far lower accuracy
    assert float(simcse_loss_and_accuracy(z1, z2[perm])[1]) < float(acc)


MESHES = [{"data": 8}, {"data": 4, "tensor": 2}, {"fsdp": 8}, {"data": 2, "fsdp": 2, "tensor": 2}]


@pytest.mark.parametrize("axes", MESHES, ids=lambda a: ",".join(f"{k}={v}" for k, v in a.items()))
def test_global_and_shard_map_twin_agree_on_meshes(axes):
    mesh = make_mesh(axes)
    arrays = [jnp.asarray(a) for a in _embeddings(seed=7)]
    expected, expected_g = jax.value_and_grad(
        lambda *z: simcse_loss(*z, temperature=0.05, hard_negative_weight=1.5), argnums=(0, 1, 2)
    )(*arrays)
    row = NamedSharding(mesh, P(("data", "fsdp")))
    sharded = jax.device_put(arrays, row)
    kw = dict(temperature=0.05, hard_negative_weight=1.5)
    with jax.set_mesh(mesh):
        glob = jax.jit(jax.value_and_grad(lambda *z: simcse_loss(*z, **kw), argnums=(0, 1, 2)))(*sharded)
        twin = jax.jit(jax.value_and_grad(lambda *z: simcse_loss_shard_map(*z, mesh=mesh, **kw), argnums=(0, 1, 2)))(*sharded)
    for loss, grads in (glob, twin):
        np.testing.assert_allclose(float(loss), float(expected), rtol=1e-6)
        for g, e in zip(grads, expected_g):
            np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-5, atol=1e-7)


def test_logits_stay_row_sharded_under_a_mesh():
    mesh = make_mesh({"data": 4, "fsdp": 2})
    z1, z2, z3 = jax.device_put([jnp.asarray(a) for a in _embeddings(seed=1)], NamedSharding(mesh, P(("data", "fsdp"))))
    with jax.set_mesh(mesh):
        logits = jax.jit(lambda a, b, c: simcse_logits(a, b, c))(z1, z2, z3)
    assert logits.shape == (B, 2 * B)
    # Each device holds B/8 rows and every column: only the [B, H] keys were gathered.
    assert {s.data.shape for s in logits.addressable_shards} == {(B // 8, 2 * B)}


def test_masked_lm_loss_equals_torch_cross_entropy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 7, 11)).astype(np.float32)
    labels = np.where(rng.random((4, 7)) < 0.3, rng.integers(0, 11, (4, 7)), -100).astype(np.int32)
    total, count = masked_lm_loss_sum(jnp.asarray(logits), jnp.asarray(labels))
    expected = torch.nn.CrossEntropyLoss()(torch.tensor(logits).view(-1, 11), torch.tensor(labels).long().view(-1))
    assert int(count) == int((labels != -100).sum())
    assert float(total / count) == pytest.approx(expected.item(), rel=1e-6)


def test_alignment_and_uniformity_equal_wang_isola_definitions():
    z1, z2 = (torch.tensor(a, dtype=torch.float64) for a in _embeddings(seed=5, n=2))
    x, y = torch.nn.functional.normalize(z1, dim=1), torch.nn.functional.normalize(z2, dim=1)
    align = (x - y).norm(p=2, dim=1).pow(2).mean()  # Wang & Isola's lalign, alpha = 2
    unif = torch.pdist(x, p=2).pow(2).mul(-2).exp().mean().log()  # their lunif, t = 2
    assert float(alignment(z1.numpy().astype(np.float32), z2.numpy().astype(np.float32))) == pytest.approx(align.item(), rel=1e-5)
    assert float(uniformity(z1.numpy().astype(np.float32))) == pytest.approx(unif.item(), rel=1e-5)


def test_alignment_and_uniformity_are_one_formula_in_the_step_and_at_evaluation():
    """jax arrays (the step's measurements) compute in float32, numpy arrays (STS-B and held-out
    evaluation) in float64; both equal Wang & Isola's definitions in torch float64."""
    z1, z2 = (torch.tensor(a, dtype=torch.float64) for a in _embeddings(seed=6, n=2))
    x, y = torch.nn.functional.normalize(z1, dim=1), torch.nn.functional.normalize(z2, dim=1)
    align = (x - y).norm(p=2, dim=1).pow(2).mean().item()
    unif = torch.pdist(x, p=2).pow(2).mul(-2).exp().mean().log().item()
    a64, b64 = z1.numpy(), z2.numpy()
    assert alignment(a64, b64).dtype == np.float64 and float(alignment(a64, b64)) == pytest.approx(align, rel=1e-12)
    assert float(uniformity(a64)) == pytest.approx(unif, rel=1e-12)
    a32, b32 = jnp.asarray(a64, jnp.float32), jnp.asarray(b64, jnp.float32)
    assert alignment(a32, b32).dtype == jnp.float32 and float(alignment(a32, b32)) == pytest.approx(align, rel=1e-5)
    assert float(jax.jit(uniformity)(a32)) == pytest.approx(unif, rel=1e-5)
