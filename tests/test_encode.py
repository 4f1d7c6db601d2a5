"""`simcse-jax encode` embeds a file of sentences exactly as sentence-transformers does."""

import subprocess
import sys

import numpy as np
from conftest import REAL_SENTENCES

from simcse_jax.cli import main


def test_encode_cli_matches_sentence_transformers(minilm_dir, tmp_path):
    from sentence_transformers import SentenceTransformer

    sentences = REAL_SENTENCES * 3 + ["a"]  # 19 lines: a partial last batch, short and long rows
    src = tmp_path / "sentences.txt"
    src.write_text("\n".join(sentences) + "\n", encoding="utf-8")
    out = tmp_path / "emb.npy"
    assert main(["encode", "--model", str(minilm_dir), "--pooler", "avg", "--input", str(src),
                 "--output", str(out), "--batch-size", "8", "--mesh", "data=8"]) == 0
    ours = np.load(out)
    assert ours.dtype == np.float32 and ours.shape == (len(sentences), 384)

    st = SentenceTransformer(str(minilm_dir), device="cpu")
    # all-MiniLM-L6-v2's pipeline ends in Normalize; compare the unnormalised mean pooling too.
    theirs_unit = st.encode(sentences, convert_to_numpy=True, batch_size=8)
    ours_unit = ours / np.linalg.norm(ours, axis=1, keepdims=True)
    np.testing.assert_allclose(ours_unit, theirs_unit, atol=1e-5)
    cos = (ours_unit * theirs_unit).sum(1)
    assert cos.min() >= 0.99999
    raw = st.encode(sentences, convert_to_numpy=True, batch_size=8, output_value="token_embeddings")
    np.testing.assert_allclose(ours, np.stack([r.numpy().mean(0) for r in raw]), atol=1e-5)


def test_encode_bad_input_names_the_line(minilm_dir, tmp_path):
    src = tmp_path / "bad.txt"
    src.write_bytes(b"fine line\nsecond\n\xff\xfe broken\n")
    proc = subprocess.run(
        [sys.executable, "-m", "simcse_jax.cli", "encode", "--model", str(minilm_dir), "--input", str(src),
         "--output", str(tmp_path / "x.npy")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == f"error: encode: {src}:3: not valid UTF-8"


def test_streamed_file_equals_the_in_memory_path(tiny_model_dir, train_samples_dir, tmp_path, monkeypatch):
    from simcse_jax.compile_cache import CACHE_ENV
    from simcse_jax.encode import SentenceEncoder, count_lines, encode_file
    from simcse_jax.hf_io import load_pretrained, load_tokenizer

    wiki = (train_samples_dir / "wiki1m_for_simcse.head11914.txt").read_text(encoding="utf-8").splitlines()[:300]
    lines = wiki[:100] + [""] + wiki[100:]  # an empty line is a row too
    src = tmp_path / "lines.txt"
    # CRLF on one line and no newline at the end: both still one row each
    src.write_bytes(("\n".join(lines[:50]) + "\r\n" + "\n".join(lines[50:])).encode("utf-8"))
    assert count_lines(src) == len(lines)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "xla"))  # main() below must not use the developer's cache

    encoder = SentenceEncoder(load_pretrained(tiny_model_dir).model, load_tokenizer(tiny_model_dir), pooler="avg", batch_size=32)
    in_memory = encoder(lines)
    out, shape = encode_file(encoder, src, tmp_path / "whole", chunk_lines=1000)  # one chunk: the same batches
    assert out.name == "whole.npy" and shape == in_memory.shape
    np.testing.assert_array_equal(np.load(out), in_memory)
    # Chunks of 64 lines: other batches, other padded lengths; rows move by float32 rounding only.
    assert main(["encode", "--model", str(tiny_model_dir), "--input", str(src), "--output", str(tmp_path / "chunked.npy"),
                 "--batch-size", "32", "--chunk-lines", "64", "--mesh", "data=8"]) == 0
    chunked = np.load(tmp_path / "chunked.npy")
    assert chunked.dtype == np.float32 and chunked.shape == in_memory.shape
    np.testing.assert_allclose(chunked, in_memory, rtol=1e-5, atol=1e-6)
    assert not list(tmp_path.glob("*.partial"))
