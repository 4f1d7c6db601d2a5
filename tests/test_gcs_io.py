"""gs:// inputs and outputs of the non-trainer code paths, against a real GCS server on loopback.

Training data, model folders, exports, STS data, `eval`, `encode` and the metrics writer, each
compared with the same operation on local files.
"""

import json

import numpy as np
import pytest

from simcse_jax import paths

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
    from simcse_jax.errors import DataError

    for url, what in [(f"{gcs_bucket}/data/absent.txt", "no such object"),
                      ("gs://no-such-bucket-z/absent.txt", "bucket no-such-bucket-z does not exist")]:
        with pytest.raises(DataError, match=f"^training data {url}: {what}") as info:
            load_tokenized(url, None, progress=False)
        assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- models, export, eval, encode


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Downloads of gs:// folders go to this test's cache, not ~/.cache."""
    monkeypatch.setenv("SIMCSE_JAX_CACHE", str(tmp_path / "simcse_cache"))


def _params(model):
    import jax
    from flax import nnx

    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def test_model_and_tokenizer_from_a_bucket_folder(tiny_model_dir, gcs_bucket, tmp_path):
    from simcse_jax.errors import CheckpointError
    from simcse_jax.hf_io import load_pretrained, load_tokenizer, resolve_model_dir

    url = f"{gcs_bucket}/models/tiny"
    paths.upload_folder(tiny_model_dir, url)
    got, want = load_pretrained(url), load_pretrained(tiny_model_dir)
    assert str(tmp_path / "simcse_cache") in str(got.path)  # read from the local cache
    for a, b in zip(_params(got.model), _params(want.model), strict=True):
        np.testing.assert_array_equal(a, b)
    assert resolve_model_dir(url) == got.path  # the second load finds the cached copy
    tok = load_tokenizer(url)
    assert tok("a tiny test")["input_ids"] == load_tokenizer(tiny_model_dir)("a tiny test")["input_ids"]
    with pytest.raises(CheckpointError, match=f"^model folder {gcs_bucket}/models/absent: no such object"):
        load_pretrained(f"{gcs_bucket}/models/absent")


@pytest.fixture
def gcs_sts(sts_dir, gcs_bucket):
    """STS-B (dev + test) in the bucket, SentEval layout."""
    for name in ("sts-dev.csv", "sts-test.csv"):
        _upload(sts_dir / "STSBenchmark" / name, f"{gcs_bucket}/sts/STSBenchmark/{name}")
    return f"{gcs_bucket}/sts"


def test_export_to_the_bucket_loads_in_transformers_and_evaluates_as_local(tiny_model_dir, sts_dir, gcs_sts, gcs_bucket,
                                                                           tmp_path):
    from simcse_jax import cli
    from simcse_jax.errors import ExportError
    from simcse_jax.hf_export import export_model, verify_export
    from simcse_jax.hf_io import load_pretrained, load_tokenizer

    loaded, tok = load_pretrained(tiny_model_dir), load_tokenizer(tiny_model_dir)
    url = f"{gcs_bucket}/run/export"
    local = export_model(loaded.model, tok, tmp_path / "local_export", pooler="cls", hf_config=loaded.hf_config)
    out = export_model(loaded.model, tok, url, pooler="cls", hf_config=loaded.hf_config)
    assert str(out) == url
    in_bucket = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    fetched = paths.local_copy(url, tmp_path / "fetched")
    assert {p.relative_to(fetched).as_posix() for p in fetched.rglob("*") if p.is_file()} == in_bucket
    assert "README.md" in in_bucket and (fetched / "README.md").read_text() == (local / "README.md").read_text()
    # The downloaded export, loaded by transformers, gives the JAX model's embeddings.
    assert verify_export(fetched, loaded.model, tok, "cls") <= 1e-5
    with pytest.raises(ExportError, match=f"^{url} is not empty"):
        export_model(loaded.model, tok, url, pooler="cls", hf_config=loaded.hf_config, verify=False)

    res = {}
    for where, model in (("local", local), ("gcs", url)):
        for backend in ("jax", "torch"):
            result = tmp_path / f"{where}-{backend}.json"
            assert cli.main(["eval", str(model), "--sts-dir", str(sts_dir) if where == "local" else gcs_sts,
                             "--pooler", "cls", "--backend", backend, "--tasks", "STSBenchmark", "--split", "dev",
                             "--limit", "60", "--output", str(result)]) == 0
            res[where, backend] = json.loads(result.read_text())
    for backend in ("jax", "torch"):
        assert res["gcs", backend]["paper"] == res["local", backend]["paper"]
        assert res["gcs", backend]["tasks"]["STSBenchmark"]["subsets"]["dev"]["n"] == 60
    assert res["gcs", "jax"]["model"] == url and res["gcs", "jax"]["sts_dir"] == gcs_sts
    gcs_out = f"{gcs_bucket}/run/eval.json"
    assert cli.main(["eval", url, "--sts-dir", gcs_sts, "--pooler", "cls", "--tasks", "STSBenchmark", "--split", "dev",
                     "--limit", "60", "--output", gcs_out]) == 0
    assert json.loads(paths.as_path(gcs_out).read_text())["paper"] == res["gcs", "jax"]["paper"]


