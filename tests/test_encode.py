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
