"""The trainer: resume equivalence, crash safety, resharding, PyTorch parity, best-model selection."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from simcse_jax.config import TrainConfig
from simcse_jax.train import TrainingError, train

REPO = Path(__file__).resolve().parents[1]


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
def uninterrupted(tiny_model_dir, train_samples_dir, data_cache, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    result = train(tiny_config(tiny_model_dir, train_samples_dir, data_cache), workdir, progress=False)
    assert result["status"] == "completed"
    return step_losses(workdir)


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
    config = tiny_config(tiny_model_dir, train_samples_dir, data_cache, max_steps=12)
    train(config, tmp_path, progress=False, callback=sigterm_at(4))
    # Resume with an absurd learning rate: the parameters overflow and the loss becomes NaN.
    exploding = config.replace(learning_rate=1e30, max_grad_norm=0.0)
    with pytest.raises(TrainingError, match=r"step (5|6|7): non-finite loss .* last good checkpoint is step 4 in"):
        train(exploding, tmp_path, progress=False)
    latest = tmp_path / "checkpoints" / "latest"
    assert max(int(p.name) for p in latest.iterdir() if p.name.isdigit()) == 4
    # on_nonfinite=skip: the bad updates are dropped inside the step and the run finishes.
    result = train(exploding.replace(on_nonfinite="skip", max_steps=8), tmp_path, progress=False)
    assert result["status"] == "completed"
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    skipped = [r["step"] for r in records if r.get("skipped") == 1.0]
    assert skipped and all(s > 4 for s in skipped)


def test_best_checkpoint_is_the_exported_model(tiny_model_dir, train_samples_dir, data_cache, sts_dir, tmp_path):
    from simcse_jax.hf_io import load_pretrained
    from simcse_jax.checkpoint import load_checkpoint

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
