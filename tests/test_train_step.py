"""The jitted update on the real all-MiniLM-L6-v2 checkpoint, sharded (data=4, fsdp=2): parameters
and optimiser state are born sharded, one update lowers the loss on a fixed batch (same dropout
key), the step compiles once for a fixed shape, and the measurements are the ones promised."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REAL_SENTENCES
from jax.sharding import NamedSharding

from simcse_jax.hf_io import load_pretrained, load_tokenizer
from simcse_jax.objective import ObjectiveConfig
from simcse_jax.optim import OptimConfig, linear_schedule, make_optimizer
from simcse_jax.sharding import batch_sharding, make_mesh, param_shardings
from simcse_jax.train_step import init_train_state, make_train_step, objective_config, optim_config

SENTENCES = REAL_SENTENCES + ["The cat sleeps on the warm windowsill.", "Parliament passed the budget after a long debate."]
MAX_LEN = 32


def _unsup_batch(tokenizer):
    enc = tokenizer(SENTENCES, padding="max_length", max_length=MAX_LEN, truncation=True, return_tensors="np")
    # [B, 2, L]: every sentence twice, as the unsupervised collator builds it.
    return {k: np.repeat(enc[k][:, None].astype(np.int32), 2, axis=1) for k in ("input_ids", "attention_mask", "token_type_ids")}


class CompileCounter:
    """Counts XLA backend compiles (jax.monitoring event, stable across jax 0.10-0.12)."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        self.count = 0

    def __call__(self, event, duration, **kwargs):
        if event == self.EVENT:
            self.count += 1

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self)


@pytest.mark.slow
def test_update_on_minilm_lowers_loss_and_compiles_once(minilm_dir):
    loaded = load_pretrained(minilm_dir)
    mesh = make_mesh({"data": 4, "fsdp": 2})
    optim = OptimConfig(total_steps=100, learning_rate=5e-5, weight_decay=0.01)
    optimizer = make_optimizer(optim)
    graphdef, state, shardings = init_train_state(loaded.model, optimizer, mesh)

    # Born sharded: every parameter and both Adam moments carry the rules' sharding.
    expected = jax.tree.leaves(param_shardings(state.params, mesh))
    assert [p.sharding for p in jax.tree.leaves(state.params)] == expected
    assert any(s.spec != jax.sharding.PartitionSpec() for s in expected)  # fsdp really splits something
    adam = state.opt_state[1][0]
    for moment in (adam.mu, adam.nu):
        assert [m.sharding for m in jax.tree.leaves(moment)] == expected

    step = make_train_step(
        graphdef, optimizer, mesh, shardings, ObjectiveConfig(pooler="cls", mlp_only_train=True), optim,
        # LLVM's cheap pipeline: the compile dominates this test on 2 cores; results are unchanged.
        compiler_options=dict(xla_backend_optimization_level=0, xla_llvm_disable_expensive_passes=True),
    )
    batch = jax.device_put(_unsup_batch(load_tokenizer(minilm_dir)), batch_sharding(mesh, 3))
    key = jax.random.key(0)
    losses, lrs = [], []
    with CompileCounter() as compiles:
        for i in range(3):
            state, meas = step(state, batch, key)  # same key: the same dropout masks every step
            losses.append(float(meas["loss"]))
            lrs.append(float(meas["learning_rate"]))
            if i == 0:
                first = compiles.count
    assert first >= 1 and compiles.count == first, f"recompiled: {first} compiles after step 1, {compiles.count} after step 3"

    assert losses[1] < losses[0] and losses[2] < losses[1], losses
    np.testing.assert_allclose(lrs, [float(linear_schedule(optim)(s)) for s in range(3)], rtol=1e-6)
    assert int(state.step) == 3
    expected_keys = {"loss", "simcse_loss", "accuracy", "alignment", "uniformity", "grad_norm", "update_norm", "param_norm",
                     "learning_rate"}
    assert set(meas) == expected_keys
    assert 0.0 <= float(meas["accuracy"]) <= 1.0 and float(meas["loss"]) == float(meas["simcse_loss"])
    assert 0.0 < float(meas["alignment"]) < 4.0 and float(meas["uniformity"]) < 0.0
    assert all(np.isfinite(float(v)) and float(v) > 0 for k, v in meas.items() if k.endswith("norm"))
    # The state stays in its declared layout after donated updates.
    assert [p.sharding for p in jax.tree.leaves(state.params)] == expected
    assert all(isinstance(v.sharding, NamedSharding) and v.sharding.is_fully_replicated for v in meas.values())
    # The model the state was built from is untouched by the donation.
    assert np.isfinite(np.asarray(loaded.model.pooler.dense.kernel[...])).all()


def test_bad_batch_and_chunk_settings_fail_at_trace_with_the_key_named():
    from flax import nnx

    from simcse_jax.encoder import Encoder, EncoderConfig

    cfg = EncoderConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    mesh = make_mesh({"data": 8})
    optim = OptimConfig(total_steps=10)
    optimizer = make_optimizer(optim)
    graphdef, state, sh = init_train_state(Encoder(cfg, rngs=nnx.Rngs(0)), optimizer, mesh)
    step = make_train_step(graphdef, optimizer, mesh, sh, ObjectiveConfig(grad_cache_chunk_size=12), optim)
    ids = jnp.ones((16, 2, 8), jnp.int32)
    batch = jax.device_put(dict(input_ids=ids, attention_mask=ids, token_type_ids=0 * ids), batch_sharding(mesh, 3))
    with pytest.raises(ValueError, match=r"grad_cache_chunk_size: must divide global_batch_size 16.*\(got 12\)"):
        step(state, batch, jax.random.key(0))


