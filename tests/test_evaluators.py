"""Evaluators (`simcse_jax.evaluators`): the contract, the config's choice of them, and a new one
added by registering it, with nothing else touched."""

import json

import jax
import numpy as np
import pytest

from simcse_jax import evaluators
from simcse_jax.config import TrainConfig
from simcse_jax.errors import ConfigError
from simcse_jax.evaluators import EvalContext, Evaluator, Final, TrainingEvaluator
from simcse_jax.train import train


def context(config: TrainConfig, sts_dir=None, heldout=None) -> EvalContext:
    # No model: choosing and checking evaluators needs none.
    return EvalContext(config, graphdef=None, tokenizer=None, mesh=None, pooler="cls", sts_dir=sts_dir, heldout=heldout)


def test_default_is_sts_with_sts_data_else_heldout_else_none(sts_dir, tmp_path):
    heldout = tmp_path / "heldout.txt"
    heldout.write_text("a sentence\n")
    config = TrainConfig()
    chosen = TrainingEvaluator.from_config(config, context(config, sts_dir=sts_dir, heldout=heldout))
    assert [e.name for e in chosen.evaluators] == ["sts"] and chosen.best_metric == "STSBenchmark"
    chosen = TrainingEvaluator.from_config(config, context(config, heldout=heldout))
    assert [e.name for e in chosen.evaluators] == ["heldout"] and chosen.best_metric is None  # selects nothing
    chosen = TrainingEvaluator.from_config(config, context(config))
    assert chosen.evaluators == [] and chosen.best_metric is None
    both = config.replace(evaluators="sts, heldout", best_metric="SICKRelatedness")
    chosen = TrainingEvaluator.from_config(both, context(both, sts_dir=sts_dir, heldout=heldout))
    assert [e.name for e in chosen.evaluators] == ["sts", "heldout"] and chosen.best_metric == "SICKRelatedness"


@pytest.mark.parametrize("changes, message", [
    ({"evaluators": "sts,bleu"}, "evaluators: unknown evaluator 'bleu'; choose from sts, heldout"),
    ({"evaluators": "sts"}, "evaluators: sts needs the STS data"),
    ({"evaluators": "heldout"}, "evaluators: heldout needs held-out text"),
    ({"best_metric": "STS12"}, "best_metric: 'STS12' is not a metric of the evaluators (STSBenchmark, SICKRelatedness)"),
])
def test_a_bad_choice_is_one_line_naming_the_key(changes, message, sts_dir):
    config = TrainConfig(**changes)
    with pytest.raises(ConfigError) as e:
        TrainingEvaluator.from_config(config, context(config, sts_dir=None if "evaluators" in changes else sts_dir))
    assert str(e.value).startswith(message), str(e.value)


def test_the_log_line_has_each_evaluators_format(sts_dir, tmp_path):
    (tmp_path / "heldout.txt").write_text("a sentence\n")
    config = TrainConfig(evaluators="sts,heldout")
    chosen = TrainingEvaluator.from_config(config, context(config, sts_dir=sts_dir, heldout=tmp_path / "heldout.txt"))
    scores = {"eval/STSBenchmark": 81.234, "eval/SICKRelatedness": 70.0, "eval/heldout_alignment": 0.12345,
              "eval/heldout_uniformity": -2.5}
    assert chosen.line(4, scores, 81.234, 4) == ("step 4 dev: STSBenchmark 81.23, SICKRelatedness 70.00, "
                                                 "heldout_alignment 0.1235, heldout_uniformity -2.5000 (best 81.23 at step 4)")


class ToyEvaluator(Evaluator):
    """A metric that peaks at the second evaluation; it remembers the parameters it saw."""

    name = "toy"
    metrics = ("toy_score",)
    primary_metric = "toy_score"

    def __init__(self, ctx):
        self.scores = iter([1.0, 3.0, 2.0])
        self.seen = []  # (a fingerprint of the parameters, the score given)

    def __call__(self, params):
        score = next(self.scores)
        self.seen.append((fingerprint(params), score))
        return {"toy_score": score}

    def final(self, params, step):
        return Final({"toy_final": {"step": step, "fingerprint": fingerprint(params)}}, f"toy: step {step}")


def fingerprint(params) -> float:
    return float(sum(np.abs(np.asarray(jax.device_get(x), np.float64)).sum() for x in jax.tree.leaves(params)))


def test_a_registered_evaluator_is_logged_and_selects_the_best_checkpoint(tiny_model_dir, train_samples_dir, tmp_path,
                                                                          monkeypatch):
    made = []
    monkeypatch.setitem(evaluators.EVALUATORS, "toy", lambda ctx: made.append(ToyEvaluator(ctx)) or made[-1])
    lines = (train_samples_dir / "wiki1m_for_simcse.head11914.txt").read_text().splitlines()[:200]
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    config = TrainConfig(
        model=str(tiny_model_dir), train_file=str(tmp_path / "train.txt"), data_cache_dir=str(tmp_path / "cache"),
        global_batch_size=16, learning_rate=1e-3, max_steps=6, eval_steps=2, save_steps=6, log_every=2, sts_dir=None,
        evaluators="toy", do_export=False, async_checkpointing=False,
    )
    results = train(config, tmp_path / "run", progress=False)
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["eval/toy_score"]) for r in records if "eval/toy_score" in r] == [(2, 1.0), (4, 3.0), (6, 2.0)]
    assert (results["best_step"], results["best_metric"], results["best_score"]) == (4, "toy_score", 3.0)
    assert results["best_dev_stsb"] is None
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints" / "best").iterdir() if p.name.isdigit()) == ["4"]
    # The end of the run sees the best step's parameters (restored from best/), not the last ones.
    toy = made[0]
    at_best = toy.seen[1][0]
    assert results["toy_final"] == {"step": 4, "fingerprint": pytest.approx(at_best, rel=1e-12)}
    assert toy.seen[2][0] != pytest.approx(at_best, rel=1e-9)  # the parameters moved after step 4
