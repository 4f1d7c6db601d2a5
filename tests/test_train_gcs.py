"""The trainer on a pod without a shared disk: a gs:// workdir and train file, against the
loopback GCS server (tests/gcs_server.py). Resume, crash safety, the run's files in the bucket,
the export read back from it, and one-line errors for a bad bucket, object or endpoint."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_train import (  # noqa: F401 (fixtures)
    data_cache,
    sigterm_at,
    step_losses,
    tiny_config,
    uninterrupted,
    uninterrupted_dir,
)

from simcse_jax import cli, paths
from simcse_jax.train import train

REPO = Path(__file__).resolve().parents[1]
WIKI = "wiki1m_for_simcse.head11914.txt"


def bucket_losses(workdir: str) -> dict[int, float]:
    lines = paths.as_path(f"{workdir}/metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def upload(local: Path, url: str) -> str:
    paths.as_path(url).write_bytes(Path(local).read_bytes())
    return url


@pytest.fixture
def host_cache(tmp_path, monkeypatch):
    """This "host"'s own disk for downloaded folders and the tokenized cache."""
    monkeypatch.setenv("SIMCSE_JAX_CACHE", str(tmp_path / "host_cache"))
    return tmp_path / "host_cache"


@pytest.mark.slow
def test_gcs_workdir_trains_resumes_and_exports_into_the_bucket(
        tiny_model_dir, train_samples_dir, data_cache, uninterrupted, sts_dir, gcs_bucket, host_cache, tmp_path):  # noqa: F811
    import transformers

    from simcse_jax.hf_io import load_pretrained

    url = upload(train_samples_dir / WIKI, f"{gcs_bucket}/data/wiki.txt")
    config = tiny_config(tiny_model_dir, train_samples_dir, data_cache, train_file=url, data_cache_dir=None,
                         sts_dir=str(sts_dir), eval_steps=2, do_export=True)
    workdir = f"{gcs_bucket}/runs/r1"
    assert train(config, workdir, progress=False, callback=sigterm_at(3))["status"] == "preempted"
    assert "checkpoints/latest/3/commit_success.txt" in paths.list_files(workdir)
    result = train(config, workdir, progress=False)
    assert result["status"] == "completed"
    # Per-step losses of the resumed gs:// run equal an uninterrupted local run.
    got = bucket_losses(workdir)
    assert sorted(got) == sorted(uninterrupted)  # every line kept: no append on gs://, the file is rewritten
    for step, loss in uninterrupted.items():
        assert abs(got[step] - loss) <= 1e-5, (step, got[step], loss)
    files = set(paths.list_files(workdir))
    assert {"config.json", "metrics.jsonl", "results.json", "export/model.safetensors", "export/README.md"} <= files
    assert any(f.startswith("tensorboard/events.out.tfevents.") for f in files)
    assert "checkpoints/latest/6/commit_success.txt" in files
    best = json.loads(paths.as_path(f"{workdir}/results.json").read_text())["best_step"]
    assert f"checkpoints/best/{best}/commit_success.txt" in files
    assert "checkpoints/best/tokenizer/tokenizer_config.json" in files

    # The export, downloaded from the bucket, loads in transformers and gives the JAX model's embeddings.
    local_export = paths.local_copy(f"{workdir}/export", tmp_path / "export")
    ours = load_pretrained(local_export).model
    tok = transformers.AutoTokenizer.from_pretrained(str(local_export))
    batch = tok(["A man plays a guitar.", "Stocks fell sharply on Monday."], padding=True, return_tensors="np")
    theirs = transformers.AutoModel.from_pretrained(str(local_export)).eval()
    import torch

    with torch.no_grad():
        ref = theirs(**{k: torch.from_numpy(v) for k, v in batch.items()}).last_hidden_state.numpy()
    jax_out = np.asarray(ours(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]).last_hidden_state)
    np.testing.assert_allclose(jax_out, ref, atol=1e-5)

    # `simcse-jax eval gs://.../export` == the same eval of the local copy.
    scores = {}
    for name, model in (("gcs", f"{workdir}/export"), ("local", str(local_export))):
        out = tmp_path / f"{name}.json"
        assert cli.main(["eval", model, "--sts-dir", str(sts_dir), "--pooler", "cls_before_pooler", "--tasks",
                         "STSBenchmark", "--split", "dev", "--limit", "100", "--output", str(out)]) == 0
        scores[name] = json.loads(out.read_text())["paper"]
    assert scores["gcs"] == scores["local"]