def test_in_step_dropout_key_is_fold_in_of_the_base_key_and_the_step_counter():
    """fold_in_step=True (the trainer's step) draws update s's dropout from fold_in(base, s): the
    same masks, hence the same state, as the eager per-step fold_in it replaced."""
    from flax import nnx

    from simcse_jax.encoder import Encoder, EncoderConfig

    cfg = EncoderConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                        hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3)
    mesh = make_mesh({"data": -1})
    optim = OptimConfig(total_steps=10, learning_rate=1e-2)
    optimizer = make_optimizer(optim)
    ids = jax.random.randint(jax.random.key(1), (8, 2, 8), 1, 50, jnp.int32)
    batch = jax.device_put(dict(input_ids=ids, attention_mask=jnp.ones_like(ids), token_type_ids=0 * ids), batch_sharding(mesh, 3))
    base = jax.random.key(42)
    runs = {}
    for in_step in (True, False):
        graphdef, state, sh = init_train_state(Encoder(cfg, rngs=nnx.Rngs(0)), optimizer, mesh)
        step = make_train_step(graphdef, optimizer, mesh, sh, ObjectiveConfig(), optim, fold_in_step=in_step)
        losses = []
        for s in range(3):
            state, meas = step(state, batch, base if in_step else jax.random.fold_in(base, s))
            losses.append(float(meas["loss"]))
        runs[in_step] = (losses, jax.tree.leaves(state.params))
    assert runs[True][0] == runs[False][0]
    for a, b in zip(runs[True][1], runs[False][1]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # ... and the key does matter: passing the base key unchanged to a step without the counter
    # repeats step 0's masks, so the losses part from step 1 on.
    graphdef, state, sh = init_train_state(Encoder(cfg, rngs=nnx.Rngs(0)), optimizer, mesh)
    step = make_train_step(graphdef, optimizer, mesh, sh, ObjectiveConfig(), optim)
    repeated = []
    for _ in range(3):
        state, meas = step(state, batch, base)
        repeated.append(float(meas["loss"]))
    assert repeated[1:] != runs[True][0][1:]


# ObjectiveConfig / OptimConfig field -> (the TrainConfig key it is set from, a valid non-default value).
OBJECTIVE_FROM_CONFIG = {
    "temperature": ("temperature", 0.07),
    "hard_negative_weight": ("hard_negative_weight", 1.5),
    "pooler": ("pooler", "avg_first_last"),
    "mlp_only_train": ("mlp_only_train", True),
    "do_mlm": ("do_mlm", True),
    "mlm_weight": ("mlm_weight", 0.3),
    "grad_cache_chunk_size": ("grad_cache_chunk_size", 8),
    "contrastive_impl": ("contrastive_impl", "ring"),
    "contrastive_block_size": ("contrastive_block_size", 64),
    "gradient_accumulation_steps": ("gradient_accumulation_steps", 4),  # refused: the refusal shows it arrived
}
OPTIM_FROM_CONFIG = {
    "learning_rate": ("learning_rate", 7e-5),
    "warmup_steps": ("warmup_steps", 3),
    "weight_decay": ("weight_decay", 0.01),
    "adam_beta1": ("adam_beta1", 0.8),
    "adam_beta2": ("adam_beta2", 0.98),
    "adam_epsilon": ("adam_epsilon", 1e-6),
    "max_grad_norm": ("max_grad_norm", 2.0),
    "reference_world_size": ("reference_world_size", 4),
}


@pytest.mark.parametrize(("cls", "derive", "mapping"), [
    (ObjectiveConfig, objective_config, OBJECTIVE_FROM_CONFIG),
    (OptimConfig, lambda config: optim_config(config, total_steps=10), OPTIM_FROM_CONFIG),
], ids=["objective", "optim"])
def test_every_objective_and_optimiser_field_is_set_from_its_config_key(cls, derive, mapping):
    """A field added to ObjectiveConfig / OptimConfig must be listed above and set by
    objective_config / optim_config; a TrainConfig key renamed or dropped fails here too."""
    import dataclasses

    from simcse_jax.config import TrainConfig
    from simcse_jax.errors import ConfigError

    derived_fields = {f.name for f in dataclasses.fields(cls)} - {"total_steps"}
    assert derived_fields == set(mapping), f"{cls.__name__} fields not listed here (and maybe not derived): " \
                                           f"{sorted(derived_fields ^ set(mapping))}"
    defaults = TrainConfig()
    for field, (key, probe) in mapping.items():
        assert probe != getattr(defaults, key) and probe != getattr(derive(defaults), field), (field, probe)
        config = defaults.replace(**{key: probe})  # TypeError if TrainConfig lost the key
        try:
            assert getattr(derive(config), field) == probe, f"{cls.__name__}.{field} is not taken from {key}"
        except ConfigError as e:  # a probe the section's own rules refuse: it reached the section
            assert field in str(e), e
