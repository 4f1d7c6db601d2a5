"""The built-in demo corpus is frozen package data: the same sentences, split the same way, on every
supported Python (it used to be extracted from the running Python's standard library, and differed)."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from simcse_jax.corpus import corpus_sentences, corpus_sha256, extract_docstring_sentences, write_builtin_corpus

REPO = Path(__file__).resolve().parents[1]

# Changes only with `python -m simcse_jax.corpus --regenerate`, which changes the README's demo figures too.
DOCSTRINGS_SHA256 = "489eb0dccf1ffa2ab93d097fa33928fe411b421564b3710c06def053cbe2f69d"
DOCSTRINGS_SENTENCES, DOCSTRINGS_TRAIN, DOCSTRINGS_HELDOUT = 8183, 7773, 410
BUILT_FROM = (3, 11, 7)  # the CPython whose standard library the shipped list comes from

# What a Python with nothing installed computes: `-S` leaves site-packages out, so no jax, no numpy.
PROBE = """
import hashlib, json, sys, tempfile
from pathlib import Path
from simcse_jax.corpus import corpus_sha256, write_builtin_corpus
with tempfile.TemporaryDirectory() as tmp:
    files = write_builtin_corpus("docstrings", Path(tmp))
    split = [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
print(json.dumps({"version": list(sys.version_info[:2]), "corpus": corpus_sha256("docstrings"), "split": split}))
"""


def _interpreter(minor: int) -> str | None:
    """A python3.<minor> on this machine: a pyenv version, /usr/bin, or on PATH (not a pyenv shim,
    which fails for a version that is installed but not selected)."""
    name = f"python3.{minor}"
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    candidates = [*sorted(root.glob(f"versions/3.{minor}.*/bin/{name}"), reverse=True), Path("/usr/bin") / name]
    on_path = shutil.which(name)
    if on_path and "shims" not in Path(on_path).parts:
        candidates.append(Path(on_path))
    return next((str(c) for c in candidates if c.is_file()), None)


def _split_hashes(directory: Path) -> list[str]:
    return [hashlib.sha256(f.read_bytes()).hexdigest() for f in write_builtin_corpus("docstrings", directory)]


def test_the_shipped_corpus_is_the_pinned_one(tmp_path):
    sentences = corpus_sentences("docstrings")
    assert corpus_sha256("docstrings") == DOCSTRINGS_SHA256
    assert len(sentences) == DOCSTRINGS_SENTENCES and len(set(sentences)) == len(sentences)
    train, heldout = write_builtin_corpus("docstrings", tmp_path)
    assert len(train.read_text().splitlines()) == DOCSTRINGS_TRAIN
    assert heldout.read_text().splitlines() == sentences[::20]  # every 20th sentence, the first one included
    assert len(sentences[::20]) == DOCSTRINGS_HELDOUT


@pytest.mark.parametrize("minor", [11, 12, 13])
def test_every_python_reads_the_same_corpus_and_split(minor, tmp_path):
    python = _interpreter(minor)
    if python is None:
        pytest.skip(f"no python3.{minor} on this machine")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([python, "-S", "-c", PROBE], env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    probe = json.loads(out.stdout)
    assert probe["version"] == [3, minor]
    assert probe["corpus"] == DOCSTRINGS_SHA256
    assert probe["split"] == _split_hashes(tmp_path / "here")  # byte for byte what this interpreter writes


def test_unknown_builtin_corpus_names_the_choices(tmp_path):
    with pytest.raises(ValueError, match=r"unknown built-in corpus builtin:wiki; choose one of builtin:docstrings"):
        write_builtin_corpus("wiki", tmp_path)


@pytest.mark.skipif(sys.version_info[:3] != BUILT_FROM, reason=f"the shipped list comes from Python {BUILT_FROM}'s stdlib")
def test_regenerating_from_the_same_python_gives_the_shipped_list():
    assert extract_docstring_sentences() == corpus_sentences("docstrings")
