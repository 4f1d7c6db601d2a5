"""The `eval` command (`simcse_jax.evaluate`): the jax and torch backends agree on MiniLM, and bad
input fails with the file named."""

import json

import numpy as np
import pytest
from conftest import REAL_SENTENCES

from simcse_jax import cli, sts
from simcse_jax.evaluate import TorchEmbedder, jax_embedder

# A slice of the real data keeps CI fast; the full 7-task comparison is run by hand (see README).
ARGS = ["--tasks", "STSBenchmark", "SICKRelatedness", "--split", "dev", "--limit", "150"]


@pytest.mark.parametrize("pooler", ["avg", "avg_first_last"])
def test_backends_embed_alike(minilm_dir, pooler):
    jax_enc, _ = jax_embedder(minilm_dir, pooler=pooler, batch_size=8)
    torch_enc = TorchEmbedder(minilm_dir, pooler=pooler, batch_size=8)
    np.testing.assert_allclose(jax_enc(REAL_SENTENCES), torch_enc(REAL_SENTENCES), atol=1e-5, rtol=0)


def test_eval_cli_jax_equals_torch(minilm_dir, sts_dir, tmp_path, capsys):
    res = {}
    for backend in ("jax", "torch"):
        out = tmp_path / f"{backend}.json"
        assert cli.main(["eval", str(minilm_dir), "--sts-dir", str(sts_dir), "--pooler", "avg",
                         "--backend", backend, *ARGS, "--output", str(out)]) == 0
        res[backend] = json.loads(out.read_text())
        table = capsys.readouterr().out
        assert "STSB" in table and f"{res[backend]['paper']['Avg.']:.2f}" in table
    j, t = res["jax"], res["torch"]
    assert list(j["paper"]) == ["STSBenchmark", "SICKRelatedness", "Avg."]
    for task in ("STSBenchmark", "SICKRelatedness"):
        assert j["tasks"][task]["subsets"]["dev"]["n"] == 150
        assert abs(j["tasks"][task]["score"] - t["tasks"][task]["score"]) < 0.01
    assert abs(j["align_uniform"]["alignment"] - t["align_uniform"]["alignment"]) < 1e-4
    assert abs(j["align_uniform"]["uniformity"] - t["align_uniform"]["uniformity"]) < 1e-4
    # the JSON numbers are the scorer's, on the reported split's Spearman
    assert j["tasks"]["STSBenchmark"]["score"] == pytest.approx(100 * j["tasks"]["STSBenchmark"]["subsets"]["dev"]["spearman"])


def test_eval_of_a_checkpoint_uses_its_pooler(minilm_dir, sts_dir, tmp_path, capsys):
    from simcse_jax.hf_export import import_hf

    import_hf(minilm_dir, tmp_path / "ckpt", pooler="avg")
    assert cli.main(["eval", str(tmp_path / "ckpt"), "--sts-dir", str(sts_dir), "--tasks", "STS16",
                     "--limit", "20", "--output", str(tmp_path / "r.json")]) == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["pooler"] == "avg" and r["tasks"]["STS16"]["n"] == 100
    code = cli.main(["eval", str(tmp_path / "ckpt"), "--sts-dir", str(sts_dir), "--backend", "torch", "--pooler", "avg"])
    last = capsys.readouterr().err.splitlines()[-1]
    assert code == 2 and last.startswith("error: eval: ") and "the torch backend reads a Hugging Face folder" in last


def test_missing_sts_folder_is_named(minilm_dir, tmp_path, capsys):
    assert cli.main(["eval", str(minilm_dir), "--sts-dir", str(tmp_path), "--pooler", "avg"]) == 1
    assert capsys.readouterr().err.startswith(f"error: eval: STS data folder {tmp_path / 'STS12-en-test'} not found")


def test_sts_dir_defaults_to_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(sts.STS_DIR_ENV, str(tmp_path))
    assert sts.default_sts_dir() == tmp_path
    monkeypatch.delenv(sts.STS_DIR_ENV)
    assert sts.default_sts_dir() == sts.DEFAULT_STS_DIR.expanduser()
