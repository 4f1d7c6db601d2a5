"""The optimiser equals torch AdamW + clip_grad_norm_ + HF's linear schedule step for step; the
decay mask spares biases and LayerNorm; and the reference's DDP gradient is 1/W of the exact one
(a simulation of W workers in torch), which `reference_world_size` reproduces."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from flax import nnx

from simcse_jax.encoder import Encoder, EncoderConfig
from simcse_jax.losses import simcse_loss
from simcse_jax.objective import ObjectiveConfig, combine
from simcse_jax.optim import OptimConfig, decay_mask, linear_schedule, make_optimizer


def _torch_scheduler(lr, warmup, total):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = transformers.get_linear_schedule_with_warmup(opt, num_warmup_steps=warmup, num_training_steps=total)
    rates = []
    for _ in range(total + 2):
        rates.append(opt.param_groups[0]["lr"])  # the rate the next optimizer.step() uses
        opt.step()
        sched.step()
    return rates


@pytest.mark.parametrize("warmup", [0, 3])
def test_schedule_equals_hf_linear_schedule_with_warmup(warmup):
    cfg = OptimConfig(total_steps=10, warmup_steps=warmup, learning_rate=3e-5)
    ours = [float(linear_schedule(cfg)(s)) for s in range(12)]
    np.testing.assert_allclose(ours, _torch_scheduler(3e-5, warmup, 10), rtol=1e-6, atol=1e-12)
    assert ours[0] == pytest.approx(3e-5 if warmup == 0 else 0.0, rel=1e-6)


def test_five_steps_equal_torch_adamw_with_clipping_and_schedule():
    rng = np.random.default_rng(0)
    params = {
        "dense": {"kernel": rng.normal(size=(6, 4)), "bias": rng.normal(size=(4,))},
        "LayerNorm": {"scale": 1 + 0.1 * rng.normal(size=(4,)), "bias": rng.normal(size=(4,))},
        "word": {"embedding": rng.normal(size=(5, 6))},
    }
    params = jax.tree.map(lambda a: a.astype(np.float32), params)
    # Gradient norms around the clip threshold: some steps are clipped, some not.
    grads = [jax.tree.map(lambda a, s=s: (s * rng.normal(size=a.shape)).astype(np.float32), params) for s in (0.5, 0.05, 0.3, 0.02, 1.0)]
    cfg = OptimConfig(total_steps=5, warmup_steps=1, learning_rate=1e-2, weight_decay=0.1, max_grad_norm=1.0)

    opt = make_optimizer(cfg)
    state, p = opt.init(params), params
    for g in grads:
        updates, state = opt.update(g, state, p)
        p = optax.apply_updates(p, updates)

    names = jax.tree_util.tree_leaves_with_path(params)
    tparams = [torch.nn.Parameter(torch.tensor(np.asarray(a))) for _, a in names]
    mask = jax.tree.leaves(decay_mask(params))
    topt = torch.optim.AdamW(
        [{"params": [t for t, m in zip(tparams, mask) if m], "weight_decay": 0.1},
         {"params": [t for t, m in zip(tparams, mask) if not m], "weight_decay": 0.0}],
        lr=1e-2, betas=(0.9, 0.999), eps=1e-8,
    )
    sched = transformers.get_linear_schedule_with_warmup(topt, num_warmup_steps=1, num_training_steps=5)
    clipped = []
    for g in grads:
        for t, a in zip(tparams, jax.tree.leaves(g)):
            t.grad = torch.tensor(np.asarray(a))
        clipped.append(float(torch.nn.utils.clip_grad_norm_(tparams, 1.0)) > 1.0)
        topt.step()
        sched.step()
    assert any(clipped) and not all(clipped)
    for ours, t in zip(jax.tree.leaves(p), tparams):
        np.testing.assert_allclose(np.asarray(ours), t.detach().numpy(), rtol=1e-5, atol=1e-7)


def test_decay_mask_spares_biases_and_layernorm():
    cfg = EncoderConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, with_mlm_head=True)
    params = nnx.state(Encoder(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    flat = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_leaves_with_path(decay_mask(params))}
    assert flat and all(
        m == (("kernel" in k or "embedding" in k) and "LayerNorm" not in k) for k, m in flat.items()
    ), flat
    assert sum(flat.values()) and not all(flat.values())


def _ddp_reference_grad(x, a, world):
    """W workers of the reference: each gathers z without grad, restores its own rows with grad,
    computes the global-batch loss; DDP averages the gradients. Linear encoder z = x @ a."""
    b = x[0].shape[0] // world
    grads = []
    for rank in range(world):
        at = torch.tensor(a, requires_grad=True)
        zs = []
        for xv in x:
            full = (torch.tensor(xv) @ at).detach()  # what all_gather returns (no grad)
            local = torch.tensor(xv[rank * b : (rank + 1) * b]) @ at
            zs.append(torch.cat([full[: rank * b], local, full[(rank + 1) * b :]], 0))
        cos = torch.nn.CosineSimilarity(dim=-1)
        logits = cos(zs[0].unsqueeze(1), zs[1].unsqueeze(0)) / 0.05
        logits = torch.cat([logits, cos(zs[0].unsqueeze(1), zs[2].unsqueeze(0)) / 0.05], 1)
        torch.nn.CrossEntropyLoss()(logits, torch.arange(len(logits))).backward()
        grads.append(at.grad.numpy())
    return np.mean(grads, axis=0)


def test_reference_ddp_gradient_is_one_over_world_of_exact_and_reference_world_size_reproduces_it():
    rng = np.random.default_rng(4)
    world, batch, d, h = 4, 16, 10, 8
    x = [rng.normal(size=(batch, d)) for _ in range(3)]
    a = rng.normal(size=(d, h))
    ddp = _ddp_reference_grad(x, a, world)

    def exact_loss(a, scale):
        z = [jnp.asarray(v, jnp.float32) @ a for v in x]
        loss = simcse_loss(*z, temperature=0.05)
        return combine(loss, {}, 0.0, 0.0, ObjectiveConfig(), scale)[0]

    a32 = jnp.asarray(a, jnp.float32)
    exact = np.asarray(jax.grad(exact_loss)(a32, 1.0))
    np.testing.assert_allclose(ddp, exact / world, rtol=1e-5, atol=1e-7)
    assert not np.allclose(ddp, exact, rtol=0.1)  # the factor is real, not an artefact of the check
    scale = OptimConfig(total_steps=1, reference_world_size=world).contrastive_scale
    np.testing.assert_allclose(np.asarray(jax.grad(exact_loss)(a32, scale)), ddp, rtol=1e-5, atol=1e-7)


def test_bad_optim_config_is_refused():
    with pytest.raises(ValueError, match="optim.warmup_steps"):
        OptimConfig(total_steps=5, warmup_steps=6)
    with pytest.raises(ValueError, match="optim.reference_world_size"):
        OptimConfig(total_steps=5, reference_world_size=0)
