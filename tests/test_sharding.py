"""Sharded forward == single-device forward; the BERT-base partition specs are pinned."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from simcse_jax.encoder import Encoder, EncoderConfig
from simcse_jax.poolers import pool
from simcse_jax.sharding import (
    batch_sharding,
    logical_to_spec,
    make_mesh,
    param_partition_specs,
    param_shardings,
)

MESHES = [{"data": 8}, {"data": 4, "tensor": 2}, {"fsdp": 8}, {"data": 2, "fsdp": 2, "tensor": 2}]


@pytest.fixture(scope="module")
def small_model():
    """Random BERT weights (BERT's initialiser), built in JAX: sharding needs no PyTorch."""
    cfg = EncoderConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=32)
    return Encoder(cfg, rngs=nnx.Rngs(0))


def forward(model, ids, mask):
    out = model(ids, mask, output_hidden_states=True)
    return out.last_hidden_state, pool("avg_first_last", out, mask), pool("cls", out, mask, model)


@pytest.mark.parametrize("axes", MESHES, ids=lambda a: ",".join(f"{k}={v}" for k, v in a.items()))
def test_sharded_forward_equals_single_device(small_model, axes):
    assert jax.device_count() == 8
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 96, (16, 12)).astype(np.int32)
    mask = (np.arange(12)[None] < rng.integers(2, 13, (16, 1))).astype(np.int32)
    graphdef, state = nnx.split(small_model)

    def fn(state, ids, mask):
        return forward(nnx.merge(graphdef, state), ids, mask)

    expected = jax.jit(fn)(state, ids, mask)

    mesh = make_mesh(axes)
    shardings = param_shardings(state, mesh)
    sharded_state = jax.device_put(state, shardings)
    row = batch_sharding(mesh)
    with jax.set_mesh(mesh):
        got = jax.jit(fn, in_shardings=(shardings, row, row))(sharded_state, jax.device_put(ids, row), jax.device_put(mask, row))
    # The parameters really are distributed as the rules say.
    kernel = sharded_state["encoder"]["layer"][0]["intermediate"]["dense"]["kernel"]
    spec = param_partition_specs(state, mesh)["encoder"]["layer"][0]["intermediate"]["dense"]["kernel"].get_value()
    assert kernel[...].sharding.spec == spec
    if axes.get("tensor", 1) > 1 or axes.get("fsdp", 1) > 1:
        assert len({str(s.index) for s in kernel[...].addressable_shards}) > 1
    for e, g in zip(expected, got):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), atol=1e-5, rtol=0)


# The golden partition specs of a BERT-base parameter tree under DEFAULT_RULES on the mesh
# (data=2, fsdp=2, tensor=2). A change of rules or attribute names shows up here as a diff.
GOLDEN_BERT_BASE = {
    "embeddings.word_embeddings.embedding": P("tensor", "fsdp"),
    "embeddings.position_embeddings.embedding": P(None, "fsdp"),
    "embeddings.token_type_embeddings.embedding": P(None, "fsdp"),
    "embeddings.LayerNorm.scale": P(),
    "embeddings.LayerNorm.bias": P(),
    "encoder.layer.{i}.attention.self.query.kernel": P("fsdp", "tensor"),
    "encoder.layer.{i}.attention.self.query.bias": P("tensor"),
    "encoder.layer.{i}.attention.self.key.kernel": P("fsdp", "tensor"),
    "encoder.layer.{i}.attention.self.key.bias": P("tensor"),
    "encoder.layer.{i}.attention.self.value.kernel": P("fsdp", "tensor"),
    "encoder.layer.{i}.attention.self.value.bias": P("tensor"),
    "encoder.layer.{i}.attention.output.dense.kernel": P("tensor", "fsdp"),
    "encoder.layer.{i}.attention.output.dense.bias": P(),
    "encoder.layer.{i}.attention.output.LayerNorm.scale": P(),
    "encoder.layer.{i}.attention.output.LayerNorm.bias": P(),
    "encoder.layer.{i}.intermediate.dense.kernel": P("fsdp", "tensor"),
    "encoder.layer.{i}.intermediate.dense.bias": P("tensor"),
    "encoder.layer.{i}.output.dense.kernel": P("tensor", "fsdp"),
    "encoder.layer.{i}.output.dense.bias": P(),
    "encoder.layer.{i}.output.LayerNorm.scale": P(),
    "encoder.layer.{i}.output.LayerNorm.bias": P(),
    "pooler.dense.kernel": P("fsdp"),
    "pooler.dense.bias": P(),
    "cls.predictions.bias": P("tensor"),
    "cls.predictions.transform.dense.kernel": P("fsdp"),
    "cls.predictions.transform.dense.bias": P(),
    "cls.predictions.transform.LayerNorm.scale": P(),
    "cls.predictions.transform.LayerNorm.bias": P(),
}


def test_golden_partition_specs_bert_base():
    cfg = EncoderConfig(with_mlm_head=True)  # bert-base-uncased shapes
    abstract = nnx.eval_shape(lambda: Encoder(cfg, rngs=nnx.Rngs(0)))
    specs = param_partition_specs(nnx.state(abstract, nnx.Param), make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))
    got = {}
    for path, spec in nnx.to_flat_state(specs):
        key = ".".join(str(p) for p in path)
        key = key.replace(".layer." + key.split(".layer.")[1].split(".")[0] + ".", ".layer.{i}.") if ".layer." in key else key
        got.setdefault(key, set()).add(spec.get_value())
    assert {k: v.pop() if len(v) == 1 else v for k, v in got.items()} == GOLDEN_BERT_BASE
    # The same parameter count as Hugging Face's BertForMaskedLM (tied decoder) plus BertModel's pooler.
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    with torch.device("meta"):
        mlm = transformers.BertForMaskedLM(transformers.BertConfig())
        pooler = transformers.BertModel(transformers.BertConfig()).pooler
    hf_count = sum(p.numel() for p in mlm.parameters()) + sum(p.numel() for p in pooler.parameters())
    assert sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract))) == hf_count


def test_indivisible_dimension_falls_back_to_replication():
    mesh = make_mesh({"tensor": 8})
    assert logical_to_spec(("vocab", "embed"), (30522, 768), mesh) == P()  # 30522 % 8 != 0
    assert logical_to_spec(("vocab", "embed"), (30528, 768), mesh) == P("tensor")


def test_mesh_builder_errors_name_the_problem():
    assert dict(make_mesh({"data": -1, "tensor": 2}).shape) == {"data": 4, "fsdp": 1, "tensor": 2}
    with pytest.raises(ValueError, match="unknown axis"):
        make_mesh({"model": 2})
    with pytest.raises(ValueError, match="do not fit 8 devices"):
        make_mesh({"data": 3, "fsdp": -1})
    with pytest.raises(ValueError, match="use 4 devices but 8"):
        make_mesh({"data": 2, "tensor": 2})
    assert make_mesh({"data": -1}).axis_types == (jax.sharding.AxisType.Auto,) * 3
