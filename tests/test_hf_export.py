"""JAX -> Hugging Face export (`simcse_jax.hf_export`) and the `import` / `export` commands:
the exported folder reproduces our encoder in transformers, sentence-transformers and the
`simcse` tool."""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import REAL_SENTENCES
from flax import nnx
from safetensors import safe_open
from transformers import AutoModel, AutoTokenizer

from simcse_jax import checkpoint as ck
from simcse_jax import cli
from simcse_jax.encode import SentenceEncoder
from simcse_jax.encoder import Encoder, EncoderConfig
from simcse_jax.errors import ExportError
from simcse_jax.hf_export import export_model, hf_state_dict, verify_export
from simcse_jax.hf_io import load_pretrained, load_tokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def torch_outputs(folder, sentences=REAL_SENTENCES, model=None):
    tok = AutoTokenizer.from_pretrained(str(folder))
    model = model or AutoModel.from_pretrained(str(folder)).eval()
    batch = tok(list(sentences), padding=True, return_tensors="pt")
    with torch.inference_mode():
        out = model(**batch)
    return out, batch["attention_mask"].numpy().astype(bool)


@nnx.jit
def _last_hidden(model, input_ids, attention_mask):
    return model(input_ids, attention_mask).last_hidden_state


def jax_last_hidden(model, tokenizer, sentences=REAL_SENTENCES):
    batch = tokenizer(list(sentences), padding=True, return_tensors="np")
    return np.asarray(_last_hidden(model, batch["input_ids"], batch["attention_mask"])), batch["attention_mask"].astype(bool)


def embed_jax(model, tokenizer, pooler, sentences=REAL_SENTENCES):
    return SentenceEncoder(model, tokenizer, pooler=pooler, batch_size=8)(list(sentences))


@pytest.fixture(scope="module")
def minilm_export(minilm_dir, tmp_path_factory):
    """MiniLM through the CLI: import -> checkpoint -> export (with its own verification)."""
    root = tmp_path_factory.mktemp("minilm")
    assert cli.main(["import", str(minilm_dir), "--out", str(root / "ckpt"), "--pooler", "avg"]) == 0
    assert cli.main(["export", str(root / "ckpt"), "--out", str(root / "hf")]) == 0
    return root / "ckpt", root / "hf"


@pytest.fixture(scope="module")
def minilm_jax(minilm_export):
    """The checkpoint's encoder and tokenizer, loaded once."""
    ckpt, _ = minilm_export
    return ck.load_checkpoint(ckpt).model, load_tokenizer(ckpt / "tokenizer")


def test_minilm_round_trip(minilm_dir, minilm_export, minilm_jax):
    ckpt, out = minilm_export
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["BertModel"] and cfg["model_type"] == "bert"
    with safe_open(str(out / "model.safetensors"), "np") as f:
        assert f.metadata() == {"format": "pt"}
        keys = set(f.keys())
    assert not any("position_ids" in k for k in keys)
    for name in ("tokenizer.json", "tokenizer_config.json", "modules.json", "sentence_bert_config.json", "1_Pooling/config.json",
                 "README.md"):
        assert (out / name).is_file(), name

    exported, info = AutoModel.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    original = AutoModel.from_pretrained(str(minilm_dir)).eval()
    sd_new, sd_old = exported.state_dict(), original.state_dict()
    assert sd_new.keys() == sd_old.keys()
    for k in sd_old:
        assert torch.equal(sd_new[k], sd_old[k]), k

    theirs, mask = torch_outputs(out, model=exported.eval())
    ref, _ = torch_outputs(minilm_dir, model=original)
    mine, jmask = jax_last_hidden(*minilm_jax)
    assert (mask == jmask).all()
    assert np.abs(theirs.last_hidden_state.numpy() - ref.last_hidden_state.numpy())[mask].max() <= 1e-6
    assert np.abs(theirs.last_hidden_state.numpy() - mine)[mask].max() <= 1e-5


