"""Where files live: local paths and object-store URLs (gs://) behind one small interface.

A path a user gives may be a local path or a URL. `as_path` turns either into a path object:
local paths stay `pathlib.Path` (so every local code path is unchanged), URLs become
`etils.epath.Path` -- what orbax uses too -- with fsspec/gcsfs underneath. Object stores are not
file systems, and the helpers here hold what that means for the rest of the package:

- no rename: a single object PUT is already atomic, so `write_text_atomic` writes in place on a
  bucket and uses tmp + rename only locally;
- no append, no memory-mapping: remote inputs are read whole, or downloaded once per host into a
  local cache by `local_copy` (keyed by each object's generation and md5, so a changed object is
  fetched again and an unchanged one never twice);
- no real directories: a "folder" exists only while objects lie under its prefix;
- errors come back as HTTP statuses deep inside aiohttp; `check_readable` turns a missing bucket,
  a missing object, an unreachable endpoint and missing credentials into one line naming the URL.

The endpoint is the real service unless STORAGE_EMULATOR_HOST names another (tests point it at a
fake-gcs-server on 127.0.0.1; see tests/gcs_server.py).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import socket
import tempfile
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from simcse_jax.errors import SimcseError

REAL_GCS_ENDPOINT = "https://storage.googleapis.com"


class PathError(SimcseError, OSError):
    """An unusable file or URL; the one-line message names it and says what is wrong."""


def is_remote(path) -> bool:
    """True for URLs such as gs://bucket/key (file:// and plain paths are local).

    Only `scheme://` counts: names such as `builtin:docstrings` or a hub id are not URLs."""
    text = os.fspath(path)
    scheme = urllib.parse.urlsplit(text).scheme
    # One letter: a Windows drive, not a scheme.
    return len(scheme) > 1 and scheme != "file" and text.startswith(f"{scheme}://")


def as_path(path):
    """`pathlib.Path` for a local path (~ expanded), `etils.epath.Path` for a URL.

    Never pass a URL through `pathlib.Path` first: it collapses "gs://b" into "gs:/b".
    """
    if isinstance(path, Path):
        return path
    text = os.fspath(path)
    if not is_remote(text):
        return Path(text.removeprefix("file://")).expanduser()
    from etils import epath

    return epath.Path(text)


def _fs(url: str):
    """The fsspec file system of `url` (instances are cached by fsspec) and the path inside it."""
    import fsspec

    return fsspec.core.url_to_fs(url)


def endpoint() -> str:
    """The storage endpoint gcsfs talks to (the emulator's when STORAGE_EMULATOR_HOST is set)."""
    host = os.environ.get("STORAGE_EMULATOR_HOST")
    if not host:
        return REAL_GCS_ENDPOINT
    return host if "://" in host else f"http://{host}"


def _probe_endpoint(url: str) -> None:
    """One TCP connect, so an unreachable endpoint fails in seconds, not after gcsfs's ~30 s of retries."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")):
        return  # the direct connect would not say what the proxied client will see
    try:
        _connect(endpoint())
    except OSError as e:
        raise PathError(f"{url}: cannot reach the storage endpoint {endpoint()} ({e.strerror or e})") from None


@functools.lru_cache(maxsize=8)  # once per endpoint and process; a failure is not cached (it raises)
def _connect(url: str) -> None:
    ep = urllib.parse.urlsplit(url)
    socket.create_connection((ep.hostname, ep.port or (443 if ep.scheme == "https" else 80)), timeout=10).close()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@contextmanager
def _translated(url: str) -> Iterator[None]:
    """Storage-client exceptions -> PathError with one line naming `url`."""
    try:
        yield
    except PathError:
        raise
    except FileNotFoundError:
        bucket = urllib.parse.urlsplit(url).netloc
        if not _bucket_exists(url):
            raise PathError(f"{url}: bucket {bucket} does not exist (or is not visible with these credentials)") from None
        raise PathError(f"{url}: no such object or folder") from None
    except Exception as e:
        raise _classify(url, e) from e


def _classify(url: str, e: Exception) -> PathError:
    try:
        import google.auth.exceptions as auth_errors

        auth_error: tuple[type, ...] = (auth_errors.GoogleAuthError,)
    except ImportError:  # pragma: no cover - google-auth comes with gcsfs
        auth_error = ()
    code = getattr(e, "code", None)
    if isinstance(e, auth_error) or code == 401:
        return PathError(
            f"{url}: no usable Google Cloud credentials ({_first_line(e)}); on a Cloud TPU VM the VM's service "
            f"account is used, elsewhere run `gcloud auth application-default login`"
        )
    if code == 403 or _first_line(e).startswith("Forbidden"):
        return PathError(f"{url}: access denied ({_first_line(e)}); grant the account storage access to the bucket")
    if isinstance(e, ImportError):
        return PathError(f"{url}: gs:// paths need gcsfs: pip install 'simcse-jax[gcs]' ({_first_line(e)})")
    if isinstance(e, OSError):  # aiohttp's connection errors are OSErrors too
        return PathError(f"{url}: storage request failed against {endpoint()} ({type(e).__name__}: {_first_line(e)})")
    return PathError(f"{url}: {type(e).__name__}: {_first_line(e)}")


def _bucket_exists(url: str) -> bool:
    fs, _ = _fs(url)
    bucket = urllib.parse.urlsplit(url).netloc
    try:
        fs.info(bucket)  # gcsfs: GET /b/<bucket>
    except FileNotFoundError:
        return False
    except Exception:
        return True  # cannot tell; the object is what was asked for
    return True


def check_readable(url, *, kind: str | None = None) -> dict:
    """Raises PathError unless `url` is an object (`kind="file"`), a non-empty prefix ("folder"), or either.

    Returns the object's metadata (gcsfs `info`). A local path gets the same checks on the file system.
    """
    text = os.fspath(url)
    if not is_remote(text):
        path = as_path(text)
        if not path.exists():
            raise PathError(f"{path}: no such file or folder")
        if kind == "file" and not path.is_file():
            raise PathError(f"{path}: is a folder, not a file")
        if kind == "folder" and not path.is_dir():
            raise PathError(f"{path}: is a file, not a folder")
        return {"type": "file" if path.is_file() else "directory", "name": str(path)}
    _probe_endpoint(text)
    with _translated(text):
        fs, inner = _fs(text)
        info = fs.info(inner)
    found = "file" if info.get("type") == "file" else "folder"
    if kind is not None and found != kind:
        raise PathError(f"{text}: is a {found}, not a {kind}")
    return info


def check_bucket(url) -> None:
    """Raises PathError unless the bucket of `url` exists (for outputs: the prefix itself may be empty)."""
    text = os.fspath(url)
    if not is_remote(text):
        return
    _probe_endpoint(text)
    bucket = urllib.parse.urlsplit(text).netloc
    with _translated(text):
        fs, _ = _fs(text)
        try:
            fs.info(bucket)  # gcsfs: GET /b/<bucket>
        except FileNotFoundError:
            raise PathError(f"{text}: bucket {bucket} does not exist") from None


def fingerprint(path) -> dict:
    """Identity of a file without reading it: local (path, size, mtime); remote (url, size, generation, md5).

    A rewritten object gets a new generation even with identical bytes; md5 is kept as well so a
    copy of the same bytes into a new bucket is recognised as different data only by its URL.
    """
    text = os.fspath(path)
    if not is_remote(text):
        p = as_path(text)
        st = p.stat()
        return {"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    info = check_readable(text, kind="file")
    return {"url": text, "size": int(info["size"]), "generation": str(info.get("generation", "")),
            "md5": info.get("md5Hash") or info.get("crc32c") or info.get("etag", "")}


def write_text_atomic(path, text: str) -> None:
    """Readers see the old content or the new, never a part: tmp + rename locally, one PUT remotely."""
    target = as_path(path)
    if is_remote(os.fspath(target)):
        with _translated(os.fspath(target)):
            target.write_text(text)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def default_cache_root() -> Path:
    """$SIMCSE_JAX_CACHE/remote, else ~/.cache/simcse_jax/remote (per host: never a shared disk)."""
    root = os.environ.get("SIMCSE_JAX_CACHE") or Path.home() / ".cache" / "simcse_jax"
    return Path(root) / "remote"


def _listing(url: str) -> tuple[str, dict[str, dict]]:
    """("file" | "folder", {relative name: info}) of the object or every object under the prefix."""
    info = check_readable(url)
    fs, inner = _fs(url)
    if info.get("type") == "file":
        return "file", {inner.rsplit("/", 1)[-1]: info}
    with _translated(url):
        found = fs.find(inner, detail=True)
    prefix = inner.rstrip("/") + "/"
    objects = {k[len(prefix):]: v for k, v in found.items() if k.startswith(prefix) and not k.endswith("/")}
    if not objects:
        raise PathError(f"{url}: no objects under this prefix")
    return "folder", objects


def list_files(path) -> list[str]:
    """Relative names of every file under a folder or prefix, sorted (gs:// has no `rglob`)."""
    text = os.fspath(path)
    if not is_remote(text):
        root = as_path(text)
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    kind, objects = _listing(text)
    if kind == "file":
        raise PathError(f"{text}: is a file, not a folder")
    return sorted(objects)


def local_copy(url, cache_root=None) -> Path:
    """The local file or folder for `url`: the path itself when local, else a cached download.

    The cache entry is named by a hash of (URL, every object's generation, md5 and size): a run
    that finds the entry downloads nothing; a changed object makes a new entry. Downloads go to a
    temporary sibling that is renamed into place, so concurrent processes on one host never see
    a half-written copy (the loser of a race drops its own).
    """
    text = os.fspath(url)
    if not is_remote(text):
        path = as_path(text)
        if not path.exists():
            raise PathError(f"{path}: no such file or folder")
        return path
    kind, objects = _listing(text)
    key = hashlib.sha256(json.dumps(
        {"url": text.rstrip("/"), "objects": {k: [str(v.get("generation", "")), v.get("md5Hash", ""), int(v.get("size", 0))]
                                               for k, v in sorted(objects.items())}},
        sort_keys=True).encode()).hexdigest()[:20]
    name = text.rstrip("/").rsplit("/", 1)[-1] or "root"
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    entry = root / key
    target = entry / name
    if target.exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
    try:
        fs, inner = _fs(text)
        inner = inner.rstrip("/")
        if kind == "file":
            remote, local = [inner], [str(tmp / name)]
        else:
            remote = [f"{inner}/{rel}" for rel in objects]
            local = [str(tmp / name / rel) for rel in objects]
            for p in local:
                Path(p).parent.mkdir(parents=True, exist_ok=True)
        with _translated(text):
            fs.get(remote, local)
        for (rel, info), p in zip(objects.items(), local, strict=True):
            if Path(p).stat().st_size != int(info["size"]):
                raise PathError(f"{text}/{rel}: downloaded {Path(p).stat().st_size} bytes, the object has {info['size']}")
        try:
            os.rename(tmp, entry)
        except OSError:
            if not target.exists():  # not a lost race with another process: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def upload_folder(local_dir, url) -> list[str]:
    """Copies every file under `local_dir` to `url/<relative path>` (one PUT each, in parallel).

    Returns the URLs written. Objects under `url` that `local_dir` lacks are left alone.
    """
    src = Path(local_dir)
    text = os.fspath(url).rstrip("/")
    files = sorted(p for p in src.rglob("*") if p.is_file())
    if not is_remote(text):
        dest = as_path(text)
        for p in files:
            (dest / p.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, dest / p.relative_to(src))
        return [str(dest / p.relative_to(src)) for p in files]
    check_bucket(text)
    fs, inner = _fs(text)
    remote = [f"{inner}/{p.relative_to(src).as_posix()}" for p in files]
    with _translated(text):
        fs.put([str(p) for p in files], remote)
    return [f"{text}/{p.relative_to(src).as_posix()}" for p in files]


def upload_file(local_file, url) -> None:
    """One local file -> `url` (a single PUT remotely: atomic for readers)."""
    text = os.fspath(url)
    if not is_remote(text):
        dest = as_path(text)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(local_file, dest)
        return
    fs, inner = _fs(text)
    with _translated(text):
        fs.put_file(str(local_file), inner)


def remove(url, *, recursive: bool = False) -> None:
    """Deletes a file (or, with `recursive`, every object under a prefix); absent is not an error."""
    path = as_path(url)
    text = os.fspath(path)
    if not is_remote(text):
        if path.is_dir() and recursive:
            shutil.rmtree(path)
        elif path.exists() and not path.is_dir():
            path.unlink()
        return
    fs, inner = _fs(text)
    with _translated(text):
        if fs.exists(inner):
            fs.rm(inner, recursive=recursive)


def move(src, dst) -> None:
    """Moves a file or folder; on gs:// a copy of every object, then a delete (no rename there)."""
    src_text, dst_text = os.fspath(as_path(src)), os.fspath(as_path(dst))
    if not is_remote(src_text):
        Path(dst_text).parent.mkdir(parents=True, exist_ok=True)
        shutil.move(src_text, dst_text)
        return
    fs, inner = _fs(src_text)
    _, target = _fs(dst_text)
    with _translated(src_text):
        fs.copy(inner, target, recursive=True)
        fs.rm(inner, recursive=True)