def test_missing_sts_bucket_folder_is_named(tiny_model_dir, gcs_bucket, capsys):
    from simcse_jax import cli

    assert cli.main(["eval", str(tiny_model_dir), "--sts-dir", f"{gcs_bucket}/nosts", "--pooler", "cls"]) == 1
    assert capsys.readouterr().err.startswith(f"error: eval: STS data {gcs_bucket}/nosts: no such object")


def test_encode_cli_with_bucket_model_input_and_output(tiny_model_dir, gcs_bucket, tmp_path, capsys):
    from simcse_jax import cli

    src = tmp_path / "sentences.txt"
    src.write_text("A man plays a guitar.\nTwo dogs run.\nStocks fell sharply.\n")
    common = ["--pooler", "avg", "--batch-size", "4", "--mesh", "data=8"]
    assert cli.main(["encode", "--model", str(tiny_model_dir), "--input", str(src), "--output", str(tmp_path / "e.npy"),
                     *common]) == 0
    paths.upload_folder(tiny_model_dir, f"{gcs_bucket}/m")
    _upload(src, f"{gcs_bucket}/in/sentences.txt")
    assert cli.main(["encode", "--model", f"{gcs_bucket}/m", "--input", f"{gcs_bucket}/in/sentences.txt",
                     "--output", f"{gcs_bucket}/out/e.npy", *common]) == 0
    back = paths.local_copy(f"{gcs_bucket}/out/e.npy", tmp_path / "back")
    np.testing.assert_array_equal(np.load(back), np.load(tmp_path / "e.npy"))
    assert cli.main(["encode", "--model", f"{gcs_bucket}/m", "--input", f"{gcs_bucket}/in/absent.txt",
                     "--output", str(tmp_path / "x.npy")]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"error: encode: {gcs_bucket}/in/absent.txt: no such object")


# ----------------------------------------------------------------------------- metrics


