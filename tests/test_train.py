"""The trainer: resume equivalence, crash safety, resharding, PyTorch parity, best-model selection."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from simcse_jax.config import TrainConfig
from simcse_jax.errors import TrainingError
from simcse_jax.train import train

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # whole training runs (~20-60 s each)


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("data_cache")  # tokenize each sample file once for the module


def tiny_config(model_dir, train_samples_dir, data_cache, **changes) -> TrainConfig:
    base = TrainConfig(
        model=str(model_dir), compute_dtype="float32",
        train_file=str(train_samples_dir / "wiki1m_for_simcse.head11914.txt"), data_cache_dir=str(data_cache),
        pooler="cls", mlp_only_train=True, global_batch_size=16, learning_rate=1e-3, max_steps=6,
        eval_steps=100, save_steps=2, log_every=1, sts_dir=None, do_export=False, do_test_eval=False, seed=3,
    )
    return base.replace(**changes)


def step_losses(workdir) -> dict[int, float]:
    out = {}
    for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out[record["step"]] = record["loss"]
    return out


def sigterm_at(step_to_stop):
    def callback(event, step):
        if event == "step" and step == step_to_stop:
            os.kill(os.getpid(), signal.SIGTERM)

    return callback


@pytest.fixture(scope="module")
def uninterrupted_dir(tiny_model_dir, train_samples_dir, data_cache, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    result = train(tiny_config(tiny_model_dir, train_samples_dir, data_cache), workdir, progress=False)
    assert result["status"] == "completed"
    return workdir


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_dir):
    return step_losses(uninterrupted_dir)


def test_sigterm_then_resume_gives_the_same_losses(tiny_model_dir, train_samples_dir, data_cache, uninterrupted, tmp_path):
    config = tiny_config(tiny_model_dir, train_samples_dir, data_cache)
    first = train(config, tmp_path, progress=False, callback=sigterm_at(3))
    assert first == {"status": "preempted", "step": 3}
    assert (tmp_path / "checkpoints" / "latest" / "3").is_dir()  # saved at the step boundary
    second = train(config, tmp_path, progress=False)
    assert second["status"] == "completed" and second["steps"] == 6
    resumed = step_losses(tmp_path)
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]  # the log was not duplicated by the resume
    for step in range(1, 7):
        assert abs(resumed[step] - uninterrupted[step]) <= 1e-5, (step, resumed[step], uninterrupted[step])
    # Dropout was on: a different seed changes the losses, so equality above is not vacuous.
    other = tmp_path / "other_seed"
    train(config.replace(seed=4, max_steps=2), other, progress=False)
    assert abs(step_losses(other)[1] - uninterrupted[1]) > 1e-4


def test_a_run_resumes_with_another_contrastive_loss_and_the_same_losses(tiny_model_dir, train_samples_dir, data_cache,
                                                                        uninterrupted, tmp_path):
    """contrastive_impl is a free key on resume (the same loss, computed another way): a dense run
    stopped at step 3 and resumed with the ring loss logs the uninterrupted dense run's losses."""
    config = tiny_config(tiny_model_dir, train_samples_dir, data_cache)
    assert train(config, tmp_path, progress=False, callback=sigterm_at(3)) == {"status": "preempted", "step": 3}
    ring = config.replace(contrastive_impl="ring", contrastive_block_size=1)
    assert train(ring, tmp_path, progress=False)["status"] == "completed"
    assert json.loads((tmp_path / "config.json").read_text())["contrastive_impl"] == "ring"
    resumed = step_losses(tmp_path)
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        assert abs(resumed[step] - uninterrupted[step]) <= 1e-5, (step, resumed[step], uninterrupted[step])


