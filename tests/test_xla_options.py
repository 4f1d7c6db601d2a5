"""oneDNN dot options for the CPU update step: on by default, really used, equal to XLA's own
kernels up to rounding, off with `cpu_onednn=false`, and a jaxlib that rejects an option falls
back to a plain compile."""

import jax
import jax.numpy as jnp
import numpy as np
from conftest import REAL_SENTENCES

from simcse_jax.config import TrainConfig, apply_overrides
from simcse_jax.hf_io import load_pretrained, load_tokenizer
from simcse_jax.objective import ObjectiveConfig
from simcse_jax.optim import OptimConfig, make_optimizer
from simcse_jax.sharding import batch_sharding, make_mesh
from simcse_jax.train_step import init_train_state, make_train_step
from simcse_jax.xla_options import CPU_ONEDNN_OPTIONS, compile_with_fallback, compiler_options

# oneDNN sums the dots in another order than XLA's Eigen kernels: float32 rounding, ~3e-5
# relative on MiniLM's loss (PERF_NOTES); 1e-4 leaves room for a few updates of drift, while a
# wrong kernel (or a different dropout mask) moves the loss by far more than that.
LOSS_RTOL = 1e-4
ONEDNN_MARKER = "__onednn_fusion"  # how oneDNN's dot fusions appear in the compiled HLO text


def test_default_config_enables_the_options_on_cpu_only():
    assert compiler_options(TrainConfig().cpu_onednn, "cpu") == CPU_ONEDNN_OPTIONS
    assert compiler_options(TrainConfig().cpu_onednn, "gpu") is None
    assert compiler_options(TrainConfig().cpu_onednn, "tpu") is None
    off = apply_overrides(TrainConfig(), ["cpu_onednn=false"])
    assert off.cpu_onednn is False and compiler_options(off.cpu_onednn, "cpu") is None


def test_rejected_options_fall_back_to_a_plain_compile():
    lowered = jax.jit(lambda x: jnp.tanh(x @ x.T)).lower(np.ones((8, 8), np.float32))
    heard = []
    compiled, used = compile_with_fallback(lowered, {"xla_cpu_no_such_option": True}, on_fallback=heard.append)
    assert used is None and len(heard) == 1 and "xla_cpu_no_such_option" in heard[0]
    np.testing.assert_allclose(compiled(np.ones((8, 8), np.float32)), np.tanh(np.full((8, 8), 8.0)), rtol=1e-6)
    compiled, used = compile_with_fallback(lowered, None)
    assert used is None


def _step_losses(model_dir, options, steps=3):
    loaded = load_pretrained(model_dir)
    mesh = make_mesh({"data": 4, "fsdp": 2})
    optim = OptimConfig(total_steps=10, learning_rate=1e-3)
    optimizer = make_optimizer(optim)
    graphdef, state, shardings = init_train_state(loaded.model, optimizer, mesh)
    step = make_train_step(graphdef, optimizer, mesh, shardings, ObjectiveConfig(pooler="cls", mlp_only_train=True), optim)
    enc = load_tokenizer(model_dir)(
        REAL_SENTENCES + ["The cat sleeps on the warm windowsill.", "Parliament passed the budget after a long debate."],
        padding="max_length", max_length=32, truncation=True, return_tensors="np",
    )
    batch = {k: np.repeat(enc[k][:, None].astype(np.int32), 2, axis=1) for k in ("input_ids", "attention_mask", "token_type_ids")}
    batch = jax.device_put(batch, batch_sharding(mesh, 3))
    key = jax.random.key(0)  # threefry: the dropout masks do not depend on the kernels
    compiled, used = compile_with_fallback(step.lower(state, batch, key), options)
    losses = []
    for i in range(steps):
        state, meas = compiled(state, batch, jax.random.fold_in(key, i))
        losses.append(float(meas["loss"]))
    return np.array(losses), used, compiled.as_text()


def test_onednn_step_equals_the_plain_step_up_to_rounding(tiny_model_dir):
    fast, used, fast_hlo = _step_losses(tiny_model_dir, compiler_options(TrainConfig().cpu_onednn, "cpu"))
    plain, unused, plain_hlo = _step_losses(tiny_model_dir, compiler_options(False, "cpu"))
    assert used == CPU_ONEDNN_OPTIONS and unused is None
    assert ONEDNN_MARKER in fast_hlo and ONEDNN_MARKER not in plain_hlo  # the options really reached XLA
    print("relative loss difference oneDNN vs XLA:", np.abs(fast / plain - 1).max())
    np.testing.assert_allclose(fast, plain, rtol=LOSS_RTOL)
    assert np.all(np.diff(plain) < 0)  # the steps did learn: the comparison is of real updates
