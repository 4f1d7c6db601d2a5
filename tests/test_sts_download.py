"""`simcse-jax download-sts` file handling on local copies (no network in tests)."""

import tarfile
import zipfile

import pytest

from simcse_jax import cli, sts
from simcse_jax.sts_download import EXPECTED_PAIRS, download_sts, required_files


def _senteval_name(rel: str) -> str:
    """Where SentEval's data/downstream keeps a file (STS tasks under STS/, SICK beside it)."""
    top = rel.split("/")[0]
    return f"SentEval/data/downstream/{'' if top == 'SICK' else 'STS/'}{rel}"


def test_from_senteval_tar(sts_dir, tmp_path):
    archive = tmp_path / "senteval.tar"
    with tarfile.open(archive, "w") as tf:
        for rel in required_files():
            tf.add(sts_dir / rel, arcname=_senteval_name(rel))
        # a deeper decoy with the same trailing path must not win
        tf.add(sts_dir / "_variants" / "as_found_double_tokenized" / "STSBenchmark" / "sts-test.csv",
               arcname="SentEval/old/copy/STS/STSBenchmark/sts-test.csv")
    out = tmp_path / "out"
    assert cli.main(["download-sts", "--source", str(archive), "--out", str(out)]) == 0
    for rel in required_files():
        assert (out / rel).read_bytes() == (sts_dir / rel).read_bytes(), rel
    assert {t: sum(len(s) for s in sts.load_task(out, t).subsets) for t in sts.TASKS} == EXPECTED_PAIRS


def test_from_zip_and_refuses_non_empty(sts_dir, tmp_path):
    archive = tmp_path / "sts.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for rel in required_files():
            zf.write(sts_dir / rel, arcname="data/" + rel)
    out = tmp_path / "out"
    assert download_sts(out, str(archive)) == EXPECTED_PAIRS
    with pytest.raises(sts.StsDataError, match="is not empty"):
        download_sts(out, str(archive))


def test_missing_file_in_source_is_named(sts_dir, tmp_path):
    src = tmp_path / "src"
    for rel in required_files():
        if rel != "SICK/SICK_trial.txt":
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            (src / rel).write_bytes((sts_dir / rel).read_bytes())
    with pytest.raises(sts.StsDataError, match=r"no file matching SICK/SICK_trial\.txt"):
        download_sts(tmp_path / "out", str(src))