def test_checkpoint_restores_onto_other_meshes(tiny_model_dir, train_samples_dir, data_cache, uninterrupted, tmp_path):
    config = tiny_config(tiny_model_dir, train_samples_dir, data_cache, mesh_data=8)
    train(config, tmp_path, progress=False, callback=sigterm_at(2))
    shutil.copytree(tmp_path, tmp_path.parent / "one_device")
    # (data=8) -> (data=2, fsdp=2, tensor=2), in this process.
    train(config.replace(mesh_data=2, mesh_fsdp=2, mesh_tensor=2), tmp_path, progress=False)
    losses = step_losses(tmp_path)
    # (data=8) -> one device, in a fresh process that sees a single CPU device.
    one = tmp_path.parent / "one_device"
    script = (
        "import sys; from simcse_jax.config import TrainConfig; from simcse_jax.train import train; "
        "import json; cfg = TrainConfig(**json.loads(sys.argv[1])); train(cfg, sys.argv[2], progress=False)"
    )
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "HF_HUB_OFFLINE": "1"}
    cfg_json = json.dumps({**config.__dict__, "mesh_data": 1})
    subprocess.run([sys.executable, "-c", script, cfg_json, str(one)], check=True, env=env, cwd=REPO, timeout=600)
    single = step_losses(one)
    for step in range(3, 7):
        assert abs(losses[step] - uninterrupted[step]) <= 1e-5 * max(1.0, abs(uninterrupted[step])), step
        assert abs(single[step] - uninterrupted[step]) <= 1e-5 * max(1.0, abs(uninterrupted[step])), step


def test_sigkill_during_async_save_restarts_from_last_complete(tiny_model_dir, train_samples_dir, data_cache, uninterrupted, tmp_path):
    """The process dies right after issuing the step-4 async save; the restart loads a complete step."""
    config = tiny_config(tiny_model_dir, train_samples_dir, data_cache)
    script = (
        "import json, os, signal, sys; from simcse_jax.config import TrainConfig; from simcse_jax.train import train\n"
        "def cb(event, step):\n"
        "    if event == 'checkpoint' and step == 4: os.kill(os.getpid(), signal.SIGKILL)\n"
        "train(TrainConfig(**json.loads(sys.argv[1])), sys.argv[2], progress=False, callback=cb)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(config.__dict__), str(tmp_path)],
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=REPO, timeout=600)
    assert proc.returncode == -signal.SIGKILL
    latest = tmp_path / "checkpoints" / "latest"
    finished = sorted(int(p.name) for p in latest.iterdir() if p.name.isdigit())
    assert 2 in finished  # the synchronous history before the crash
    result = train(config, tmp_path, progress=False)
    assert result["status"] == "completed"
    losses = step_losses(tmp_path)
    for step in range(1, 7):
        assert abs(losses[step] - uninterrupted[step]) <= 1e-5, step


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
        tiny_model_dir, train_samples_dir, data_cache, tmp_path):
    """A NaN at step k is caught although measurements are fetched only every `log_every` (> k)
    steps: the error names step k exactly and no state from step k or later is saved."""
    config = tiny_config(tiny_model_dir, train_samples_dir, data_cache, max_steps=12)
    train(config, tmp_path, progress=False, callback=sigterm_at(4))
    shutil.copytree(tmp_path, tmp_path.parent / "skip_run")
    # Resume with an absurd learning rate: the parameters overflow and the loss becomes NaN.
    exploding = config.replace(learning_rate=1e30, max_grad_norm=0.0, allow_config_change=True)
    # on_nonfinite=skip, logging every step: the bad updates are dropped inside the step, the run
    # finishes, and the log shows the first non-finite step k.
    result = train(exploding.replace(on_nonfinite="skip"), tmp_path.parent / "skip_run", progress=False)
    assert result["status"] == "completed"
    records = [json.loads(x) for x in (tmp_path.parent / "skip_run" / "metrics.jsonl").read_text().splitlines()]
    assert {"step": 4, "allow_config_change": 1.0}.items() <= records[4].items()  # the change is on the record
    skipped = [r["step"] for r in records if r.get("skipped") == 1.0]
    assert skipped and all(s > 4 for s in skipped)
    first_bad = min(skipped)
    # on_nonfinite=stop, measurements fetched only at log steps (every 50) and saves (every 2).
    with pytest.raises(TrainingError, match=rf"step {first_bad}: non-finite loss .* last good checkpoint is step 4 in"):
        train(exploding.replace(log_every=50), tmp_path, progress=False)
    latest = tmp_path / "checkpoints" / "latest"
    assert max(int(p.name) for p in latest.iterdir() if p.name.isdigit()) == 4


