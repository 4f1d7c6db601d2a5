"""The train state and the one jitted update function.

`init_train_state` places the parameters by the sharding rules (`sharding.param_shardings`) and
builds the optimiser state directly in its sharded layout (`jax.jit(optimizer.init,
out_shardings=...)`; moment estimates mirror their parameter's sharding). `make_train_step`
returns the update `(state, batch, key) -> (state, measurements)` jitted once with explicit
in/out shardings and the state donated, traced under `jax.set_mesh(mesh)` so the encoder and
the loss see the mesh (row-sharded activations and logits).

Measurements (replicated float32 scalars): `loss` (simcse + mlm_weight * mlm), `simcse_loss`,
`mlm_loss` (with do_mlm), `accuracy` (share of rows whose top-1 logit is the positive),
`alignment` and `uniformity` of the batch embeddings (Wang & Isola, normalised, uniformity over
distinct first-view pairs), `grad_norm` (the gradient given to the clipper, i.e. after the
`reference_world_size` scaling), `update_norm`, `param_norm` (after the update) and
`learning_rate` (the rate this update used).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from simcse_jax.grad_cache import grad_cache_value_and_grad
from simcse_jax.objective import ObjectiveConfig, num_chunks_for, objective_fn
from simcse_jax.optim import OptimConfig, global_norm, linear_schedule
from simcse_jax.sharding import batch_sharding, data_parallel_size, param_shardings


def objective_config(config) -> ObjectiveConfig:
    """The objective of a TrainConfig, field by field (tests/test_train_step.py checks that every
    ObjectiveConfig field is set here from the TrainConfig key it depends on)."""
    return ObjectiveConfig(
        temperature=config.temperature,
        hard_negative_weight=config.hard_negative_weight,
        pooler=config.pooler,
        mlp_only_train=config.mlp_only_train,
        do_mlm=config.do_mlm,
        mlm_weight=config.mlm_weight,
        grad_cache_chunk_size=config.grad_cache_chunk_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        contrastive_impl=config.contrastive_impl,
        contrastive_block_size=config.contrastive_block_size,
    )


def optim_config(config, total_steps: int) -> OptimConfig:
    """The optimiser of a TrainConfig for a run of `total_steps` updates, field by field."""
    return OptimConfig(
        total_steps=total_steps,
        learning_rate=config.learning_rate,
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        adam_beta1=config.adam_beta1,
        adam_beta2=config.adam_beta2,
        adam_epsilon=config.adam_epsilon,
        max_grad_norm=config.max_grad_norm,
        reference_world_size=config.reference_world_size,
    )


def dropout_overrides(config) -> dict[str, float]:
    """The dropout rates a TrainConfig sets; a key left at None keeps the checkpoint's own rate."""
    keys = ("hidden_dropout_prob", "attention_probs_dropout_prob")
    return {k: getattr(config, k) for k in keys if getattr(config, k) is not None}


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: updates applied so far
    params: nnx.State  # nnx.State of the encoder's Params
    opt_state: Any


def _opt_state_shardings(optimizer, params, params_sh, mesh: Mesh):
    """Shardings for the optimiser state: subtrees shaped like the params take the params'
    shardings, everything else (step counts) is replicated."""
    abstract = jax.eval_shape(optimizer.init, params)
    params_def = jax.tree.structure(params)
    replicated = NamedSharding(mesh, P())

    def is_params(x):
        return jax.tree.structure(x) == params_def

    return jax.tree.map(lambda x: params_sh if is_params(x) else replicated, abstract, is_leaf=is_params)


def state_shardings(graphdef_params: nnx.State, optimizer: optax.GradientTransformation, mesh: Mesh) -> TrainState:
    """The TrainState of NamedShardings for parameters `graphdef_params` (arrays or abstract)."""
    params_sh = param_shardings(graphdef_params, mesh)
    return TrainState(
        step=NamedSharding(mesh, P()),
        params=params_sh,
        opt_state=_opt_state_shardings(optimizer, graphdef_params, params_sh, mesh),
    )


class AbstractTrainState(NamedTuple):
    model: nnx.Module  # the encoder with abstract (ShapeDtypeStruct) weights
    graphdef: nnx.GraphDef
    state: TrainState  # ShapeDtypeStructs, no shardings attached
    shardings: TrainState  # NamedShardings by the rules


