"""Two hosts that share no disk: `launch-local --isolate` gives each process its own HOME, cache and
working directory; the workdir, the training file and the model are in a bucket of the loopback
GCS server. The run equals 1 process x 8 devices and resumes after a SIGTERM to one host."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from test_multihost import RUN_TIMEOUT_S, STEPS, assert_close, config, config_file, one_process  # noqa: F401 (fixtures)

from simcse_jax import paths

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bucket_losses(workdir: str) -> dict[int, float]:
    out = {}
    for record in map(json.loads, paths.as_path(f"{workdir}/metrics.jsonl").read_text().splitlines()):
        if "loss" in record:
            assert record["step"] not in out, f"step {record['step']} logged twice"
            out[record["step"]] = record["loss"]
    return out


def launch(config_file, workdir, homes, env, *overrides):  # noqa: F811
    return [sys.executable, "-m", "simcse_jax.cli", "launch-local", "--num-processes", "2", "--devices-per-process", "4",
            "--timeout", str(RUN_TIMEOUT_S), "--isolate", str(homes), "--pids-file", str(homes / "pids.json"), "--",
            "train", "--config", str(config_file), "--workdir", workdir, "--no-progress", *overrides]


@pytest.mark.slow
def test_two_hosts_without_a_shared_disk_train_from_the_bucket_and_resume(
        config, config_file, one_process, tiny_model_dir, train_samples_dir, gcs_server, gcs_bucket, tmp_path):  # noqa: F811
    paths.upload_folder(tiny_model_dir, f"{gcs_bucket}/model")
    train_url = f"{gcs_bucket}/data/wiki.txt"
    paths.as_path(train_url).write_bytes((train_samples_dir / "wiki1m_for_simcse.head11914.txt").read_bytes())
    workdir = f"{gcs_bucket}/runs/mh"
    overrides = ["--set", f"model={gcs_bucket}/model", "--set", f"train_file={train_url}", "--set", "data_cache_dir=none"]
    env = {**os.environ, **gcs_server.env}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    homes = tmp_path / "hosts"
    homes.mkdir()

    proc = subprocess.Popen(launch(config_file, workdir, homes, env, *overrides), env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        for line in proc.stdout:  # the loop starts right after the update step is compiled
            lines.append(line)
            if "[p0] compiled the update step" in line:
                break
            assert time.monotonic() < deadline, "the 2-process run did not compile"
        os.kill(json.loads((homes / "pids.json").read_text())["p1"], signal.SIGTERM)  # one host is preempted
        out, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = "".join(lines) + out
    assert proc.returncode == 0, out[-5000:]
    saved = sorted(int(f.split("/")[0]) for f in paths.list_files(f"{workdir}/checkpoints/latest")
                   if f.endswith("/commit_success.txt") and f.count("/") == 1)
    assert len(saved) == 1 and saved[0] < STEPS, (saved, out[-3000:])
    assert f"[p0] preempted: saved step {saved[0]} in" in out
    # Each host downloaded the model and tokenized the data on its own disk.
    for i in (0, 1):
        assert any((homes / f"p{i}" / "cache").rglob("model.safetensors")), i

    res = subprocess.run(launch(config_file, workdir, homes, env, *overrides), env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=RUN_TIMEOUT_S + 30)
    assert res.returncode == 0, res.stdout[-5000:]
    assert f"resumed from step {saved[0]} (" in res.stdout
    losses = bucket_losses(workdir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert_close(losses, one_process, range(1, STEPS + 1))