def test_best_checkpoint_is_the_exported_model(tiny_model_dir, train_samples_dir, data_cache, sts_dir, tmp_path):
    from simcse_jax.checkpoint import load_checkpoint
    from simcse_jax.hf_io import load_pretrained

    config = tiny_config(tiny_model_dir, train_samples_dir, data_cache, sts_dir=str(sts_dir), eval_steps=2,
                         max_steps=6, learning_rate=3e-3, do_export=True, do_test_eval=False)
    result = train(config, tmp_path, progress=False)
    evals = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if "eval/STSBenchmark" in x]
    assert [e["step"] for e in evals] == [2, 4, 6]
    best = max(evals, key=lambda e: e["eval/STSBenchmark"])
    assert result["best_step"] == best["step"]
    assert len({round(e["eval/STSBenchmark"], 6) for e in evals}) == 3, "the test needs distinct dev scores"
    exported = load_pretrained(tmp_path / "export")
    chosen = load_checkpoint(tmp_path / "checkpoints" / "best", best["step"])
    import jax

    for a, b in zip(jax.tree.leaves(nnx_params(exported.model)), jax.tree.leaves(nnx_params(chosen.model))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def nnx_params(model):
    from flax import nnx

    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def test_whole_trainer_equals_a_pytorch_loop(minilm_dir, train_samples_dir, data_cache, tmp_path):
    """Supervised SimCSE, dropout 0, file order: 5 steps of batch 16 from MiniLM, JAX vs torch."""
    import csv

    from simcse_jax.checkpoint import load_checkpoint
    from simcse_jax.hf_export import hf_state_dict

    nli = train_samples_dir / "snli_dev_triples_simcse_format.csv"
    steps, batch, lr = 5, 16, 5e-5
    config = TrainConfig(
        model=str(minilm_dir), train_file=str(nli), data_cache_dir=str(data_cache), shuffle=False,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pooler="cls", mlp_only_train=False,
        mlp_init="checkpoint", temperature=0.05, hard_negative_weight=0.0, global_batch_size=batch,
        learning_rate=lr, max_steps=steps, max_grad_norm=1.0, reference_world_size=1, eval_steps=100,
        save_steps=steps, sts_dir=None, do_export=False, do_test_eval=False, log_every=1,
    )
    assert train(config, tmp_path, progress=False)["status"] == "completed"
    ours = hf_state_dict(load_checkpoint(tmp_path / "checkpoints" / "latest", steps).model)

    # The reference recipe written out in PyTorch.
    torch.manual_seed(0)
    tok = transformers.AutoTokenizer.from_pretrained(str(minilm_dir))
    model = transformers.BertModel.from_pretrained(str(minilm_dir), hidden_dropout_prob=0.0,
                                                   attention_probs_dropout_prob=0.0).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    sched = transformers.get_linear_schedule_with_warmup(opt, 0, steps)
    with nli.open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))[1:]
    cos = torch.nn.CosineSimilarity(dim=-1)
    for s in range(steps):
        sentences = [x for row in rows[s * batch:(s + 1) * batch] for x in row]  # (sent0, sent1, hard_neg) per row
        enc = tok(sentences, max_length=32, truncation=True, padding="max_length", return_tensors="pt")
        z = model(**enc).pooler_output.view(batch, 3, -1)  # pooler = dense + tanh over [CLS] = the MLP
        z1, z2, z3 = z[:, 0], z[:, 1], z[:, 2]
        logits = torch.cat([cos(z1.unsqueeze(1), z2.unsqueeze(0)), cos(z1.unsqueeze(1), z3.unsqueeze(0))], 1) / 0.05
        loss = torch.nn.functional.cross_entropy(logits, torch.arange(batch))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
    theirs = {k: v.detach().numpy() for k, v in model.state_dict().items() if k != "embeddings.position_ids"}
    assert set(ours) == set(theirs)
    worst = max(float(np.abs(ours[k] - theirs[k]).max()) for k in theirs)
    moved = max(float(np.abs(theirs[k] - transformers.BertModel.from_pretrained(str(minilm_dir)).state_dict()[k].numpy()).max())
                for k in ("pooler.dense.weight",))
    assert moved > 1e-4, "the parameters must have moved for the comparison to mean anything"
    assert worst <= 1e-4, worst


