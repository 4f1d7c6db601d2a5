"""simcse_jax.paths against a real GCS server on loopback (tests/gcs_server.py) and on local disk."""

import hashlib
import json
import os
from pathlib import Path

import pytest

from simcse_jax import paths
from simcse_jax.paths import PathError


def _put(url: str, data: bytes) -> None:
    paths.as_path(url).write_bytes(data)


def test_as_path_keeps_local_paths_pathlib_and_urls_intact(tmp_path):
    assert isinstance(paths.as_path(tmp_path / "x"), Path)
    assert paths.as_path("~/x") == Path.home() / "x"
    assert str(paths.as_path("gs://b/some/key.txt")) == "gs://b/some/key.txt"  # pathlib would give gs:/b/...
    assert str(paths.as_path("gs://b/run") / "metrics.jsonl") == "gs://b/run/metrics.jsonl"
    assert paths.is_remote("gs://b/x") and not paths.is_remote(tmp_path) and not paths.is_remote("C:/x")
    assert not paths.is_remote("file:///tmp/x") and paths.as_path("file:///tmp/x") == Path("/tmp/x")
    assert not paths.is_remote("builtin:docstrings") and not paths.is_remote("princeton-nlp/unsup-simcse-bert-base-uncased")


def test_write_text_atomic_local_and_remote(tmp_path, gcs_bucket):
    local = tmp_path / "sub" / "config.json"
    paths.write_text_atomic(local, "one")
    paths.write_text_atomic(local, "two")
    assert local.read_text() == "two" and sorted(p.name for p in local.parent.iterdir()) == ["config.json"]
    url = f"{gcs_bucket}/run/config.json"
    paths.write_text_atomic(url, "one")
    paths.write_text_atomic(url, "two")
    assert paths.as_path(url).read_text() == "two"


def test_fingerprint_follows_the_object_generation(gcs_bucket):
    url = f"{gcs_bucket}/data/train.txt"
    _put(url, b"a\nb\n")
    first = paths.fingerprint(url)
    assert first["size"] == 4 and first["url"] == url and first["generation"]
    assert paths.fingerprint(url) == first  # no change without a write
    _put(url, b"a\nb\n")  # same bytes, new generation: a new cache key
    second = paths.fingerprint(url)
    assert second["generation"] != first["generation"] and second["md5"] == first["md5"]


def test_local_copy_downloads_once_and_again_after_a_change(tmp_path, gcs_bucket):
    files = {"config.json": b'{"a": 1}', "model.safetensors": os.urandom(300_000), "1_Pooling/config.json": b"{}"}
    for rel, data in files.items():
        _put(f"{gcs_bucket}/hf/{rel}", data)
    cache = tmp_path / "cache"
    copy = paths.local_copy(f"{gcs_bucket}/hf", cache)
    assert copy.name == "hf"
    assert {p.relative_to(copy).as_posix(): p.read_bytes() for p in copy.rglob("*") if p.is_file()} == files
    mtime = (copy / "model.safetensors").stat().st_mtime_ns
    assert paths.local_copy(f"{gcs_bucket}/hf/", cache) == copy  # trailing slash: the same entry
    assert (copy / "model.safetensors").stat().st_mtime_ns == mtime  # not fetched again
    _put(f"{gcs_bucket}/hf/config.json", b'{"a": 2}')
    changed = paths.local_copy(f"{gcs_bucket}/hf", cache)
    assert changed != copy and json.loads((changed / "config.json").read_text()) == {"a": 2}
    single = paths.local_copy(f"{gcs_bucket}/hf/model.safetensors", cache)
    assert single.name == "model.safetensors"
    assert hashlib.md5(single.read_bytes()).digest() == hashlib.md5(files["model.safetensors"]).digest()
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temporary folder left
    assert paths.local_copy(tmp_path, cache) == tmp_path  # local paths pass through