def _events(folder) -> dict[str, list[tuple[int, float]]]:
    """Scalars of every TFRecord event file under `folder` (the record framing read by hand)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    out = {}
    for f in sorted(folder.rglob("events.out.tfevents.*")):
        data, pos = f.read_bytes(), 0
        while pos < len(data):
            (n,) = struct.unpack_from("<Q", data, pos)
            event = Event.FromString(data[pos + 12: pos + 12 + n])  # length, its crc, payload, payload crc
            pos += 12 + n + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_metrics_log_keeps_every_line_across_flushes_and_resume(gcs_bucket, tmp_path):
    from simcse_jax.metrics_log import MetricsLog

    workdir = f"{gcs_bucket}/runs/r1"
    log = MetricsLog(workdir, flush_every_s=3600)
    for step in range(1, 4):
        log.write(step, {"loss": 1.0 / step})
        log.flush()
        got = [json.loads(x)["step"] for x in paths.as_path(f"{workdir}/metrics.jsonl").read_text().splitlines()]
        assert got == list(range(1, step + 1))  # all lines, not just the last (no append on gs://)
    log.write(4, {"loss": 0.25})  # not flushed yet: the bucket still has 3 lines
    assert len(paths.as_path(f"{workdir}/metrics.jsonl").read_text().splitlines()) == 3
    log.close()
    lines = [json.loads(x) for x in paths.as_path(f"{workdir}/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4] and lines[-1]["loss"] == 0.25
    events = _events(paths.local_copy(f"{workdir}/tensorboard", tmp_path / "tb"))
    assert events["train/loss"] == [(s, pytest.approx(1.0 / s)) for s in range(1, 5)]

    resumed = MetricsLog(workdir, truncate_after=2, flush_every_s=0)  # flush at every write
    assert [r["step"] for r in resumed.records] == [1, 2]
    resumed.write(3, {"loss": 0.5})
    assert [json.loads(x)["step"] for x in paths.as_path(f"{workdir}/metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    resumed.close()
    # The resumed run's events are a second file beside the first: nothing was overwritten.
    assert len(list(paths.as_path(f"{workdir}/tensorboard").iterdir())) == 2


def test_metrics_log_local_is_unchanged(tmp_path):
    from simcse_jax.metrics_log import MetricsLog

    log = MetricsLog(tmp_path)
    for step in range(1, 4):
        log.write(step, {"loss": float(step)})
        assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == step  # appended at once
    log.close()
    assert _events(tmp_path / "tensorboard")["train/loss"] == [(s, float(s)) for s in range(1, 4)]
    assert [r["step"] for r in MetricsLog(tmp_path, truncate_after=2, enabled=True).records] == [1, 2]
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


# ----------------------------------------------------------------------------- orbax on gs:// (what resume relies on)


def test_orbax_on_gcs_ignores_a_step_without_its_commit_file(gcs_bucket):
    """On gs:// orbax writes a step in place and marks it complete with commit_success.txt last;
    a step folder without it (a save killed midway) is not listed, not restorable, and a later
    save of that step replaces it. The trainer's resume relies on exactly this."""
    import orbax.checkpoint as ocp

    url = f"{gcs_bucket}/run/checkpoints"
    options = ocp.CheckpointManagerOptions(max_to_keep=3, enable_async_checkpointing=True)
    like = {"a": np.zeros(1000, np.float32)}
    with ocp.CheckpointManager(paths.as_path(url), options=options) as mngr:
        for step in (1, 2):
            mngr.save(step, args=ocp.args.StandardSave({"a": np.full(1000, step, np.float32)}))
        mngr.wait_until_finished()
    assert paths.as_path(f"{url}/2/commit_success.txt").is_file()
    # A half-written step 3: every object of a complete step except its commit file.
    for obj in paths.list_files(f"{url}/2"):
        if not obj.endswith("commit_success.txt"):
            paths.as_path(f"{url}/3/{obj}").write_bytes(paths.as_path(f"{url}/2/{obj}").read_bytes())
    assert paths.as_path(f"{url}/3/_CHECKPOINT_METADATA").is_file()  # the uncommitted step is really there
    with ocp.CheckpointManager(paths.as_path(url), options=options) as mngr:
        assert mngr.all_steps() == [1, 2] and mngr.latest_step() == 2
        with pytest.raises(ValueError, match="incomplete checkpoint"):
            mngr.restore(3, args=ocp.args.StandardRestore(like))
        mngr.save(3, args=ocp.args.StandardSave({"a": np.full(1000, 30, np.float32)}))
        mngr.wait_until_finished()
        assert mngr.all_steps() == [1, 2, 3]
        np.testing.assert_array_equal(mngr.restore(3, args=ocp.args.StandardRestore(like))["a"], 30)

