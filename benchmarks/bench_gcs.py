"""What gs:// operations cost against a real GCS server on loopback (fake-gcs-server, memory backend).

    .venv/bin/python benchmarks/bench_gcs.py [--mb 100] [--repeats 3]

Every figure is the median of `--repeats` runs, printed as one JSON line, with the same
operation on local disk beside it where there is one (compare the ratio, not the seconds: the
emulator has no network latency or bandwidth limit, so real GCS is slower, chiefly per request):

- orbax: `ocp.CheckpointManager` on gs:// with async saves, a `--mb` MB state of 25 float32
  arrays: the time `save()` blocks the caller, the time to `wait_until_finished()`, a restore;
- metrics: one flush of `MetricsLog` on gs:// (metrics.jsonl rewritten whole) at 1,000 and
  10,000 lines, against appending one line locally;
- model folder: all-MiniLM-L6-v2 (~90 MB, 12 files) uploaded (`paths.upload_folder`),
  downloaded cold (`paths.local_copy`) and found again in the cache (listing only);
- a `check_readable` round trip (one metadata request).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
import gcs_server  # noqa: E402  (sets the gcsfs/fsspec variables before either is imported)


def emit(figure: str, value: float, unit: str, **context) -> None:
    print(json.dumps({"figure": figure, "value": round(value, 4), "unit": unit, **context}), flush=True)


def median_time(fn, repeats: int) -> float:
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_orbax(root: str, mb: int, repeats: int, where: str) -> None:
    import numpy as np
    import orbax.checkpoint as ocp

    from simcse_jax import paths

    n = mb * 2**20 // 4 // 25
    state = {f"w{i}": np.random.default_rng(i).standard_normal(n, dtype=np.float32) for i in range(25)}
    like = {k: np.zeros_like(v) for k, v in state.items()}
    options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=True)
    blocked, total, restore = [], [], []
    with ocp.CheckpointManager(paths.as_path(f"{root}/ckpt"), options=options) as mngr:
        for step in range(1, repeats + 1):
            t0 = time.perf_counter()
            mngr.save(step, args=ocp.args.StandardSave(state))
            blocked.append(time.perf_counter() - t0)
            mngr.wait_until_finished()
            total.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            got = mngr.restore(step, args=ocp.args.StandardRestore(like))
            restore.append(time.perf_counter() - t0)
            assert all(np.array_equal(got[k], state[k]) for k in state)
    for name, times in (("save: blocks the caller", blocked), ("save: until committed", total), ("restore", restore)):
        emit(f"orbax {name}", statistics.median(times), "s", where=where, mb=mb)


def bench_metrics(root: str, repeats: int) -> None:
    from simcse_jax.metrics_log import MetricsLog

    values = {"loss": 1.2345, "accuracy": 0.5, "learning_rate": 3e-5, "steps_per_s": 1.5, "sentences_per_s": 96.0}
    for lines in (1_000, 10_000):
        log = MetricsLog(f"{root}/metrics-{lines}", flush_every_s=float("inf"))
        for step in range(lines):
            log.write(step, values)

        def flush(i, log=log, lines=lines):
            log.write(lines + i, values)
            log.flush()

        size = len("".join(json.dumps(r) + "\n" for r in log.records))
        emit("metrics flush (rewrite metrics.jsonl whole)", median_time(flush, repeats), "s", where="gs", lines=lines,
             bytes=size)
        log.close()
    with tempfile.TemporaryDirectory() as tmp:
        log = MetricsLog(Path(tmp))
        emit("metrics write (append one line)", median_time(lambda i: log.write(i, values), repeats * 100), "s", where="local")
        log.close()


def bench_model_folder(bucket: str, repeats: int) -> None:
    from simcse_jax import paths
    from simcse_jax.hf_io import minilm_dir

    src = minilm_dir()
    files = paths.list_files(src)
    mb = sum((src / f).stat().st_size for f in files) / 2**20
    emit("model folder upload", median_time(lambda i: paths.upload_folder(src, f"{bucket}/models/m{i}"), repeats), "s",
         mb=round(mb, 1), files=len(files))
    with tempfile.TemporaryDirectory() as tmp:
        cold = median_time(lambda i: paths.local_copy(f"{bucket}/models/m{i}", Path(tmp) / "cache"), repeats)
        emit("model folder download (cold cache)", cold, "s", mb=round(mb, 1))
        emit("model folder found in the cache (listing only)",
             median_time(lambda i: paths.local_copy(f"{bucket}/models/m{i}", Path(tmp) / "cache"), repeats), "s")
        emit("model folder local copy (shutil.copytree)",
             median_time(lambda i: shutil.copytree(src, Path(tmp) / f"copy{i}"), repeats), "s", where="local")
    emit("check_readable (one metadata request)",
         median_time(lambda i: paths.check_readable(f"{bucket}/models/m0/config.json"), repeats * 10), "s")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=100, help="checkpoint size in MB")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    print(f"load average at start: {os.getloadavg()}", file=sys.stderr)
    server = gcs_server.GcsServer()
    os.environ.update(server.env)
    try:
        bucket = f"gs://{server.create_bucket('bench')}"
        with tempfile.TemporaryDirectory() as tmp:
            bench_orbax(tmp, args.mb, args.repeats, "local")
        bench_orbax(bucket, args.mb, args.repeats, "gs")
        bench_metrics(bucket, args.repeats)
        bench_model_folder(bucket, args.repeats)
    finally:
        server.stop()
    print(f"load average at end: {os.getloadavg()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