def abstract_train_state(encoder_config, optimizer: optax.GradientTransformation, mesh: Mesh) -> AbstractTrainState:
    """The train state's shapes and shardings for an encoder, without allocating a weight: what
    the trainer compiles and restores against and what the planner compiles for a topology."""
    from simcse_jax.encoder import Encoder

    model = nnx.eval_shape(lambda: Encoder(encoder_config, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(model, nnx.Param)
    state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params, opt_state=jax.eval_shape(optimizer.init, params))
    return AbstractTrainState(model, graphdef, state, state_shardings(params, optimizer, mesh))


def init_train_state(
    model: nnx.Module, optimizer: optax.GradientTransformation, mesh: Mesh
) -> tuple[nnx.GraphDef, TrainState, TrainState]:
    """(graphdef, state, state_shardings): params placed by the rules, opt state born sharded."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ValueError("the encoder holds non-parameter state; simcse-jax trains Params only")
    shardings = state_shardings(params, optimizer, mesh)
    # A copy in the target layout: the step donates the state, which must not delete the model's
    # own arrays (device_put may alias a buffer already on the right device).
    params = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=shardings.params)(params)
    opt_state = jax.jit(optimizer.init, out_shardings=shardings.opt_state)(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
    return graphdef, TrainState(step=step, params=params, opt_state=opt_state), shardings


class TrainStep:
    """The jitted update; calling it enters `jax.set_mesh(mesh)` so tracing sees the mesh.

    `jitted` is the `jax.jit` object (for `.lower(...)`); `lower` lowers under the mesh too.
    """

    def __init__(self, jitted, mesh: Mesh):
        self.jitted = jitted
        self.mesh = mesh

    def __call__(self, state: TrainState, batch: dict, key: jax.Array | None):
        with jax.set_mesh(self.mesh):
            return self.jitted(state, batch, key)

    def lower(self, state, batch, key):
        with jax.set_mesh(self.mesh):
            return self.jitted.lower(state, batch, key)


def make_train_step(
    graphdef: nnx.GraphDef,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    shardings: TrainState,
    objective: ObjectiveConfig,
    optim: OptimConfig,
    *,
    compiler_options: dict | None = None,
    skip_nonfinite: bool = False,
    fold_in_step: bool = False,
) -> TrainStep:
    """The update function `(state, batch, key) -> (state, measurements)`.

    `batch` follows the contract in `objective.py` (rows sharded by `sharding.batch_sharding(mesh,
    3)`); `key` is this step's dropout key, None for a deterministic step. `fold_in_step`: `key`
    is the run's base key and the step's own is `fold_in(key, state.step)`, derived on the device
    (the trainer's choice: an eager fold_in per step is one more host dispatch, ~0.4-1.4 ms on
    CPU). `grad_cache_chunk_size` smaller than the batch switches to gradient caching.
    `compiler_options` go to `jax.jit` (e.g. oneDNN on CPU, see TrainConfig.cpu_onednn).
    `skip_nonfinite`: a step whose loss or gradient norm is not finite leaves the parameters and
    optimizer state unchanged (the step counter still advances; `skipped` = 1 in measurements).
    """
    dp = data_parallel_size(mesh)
    schedule = linear_schedule(optim)

    def update(state: TrainState, batch: dict, key):
        if fold_in_step and key is not None:
            key = jax.random.fold_in(key, state.step)
        n = num_chunks_for(objective, batch["input_ids"].shape[0], dp)
        kw = dict(num_chunks=n, data_parallel=dp, contrastive_scale=optim.contrastive_scale)
        if n > 1:
            (_, meas), grads = grad_cache_value_and_grad(graphdef, state.params, batch, key, objective, **kw)
        else:
            loss_fn = functools.partial(objective_fn, graphdef, batch=batch, key=key, cfg=objective, **kw)
            (_, meas), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        meas = dict(meas)
        meas.update(
            grad_norm=global_norm(grads),
            update_norm=global_norm(updates),
            param_norm=global_norm(params),
            learning_rate=schedule(state.step),
        )
        new = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
        if skip_nonfinite:
            finite = jnp.isfinite(meas["loss"]) & jnp.isfinite(meas["grad_norm"])
            # Decided inside the step: the old state is donated, so the host cannot roll back.
            new = TrainState(
                step=new.step,
                params=jax.tree.map(lambda a, b: jnp.where(finite, a, b), new.params, state.params),
                opt_state=jax.tree.map(lambda a, b: jnp.where(finite, a, b), new.opt_state, state.opt_state),
            )
            meas["skipped"] = 1.0 - finite.astype(jnp.float32)
        meas = {k: v.astype(jnp.float32) for k, v in meas.items()}
        return new, meas

    replicated = NamedSharding(mesh, P())
    jitted = jax.jit(
        update,
        donate_argnums=0,
        in_shardings=(shardings, batch_sharding(mesh, 3), replicated),
        out_shardings=(shardings, replicated),
        compiler_options=compiler_options,
    )
    return TrainStep(jitted, mesh)