@pytest.mark.slow
def test_sigkill_during_an_async_save_to_the_bucket_resumes_from_the_last_committed_step(
        tiny_model_dir, train_samples_dir, data_cache, uninterrupted, gcs_server, gcs_bucket, tmp_path):  # noqa: F811
    url = upload(train_samples_dir / WIKI, f"{gcs_bucket}/data/wiki.txt")
    config = tiny_config(tiny_model_dir, train_samples_dir, data_cache, train_file=url)
    workdir = f"{gcs_bucket}/runs/killed"
    script = (
        "import json, os, signal, sys; from simcse_jax.config import TrainConfig; from simcse_jax.train import train\n"
        "def cb(event, step):\n"
        "    if event == 'checkpoint' and step == 4: os.kill(os.getpid(), signal.SIGKILL)\n"
        "train(TrainConfig(**json.loads(sys.argv[1])), sys.argv[2], progress=False, callback=cb)\n"
    )
    env = {**os.environ, **gcs_server.env, "HF_HUB_OFFLINE": "1", "SIMCSE_JAX_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(config.__dict__), workdir], env=env, cwd=REPO, timeout=600)
    assert proc.returncode == -signal.SIGKILL
    latest = f"{workdir}/checkpoints/latest"
    files = paths.list_files(latest)
    assert "2/commit_success.txt" in files
    # The step-4 save was under way: some of its objects are in the bucket, but not its commit marker.
    assert any(f.startswith("4/") for f in files) and "4/commit_success.txt" not in files, files
    result = train(config, workdir, progress=False)
    assert result["status"] == "completed"
    losses = bucket_losses(workdir)
    for step in range(1, 7):
        assert abs(losses[step] - uninterrupted[step]) <= 1e-5, step


def test_bad_bucket_object_or_endpoint_is_one_line_naming_the_url(tiny_model_dir, train_samples_dir, gcs_server,
                                                                   gcs_bucket, tmp_path, capsys, monkeypatch):
    config_file = tmp_path / "c.py"
    config_file.write_text(
        "from simcse_jax.config import TrainConfig\n\n\ndef get_config(arg=None):\n"
        f"    return TrainConfig(model={str(tiny_model_dir)!r}, global_batch_size=16, max_steps=2, sts_dir=None,"
        " do_export=False)\n")
    wiki = upload(train_samples_dir / WIKI, f"{gcs_bucket}/data/wiki.txt")

    def run(*overrides):
        code = cli.main(["train", "--config", str(config_file), "--no-progress", *overrides])
        return code, capsys.readouterr().err.strip().splitlines()

    code, err = run("--workdir", "gs://no-such-bucket/run", "--set", f"train_file={wiki}")
    assert code == 2 and err[-1].startswith("error: train: workdir: gs://no-such-bucket/run: bucket no-such-bucket does not exist")
    code, err = run("--workdir", f"{gcs_bucket}/run", "--set", f"train_file={gcs_bucket}/data/absent.txt")
    assert code == 2 and err[-1] == f"error: train: train_file: {gcs_bucket}/data/absent.txt: no such object or folder"
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:1")  # nothing listens there
    monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", "http://127.0.0.1:1")
    code, err = run("--workdir", f"{gcs_bucket}/run2", "--set", f"train_file={wiki}")
    assert code == 2 and err[-1].startswith(f"error: train: train_file: {wiki}: cannot reach the storage endpoint")
    assert len(err) == 1 or not any("Traceback" in line for line in err)
    monkeypatch.undo()
    # Nothing was written for any of them.
    assert not any(f.startswith(("run/", "run2/")) for f in paths.list_files(gcs_bucket))


@pytest.mark.slow
def test_interrupted_gcs_run_names_the_buckets_last_complete_step(
        tiny_model_dir, train_samples_dir, data_cache, gcs_server, gcs_bucket, tmp_path):  # noqa: F811
    """Two Ctrl-C on a run whose workdir is gs://: the last line names the bucket's last complete
    step (not a local `gs:/...` folder with "no complete checkpoint"), and that step resumes."""
    import time

    from test_train import config_file_for

    from simcse_jax.checkpoint import complete_steps

    url = upload(train_samples_dir / WIKI, f"{gcs_bucket}/data/wiki.txt")
    config = tiny_config(tiny_model_dir, train_samples_dir, data_cache, train_file=url, max_steps=100_000)
    workdir = f"{gcs_bucket}/runs/interrupted"
    env = {**os.environ, **gcs_server.env, "HF_HUB_OFFLINE": "1", "SIMCSE_JAX_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen([sys.executable, "-m", "simcse_jax.cli", "train", "--config", str(config_file_for(config, tmp_path)),
                             "--workdir", workdir, "--no-progress"], env=env, cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        while 2 not in complete_steps(f"{workdir}/checkpoints/latest"):
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        head = []
        while not (head and head[-1].startswith("interrupt: saving at the next step boundary")):
            head.append(proc.stderr.readline())
            assert head[-1], "".join(head)[-3000:]
        proc.send_signal(signal.SIGINT)  # the second: stop at once
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err[-3000:]
    last = max(complete_steps(f"{workdir}/checkpoints/latest"))
    assert err.strip().splitlines()[-1] == (
        f"error: train: interrupted: stopped at once without saving. The last complete checkpoint is step {last} in "
        f"{workdir}/checkpoints/latest; rerun the same command to resume from it."), err[-3000:]
