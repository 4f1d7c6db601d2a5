"""Importing Hugging Face folders: the rule set, the legacy names, and errors that name the problem."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from simcse_jax.errors import CheckpointError
from simcse_jax.hf_io import hf_key_to_path, load_pretrained, resolve_model_dir

TINY = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=24)


def test_key_rules():
    assert hf_key_to_path("bert.encoder.layer.3.attention.self.query.weight") == (
        "encoder", "layer", "3", "attention", "self", "query", "weight")
    assert hf_key_to_path("roberta.embeddings.LayerNorm.gamma") == ("embeddings", "LayerNorm", "weight")
    assert hf_key_to_path("embeddings.LayerNorm.beta") == ("embeddings", "LayerNorm", "bias")
    assert hf_key_to_path("embeddings.position_ids") is None
    assert hf_key_to_path("cls.predictions.decoder.weight") is None  # tied to the word embeddings
    assert hf_key_to_path("lm_head.decoder.bias") is None


def _hidden(model_dir, loaded, ids):
    tm = transformers.AutoModel.from_pretrained(str(model_dir)).eval()
    with torch.no_grad():
        theirs = tm(input_ids=torch.tensor(ids)).last_hidden_state.numpy()
    ours = np.asarray(loaded.model(jnp.asarray(ids)).last_hidden_state)
    return ours, theirs


def test_mlm_checkpoint_with_prefix_and_legacy_names_in_pytorch_bin(tmp_path):
    """A BertForMaskedLM `pytorch_model.bin` with `bert.` prefixes and TF-era gamma/beta names."""
    torch.manual_seed(0)
    mlm = transformers.BertForMaskedLM(transformers.BertConfig(**TINY)).eval()
    sd = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
          for k, v in mlm.state_dict().items()}
    assert any(k.startswith("bert.") for k in sd) and any(k.endswith("gamma") for k in sd)
    mlm.config.save_pretrained(tmp_path)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    loaded = load_pretrained(tmp_path)
    assert loaded.weights_file.name == "pytorch_model.bin"
    assert loaded.model.config.with_mlm_head
    assert loaded.initialized == ["pooler.dense.bias", "pooler.dense.weight"]  # BertForMaskedLM has no pooler
    ids = np.array([[2, 5, 9, 11, 3]])
    ours_h = loaded.model(jnp.asarray(ids)).last_hidden_state
    with torch.no_grad():
        theirs = mlm(input_ids=torch.tensor(ids))
    np.testing.assert_allclose(np.asarray(loaded.model.mlm_logits(ours_h)), theirs.logits.numpy(), atol=1e-5)


def test_roberta_lm_head_is_kept(tmp_path):
    torch.manual_seed(0)
    mlm = transformers.RobertaForMaskedLM(transformers.RobertaConfig(**TINY, pad_token_id=1)).eval()
    mlm.save_pretrained(tmp_path)
    loaded = load_pretrained(tmp_path)
    assert loaded.model.config.with_mlm_head
    ids = np.array([[0, 5, 9, 11, 2, 1]])
    mask = (ids != 1).astype(np.int32)
    h = loaded.model(jnp.asarray(ids), jnp.asarray(mask)).last_hidden_state
    with torch.no_grad():
        theirs = mlm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    np.testing.assert_allclose(np.asarray(loaded.model.mlm_logits(h))[mask == 1], theirs[mask == 1], atol=1e-5)


def test_folder_without_weights(tmp_path):
    transformers.BertConfig(**TINY).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"no weights found; expected one of model.safetensors.*present: config.json"):
        load_pretrained(tmp_path)


def test_folder_without_config(tmp_path):
    with pytest.raises(CheckpointError, match=r"config.json not found"):
        load_pretrained(tmp_path)


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(CheckpointError, match=r"config.json: model_type 'gpt2'.*not supported"):
        load_pretrained(tmp_path)


def test_truncated_safetensors(tmp_path):
    transformers.BertModel(transformers.BertConfig(**TINY)).save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model.safetensors: cannot read weights"):
        load_pretrained(tmp_path)


def test_shape_mismatch_names_file_and_parameter(tmp_path):
    transformers.BertModel(transformers.BertConfig(**TINY)).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 40
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    expected = (r"model.safetensors: parameter encoder.layer.0.intermediate.dense.(weight|bias) has shape \(32(, 16)?,?\) "
                r"but the architecture in .*config.json expects \(40(, 16)?,?\)")
    with pytest.raises(CheckpointError, match=expected):
        load_pretrained(tmp_path)


def test_missing_parameter_is_an_error(tmp_path):
    from safetensors.torch import save_file

    model = transformers.BertModel(transformers.BertConfig(**TINY))
    model.config.save_pretrained(tmp_path)
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if "layer.1.output.dense" not in k}
    save_file(sd, tmp_path / "model.safetensors")
    expected = (r"model.safetensors: missing parameters encoder.layer.1.output.dense.bias, "
                r"encoder.layer.1.output.dense.weight \(2 in all\)")
    with pytest.raises(CheckpointError, match=expected):
        load_pretrained(tmp_path)


def test_hub_name_offline_says_what_to_pass(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match=r"'bert-base-uncased' is not a local folder.*pass a local folder holding config.json"):
        resolve_model_dir("bert-base-uncased")
    with pytest.raises(CheckpointError, match=r"does not exist"):
        resolve_model_dir("./no/such/folder")


def test_minilm_folder_copy_loads_without_extra_files(minilm_dir, tmp_path):
    for name in ("config.json", "model.safetensors"):
        shutil.copy(minilm_dir / name, tmp_path / name)
    loaded = load_pretrained(tmp_path)
    ours, theirs = _hidden(tmp_path, loaded, np.array([[101, 7592, 2088, 102]]))
    assert np.abs(ours - theirs).max() <= 1e-5
    assert loaded.initialized == [] and loaded.ignored == []


def _hub_cache(root, repo_id, folder):
    """A huggingface_hub cache holding `folder` as `repo_id` at revision main: a Hub id that
    resolves offline, as on a machine that downloaded it before."""
    repo, commit = root / f"models--{repo_id.replace('/', '--')}", "0" * 40
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit


@pytest.mark.parametrize("kind", ["local", "builtin", "gs", "hub"])
def test_train_plan_and_encode_resolve_every_kind_of_model_name_alike(kind, tiny_model_dir, minilm_dir, request,
                                                                      tmp_path, monkeypatch, capsys):
    import huggingface_hub

    from simcse_jax import cli, paths, train
    from simcse_jax.hf_io import read_config
    from simcse_jax.planner import plan

    if kind == "local":
        name, want = str(tiny_model_dir), tiny_model_dir
    elif kind == "builtin":
        name, want = "builtin:minilm", minilm_dir
    elif kind == "gs":
        name = f"{request.getfixturevalue('gcs_bucket')}/models/tiny"
        paths.upload_folder(tiny_model_dir, name)
        want = resolve_model_dir(name)  # this host's cached copy
        assert (want / "model.safetensors").read_bytes() == (tiny_model_dir / "model.safetensors").read_bytes()
    else:
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
        name, want = "simcse-test/tiny-bert", _hub_cache(tmp_path / "hub", "simcse-test/tiny-bert", tiny_model_dir)
    assert resolve_model_dir(name) == want

    assert train.resolve_model_dir is resolve_model_dir  # the trainer's resolver (train.train: config.model)
    assert plan.model_config(name)[0] == read_config(want)
    src = tmp_path / "in.txt"
    src.write_text("A man is playing a guitar.\n")
    assert cli.main(["encode", "--model", name, "--input", str(src), "--output", str(tmp_path / "out.npy")]) == 0
    assert f"model {want})" in capsys.readouterr().err


def test_unknown_builtin_and_unreachable_hub_ids_are_refused_alike(tmp_path, monkeypatch, capsys):
    from simcse_jax import cli
    from simcse_jax.planner import plan

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = tmp_path / "in.txt"
    src.write_text("A sentence.\n")
    for name, message in (("builtin:nothing", "no such built-in model; the built-in models are builtin:minilm"),
                          ("simcse-test/absent", "'simcse-test/absent' is not a local folder and could not be fetched")):
        with pytest.raises(CheckpointError, match=message):
            resolve_model_dir(name)
        with pytest.raises(plan.PlanError, match=message):
            plan.model_config(name)
        assert cli.main(["encode", "--model", name, "--input", str(src), "--output", str(tmp_path / "o.npy")]) == 1
        assert message in capsys.readouterr().err
