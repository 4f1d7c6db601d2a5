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


@pytest.mark.slow  # 60 steps with three deliberately slow evaluations
def test_logged_rates_exclude_evaluation_and_checkpoint_time(tiny_model_dir, train_samples_dir, tmp_path, monkeypatch):
    """An evaluation that takes 1.5 s (deliberately slow) is not in the rate of the interval it
    falls in: every logged rate is within 2x of the median one. The time is reported separately:
    the evaluation's own `eval_seconds`, the interval's `excluded_seconds`, and the run's totals."""
    import statistics
    import time

    from simcse_jax.evaluators import TrainingEvaluator

    slow_s = 1.5

    def slow_dev(self, params):
        time.sleep(slow_s)
        return {"eval/toy": 0.0}

    monkeypatch.setattr(TrainingEvaluator, "dev", slow_dev)
    config = TrainConfig(
        model=str(tiny_model_dir), train_file=str(train_samples_dir / "wiki1m_for_simcse.head11914.txt"),
        data_cache_dir=str(tmp_path / "cache"), global_batch_size=16, learning_rate=1e-3, max_steps=60, log_every=10,
        eval_steps=20, sts_dir=None, do_export=False, do_test_eval=False,
    )
    results = train(config, tmp_path / "run", progress=False)
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rates = {r["step"]: r["steps_per_s"] for r in records if "steps_per_s" in r}
    assert sorted(rates) == [10, 20, 30, 40, 50, 60]
    steady = [rates[s] for s in sorted(rates)[1:]]  # the first interval holds the first dispatch's warm-up
    median = statistics.median(steady)
    # Evaluations (and the saves after them) at steps 20 and 40 fall in the intervals logged at 30 and 50
    # (10 steps each: a 5-step interval of ~0.15 s on 2 cores is at the mercy of the background save).
    for step in (30, 50):
        assert median / 2 <= rates[step] <= 2 * median, (step, rates, median)
        assert next(r for r in records if r["step"] == step and "steps_per_s" in r)["excluded_seconds"] >= slow_s
    evals = [r for r in records if "eval/toy" in r]
    assert [e["step"] for e in evals] == [20, 40, 60] and all(e["eval_seconds"] >= slow_s for e in evals)
    assert results["eval_seconds"] >= 3 * slow_s and results["checkpoint_seconds"] > 0
    assert results["train_seconds"] <= results["loop_seconds"] - 3 * slow_s


def test_hooks_run_at_their_periods_in_the_order_added():
    """`every`: after every N-th update; `at_last`: also after the last; `lag=1`: one update
    later, for the same step (how a log step's measurements are read once the next update is queued)."""
    import types

    from simcse_jax.train import Hooks

    calls = []
    hooks = Hooks()
    hooks.add_hook(lambda run, step: calls.append(("read log step", step, run.step)), every=4, lag=1)
    hooks.add_hook(lambda run, step: calls.append(("evaluate", step, run.step)), every=5, at_last=True)
    run = types.SimpleNamespace(step=0, total_steps=12)
    for run.step in range(1, 13):
        hooks.run(run)
    assert calls == [("read log step", 4, 5), ("evaluate", 5, 5), ("read log step", 8, 9), ("evaluate", 10, 10),
                     ("evaluate", 12, 12)]