def test_minilm_sentence_transformers_avg(minilm_export, minilm_jax):
    from sentence_transformers import SentenceTransformer

    ckpt, out = minilm_export
    modules = json.loads((out / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[1] for m in modules] == ["Transformer", "Pooling"]
    assert json.loads((out / "1_Pooling" / "config.json").read_text())["pooling_mode_mean_tokens"] is True
    st = SentenceTransformer(str(out), device="cpu")
    got = st.encode(REAL_SENTENCES, convert_to_numpy=True)
    want = embed_jax(*minilm_jax, "avg")
    assert np.abs(got - want).max() <= 1e-5


def test_random_roberta_with_mlm_head(minilm_tokenizer_dir, tmp_path):
    """A random-init RobertaForMaskedLM: the MLM head is dropped, the encoder reproduced."""
    from transformers import RobertaConfig, RobertaForMaskedLM

    torch.manual_seed(0)
    cfg = RobertaConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=66, type_vocab_size=1)
    src = tmp_path / "src"
    RobertaForMaskedLM(cfg).save_pretrained(src)
    for f in TOKENIZER_FILES:
        shutil.copy(minilm_tokenizer_dir / f, src / f)
    loaded = load_pretrained(src)
    assert loaded.model.config.with_mlm_head
    tok = load_tokenizer(src)
    out = export_model(loaded.model, tok, tmp_path / "hf", pooler="avg", hf_config=loaded.hf_config)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["RobertaModel"]
    assert not any(k.startswith("lm_head") for k in hf_state_dict(loaded.model))
    exported, info = AutoModel.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    theirs, mask = torch_outputs(out, model=exported.eval())
    ref, _ = torch_outputs(src, model=RobertaForMaskedLM.from_pretrained(str(src)).roberta.eval())
    mine, _ = jax_last_hidden(loaded.model, tok)
    assert np.abs(theirs.last_hidden_state.numpy() - ref.last_hidden_state.numpy())[mask].max() <= 1e-6
    assert np.abs(theirs.last_hidden_state.numpy() - mine)[mask].max() <= 1e-6


@pytest.fixture(scope="module")
def cls_model(minilm_tokenizer_dir):
    """A small BERT 'trained' with the cls pooler: its pooler.dense is the SimCSE MLP (random here)."""
    cfg = EncoderConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    return Encoder(cfg, rngs=nnx.Rngs(11)), load_tokenizer(minilm_tokenizer_dir)


def test_cls_pooler_is_pooler_output_and_loads_everywhere(cls_model, tmp_path):
    import simcse  # installed by the README test command: pip install --no-deps simcse (it pins numpy<1.20)
    from sentence_transformers import SentenceTransformer
    model, tok = cls_model
    out = export_model(model, tok, tmp_path / "hf", pooler="cls", hf_config={"model_type": "bert"},
                       meta={"pooler": "cls", "mlp_only_train": False, "step": 100, "train_config": {"lr": 3e-5}},
                       scores={"STSBenchmark": 80.0, "Avg.": 80.0})
    want = embed_jax(model, tok, "cls")
    # pooler_output *is* the MLP over [CLS]
    theirs, _ = torch_outputs(out)
    h, _ = jax_last_hidden(model, tok)
    mlp = np.asarray(model.pooler(h[:, 0]))
    assert np.abs(theirs.pooler_output.numpy() - mlp).max() <= 1e-6
    assert np.abs(theirs.pooler_output.numpy() - want).max() <= 1e-6
    # sentence-transformers: CLS pooling + the tanh Dense carrying pooler.dense
    assert [m["path"] for m in json.loads((out / "modules.json").read_text())] == ["", "1_Pooling", "2_Dense"]
    st = SentenceTransformer(str(out), device="cpu")
    assert np.abs(st.encode(REAL_SENTENCES, convert_to_numpy=True) - want).max() <= 1e-5
    # the SimCSE reference tool
    tool = simcse.SimCSE(str(out), device="cpu", pooler="cls")
    got = tool.encode(REAL_SENTENCES, return_numpy=True, normalize_to_unit=False, max_length=64)
    assert np.abs(got - want).max() <= 1e-5
    card = (out / "README.md").read_text()
    assert "pooler `cls`" in card and "80.00" in card and '"lr": 3e-05' in card