def test_upload_folder_round_trip(tmp_path, gcs_bucket):
    src = tmp_path / "export"
    (src / "2_Dense").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "2_Dense" / "model.safetensors").write_bytes(b"\x00" * 1000)
    written = paths.upload_folder(src, f"{gcs_bucket}/out/hf")
    assert paths.list_files(f"{gcs_bucket}/out/hf") == paths.list_files(src) == ["2_Dense/model.safetensors", "config.json"]
    assert sorted(written) == [f"{gcs_bucket}/out/hf/2_Dense/model.safetensors", f"{gcs_bucket}/out/hf/config.json"]
    back = paths.local_copy(f"{gcs_bucket}/out/hf", tmp_path / "cache")
    assert (back / "2_Dense" / "model.safetensors").read_bytes() == b"\x00" * 1000
    paths.remove(f"{gcs_bucket}/out/hf", recursive=True)
    with pytest.raises(PathError, match="no such object"):
        paths.check_readable(f"{gcs_bucket}/out/hf")


def test_check_readable_messages_name_the_url(gcs_bucket, gcs_server):
    _put(f"{gcs_bucket}/data/x.txt", b"x\n")
    assert paths.check_readable(f"{gcs_bucket}/data/x.txt", kind="file")["size"] == 2
    paths.check_readable(f"{gcs_bucket}/data", kind="folder")
    cases = {
        f"{gcs_bucket}/data/missing.txt": f"^{gcs_bucket}/data/missing.txt: no such object or folder$",
        "gs://no-such-bucket-x/data/x.txt": "^gs://no-such-bucket-x/data/x.txt: bucket no-such-bucket-x does not exist",
    }
    for url, pattern in cases.items():
        with pytest.raises(PathError, match=pattern) as info:
            paths.check_readable(url)
        assert "\n" not in str(info.value)
    with pytest.raises(PathError, match=f"^{gcs_bucket}/data: is a folder, not a file$"):
        paths.check_readable(f"{gcs_bucket}/data", kind="file")
    with pytest.raises(PathError, match="bucket no-such-bucket-y does not exist"):
        paths.check_bucket("gs://no-such-bucket-y/run")
    paths.check_bucket(f"{gcs_bucket}/empty/prefix")  # outputs: an empty prefix is fine


@pytest.fixture
def fresh_gcs_clients():
    """gcsfs caches its clients with the endpoint they were made for: start and end with none."""
    import gcsfs

    gcsfs.GCSFileSystem.clear_instance_cache()
    yield
    gcsfs.GCSFileSystem.clear_instance_cache()


def test_unreachable_endpoint_fails_fast_naming_the_url(gcs_server, monkeypatch, fresh_gcs_clients):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:1")
    with pytest.raises(PathError, match=r"^gs://b/x.txt: cannot reach the storage endpoint http://127.0.0.1:1 \(") as info:
        paths.check_readable("gs://b/x.txt")
    assert "\n" not in str(info.value)


def test_missing_credentials(gcs_server, monkeypatch, tmp_path, fresh_gcs_clients):
    import fsspec.config

    # What a machine without Application Default Credentials sees when gcsfs is asked to use them.
    monkeypatch.setitem(fsspec.config.conf, "gcs", {"token": "google_default"})
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "absent.json"))
    with pytest.raises(PathError, match=r"^gs://b/x.txt: no usable Google Cloud credentials \(") as info:
        paths.check_readable("gs://b/x.txt")
    assert "\n" not in str(info.value)
    with pytest.raises(PathError, match=r"^gs://b/run: no usable Google Cloud credentials \("):
        paths.check_bucket("gs://b/run")


def test_local_errors(tmp_path):
    with pytest.raises(PathError, match=f"^{tmp_path / 'absent'}: no such file or folder$"):
        paths.check_readable(tmp_path / "absent")
    with pytest.raises(PathError, match="no such file"):
        paths.local_copy(tmp_path / "absent")
