"""A model folder must bring the tokenizer its model was trained with. Without tokenizer files,
transformers 5 builds an empty 5-token BertTokenizer that turns every word into [UNK], and a run
on it "succeeds"; every command that loads a model folder refuses that in one line instead."""

import json
import os
import shutil

import pytest
import transformers

from simcse_jax import cli
from simcse_jax.hf_io import CheckpointError, load_tokenizer

REFUSAL = "no usable tokenizer"


@pytest.fixture(scope="module")
def no_tokenizer_dir(tmp_path_factory, minilm_dir):
    """The MiniLM checkpoint's config.json and weights, and nothing else."""
    folder = tmp_path_factory.mktemp("minilm_without_tokenizer")
    shutil.copy(minilm_dir / "config.json", folder / "config.json")
    os.symlink(minilm_dir / "model.safetensors", folder / "model.safetensors")  # 90 MB: read, never written
    return folder


def assert_one_line_refusal(capsys, code: int, folder) -> None:
    err = capsys.readouterr().err
    assert code == 1
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert f"{folder}: {REFUSAL}" in lines[0] and "vocab.txt" in lines[0] and "tokenizer.json" in lines[0], lines[0]


# ----------------------------------------------------------------------------- the check itself


def test_transformers_builds_an_all_unknown_tokenizer_for_such_a_folder(no_tokenizer_dir):
    """Why the check exists: this is what a plain AutoTokenizer gives (if transformers ever refuses
    on its own, load_tokenizer still refuses, through its load-error branch)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(no_tokenizer_dir))
    assert len(tokenizer) == 5
    assert tokenizer("hello world, this is a test")["input_ids"] == [2, 1, 1, 1, 1, 1, 1, 1, 3]


def test_a_folder_without_tokenizer_files_is_refused(no_tokenizer_dir):
    with pytest.raises(CheckpointError) as e:
        load_tokenizer(no_tokenizer_dir)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"{no_tokenizer_dir}: {REFUSAL} (5 tokens for a model with vocab_size 30522)")
    assert "vocab.txt" in message and "tokenizer.json" in message and "present: config.json, model.safetensors" in message


def test_a_vocabulary_larger_than_the_embedding_table_is_refused(minilm_tokenizer_dir, tmp_path):
    """Ids past vocab_size would be clamped by JAX's gather, not reported."""
    for name in os.listdir(minilm_tokenizer_dir):
        shutil.copy(minilm_tokenizer_dir / name, tmp_path / name)
    transformers.BertConfig(vocab_size=1000, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=32).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"its 30522 tokens do not fit the model's vocab_size 1000"):
        load_tokenizer(tmp_path)
    assert len(load_tokenizer(tmp_path, vocab_size=30522)) == 30522  # the caller's vocab_size wins


def test_a_tokenizer_that_maps_english_to_unknown_is_refused(tmp_path):
    """A real WordPiece vocabulary of the right size, but of no English words."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    (tmp_path / "vocab.txt").write_text("\n".join(specials + [f"q{i}z" for i in range(995)]) + "\n")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True}))
    with pytest.raises(CheckpointError, match=rf"{REFUSAL} \(\d+ of the \d+ tokens of a plain English sentence are \[UNK\]\)"):
        load_tokenizer(tmp_path, vocab_size=1000)


def test_a_random_model_with_a_real_tokenizer_passes(tiny_model_dir, minilm_dir):
    assert len(load_tokenizer(tiny_model_dir)) == 30522
    assert load_tokenizer(minilm_dir)("hello world")["input_ids"] == [101, 7592, 2088, 102]


# ----------------------------------------------------------------------------- every command


def test_train_refuses_before_writing_anything(no_tokenizer_dir, tmp_path, capsys):
    workdir = tmp_path / "run"
    code = cli.main(["train", "--config", "configs/demo_cpu.py", "--workdir", str(workdir), "--no-progress",
                     "--set", f"model={no_tokenizer_dir}", "--set", "max_steps=1"])
    assert_one_line_refusal(capsys, code, no_tokenizer_dir)
    assert not workdir.exists()


def test_encode_refuses_and_writes_no_output(no_tokenizer_dir, tmp_path, capsys):
    src = tmp_path / "in.txt"
    src.write_text("A man is playing a guitar.\n")
    code = cli.main(["encode", "--model", str(no_tokenizer_dir), "--input", str(src), "--output", str(tmp_path / "out.npy")])
    assert_one_line_refusal(capsys, code, no_tokenizer_dir)
    assert sorted(os.listdir(tmp_path)) == ["in.txt"]


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_eval_refuses_and_writes_no_output(backend, no_tokenizer_dir, sts_dir, tmp_path, capsys):
    out = tmp_path / "results.json"
    code = cli.main(["eval", str(no_tokenizer_dir), "--sts-dir", str(sts_dir), "--tasks", "STS16", "--pooler", "avg",
                     "--backend", backend, "--output", str(out)])
    assert_one_line_refusal(capsys, code, no_tokenizer_dir)
    assert not out.exists()


def test_import_refuses_and_overwrite_keeps_the_existing_checkpoint(no_tokenizer_dir, tiny_model_dir, tmp_path, capsys):
    fresh = tmp_path / "fresh"
    assert_one_line_refusal(capsys, cli.main(["import", str(no_tokenizer_dir), "--out", str(fresh)]), no_tokenizer_dir)
    assert not fresh.exists()

    existing = tmp_path / "existing"
    assert cli.main(["import", str(tiny_model_dir), "--out", str(existing)]) == 0
    before = sorted(p.relative_to(existing) for p in existing.rglob("*"))
    capsys.readouterr()
    code = cli.main(["import", str(no_tokenizer_dir), "--out", str(existing), "--overwrite"])
    assert_one_line_refusal(capsys, code, no_tokenizer_dir)
    assert sorted(p.relative_to(existing) for p in existing.rglob("*")) == before
    assert json.loads((existing / "tokenizer" / "tokenizer_config.json").read_text())  # still a whole checkpoint
