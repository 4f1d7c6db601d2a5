"""What the trainer measures on its model: evaluators, one contract, listed in the config.

An `Evaluator` has a `name` (its key in `EVALUATORS` and in the config's `evaluators`), the
`metrics` it returns, and a `primary_metric`; calling it on the parameters returns
{metric: float} (logged as `eval/<metric>` in metrics.jsonl at every evaluation step);
`format` writes its part of the evaluation's log line; `final` (optional) is its part of the
end of the run, on the best parameters: entries of results.json, a log message, and the
scores the exported model card shows.

The config chooses them: `evaluators` is a comma-separated list of names; None (the default)
is STS when an STS folder exists, else held-out alignment/uniformity when the training corpus
has held-out text (`builtin:` corpora), else none. `best_metric` names the metric (higher is
better) whose best value selects the checkpoint in `checkpoints/best/` and the export; None is
the first evaluator's primary metric: STS-B dev Spearman, as in the reference. Alignment and
uniformity trade off against each other, so the held-out evaluator selects nothing.

Adding an evaluator: a class here following the contract, and `EVALUATORS[name] = factory`
(a factory takes the run's `EvalContext`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from simcse_jax import sts
from simcse_jax.config import TrainConfig
from simcse_jax.encode import SentenceEncoder
from simcse_jax.errors import ConfigError
from simcse_jax.losses import alignment, uniformity
from simcse_jax.objective import embed_views
from simcse_jax.sharding import batch_sharding, data_parallel_size
from simcse_jax.train_step import objective_config


@dataclasses.dataclass
class EvalContext:
    """What a run's evaluators share. `graphdef` is the encoder's graph in the evaluation dtype
    (`TrainConfig.eval_dtype`, float32 by default whatever the training compute dtype): the test
    table is then the export's table. Programs compile once per run; `params` change."""

    config: TrainConfig
    graphdef: nnx.GraphDef
    tokenizer: object
    mesh: jax.sharding.Mesh
    pooler: str  # the evaluation pooler (config.eval_pooler)
    sts_dir: Path | None
    heldout: Path | None  # held-out text of a builtin: corpus
    _encoder: SentenceEncoder | None = None

    def encoder(self, params) -> SentenceEncoder:
        """The sentence encoder on `params` (one per run: its compiled programs are reused)."""
        model = nnx.merge(self.graphdef, params)
        if self._encoder is None:
            self._encoder = SentenceEncoder(model, self.tokenizer, pooler=self.pooler, mesh=self.mesh,
                                            batch_size=self.config.eval_batch_size)
        else:
            self._encoder.set_model(model)
        return self._encoder


@dataclasses.dataclass
class Final:
    """An evaluator's part of the end of the run."""

    results: dict  # merged into results.json
    message: str  # logged
    card_scores: dict[str, float] | None = None  # {name: number} for the exported model card


class Evaluator:
    """The contract (subclass it, or provide the same attributes and methods)."""

    name: str = ""
    metrics: tuple[str, ...] = ()  # the names __call__ returns
    primary_metric: str | None = None  # selects the best checkpoint unless the config names another

    def __call__(self, params: nnx.State) -> dict[str, float]:
        raise NotImplementedError

    def format(self, metrics: dict[str, float]) -> str:
        return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())

    def final(self, params: nnx.State, step: int) -> Final | None:
        """The end of the run on the parameters of `step` (the best, or the last); None: nothing."""
        return None


class StsEvaluator(Evaluator):
    """STS-B / SICK-R dev Spearman x 100 during training; the seven-task STS test table at the end
    (with `do_test_eval`), which the exported model card shows."""

    name = "sts"
    metrics = sts.DEV_TASKS
    primary_metric = "STSBenchmark"  # STS-B dev Spearman selects the best checkpoint, as in the reference

    def __init__(self, ctx: EvalContext):
        if ctx.sts_dir is None:
            raise ConfigError("evaluators: sts needs the STS data: pass --set sts_dir=... or set $SIMCSE_STS_DIR")
        self.ctx = ctx
        self.dev_tasks = [sts.load_task(ctx.sts_dir, t, "dev") for t in sts.DEV_TASKS]

    def __call__(self, params) -> dict[str, float]:
        res = sts.evaluate(self.ctx.encoder(params), self.dev_tasks, align_uniform=False)
        return {k: v for k, v in res["paper"].items() if k != "Avg."}

    def format(self, metrics: dict[str, float]) -> str:
        return ", ".join(f"{k} {v:.2f}" for k, v in metrics.items())

    def final(self, params, step: int) -> Final | None:
        if not self.ctx.config.do_test_eval:
            return None
        t0 = time.perf_counter()
        test = sts.evaluate(self.ctx.encoder(params), [sts.load_task(self.ctx.sts_dir, t, "test") for t in sts.TASKS])
        message = (f"STS test (Spearman x 100, {self.ctx.pooler} pooler, {self.ctx.config.eval_dtype}, step {step}):\n"
                   + sts.format_table(test["paper"]))
        return Final({"sts_test": test, "test_eval_seconds": round(time.perf_counter() - t0, 2)}, message, test["paper"])


