"""gs:// inputs and outputs of the non-trainer code paths, against a real GCS server on loopback.

Training data, model folders, exports, STS data, `eval`, `encode` and the metrics writer, each
compared with the same operation on local files.
"""

import json

import numpy as np
import pytest

from simcse_jax import paths

pytest_plugins = ["gcs_server"]

WIKI = "wiki1m_for_simcse.head11914.txt"
SNLI = "snli_dev_triples_simcse_format.csv"


@pytest.fixture(scope="module")
def tok(minilm_dir):
    from simcse_jax.hf_io import load_tokenizer

    return load_tokenizer(minilm_dir)


def _upload(local, url) -> str:
    paths.as_path(url).write_bytes(local.read_bytes())
    return url


def _slice(src, dst, lines: int):
    dst.write_text("".join(src.read_text().splitlines(keepends=True)[:lines]))
    return dst


# ----------------------------------------------------------------------------- training data


@pytest.mark.parametrize("name, lines", [(WIKI, 300), (SNLI, 120)])
def test_train_file_from_the_bucket_equals_the_local_file(name, lines, train_samples_dir, tok, tmp_path, gcs_bucket):
    from simcse_jax.data import load_tokenized

    local = _slice(train_samples_dir / name, tmp_path / name, lines)
    url = _upload(local, f"{gcs_bucket}/data/{name}")
    want = load_tokenized(local, tok, use_cache=False, progress=False)
    cache = tmp_path / "cache"
    got = load_tokenized(url, tok, cache_dir=cache, progress=False)
    assert got.source == url and got.kind == want.kind and len(got) == len(want)
    np.testing.assert_array_equal(got.input_ids, want.input_ids)
    np.testing.assert_array_equal(got.lengths, want.lengths)
    np.testing.assert_array_equal(got.lines, want.lines)
    # The tokenized cache is on the local disk, memory-mapped from there.
    assert isinstance(got.input_ids, np.memmap) and str(cache) in str(got.input_ids.filename)
    entries = sorted(p.name for p in cache.iterdir() if not p.name.startswith("."))
    again = load_tokenized(url, tok, cache_dir=cache, progress=False)
    assert again.input_ids.filename == got.input_ids.filename  # same object generation: the same entry
    paths.as_path(url).write_bytes(local.read_bytes())  # rewritten (same bytes): a new generation, a new entry
    load_tokenized(url, tok, cache_dir=cache, progress=False)
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == len(entries) + 1


def test_hf_data_file_from_the_bucket(tok, tmp_path, gcs_bucket):
    from simcse_jax.data_readers import read_examples

    rows = [{"sent0": f"sentence {i}", "sent1": f"other {i}"} for i in range(20)]
    local = tmp_path / "pairs.jsonl"
    local.write_text("".join(json.dumps(r) + "\n" for r in rows))
    url = _upload(local, f"{gcs_bucket}/data/pairs.jsonl")
    got, want = read_examples(url), read_examples(local)
    assert got.kind == want.kind == "pairs" and got.columns == want.columns and got.source == url


def test_missing_train_object_or_bucket_is_one_line_naming_the_url(gcs_bucket):
    from simcse_jax.data import load_tokenized
    from simcse_jax.data_readers import DataError

    for url, what in [(f"{gcs_bucket}/data/absent.txt", "no such object"),
                      ("gs://no-such-bucket-z/absent.txt", "bucket no-such-bucket-z does not exist")]:
        with pytest.raises(DataError, match=f"^training data {url}: {what}") as info:
            load_tokenized(url, None, progress=False)
        assert "\n" not in str(info.value)