def test_without_sts_data_the_builtin_corpus_gives_heldout_alignment_uniformity(
        tiny_model_dir, data_cache, tmp_path):
    config = TrainConfig(model=str(tiny_model_dir), train_file="builtin:docstrings", data_cache_dir=str(data_cache),
                         global_batch_size=16, learning_rate=1e-3, max_steps=2, eval_steps=1, log_every=1,
                         sts_dir=None, do_export=False)
    result = train(config, tmp_path, progress=False)
    evals = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if "eval/heldout" in x]
    assert [e["step"] for e in evals] == [1, 2]
    assert evals[0]["eval/heldout_alignment"] != evals[1]["eval/heldout_alignment"]  # the model trained
    held = result["heldout"]
    # Unit vectors: alignment is a mean squared distance in (0, 4]; uniformity is negative.
    assert 0.0 < held["alignment"] <= 4.0 and held["uniformity"] < 0.0
    assert held == {"alignment": evals[1]["eval/heldout_alignment"], "uniformity": evals[1]["eval/heldout_uniformity"]}


# ----------------------------------------------------------------------------- faults


def config_file_for(config: TrainConfig, folder: Path) -> Path:
    """`config` as a configs/-style file, for the command line."""
    path = folder / "run_config.py"
    path.write_text("import json\nfrom simcse_jax.config import TrainConfig\n\n\n"
                    f"def get_config(arg=None):\n    return TrainConfig(**json.loads({json.dumps(json.dumps(config.__dict__))}))\n")
    return path


def cli_train(config_file, workdir, *overrides) -> int:
    from simcse_jax.cli import main

    return main(["train", "--config", str(config_file), "--workdir", str(workdir), "--no-progress",
                 *[x for o in overrides for x in ("--set", o)]])


def sigint_at(step_to_stop):
    def callback(event, step):
        if event == "step" and step == step_to_stop:
            os.kill(os.getpid(), signal.SIGINT)

    return callback


def test_first_sigint_saves_and_a_changed_run_is_refused_on_resume(
        tiny_model_dir, train_samples_dir, data_cache, uninterrupted, tmp_path, capfd):
    """Ctrl-C once = SIGTERM: saved at the step boundary, resumable. Resuming with a key that
    changes the run is refused in one line naming the key, old and new values; a key that does
    not (eval_steps) is accepted and noted, and the losses equal an uninterrupted run's."""
    config = tiny_config(tiny_model_dir, train_samples_dir, data_cache)
    workdir = tmp_path / "run"
    assert train(config, workdir, progress=False, callback=sigint_at(3)) == {"status": "preempted", "step": 3}
    assert "interrupt: saving at the next step boundary" in capfd.readouterr().err
    assert (workdir / "checkpoints" / "latest" / "3").is_dir()
    cfg = config_file_for(config, tmp_path)
    for override, old, new in (("global_batch_size=32", 16, 32), ("learning_rate=0.01", 0.001, 0.01)):
        assert cli_train(cfg, workdir, override) == 2
        err = capfd.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and "Traceback" not in err, err  # one line, no traceback
        key = override.split("=")[0]
        assert lines[0].startswith(f"error: train: {workdir / 'config.json'} records another run: {key} {old!r} -> {new!r}. ")
        assert "new --workdir" in lines[0] and "--set allow_config_change=true" in lines[0]
    assert step_losses(workdir).keys() == {1, 2, 3}  # refused before anything ran
    assert cli_train(cfg, workdir, "eval_steps=50") == 0
    err = capfd.readouterr().err
    assert "note: resuming with changed settings: eval_steps 100 -> 50" in err and "resumed from step 3 (" in err
    losses = step_losses(workdir)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        assert abs(losses[step] - uninterrupted[step]) <= 1e-5, step


