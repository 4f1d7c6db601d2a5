"""Orbax checkpoints of the encoder (`simcse_jax.checkpoint`): round trip, sharded restore,
trainer items added through the same dict -> Composite helpers, and clear errors."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from simcse_jax import checkpoint as ck
from simcse_jax.encoder import Encoder, EncoderConfig
from simcse_jax.errors import CheckpointError
from simcse_jax.sharding import make_mesh, param_shardings

CFG = EncoderConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=64, max_position_embeddings=40, with_mlm_head=True)
HF = {"model_type": "bert", "architectures": ["BertForMaskedLM"], "vocab_size": 64, "hidden_size": 32}


def flat(model):
    return {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    model = Encoder(CFG, rngs=nnx.Rngs(3))
    ck.save_checkpoint(d, 7, model, hf_config=HF, pooler="cls", mlp_only_train=True, train_config={"lr": 3e-5})
    return d, model


def test_round_trip_params_and_meta(saved):
    d, model = saved
    loaded = ck.load_checkpoint(d)
    assert loaded.step == 7
    assert loaded.model.config == CFG
    a, b = flat(model), flat(loaded.model)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    m = loaded.meta
    assert m["hf_config"] == HF and m["pooler"] == "cls" and m["mlp_only_train"] is True and m["step"] == 7
    assert m["train_config"] == {"lr": 3e-5}
    assert loaded.eval_pooler == "cls_before_pooler"  # mlp_only_train: MLP dropped at evaluation
    # the restored model runs
    ids = np.array([[2, 5, 9, 3]], np.int32)
    np.testing.assert_allclose(np.asarray(loaded.model(ids).last_hidden_state), np.asarray(model(ids).last_hidden_state))


def test_restore_onto_mesh_shardings(saved):
    d, model = saved
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    loaded = ck.load_checkpoint(d, mesh=mesh)
    state = nnx.state(loaded.model, nnx.Param)
    want = param_shardings(state, mesh)
    got_s = jax.tree.map(lambda v: v.sharding, nnx.to_pure_dict(state))
    want_s = nnx.to_pure_dict(want)
    for (path, g), (_, w) in zip(jax.tree_util.tree_flatten_with_path(got_s)[0], jax.tree_util.tree_flatten_with_path(want_s)[0]):
        assert g.is_equivalent_to(w, 2 if "kernel" in str(path) or "embedding" in str(path) else 1), path
    assert any(not s.is_fully_replicated for s in jax.tree.leaves(got_s))
    a, b = flat(model), flat(loaded.model)
    for k in a:
        np.testing.assert_array_equal(a[k], np.asarray(b[k]))


def test_trainer_items_through_same_helpers(tmp_path):
    """opt_state / rng / data_state join params+meta as extra dict entries."""
    model = Encoder(CFG, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    tx = optax.adamw(1e-3)
    opt_state = tx.init(nnx.to_pure_dict(params))
    opt_state = jax.tree.map(lambda x: x + 1 if hasattr(x, "dtype") and x.dtype == np.float32 else x, opt_state)
    rng = jax.random.key_data(jax.random.key(5))
    data_state = {"epoch": 1, "position": 1234}
    mngr = ck.manager(tmp_path, max_to_keep=2)
    for step in (1, 2, 3):
        ck.save_checkpoint(tmp_path, step, model, hf_config=HF, pooler="avg", mngr=mngr,
                           extra_items={"opt_state": opt_state, "rng": rng, "data_state": data_state})
    mngr.close()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["2", "3"]
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract_opt = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), opt_state)
    loaded = ck.load_checkpoint(tmp_path, step=2, extra_items={
        "opt_state": abstract_opt, "rng": jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=one), "data_state": None})
    assert loaded.step == 2 and loaded.extra["data_state"] == data_state
    np.testing.assert_array_equal(loaded.extra["rng"], rng)
    for x, y in zip(jax.tree.leaves(opt_state), jax.tree.leaves(loaded.extra["opt_state"])):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert jax.tree.structure(loaded.extra["opt_state"]) == jax.tree.structure(opt_state)


def test_not_a_checkpoint_dir(tmp_path):
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'nope'} does not exist"):
        ck.load_checkpoint(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=rf"{tmp_path} is not a simcse-jax checkpoint.*simcse-jax import"):
        ck.load_checkpoint(tmp_path)


def test_missing_step_named(saved):
    d, _ = saved
    with pytest.raises(CheckpointError, match=r"no step 5; available: \[7\]"):
        ck.load_checkpoint(d, step=5)
