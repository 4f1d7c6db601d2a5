"""Training data: reference reading semantics, exact token ids, host split, resume, static shapes,
bad input named by file and line, the tokenized cache and MLM inputs.

The reference side is computed independently: `datasets.load_dataset("text" | "csv")` (the
reference's reader) and the `transformers` tokenizer called with the reference settings
(`max_length=32, truncation=True`, no padding).
"""

from __future__ import annotations

import json
import logging

import jax
import numpy as np
import pytest

from simcse_jax.data import (
    DataIterator,
    load_tokenized,
    make_data_iterator,
)
from simcse_jax.data_readers import read_examples
from simcse_jax.errors import DataError
from simcse_jax.hf_io import load_tokenizer
from simcse_jax.masking import IGNORE_INDEX
from simcse_jax.sharding import batch_sharding, make_mesh

WIKI = "wiki1m_for_simcse.head11914.txt"
SNLI = "snli_dev_triples_simcse_format.csv"
L = 32


@pytest.fixture(scope="module")
def tok(minilm_dir):
    return load_tokenizer(minilm_dir)


def reference_rows(path, kind, tmp_path):
    """Rows as the reference reads them (datasets' loaders; None -> " ")."""
    import datasets

    ds = datasets.load_dataset(kind, data_files=str(path), split="train", cache_dir=str(tmp_path / "hf"))
    cols = [[" " if s is None else s for s in ds[c]] for c in ds.column_names]
    return cols


def reference_ids(tok, sentences):
    return tok(list(sentences), max_length=L, truncation=True)["input_ids"]


def assert_padded_equal(ids, mask, expected, pad_id):
    """`ids` [n, L] hold `expected` (ragged) left-aligned, then pad_id; mask marks the tokens."""
    assert len(ids) == len(expected)
    for row, m, exp in zip(ids, mask, expected):
        n = len(exp)
        assert row[:n].tolist() == exp
        assert (row[n:] == pad_id).all()
        assert m.tolist() == [1] * n + [0] * (L - n)


def write(path, text, encoding="utf-8"):
    path.write_bytes(text.encode(encoding) if isinstance(text, str) else text)
    return path


# ------------------------------------------------------------------ 1. exact ids, reference order


def test_wiki_txt_batches_hold_reference_token_ids_in_seed_order(train_samples_dir, tok, tmp_path):
    path = train_samples_dir / WIKI
    (sentences,) = reference_rows(path, "text", tmp_path)
    data = load_tokenized(path, tok, cache_dir=tmp_path / "cache", progress=False)
    assert data.kind == "unsup" and data.num_sent == 2 and len(data) == len(sentences) == 11914
    expected = reference_ids(tok, sentences)
    assert_padded_equal(data.input_ids[:, 0], data.take(np.arange(len(data)))["attention_mask"][:, 0], expected, tok.pad_token_id)

    seed, G = 7, 128
    it = DataIterator(data, G, seed=seed, process_index=0, process_count=1)
    nb = len(sentences) // G
    # The order is the documented one: epoch e visits default_rng([seed, e]).permutation(N).
    for epoch, batch in [(0, 0), (0, 1), (0, nb - 1), (1, 0)]:
        b = it.host_batch(epoch, batch)
        rows = np.random.default_rng([seed, epoch]).permutation(len(sentences))[batch * G : (batch + 1) * G]
        exp = [expected[i] for i in rows]
        for view in (0, 1):  # the sentence twice (two dropout views)
            assert_padded_equal(b["input_ids"][:, view], b["attention_mask"][:, view], exp, tok.pad_token_id)
        assert (b["token_type_ids"] == 0).all()
        assert all(v.dtype == np.int32 and v.shape == (G, 2, L) for v in b.values())


def test_snli_csv_batches_hold_reference_token_ids_per_column(train_samples_dir, tok, tmp_path):
    path = train_samples_dir / SNLI
    cols = reference_rows(path, "csv", tmp_path)
    data = load_tokenized(path, tok, cache_dir=tmp_path / "cache", progress=False)
    assert data.kind == "triples" and data.num_sent == 3 and len(data) == len(cols[0]) == 2943
    expected = [reference_ids(tok, c) for c in cols]
    seed, G = 3, 64
    it = DataIterator(data, G, seed=seed, process_index=0, process_count=1)
    for epoch, batch in [(0, 0), (0, 5), (2, 1)]:
        b = it.host_batch(epoch, batch)
        rows = np.random.default_rng([seed, epoch]).permutation(len(data))[batch * G : (batch + 1) * G]
        for c in range(3):  # sent0, sent1, hard_neg in the reference's column order
            assert_padded_equal(b["input_ids"][:, c], b["attention_mask"][:, c], [expected[c][i] for i in rows], tok.pad_token_id)