def largest_file(folder: Path) -> Path:
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def test_damaged_newest_step_falls_back_to_the_previous_and_none_readable_is_an_error(
        tiny_model_dir, train_samples_dir, data_cache, uninterrupted, tmp_path, capfd):
    config = tiny_config(tiny_model_dir, train_samples_dir, data_cache)
    workdir = tmp_path / "run"
    latest = workdir / "checkpoints" / "latest"
    train(config, workdir, progress=False, callback=sigterm_at(4))
    assert sorted(int(p.name) for p in latest.iterdir() if p.name.isdigit()) == [2, 4]  # keep_checkpoints=2
    damaged = largest_file(latest / "4" / "params")
    os.truncate(damaged, 1000)
    capfd.readouterr()
    cfg = config_file_for(config, tmp_path)
    assert cli_train(cfg, workdir) == 0
    err = capfd.readouterr().err
    assert f"checkpoint step 4 in {latest} is damaged: {damaged}: truncated to 1000 bytes" in err, err[-3000:]
    assert "resumed from step 2 (" in err and "newer step(s) 4 damaged" in err
    moved = list((workdir / "checkpoints" / "damaged").iterdir())  # kept for inspection, not deleted
    assert [p.name.split("-")[:2] for p in moved] == [["latest", "4"]] and f"moved it to {moved[0]}" in err
    losses = step_losses(workdir)
    for step in range(1, 7):
        assert abs(losses[step] - uninterrupted[step]) <= 1e-5, step

    # Every step damaged (a truncated array file; unreadable metadata): an error, no training.
    steps = sorted(int(p.name) for p in latest.iterdir() if p.name.isdigit())
    os.truncate(largest_file(latest / str(steps[-1]) / "opt_state"), 10)
    for step in steps[:-1]:
        (latest / str(step) / "meta" / "metadata").unlink()
    before = (workdir / "metrics.jsonl").read_text()
    assert cli_train(cfg, workdir) == 1
    err = capfd.readouterr().err
    assert err.startswith(f"error: train: {latest}: no checkpoint step reads back completely (step {steps[-1]}: "), err[-3000:]
    assert all(f"step {s}: " in err for s in steps) and "not starting over from the pretrained model" in err
    assert "compiled the update step" not in err and (workdir / "metrics.jsonl").read_text() == before
    # resume_step names one step explicitly: the damaged one is refused rather than replaced.
    assert cli_train(cfg, workdir, f"resume_step={steps[0]}") == 1
    assert f"resume_step={steps[0]} does not read back completely" in capfd.readouterr().err


def test_second_sigint_aborts_at_once_and_the_last_checkpoint_loads(tiny_model_dir, train_samples_dir, data_cache, tmp_path):
    from simcse_jax.checkpoint import load_checkpoint

    config = tiny_config(tiny_model_dir, train_samples_dir, data_cache, max_steps=100_000)  # never ends by itself
    workdir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "simcse_jax.cli", "train", "--config", str(config_file_for(config, tmp_path)),
                             "--workdir", str(workdir), "--no-progress"], env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=REPO,
                            stderr=subprocess.PIPE, text=True)
    try:
        saved = workdir / "checkpoints" / "latest" / "2"
        while not saved.is_dir():
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            time.sleep(0.05)
        # The second Ctrl-C after the first was handled (two pending SIGINTs would merge into one);
        # the first one's save at the next step boundary is then still ahead.
        proc.send_signal(signal.SIGINT)
        head = []
        while not (head and head[-1].startswith("interrupt: saving at the next step boundary")):
            head.append(proc.stderr.readline())
            assert head[-1], "".join(head)[-3000:]
        proc.send_signal(signal.SIGINT)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=120)
        err = "".join(head) + err
        stopped_s = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    print(f"two SIGINTs -> exit in {stopped_s:.1f} s")
    assert proc.returncode == 130, err[-3000:]
    assert stopped_s < 20, stopped_s  # no save, no end-of-run work
    last = max(int(p.name) for p in (workdir / "checkpoints" / "latest").iterdir() if p.name.isdigit())
    assert (f"error: train: interrupted: stopped at once without saving. The last complete checkpoint is step "
            f"{last} in {workdir / 'checkpoints' / 'latest'}; rerun the same command to resume from it.") in err, err[-3000:]
    assert "Traceback" not in err
    assert load_checkpoint(workdir / "checkpoints" / "latest", last).step == last