def test_mlp_only_train_exports_cls_before_pooler(cls_model, tmp_path):
    import simcse  # installed by the README test command: pip install --no-deps simcse (it pins numpy<1.20)
    from sentence_transformers import SentenceTransformer
    model, tok = cls_model
    ck.save_checkpoint(tmp_path / "ckpt", 5, model, hf_config={"model_type": "bert"}, pooler="cls",
                       mlp_only_train=True, tokenizer=tok)
    assert cli.main(["export", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")]) == 0
    out = tmp_path / "hf"
    want = embed_jax(model, tok, "cls_before_pooler")
    assert not (out / "2_Dense").exists()
    assert json.loads((out / "1_Pooling" / "config.json").read_text())["pooling_mode_cls_token"] is True
    st = SentenceTransformer(str(out), device="cpu")
    assert np.abs(st.encode(REAL_SENTENCES, convert_to_numpy=True) - want).max() <= 1e-5
    got = simcse.SimCSE(str(out), device="cpu", pooler="cls_before_pooler").encode(
        REAL_SENTENCES, return_numpy=True, normalize_to_unit=False, max_length=64)
    assert np.abs(got - want).max() <= 1e-5
    assert "mlp_only_train" in (out / "README.md").read_text()


def test_refuses_non_empty_folder_and_overwrites_when_told(cls_model, tmp_path):
    model, tok = cls_model
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ExportError, match=f"{out} is not empty"):
        export_model(model, tok, out, pooler="cls", verify=False)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    export_model(model, tok, out, pooler="cls", verify=False, overwrite=True)
    assert (out / "2_Dense").is_dir()
    export_model(model, tok, out, pooler="avg", verify=False, overwrite=True)
    assert not (out / "2_Dense").exists()  # a stale Dense would change sentence-transformers' output
    assert len(json.loads((out / "modules.json").read_text())) == 2


def test_verification_catches_a_mismatch(cls_model, tmp_path):
    model, tok = cls_model
    out = export_model(model, tok, tmp_path / "hf", pooler="cls", verify=False)
    other = Encoder(model.config, rngs=nnx.Rngs(12))  # different weights than the folder holds
    with pytest.raises(ExportError, match=r"reproduces the cls embeddings only to"):
        verify_export(out, other, tok, "cls")


def test_export_of_a_non_checkpoint_is_a_clear_error(minilm_dir, tmp_path, capsys):
    assert cli.main(["export", str(minilm_dir), "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: export: {minilm_dir} is not a simcse-jax checkpoint") and "simcse-jax import" in err


def test_export_of_a_bf16_trained_checkpoint_verifies_in_float32(minilm_tokenizer_dir, tmp_path, capsys):
    """A checkpoint trained with bfloat16 compute exports (float32 parameters) and verifies against
    transformers in float32 to 1e-5: the check compares weights, not bf16 rounding, which alone
    moves these embeddings far more than the limit."""
    cfg = EncoderConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, compute_dtype="bfloat16")
    bf16 = Encoder(cfg, rngs=nnx.Rngs(5))
    tok = load_tokenizer(minilm_tokenizer_dir)
    ck.save_checkpoint(tmp_path / "ckpt", 7, bf16, hf_config={"model_type": "bert"}, pooler="cls", mlp_only_train=True,
                       tokenizer=tok)
    assert ck.load_meta(tmp_path / "ckpt")["encoder_config"]["compute_dtype"] == "bfloat16"
    assert cli.main(["export", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")]) == 0, capsys.readouterr().err

    from simcse_jax.encoder import with_compute_dtype

    fp32 = with_compute_dtype(bf16, "float32")
    assert fp32.config.compute_dtype == "float32" and with_compute_dtype(fp32, "float32") is fp32
    theirs = torch_outputs(tmp_path / "hf")[0].last_hidden_state[:, 0].numpy()
    ours_fp32 = embed_jax(fp32, tok, "cls_before_pooler")
    ours_bf16 = embed_jax(bf16, tok, "cls_before_pooler")
    np.testing.assert_allclose(ours_fp32, theirs, atol=1e-5)
    assert np.abs(ours_bf16 - theirs).max() > 10 * 1e-5  # what the old, compute-dtype check compared
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "np") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {np.dtype(np.float32)}