class HeldoutEvaluator(Evaluator):
    """Wang & Isola on held-out sentences: alignment between two dropout views of each sentence
    (the unsupervised positives), uniformity of the evaluation embeddings."""

    name = "heldout"
    metrics = ("heldout_alignment", "heldout_uniformity")

    def __init__(self, ctx: EvalContext, max_sentences: int = 1024):
        if ctx.heldout is None:
            raise ConfigError("evaluators: heldout needs held-out text, which a builtin: train_file provides")
        self.ctx, self.max_sentences = ctx, max_sentences
        self._inputs = None

    def alignment_uniformity(self, params) -> dict[str, float]:
        ctx = self.ctx
        if self._inputs is None:  # tokenized, placed and compiled once per run
            lines = [s for s in ctx.heldout.read_text(encoding="utf-8").splitlines() if s.strip()]
            dp = data_parallel_size(ctx.mesh)
            lines = lines[: (min(len(lines), self.max_sentences) // dp) * dp]
            ids = ctx.tokenizer(lines, max_length=ctx.config.max_seq_length, truncation=True,
                                padding="max_length", return_tensors="np")
            batch = {k: np.repeat(ids[k][:, None].astype(np.int32), 2, axis=1) for k in ("input_ids", "attention_mask")}
            batch["token_type_ids"] = np.zeros_like(batch["input_ids"])
            cfg, graphdef = objective_config(ctx.config), ctx.graphdef
            views = jax.jit(lambda p, b, k: embed_views(nnx.merge(graphdef, p), b, cfg, k))
            self._inputs = (lines, jax.device_put(batch, batch_sharding(ctx.mesh, 3)), views)
        lines, batch, views = self._inputs
        with jax.set_mesh(ctx.mesh):
            z = views(params, batch, jax.random.key(0))
        z = np.asarray(z, np.float64)
        e = ctx.encoder(params)(lines).astype(np.float64)
        return {"alignment": float(alignment(z[:, 0], z[:, 1])), "uniformity": float(uniformity(e))}

    def __call__(self, params) -> dict[str, float]:
        return {f"heldout_{k}": v for k, v in self.alignment_uniformity(params).items()}

    def final(self, params, step: int) -> Final:
        au = self.alignment_uniformity(params)
        message = (f"held-out alignment {au['alignment']:.4f}, uniformity {au['uniformity']:.4f} "
                   f"(no STS folder: pass --set sts_dir=... or $SIMCSE_STS_DIR for the STS table)")
        return Final({"heldout": au}, message)


# name -> factory(EvalContext) -> Evaluator
EVALUATORS: dict[str, Callable[[EvalContext], Evaluator]] = {"sts": StsEvaluator, "heldout": HeldoutEvaluator}


def default_evaluators(ctx: EvalContext) -> list[str]:
    """The evaluators of `evaluators=None`: STS when there is STS data, else held-out text's."""
    return ["sts"] if ctx.sts_dir is not None else ["heldout"] if ctx.heldout is not None else []


class TrainingEvaluator:
    """A run's evaluators as one: `dev` merges their metrics (`eval/<metric>`), `line` writes the
    evaluation's log line, `final` collects their end of the run; `best_metric` selects the best
    checkpoint (None: nothing does)."""

    def __init__(self, evaluators: list[Evaluator], best_metric: str | None):
        self.evaluators, self.best_metric = evaluators, best_metric

    @classmethod
    def from_config(cls, config: TrainConfig, ctx: EvalContext) -> TrainingEvaluator:
        """The config's `evaluators` and `best_metric`, or ConfigError naming the key."""
        if config.evaluators is None:
            names = default_evaluators(ctx)
        else:
            names = [n.strip() for n in config.evaluators.split(",") if n.strip()]
        for name in names:
            if name not in EVALUATORS:
                raise ConfigError(f"evaluators: unknown evaluator {name!r}; choose from {', '.join(EVALUATORS)}")
        evaluators = [EVALUATORS[name](ctx) for name in dict.fromkeys(names)]
        metrics = [m for e in evaluators for m in e.metrics]
        clash = sorted({m for m in metrics if metrics.count(m) > 1})
        if clash:
            raise ConfigError(f"evaluators: {', '.join(clash)} returned by more than one of {', '.join(names)}")
        if config.best_metric is not None and config.best_metric not in metrics:
            raise ConfigError(f"best_metric: {config.best_metric!r} is not a metric of the evaluators "
                              f"({', '.join(metrics) or 'none'})")
        return cls(evaluators, config.best_metric or next((e.primary_metric for e in evaluators if e.primary_metric), None))

    def dev(self, params) -> dict[str, float]:
        return {f"eval/{k}": v for e in self.evaluators for k, v in e(params).items()}

    def line(self, step: int, scores: dict[str, float], best_score: float, best_step: int | None) -> str:
        """One log line for an evaluation: each evaluator formats its own metrics."""
        values = {k.split("/", 1)[1]: v for k, v in scores.items()}
        parts = [e.format({m: values.pop(m) for m in e.metrics if m in values}) for e in self.evaluators]
        parts += [f"{k} {v:.4f}" for k, v in values.items()]  # returned but not declared
        best = f" (best {best_score:.2f} at step {best_step})" if best_step is not None else ""
        return f"step {step} dev: {', '.join(p for p in parts if p)}{best}"

    def final(self, params, step: int) -> list[Final]:
        return [f for f in (e.final(params, step) for e in self.evaluators) if f is not None]