@pytest.fixture
def small_filesystem(tmp_path):
    """mount(size_bytes) -> a folder on a tmpfs of that size (unmounted afterwards); skips where
    this machine does not allow mounting one."""
    mounted = []

    def mount(folder: Path, size_bytes: int) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(folder)], capture_output=True, text=True)
        if res.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here (needs root and mount permission): {res.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_disk_full_during_async_save_stops_naming_the_folder_and_the_earlier_step_resumes(
        tiny_model_dir, train_samples_dir, data_cache, uninterrupted_dir, uninterrupted, tmp_path, small_filesystem):
    from simcse_jax.errors import CheckpointWriteError

    step_bytes = sum(p.stat().st_size for p in (uninterrupted_dir / "checkpoints" / "latest" / "6").rglob("*") if p.is_file())
    workdir = tmp_path / "run"
    latest = small_filesystem(workdir / "checkpoints" / "latest", int(1.5 * step_bytes))  # one step fits, two do not
    config = tiny_config(tiny_model_dir, train_samples_dir, data_cache)  # async saves at steps 2, 4, 6
    with pytest.raises(CheckpointWriteError, match=rf"^{latest}: writing a checkpoint failed \(.*No space left on device.*\); "
                                                   r"the run stopped. The last complete step is 2; free space") as stopped:
        train(config, workdir, progress=False)
    print(f"disk full: {stopped.value}")
    assert sorted(int(p.name) for p in latest.iterdir() if p.name.isdigit()) == [2]
    # The earlier step is intact: the run resumes from it (here on a disk with room) and repeats
    # the uninterrupted run's losses.
    roomy = tmp_path / "copied"
    shutil.copytree(workdir, roomy)
    assert train(config, roomy, progress=False)["status"] == "completed"
    losses = step_losses(roomy)
    for step in range(1, 7):
        assert abs(losses[step] - uninterrupted[step]) <= 1e-5, step


@pytest.mark.parametrize("where", ["under_proc", "a_file", "read_only_disk"])
def test_a_workdir_that_cannot_be_written_is_one_line_before_anything_runs(where, tiny_model_dir, train_samples_dir,
                                                                            data_cache, tmp_path, capfd, request):
    """`--workdir /proc/x`, a path that is a file, a read-only disk: one line naming the folder and
    the OS error, exit 2, nothing written."""
    config = tiny_config(tiny_model_dir, train_samples_dir, data_cache)
    if where == "under_proc":
        workdir, why = Path("/proc/simcse-jax-test/run"), "No such file or directory"
    elif where == "a_file":
        workdir, why = tmp_path / "taken", "File exists"
        workdir.write_text("not a folder")
    else:
        mount = request.getfixturevalue("small_filesystem")
        disk = mount(tmp_path / "disk", 1 << 20)
        (disk / "run").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        workdir, why = disk / "run", "Read-only file system"
    config_file = config_file_for(config, tmp_path)
    before = sorted(tmp_path.rglob("*"))
    assert cli_train(config_file, workdir) == 2
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == [f"error: train: workdir {workdir}: cannot write there ({why})"], err[-2000:]
    assert sorted(tmp_path.rglob("*")) == before