def test_padding_uses_the_tokenizers_pad_id(minilm_dir, tmp_path):
    """RoBERTa pads with 1, not 0: the pipeline must take the id from the tokenizer."""
    tok = load_tokenizer(minilm_dir)
    tok.pad_token = "[UNK]"  # id 100, a pad id that is neither 0 nor 1
    path = write(tmp_path / "s.txt", "a short line\nanother short line here\n")
    data = load_tokenized(path, tok, cache_dir=tmp_path / "cache", progress=False)
    b = DataIterator(data, 2, seed=4, process_index=0, process_count=1).host_batch(0, 0)
    assert data.pad_token_id == 100
    order = np.random.default_rng([4, 0]).permutation(2)
    expected = reference_ids(tok, [["a short line", "another short line here"][i] for i in order])
    assert_padded_equal(b["input_ids"][:, 0], b["attention_mask"][:, 0], expected, 100)


def test_hf_dataset_folder_and_tsv_read_by_position(tok, tmp_path):
    import datasets

    sent0, sent1 = ["A man plays.", "Kids run home.", "It rains."], ["Someone plays.", "", "Water falls."]
    datasets.Dataset.from_dict({"premise": sent0, "other": sent1}).save_to_disk(str(tmp_path / "ds"))
    data = load_tokenized(tmp_path / "ds", tok, cache_dir=tmp_path / "cache", progress=False)
    assert data.kind == "pairs"
    filled = [s if s else " " for s in sent1]  # the reference's " " for an empty field
    for c, col in enumerate((sent0, filled)):
        assert [data.input_ids[i, c, : data.lengths[i, c]].tolist() for i in range(3)] == reference_ids(tok, col)

    tsv = write(tmp_path / "pairs.tsv", "a\tb\nA man plays.\tSomeone, a man, plays.\n")
    raw = read_examples(tsv)
    assert raw.kind == "pairs" and raw.columns == [["A man plays."], ["Someone, a man, plays."]]


# ------------------------------------------------------------------ 2. hosts; 4. shapes; sharding


@pytest.fixture(scope="module")
def numbered(tok, tmp_path_factory):
    """300 distinct sentences: a row's token ids identify the example."""
    d = tmp_path_factory.mktemp("numbered")
    path = write(d / "n.txt", "".join(f"sentence number {i} of the set\n" for i in range(300)))
    return load_tokenized(path, tok, cache_dir=d / "cache", progress=False)


def example_ids(data, batch):
    index = {data.input_ids[i, 0].tobytes(): i for i in range(len(data))}
    return [index[np.asarray(r, dtype=np.int32).tobytes()] for r in batch["input_ids"][:, 0]]


