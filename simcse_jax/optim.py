"""The optimiser of the reference run: global-norm clipping, then AdamW on a linear schedule.

Defaults follow the SimCSE reference (Hugging Face Trainer + torch AdamW): b1 0.9, b2 0.999,
eps 1e-8, weight decay 0.0 (when set, not applied to biases or LayerNorm parameters, HF's
`no_decay = ["bias", "LayerNorm.weight"]`), clipping at global norm 1.0 with torch's formula
(scale = min(1, max_norm / (norm + 1e-6))), and `get_linear_schedule_with_warmup`: the update
with index s (0-based) uses lr * s / warmup during warmup, then lr * (total - s) / (total -
warmup), so the first update without warmup uses the full rate and the rate reaches 0 at
`total_steps`. torch's AdamW and optax's adamw place eps identically (sqrt(v_hat) + eps) and
decay decoupled weights by lr * wd * p.

Clipping and the reference's gradient scale (`reference_world_size`)
----------------------------------------------------------------------
The reference trains with DDP on W GPUs. Each GPU all-gathers z1, z2 (z3) without gradient,
puts its own rows back with gradient, and computes the loss over the *whole* global batch: every
GPU's loss has the value L of the global loss, but only its local rows are in its graph, so its
gradient is sum over its rows r of (dL/dz_r)(dz_r/dtheta). The W partial gradients sum to the
exact dL/dtheta; DDP *averages* them, so the reference's parameter gradient is

    g_reference = (1 / W) * dL/dtheta            (contrastive term)

(`tests/test_optim.py` simulates the W workers in torch and checks this). simcse-jax computes the
exact gradient dL/dtheta. AdamW is invariant to a constant gradient scale up to eps, so only
clipping sees the factor W: the reference clips when |dL/dtheta| > W * max_grad_norm. The MLM
term is a per-device mean that DDP averages, so it is not scaled (exactly equal when every
device holds the same number of labelled tokens).

`reference_world_size = W` reproduces the reference run on W GPUs exactly: the contrastive
term's gradient is multiplied by 1/W before clipping and AdamW (losses are reported unscaled).
The default 1 matches the reference's single-GPU recipes (unsup BERT: 1 GPU, batch 64).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from simcse_jax.config import check_optim

TORCH_CLIP_EPS = 1e-6
NO_DECAY_MODULES = ("LayerNorm", "layer_norm")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    total_steps: int  # number of updates; the linear schedule reaches 0 here
    learning_rate: float = 3e-5  # the reference's unsup BERT-base rate (HF's default is 5e-5)
    warmup_steps: int = 0
    weight_decay: float = 0.0
    # Field names are TrainConfig's; `train_step.optim_config` sets each one.
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0  # <= 0 disables clipping
    reference_world_size: int = 1  # see the module docstring

    def __post_init__(self):
        if self.total_steps < 1:
            raise ValueError(f"optim.total_steps must be >= 1, got {self.total_steps}")
        check_optim(self, "optim.")  # the same rules as config.validate's
        # total_steps comes from the data (train.py), so only here can warmup be checked against it.
        if self.warmup_steps > self.total_steps:
            raise ValueError(f"optim.warmup_steps must be in [0, total_steps={self.total_steps}], got {self.warmup_steps}")

    @property
    def contrastive_scale(self) -> float:
        return 1.0 / self.reference_world_size


def linear_schedule(cfg: OptimConfig) -> optax.Schedule:
    """HF `get_linear_schedule_with_warmup` as a function of the number of updates done."""
    lr, warm, total = cfg.learning_rate, cfg.warmup_steps, cfg.total_steps

    def schedule(step):
        s = jnp.asarray(step, jnp.float32)
        up = s / max(1, warm)
        down = jnp.maximum(0.0, (total - s) / max(1, total - warm))
        return lr * jnp.where(s < warm, up, down)

    return schedule


def decay_mask(params):
    """True for parameters that get weight decay: not biases, not LayerNorm scales/biases."""

    def decays(path, _):
        names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        return not (names and names[-1] == "bias") and not any(n in NO_DECAY_MODULES for n in names)

    return jax.tree_util.tree_map_with_path(decays, params)


def clip_by_global_norm_torch(max_norm: float) -> optax.GradientTransformation:
    """torch.nn.utils.clip_grad_norm_: g * min(1, max_norm / (|g| + 1e-6))."""

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        scale = jnp.minimum(1.0, max_norm / (optax.tree.norm(updates) + TORCH_CLIP_EPS))
        return jax.tree.map(lambda g: (g * scale).astype(g.dtype), updates), state

    return optax.GradientTransformation(init, update)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """clip (torch formula) -> AdamW (torch semantics) on the linear schedule."""
    adamw = optax.adamw(
        linear_schedule(cfg),
        b1=cfg.adam_beta1,
        b2=cfg.adam_beta2,
        eps=cfg.adam_epsilon,
        weight_decay=cfg.weight_decay,
        mask=decay_mask,
    )
    if cfg.max_grad_norm and cfg.max_grad_norm > 0:
        return optax.chain(clip_by_global_norm_torch(cfg.max_grad_norm), adamw)
    return adamw


def global_norm(tree) -> jax.Array:
    return optax.tree.norm(tree)
