"""The update step of a TrainConfig, built in one place for the trainer and the planner.

`build_update_step(config, hf_config, mesh, total_steps=...)` makes everything the step is
made of, on the mesh of the config's axes (`config_mesh`): the EncoderConfig (compute dtype, the
config's dropout rates, the MLM head with do_mlm), the optimizer for a schedule of
`total_steps`, the abstract train state and its shardings, and the jitted update
(`train_step.make_train_step` with the config's objective, `on_nonfinite=skip` decided inside
the step, and the dropout key folded in from the step counter) with the platform's compiler
options. `train.py` restores or imports weights into that state and compiles the step for its
data; `planner/plan.py` compiles the same step for a topology it does not have, for the batch `abstract_batch` describes.

`compile_train_step` compiles ahead of time from abstract arguments; `StepMemory` is the
compiled step's memory per device: the peak the trainer logs is the peak the planner reports.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from simcse_jax.encoder import EncoderConfig
from simcse_jax.objective import MLM_KEYS, REQUIRED_KEYS
from simcse_jax.optim import make_optimizer
from simcse_jax.sharding import batch_sharding, make_mesh
from simcse_jax.train_step import (
    AbstractTrainState,
    TrainState,
    TrainStep,
    abstract_train_state,
    dropout_overrides,
    make_train_step,
    objective_config,
    optim_config,
)
from simcse_jax.xla_options import compile_with_fallback, compiler_options


def config_mesh(config, devices: list | None = None) -> Mesh:
    """The mesh of a TrainConfig's `mesh_data` / `mesh_fsdp` / `mesh_tensor` over `devices` (default: all)."""
    return make_mesh({"data": config.mesh_data, "fsdp": config.mesh_fsdp, "tensor": config.mesh_tensor}, devices=devices)


@dataclasses.dataclass(frozen=True)
class UpdateStep:
    mesh: Mesh
    encoder_config: EncoderConfig
    optimizer: optax.GradientTransformation
    abstract: AbstractTrainState  # the encoder, graphdef, state shapes and shardings; no weight allocated
    step: TrainStep  # jitted, not yet compiled (compile_train_step)
    compiler_options: dict | None

    @property
    def graphdef(self) -> nnx.GraphDef:
        return self.abstract.graphdef

    @property
    def shardings(self) -> TrainState:
        return self.abstract.shardings

    def sharded_state(self) -> TrainState:
        """The abstract state as ShapeDtypeStructs carrying their shardings (what the planner measures)."""
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            self.abstract.state, self.abstract.shardings)


def build_update_step(config, hf_config: dict, mesh: Mesh, *, total_steps: int) -> UpdateStep:
    """The update step of TrainConfig `config` for the model of Hugging Face config `hf_config`
    on `mesh` (`config_mesh`). `total_steps` sets the learning-rate schedule's length (constants
    inside the step: it changes neither its memory nor its cost).
    """
    encoder_config = EncoderConfig.from_hf_dict(hf_config, compute_dtype=config.compute_dtype,
                                                with_mlm_head=config.do_mlm, **dropout_overrides(config))
    optim = optim_config(config, total_steps)
    optimizer = make_optimizer(optim)
    abstract = abstract_train_state(encoder_config, optimizer, mesh)
    # One executable serves the whole run: a batch of another shape is an error, not a silent recompilation.
    step = make_train_step(abstract.graphdef, optimizer, mesh, abstract.shardings, objective_config(config), optim,
                           skip_nonfinite=config.on_nonfinite == "skip", fold_in_step=True)
    options = compiler_options(config.cpu_onednn, mesh.devices.flat[0].platform)
    return UpdateStep(mesh, encoder_config, optimizer, abstract, step, options)


def abstract_batch(config, mesh: Mesh, num_sent: int) -> dict:
    """The global batch the data pipeline gives for `config` (`data.DataIterator.abstract_batch`),
    as sharded ShapeDtypeStructs, for compiling without data: (batch, views, length) int32."""
    keys = REQUIRED_KEYS + (MLM_KEYS if config.do_mlm else ())
    shape = (config.global_batch_size, num_sent, config.max_seq_length)
    return {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sharding(mesh, 3)) for k in keys}


@dataclasses.dataclass(frozen=True)
class StepMemory:
    """A compiled step's memory per device, from XLA's memory analysis."""

    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int

    @property
    def peak_bytes(self) -> int:
        """Live at the step's peak: inputs + outputs not aliased to a donated input + scratch."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    @property
    def needed_bytes(self) -> int:
        return self.peak_bytes + self.code_bytes

    @classmethod
    def of(cls, compiled) -> StepMemory | None:
        """None when the backend's compiler gives no memory analysis."""
        mem = compiled.memory_analysis()
        if mem is None:
            return None
        return cls(int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes), int(mem.alias_size_in_bytes),
                   int(mem.temp_size_in_bytes), int(getattr(mem, "generated_code_size_in_bytes", 0)))


def compile_train_step(step: TrainStep, abstract_state: TrainState, abstract_batch: dict,
                       compiler_options: dict | None = None, *, on_fallback=None):
    """Compiles the update ahead of time from abstract arguments, before any batch exists.

    Returns (executable, info) with the compile time, the peak memory per device and the
    compiler options that took effect: a jaxlib that rejects `compiler_options` (e.g. oneDNN
    flags it does not know) gets the step without them (`xla_options.compile_with_fallback`;
    `on_fallback(message)` hears why).
    """
    key = jax.eval_shape(lambda: jax.random.key(0))
    t0 = time.perf_counter()
    compiled, used = compile_with_fallback(step.lower(abstract_state, abstract_batch, key), compiler_options,
                                           on_fallback=on_fallback)
    info: dict[str, Any] = {"compile_seconds": round(time.perf_counter() - t0, 2), "compiler_options": dict(used or {})}
    memory = StepMemory.of(compiled)
    if memory is not None:
        info["step_peak_memory_mib"] = round(memory.peak_bytes / 2**20, 1)
    return compiled, info
