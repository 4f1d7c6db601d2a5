"""The training loop does not wait for the devices between steps.

The loop reads measurements to the host only at log, evaluation and save steps; in between it
only dispatches. Every host read of a jax.Array's value (`jax.device_get`, `float()`, `bool()`,
`.tolist()`) goes through `ArrayImpl._value`; the test records, for each such read, the last
step the loop had dispatched.
"""

import json

import pytest
from jax._src.array import ArrayImpl

from simcse_jax.config import TrainConfig
from simcse_jax.train import train


@pytest.fixture
def host_reads(monkeypatch):
    """Records the loop's step (from the callback) at every host read of an array's value."""
    record = {"step": 0, "reads": []}
    original = ArrayImpl._value

    def counted(self):
        record["reads"].append(record["step"])
        return original.fget(self)

    monkeypatch.setattr(ArrayImpl, "_value", property(counted))

    def callback(event, step):
        if event == "step":
            record["step"] = step

    record["callback"] = callback
    return record


def test_measurements_reach_the_host_only_at_log_and_save_steps(tiny_model_dir, train_samples_dir, tmp_path, host_reads):
    config = TrainConfig(
        model=str(tiny_model_dir), train_file=str(train_samples_dir / "wiki1m_for_simcse.head11914.txt"),
        data_cache_dir=str(tmp_path / "cache"), pooler="cls", mlp_only_train=True, global_batch_size=16,
        learning_rate=1e-3, max_steps=12, log_every=4, save_steps=6, eval_steps=100, sts_dir=None,
        do_export=False, do_test_eval=False, async_checkpointing=False,
    )
    result = train(config, tmp_path / "run", progress=False, callback=host_reads["callback"])
    assert result["status"] == "completed"
    reads = set(host_reads["reads"])
    # Log steps 4, 8, 12 (a log step is read while the next step runs), saves 6, 12; nothing else.
    # A loop that fetched measurements at every step would read at steps 1, 2, 3, 5, ...
    assert reads and reads <= {4, 6, 8, 12}, sorted(reads)
    assert {4, 8} <= reads
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [4, 8, 12]  # each log step's own values, as before
    assert set(records[0]) == {"step", "time", "loss", "simcse_loss", "accuracy", "alignment", "uniformity", "grad_norm",
                               "update_norm", "param_norm", "learning_rate", "steps_per_s", "sentences_per_s", "epoch"}
    assert records[-1]["epoch"] == pytest.approx(12 / (11914 // 16))