def test_two_hosts_see_every_example_of_an_epoch_once(numbered):
    G = 64
    hosts = [DataIterator(numbered, G, seed=1, process_index=p, process_count=2, mlm_probability=0.15) for p in (0, 1)]
    single = DataIterator(numbered, G, seed=1, process_index=0, process_count=1, mlm_probability=0.15)
    seen = []
    for _ in range(single.batches_per_epoch):
        parts = [next(h) for h in hosts]
        whole = next(single)
        assert all(len(p["input_ids"]) == G // 2 for p in parts)
        for k in whole:  # the hosts' halves are the single-host global batch, MLM masks included
            np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), whole[k])
        seen += example_ids(numbered, parts[0]) + example_ids(numbered, parts[1])
    assert len(seen) == len(set(seen)) == (300 // G) * G  # no overlap; only the partial batch dropped
    assert all(h.state()["epoch"] == 1 for h in hosts)


def test_global_arrays_sharded_over_8_devices_and_one_shape_across_epochs(numbered):
    assert jax.device_count() == 8
    G = 64
    for axes in ({"data": 8}, {"data": 2, "fsdp": 2, "tensor": 2}):
        mesh = make_mesh(axes)
        it = DataIterator(numbered, G, seed=5, mesh=mesh, mlm_probability=0.15)
        ref = DataIterator(numbered, G, seed=5, process_index=0, process_count=1, mlm_probability=0.15)
        step = jax.jit(lambda b: {k: v.sum() for k, v in b.items()})
        for _ in range(2 * it.batches_per_epoch + 1):  # across two epoch boundaries
            b, want = next(it), next(ref)
            assert set(b) == {"input_ids", "attention_mask", "token_type_ids", "mlm_input_ids", "mlm_labels"}
            for k, v in b.items():
                assert v.shape == (G, 2, L) and v.dtype == np.int32 and v.sharding == batch_sharding(mesh, 3)
                np.testing.assert_array_equal(np.asarray(v), want[k])
            ways = axes.get("data", 1) * axes.get("fsdp", 1)  # rows split over data x fsdp, copied over tensor
            assert {s.data.shape for s in b["input_ids"].addressable_shards} == {(G // ways, 2, L)}
            step(b)
        assert step._cache_size() == 1  # one compiled program for the whole run


# ------------------------------------------------------------------ 3. resume


@pytest.mark.parametrize("k", [3, 4, 6])  # inside epoch 0, exactly at the boundary, inside epoch 1
def test_restored_state_continues_the_same_batches(numbered, k):
    G = 64  # 4 batches per epoch
    run = DataIterator(numbered, G, seed=9, process_index=0, process_count=1, mlm_probability=0.15)
    straight = [next(run) for _ in range(k + 5)]
    first = DataIterator(numbered, G, seed=9, process_index=0, process_count=1, mlm_probability=0.15)
    for _ in range(k):
        next(first)
    saved = json.loads(json.dumps(first.state()))  # it travels through the checkpoint as JSON
    resumed = DataIterator(numbered, G, seed=0, process_index=0, process_count=1, mlm_probability=0.15, state=saved)
    for want in straight[k:]:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_restore_refuses_a_state_of_other_data(numbered):
    it = DataIterator(numbered, 64, process_index=0, process_count=1)
    state = it.state() | {"num_examples": 999}
    with pytest.raises(DataError, match="num_examples=999"):
        it.restore(state)
    with pytest.raises(DataError, match="global_batch_size=32"):
        DataIterator(numbered, 64, process_index=0, process_count=1, state=it.state() | {"global_batch_size": 32})


# ------------------------------------------------------------------ MLM


def test_mlm_inputs_mask_only_real_tokens_and_are_reproducible(numbered, tok):
    it = DataIterator(numbered, 64, seed=2, process_index=0, process_count=1, mlm_probability=0.15)
    b = it.host_batch(0, 1)
    ids, masked, labels = b["input_ids"], b["mlm_input_ids"], b["mlm_labels"]
    chosen = labels != IGNORE_INDEX
    np.testing.assert_array_equal(labels[chosen], ids[chosen])
    np.testing.assert_array_equal(masked[~chosen], ids[~chosen])
    assert not np.isin(ids[chosen], tok.all_special_ids).any()
    real = b["attention_mask"].astype(bool) & ~np.isin(ids, tok.all_special_ids)
    assert 0.08 < chosen.sum() / real.sum() < 0.22
    assert (masked[chosen] == tok.mask_token_id).mean() > 0.6
    again = it.host_batch(0, 1)
    np.testing.assert_array_equal(again["mlm_input_ids"], masked)
    assert not np.array_equal(it.host_batch(0, 2)["mlm_labels"] != IGNORE_INDEX, chosen)


# ------------------------------------------------------------------ cache


def test_cache_is_reused_and_keyed_by_file_and_max_length(tok, tmp_path, capsys, caplog):
    path = write(tmp_path / "c.txt", "one line\n\nanother line\nthird line\n")
    cache = tmp_path / "cache"
    first = load_tokenized(path, tok, cache_dir=cache)
    assert "tokenizing" in capsys.readouterr().err  # the progress bar of the build
    assert len(list(cache.iterdir())) == 1
    with caplog.at_level(logging.WARNING):
        again = load_tokenized(path, tok, cache_dir=cache)
    assert "tokenizing" not in capsys.readouterr().err
    assert isinstance(again.input_ids, np.memmap)
    np.testing.assert_array_equal(again.input_ids, first.input_ids)
    assert "1 blank line" in caplog.text  # the first read's warning is repeated from the cache
    load_tokenized(path, tok, cache_dir=cache, max_seq_length=16, progress=False)
    assert len(list(cache.iterdir())) == 2
    write(path, "one line\nanother line, edited\n")
    edited = load_tokenized(path, tok, cache_dir=cache, progress=False)
    assert len(edited) == 2 and len(list(cache.iterdir())) == 3


# ------------------------------------------------------------------ 5. bad input


def test_missing_and_empty_files_are_named(tok, tmp_path):
    with pytest.raises(DataError, match=r"nope\.txt does not exist"):
        load_tokenized(tmp_path / "nope.txt", tok, use_cache=False)
    for name, text in [("e.txt", ""), ("w.txt", "\n \n"), ("e.csv", "")]:
        with pytest.raises(DataError, match=rf"{name} is empty"):
            read_examples(write(tmp_path / name, text))
    with pytest.raises(DataError, match=r"h\.csv has a header row \(line 1\) but no examples"):
        read_examples(write(tmp_path / "h.csv", "sent0,sent1\n"))


def test_csv_row_with_wrong_field_count_names_its_line(tmp_path):
    # Line 2-3 is one quoted two-line field, so the bad row starts on physical line 5.
    text = 'sent0,sent1,hard_neg\n"a\nb",c,d\ne,f,g\nh,i\n'
    with pytest.raises(DataError, match=r"bad\.csv, line 5: 2 field\(s\) where the header \(line 1\) has 3"):
        read_examples(write(tmp_path / "bad.csv", text))
    with pytest.raises(DataError, match=r"wide\.csv, line 1: the header has 4 columns"):
        read_examples(write(tmp_path / "wide.csv", "a,b,c,d\n1,2,3,4\n"))


@pytest.mark.parametrize("name", ["latin.txt", "latin.csv"])
def test_non_utf8_line_is_named(tmp_path, name):
    head = "sent0,sent1\nok,fine\n" if name.endswith(".csv") else "ok\nfine\n"
    path = write(tmp_path / name, head.encode() + "caf\u00e9,x\n".encode("latin-1"))
    with pytest.raises(DataError, match=rf"{name}, line 3: not valid UTF-8"):
        read_examples(path)


def test_empty_sentences(tok, tmp_path, caplog):
    with pytest.raises(DataError, match=r"e\.csv, line 3: every field is empty"):
        read_examples(write(tmp_path / "e.csv", "sent0,sent1\na,b\n,\nc,d\n"))
    with caplog.at_level(logging.WARNING):
        raw = read_examples(write(tmp_path / "half.csv", "sent0,sent1,hard_neg\na,,c\nd,e,\n"))
    assert raw.columns == [["a", "d"], [" ", "e"], ["c", " "]]  # the reference's " "
    assert "2 empty field(s)" in caplog.text and "line 2" in caplog.text
    # A row whose only text tokenizes to nothing (zero-width characters) is no example either.
    with pytest.raises(DataError, match=r"z\.csv, line 2: no field has any token"):
        load_tokenized(write(tmp_path / "z.csv", "sent0,sent1\n\u200b,\u200b\nc,d\n"), tok, use_cache=False, progress=False)

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        data = load_tokenized(write(tmp_path / "b.txt", "first\n\n   \nsecond\n\u200b\nthird\n"), tok, use_cache=False, progress=False)
    assert data.lines.tolist() == [1, 4, 6]  # blank and token-less lines skipped, with counts:
    assert "skipped 2 blank line(s) (first at line(s) 2, 3)" in caplog.text
    assert "skipped 1 line(s) with no tokens" in caplog.text and "first at line 5" in caplog.text


def test_dataset_smaller_than_one_global_batch_is_named(tok, tmp_path):
    path = write(tmp_path / "small.txt", "".join(f"line {i}\n" for i in range(10)))
    with pytest.raises(DataError, match=r"small\.txt: 10 examples, fewer than one global batch of 16"):
        make_data_iterator(path, tok, 16, use_cache=False, progress=False)


def test_hub_name_offline_says_to_pass_a_local_file():
    import datasets

    assert datasets.config.HF_HUB_OFFLINE  # conftest: tests never reach the hub
    with pytest.raises(DataError, match=r"no-such-user/no-such-set.*pass a local \.txt"):
        read_examples("no-such-user/no-such-set")


def test_cache_write_is_atomic_when_two_hosts_race(tok, tmp_path):
    from simcse_jax.data import load_cache, save_cache

    path = write(tmp_path / "r.txt", "one line\nanother line\n")
    data = load_tokenized(path, tok, use_cache=False, progress=False)
    target = tmp_path / "cache" / "r-key"
    save_cache(data, target)
    save_cache(data, target)  # the loser of a race keeps the winner's copy and does not fail
    assert sorted(p.name for p in target.parent.iterdir()) == ["r-key"]  # no temporary left behind
    np.testing.assert_array_equal(load_cache(target).input_ids, data.input_ids)
