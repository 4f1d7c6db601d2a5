"""The SimCSE trainer: `simcse-jax train --config configs/NAME.py[:variant] --workdir DIR`.

`train` runs three phases, in the order a run happens:

 1. `set_up` returns the `Run`: the config validated before anything is compiled and recorded
    in the workdir; the mesh, the tokenizer and the data iterator (each host reads its own
    rows); the update step (`step_builder.build_update_step`, the planner's construction too)
    with parameters born sharded: abstract shapes first, weights then either restored from the
    latest checkpoint or read from the Hugging Face folder and placed by the sharding rules;
    the config's evaluators (evaluators.py); the step compiled ahead of time for the data's batch;
 2. `train_loop` dispatches updates; everything else it does is a hook with its period
    (`loop_hooks`: reading the log steps' measurements, the progress bar, evaluation, checkpoints,
    preemption), run in the order registered after each update;
 3. `end_of_run`: the best parameters, the evaluators' end of the run (the STS test table),
    export to a Hugging Face folder, `results.json`.

The loop never waits for the devices between steps: it dispatches update s+1 while update s
runs. Batches are assembled and placed on the devices by a prefetch thread (`data.Prefetch`).
Measurements stay on the devices and come to the host together only at log steps (one step
after they were dispatched, so the next update is already queued), evaluation steps and save
steps, which need the state anyway. The logged figures are each log step's own values, as
before. Non-finite detection is exact: every fetch checks every step since the last one, and a
fetch precedes every save, so `on_nonfinite=stop` names the first bad step and never saves a
state from it or after it. A logged rate measures training only: time spent evaluating and
saving inside a log interval is taken out of it (`LoopClock`).

Determinism: the data order is a function of (seed, epoch) and the dropout key of update `s` is
`fold_in(key(seed), s)` (derived inside the step from its counter), so a resumed run repeats exactly what an uninterrupted one would do.

Checkpoints (`<workdir>/checkpoints/`, see checkpoint.py): `latest/` keeps the newest
`keep_checkpoints` complete training states for resuming; `best/` keeps the parameters with the
highest `best_metric` (STS-B dev Spearman by default). orbax makes a step visible only when it
is complete, so a crash mid-save leaves no checkpoint that a restart would load.

Faults (each ends the run with a message naming what and where; rerunning the same command
resumes from the last complete checkpoint):
- a lost host: the other processes stop within `host_heartbeat_timeout_s` (distributed.py);
- a damaged newest step (missing or truncated file): reported by step and file, moved to
  `checkpoints/damaged/`, and the resume falls back to the newest step that reads back completely
  (`--set resume_step=N` picks one); nothing readable is an error, never a fresh start;
- a save that fails (a full disk): CheckpointWriteError naming the folder and the OS error;
- a config that changes the run: `config.json` is the run's identity, see `config.check_resume`;
- SIGTERM or a first Ctrl-C: save at the next step boundary and stop; a second Ctrl-C: at once.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from simcse_jax import checkpoint as ckpt_lib
from simcse_jax import distributed, paths
from simcse_jax.config import TrainConfig, check_resume, load_config, resolve_sts_dir, validate
from simcse_jax.corpus import BUILTIN_PREFIX, write_builtin_corpus
from simcse_jax.data import DataIterator, Prefetch, make_data_iterator
from simcse_jax.encoder import Encoder, encoder_graphdef
from simcse_jax.errors import INTERRUPTED_EXIT_CODE, ConfigError, TrainingError
from simcse_jax.evaluators import EvalContext, TrainingEvaluator
from simcse_jax.hf_io import load_pretrained, load_tokenizer, read_config, resolve_model_dir
from simcse_jax.metrics_log import MetricsLog, Progress
from simcse_jax.poolers import eval_pooler
from simcse_jax.sharding import data_parallel_size
from simcse_jax.step_builder import UpdateStep, build_update_step, compile_train_step, config_mesh
from simcse_jax.train_step import TrainState, dropout_overrides, init_train_state

# ----------------------------------------------------------------------------- set-up helpers


def resolve_train_file(config: TrainConfig, workdir: Path) -> tuple[str, Path | None]:
    """(train_file for the data pipeline, held-out text file or None)."""
    if config.train_file.startswith(BUILTIN_PREFIX):
        # Written where this host can read it: a gs:// workdir is no place for a per-host scratch file.
        root = paths.default_cache_root().parent / "corpus" if paths.is_remote(workdir) else workdir / "corpus"
        train, heldout = write_builtin_corpus(config.train_file[len(BUILTIN_PREFIX):], root)
        return str(train), heldout
    return config.train_file, None


def fresh_mlp(model: Encoder, seed: int) -> None:
    """Re-initialises `pooler.dense` as the reference's new MLPLayer: N(0, initializer_range), bias 0.

    SimCSE's MLP is a new module (`cls.mlp`), not BERT's pretrained pooler, which it never loads.
    """
    std = model.config.initializer_range
    kernel = model.pooler.dense.kernel
    kernel.set_value(std * jax.random.normal(jax.random.key(seed + 7919), kernel.shape, jnp.float32))
    model.pooler.dense.bias.set_value(jnp.zeros(model.pooler.dense.bias.shape, jnp.float32))


class PendingMeasurements:
    """Per-step measurements still on the devices, fetched together when the loop must look.

    `fetch()` is the loop's only device-to-host read of measurements: one transfer for every
    step since the last fetch, each checked for a non-finite loss or gradient norm.
    """

    def __init__(self):
        self._pending: list[tuple[int, dict, float]] = []

    def add(self, step: int, meas: dict, epoch: float) -> None:
        """`epoch`: the data's progress after `step` (epochs, fractional), for its log line."""
        self._pending.append((step, meas, epoch))

    def fetch(self, upto: int | None = None) -> list[tuple[int, dict[str, float], float]]:
        """[(step, {name: float}, epoch)] for the pending steps <= `upto` (all by default), in order."""
        ready = [p for p in self._pending if upto is None or p[0] <= upto]
        self._pending = self._pending[len(ready):]
        if not ready:
            return []
        values = jax.device_get([m for _, m, _ in ready])
        return [(s, {k: float(v) for k, v in m.items()}, e) for (s, _, e), m in zip(ready, values)]


def _is_finite(meas: dict[str, float]) -> bool:
    return math.isfinite(meas["loss"]) and math.isfinite(meas["grad_norm"])


class LoopClock:
    """The loop's time. A logged rate measures training only: time spent evaluating and issuing
    checkpoint saves inside a log interval is taken out of its rate (logged as the interval's
    `excluded_seconds`; each evaluation's own `eval_seconds` is in its record; the run's totals
    in results.json)."""

    def __init__(self, step: int):
        self.start = self.time = time.perf_counter()
        self.step, self.paused = step, 0.0
        self.spent = {"eval_seconds": 0.0, "checkpoint_seconds": 0.0}
        self.rates: list[float] = []  # sentences/s of each logged interval

    def exclude(self, kind: str, since: float) -> float:
        """Takes the seconds from `since` to now, spent on `kind` (eval_seconds,
        checkpoint_seconds), out of the current log interval; returns them."""
        seconds = time.perf_counter() - since
        self.paused += seconds
        self.spent[kind] += seconds
        return seconds

    def interval(self, step: int, sentences_per_step: int) -> dict[str, float]:
        """The rates of the log interval that ends at `step` (and starts the next one)."""
        now = time.perf_counter()
        rate = (step - self.step) / max(now - self.time - self.paused, 1e-9)
        out = {"steps_per_s": rate, "sentences_per_s": rate * sentences_per_step}
        if self.paused:
            out["excluded_seconds"] = self.paused
        self.time, self.step, self.paused = now, step, 0.0
        self.rates.append(rate * sentences_per_step)
        return out


@dataclasses.dataclass
class Checkpoints:
    root: Path  # <workdir>/checkpoints
    latest: Any  # orbax CheckpointManager of `latest/`: training states to resume from
    best: Any  # of `best/`: the parameters with the best `best_metric`
    meta: dict  # written with every step (checkpoint.make_meta)

    def close(self) -> None:
        self.latest.close()
        self.best.close()


@dataclasses.dataclass
class Run:
    """One training run: what set-up builds, the loop advances and the end of the run reads."""

    config: TrainConfig
    workdir: Path
    is_lead: bool
    tokenizer: Any
    hf_config: dict
    data: DataIterator
    total_steps: int
    built: UpdateStep  # mesh, encoder config, optimizer, abstract state and shardings, the jitted step
    update: Callable  # the compiled step: (state, batch, base_key) -> (state, measurements)
    compile_info: dict
    evaluator: TrainingEvaluator
    checkpoints: Checkpoints
    log: MetricsLog
    bar: Progress | None
    # where the run is: set up by restore-or-import, advanced by the loop and its hooks
    state: TrainState
    step: int
    best_score: float
    best_step: int | None
    position: dict  # the data iterator's position after `step`: what a checkpoint records
    base_key: jax.Array
    pending: PendingMeasurements
    clock: LoopClock
    saved_step: int | None = None  # the newest step a training state was saved at
    stopping: bool = False  # a preemption asked the loop to end after this step
    preemption: distributed.Preemption | None = None  # the loop's signal handling, while it runs

    @property
    def mesh(self) -> Mesh:
        return self.built.mesh


# ----------------------------------------------------------------------------- the run


def train(config: TrainConfig, workdir: str | os.PathLike, *, progress: bool = True, callback=None) -> dict:
    """Trains (or resumes) in `workdir`; returns the results dict also written to results.json.

    `callback(event, step)`, if given, is called after every update is dispatched (`"step"`)
    and after a checkpoint save is issued (`"checkpoint"`): two loop hooks, for custom logging
    and for tests that interrupt a run at a chosen point.
    """
    run = set_up(config, workdir, progress=progress)
    train_loop(run, loop_hooks(run, callback))
    if run.stopping and run.step < run.total_steps:
        run.log.close()
        run.checkpoints.close()
        return {"status": "preempted", "step": run.step}
    return end_of_run(run)


# ----------------------------------------------------------------------------- 1. set-up


def set_up(config: TrainConfig, workdir: str | os.PathLike, *, progress: bool = True) -> Run:
    """Validates, reads the data, builds the step, restores or imports the weights, compiles."""
    remote = paths.is_remote(workdir)  # gs://: no shared disk; every host reads and writes the bucket
    workdir = workdir_path(workdir)
    is_lead = jax.process_index() == 0

    # Validate before compiling anything (the config, the model folder and its tokenizer, the
    # workdir) and before writing anything; refuse a resume that changes the run; record the config.
    validate(config, num_devices=jax.device_count())
    sts_dir = resolve_sts_dir(config)
    model_dir = resolve_model_dir(config.model)
    hf_config = read_config(model_dir)
    tokenizer = load_tokenizer(model_dir)
    _check_workdir(workdir, remote)
    ckpt_root = workdir / "checkpoints"
    run_changes, free_changes = _check_and_record_config(
        config, workdir, is_lead, resuming=bool(ckpt_lib.complete_steps(ckpt_root / "latest")))

    mesh = config_mesh(config)
    train_file, heldout = resolve_train_file(config, workdir)
    data = make_data_iterator(
        train_file, tokenizer, config.global_batch_size, max_seq_length=config.max_seq_length, seed=config.seed,
        mesh=mesh, mlm_probability=config.mlm_probability if config.do_mlm else None,
        cache_dir=config.data_cache_dir or (None if remote else workdir / "data_cache"),  # None: this host's cache
        progress=progress and is_lead, shuffle=config.shuffle,
    )
    total_steps = config.max_steps if config.max_steps > 0 else int(math.ceil(config.num_epochs * data.batches_per_epoch))
    built = build_update_step(config, hf_config, mesh, total_steps=total_steps)
    # Evaluation and the test table compute in `eval_dtype` (float32 by default) on the same
    # parameters: the numbers the exported float32 folder gives in transformers and SentEval.
    eval_graphdef = encoder_graphdef(dataclasses.replace(built.encoder_config, compute_dtype=config.eval_dtype))
    evaluator = TrainingEvaluator.from_config(config, EvalContext(
        config, eval_graphdef, tokenizer, mesh, eval_pooler(config.pooler, config.mlp_only_train, config.eval_pooler),
        sts_dir, heldout))

    checkpoints = Checkpoints(
        ckpt_root, ckpt_lib.manager(ckpt_root / "latest", max_to_keep=config.keep_checkpoints, async_save=config.async_checkpointing),
        ckpt_lib.manager(ckpt_root / "best", max_to_keep=1),
        ckpt_lib.make_meta(built.abstract.model, hf_config=hf_config, pooler=config.pooler,
                           mlp_only_train=config.mlp_only_train, train_config=dataclasses.asdict(config)))
    state, start, best, resumed = _restore_or_import(config, built, checkpoints, data, model_dir, is_lead)
    if is_lead:
        for folder in ("latest", "best"):
            ckpt_lib.save_tokenizer(ckpt_root / folder, tokenizer)

    log = MetricsLog(workdir, enabled=is_lead, truncate_after=start)
    if run_changes:  # only with allow_config_change: the run's identity changed here, on the record
        log.write(start, {"allow_config_change": 1.0})
        log.message(f"note: resuming at step {start} with changed run keys (allow_config_change): {_listed(run_changes)}")
    if free_changes:
        log.message(f"note: resuming with changed settings: {_listed(free_changes)}")
    if {"evaluators", "best_metric"} & free_changes.keys() and best[1] is not None:
        best = (-math.inf, None)  # another metric: the recorded best score is no yardstick
        log.message("note: the best checkpoint is selected afresh from here (evaluators or best_metric changed)")
    update, compile_info = compile_train_step(built.step, built.abstract.state, data.abstract_batch(), built.compiler_options,
                                              on_fallback=lambda why: log.message(f"note: {why}"))
    log.message(f"compiled the update step in {compile_info['compile_seconds']:.1f} s; peak memory per "
                f"device {compile_info.get('step_peak_memory_mib', 'n/a')} MiB")
    per_device = config.global_batch_size // data_parallel_size(mesh)
    log.message(
        f"mesh {dict(mesh.shape)} | {jax.device_count()} devices, {jax.local_device_count()} on each of "
        f"{jax.process_count()} host(s) ({jax.devices()[0].platform}) | global batch {config.global_batch_size} "
        f"sentences x {data.data.num_sent} views, {per_device} per data-parallel shard | {total_steps} steps "
        f"({data.batches_per_epoch} per epoch) | compute {config.compute_dtype}, evaluation {config.eval_dtype} | {resumed}"
    )
    return Run(config=config, workdir=workdir, is_lead=is_lead, tokenizer=tokenizer, hf_config=hf_config, data=data,
               total_steps=total_steps, built=built, update=update, compile_info=compile_info, evaluator=evaluator,
               checkpoints=checkpoints, log=log,
               bar=log.progress(total_steps, start, config.global_batch_size) if progress else None,
               state=state, step=start, best_score=best[0], best_step=best[1], position=data.state(),
               base_key=jax.random.key(config.seed), pending=PendingMeasurements(), clock=LoopClock(start))


def _restore_or_import(config: TrainConfig, built: UpdateStep, checkpoints: Checkpoints, data: DataIterator, model_dir: Path,
                       is_lead: bool) -> tuple[TrainState, int, tuple[float, int | None], str]:
    """(state, start step, (best score, best step), how the run began): the newest complete
    checkpoint's state and data position, or the Hugging Face folder's weights placed by the rules."""
    latest, best, root = checkpoints.latest, checkpoints.best, checkpoints.root
    start, restored, damaged = ckpt_lib.restore_newest(
        latest, lambda s: ckpt_lib.restore_train_state(latest, s, built.abstract.state, built.shardings),
        step=config.resume_step, agree=distributed.all_hosts, is_lead=is_lead, barrier=distributed.barrier)
    for d in damaged:
        if is_lead:
            print(f"checkpoint step {d.step} in {root / 'latest'} is damaged: {d.reason}; moved it to {d.moved_to}",
                  file=sys.stderr, flush=True)
    if start is None:
        loaded = load_pretrained(model_dir, compute_dtype=config.compute_dtype, with_mlm_head=config.do_mlm,
                                 **dropout_overrides(config))
        if config.pooler == "cls" and config.mlp_init == "fresh":
            fresh_mlp(loaded.model, config.seed)
        _, state, _ = init_train_state(loaded.model, built.optimizer, built.mesh)
        return state, 0, (-math.inf, None), f"started from {model_dir}"
    state, _, saved = restored
    data.restore(saved["iterator"])
    for stale in [s for s in best.all_steps() if s > start]:  # from a lost future of the run
        best.delete(stale)
    later = [s for s in latest.all_steps() if s > start]
    if later:  # only with resume_step: a future of the run that this one replaces
        if is_lead:
            print(f"resume_step={start}: deleting the later step(s) {', '.join(map(str, later))} of {root / 'latest'}",
                  file=sys.stderr, flush=True)
        for s in later:
            latest.delete(s)
    fallback = f"; newer step(s) {', '.join(str(d.step) for d in damaged)} damaged" if damaged else ""
    resumed = f"resumed from step {start} ({root / 'latest' / str(start)}{fallback})"
    return state, start, (saved.get("best_score", -math.inf), saved.get("best_step")), resumed


# ----------------------------------------------------------------------------- 2. the loop and its hooks


@dataclasses.dataclass(frozen=True)
class Hook:
    """`fn(run, step)` after every `every`-th update (and after the last with `at_last`).
    `lag`: one update later than that, for the same step (`fn` gets the step it is for)."""

    fn: Callable[[Run, int], None]
    every: int
    at_last: bool = False
    lag: int = 0

    def step_due(self, step: int, last: int) -> int | None:
        if self.at_last and step == last:
            return step
        due = step - self.lag
        return due if due > 0 and due % self.every == 0 else None


class Hooks:
    """The loop's periodic work, run in the order added after each update (levanter's `add_hook`)."""

    def __init__(self):
        self.hooks: list[Hook] = []

    def add_hook(self, fn: Callable[[Run, int], None], *, every: int, at_last: bool = False, lag: int = 0) -> None:
        self.hooks.append(Hook(fn, every, at_last, lag))

    def run(self, run: Run) -> None:
        for hook in self.hooks:
            step = hook.step_due(run.step, run.total_steps)
            if step is not None:
                hook.fn(run, step)


def loop_hooks(run: Run, callback=None) -> Hooks:
    """The loop's hooks, in the order they run after an update."""
    config, hooks = run.config, Hooks()
    # A log step's measurements are read one update later: that update is already queued behind them.
    hooks.add_hook(lambda run, step: read_measurements(run, upto=step), every=config.log_every, lag=1)
    if run.bar is not None:
        hooks.add_hook(lambda run, step: run.bar.advance(), every=1)
    if callback is not None:
        hooks.add_hook(lambda run, step: callback("step", step), every=1)
    hooks.add_hook(evaluate, every=config.eval_steps, at_last=True)
    hooks.add_hook(save_checkpoint, every=config.save_steps or config.eval_steps, at_last=True)
    hooks.add_hook(check_preemption, every=1)  # multi-host: a vote every preemption_check_steps and at saves
    if callback is not None:
        def after_save(run: Run, step: int) -> None:
            if run.saved_step == step:  # a periodic save or a preemption's
                callback("checkpoint", step)

        hooks.add_hook(after_save, every=1)
    return hooks


def train_loop(run: Run, hooks: Hooks) -> None:
    """Dispatches updates until the last step or a preemption, running `hooks` after each."""
    batches = Prefetch(run.data, run.config.prefetch_batches)
    run.preemption = distributed.Preemption(run.config.preemption_check_steps)
    latest = run.checkpoints.latest
    ended = "failed"
    try:
        while run.step < run.total_steps and not run.stopping:
            batch, run.position = next(batches)
            run.state, meas = run.update(run.state, batch, run.base_key)  # dropout key: fold_in(base_key, state.step), in the step
            run.step += 1
            run.pending.add(run.step, meas, run.position["epoch"] + run.position["batch"] / run.data.batches_per_epoch)
            hooks.run(run)
        if run.stopping and run.step < run.total_steps:
            ckpt_lib.finish_saves(latest)
            run.log.message(f"preempted: saved step {run.step} in {run.checkpoints.root / 'latest'}; "
                            "rerun the same command to resume")
        ended = "ok"
    except KeyboardInterrupt:
        ended = "aborted"
        raise
    finally:
        batches.close()
        run.preemption.restore()
        if run.bar is not None:
            run.bar.close()
        if ended == "ok":
            ckpt_lib.finish_saves(latest)
        elif ended == "failed":  # let an in-flight save of a good step complete; its own error is secondary
            with contextlib.suppress(Exception):
                latest.wait_until_finished()
        # "aborted" (a second Ctrl-C): no waiting; an unfinished save leaves no visible step


def read_measurements(run: Run, upto: int | None = None) -> None:
    """Fetches pending measurements (up to step `upto`, default all): stops on a non-finite step,
    logs the log steps. Every evaluation and save reads all first: every step so far is finite."""
    config = run.config
    for s, meas, epoch in run.pending.fetch(upto):
        if not _is_finite(meas):
            if config.on_nonfinite == "stop":
                good = run.checkpoints.latest.latest_step()
                where = f"step {good} in {run.checkpoints.root / 'latest'}" if good is not None else "none"
                raise TrainingError(
                    f"step {s}: non-finite loss {meas['loss']} / grad norm {meas['grad_norm']}; stopped without saving. "
                    f"The last good checkpoint is {where}; "
                    f"lower learning_rate (with --set allow_config_change=true) or set on_nonfinite=skip"
                )
            run.log.message(f"step {s}: non-finite loss; update skipped (on_nonfinite=skip)")
        if s % config.log_every == 0 or s == run.total_steps:
            run.log.write(s, {**meas, **run.clock.interval(s, config.global_batch_size), "epoch": epoch})
            if run.bar is not None:
                run.bar.show(meas)


def evaluate(run: Run, step: int) -> None:
    """The evaluators on the current parameters; a new best `best_metric` saves them to `best/`."""
    read_measurements(run)
    t0 = time.perf_counter()
    scores = run.evaluator.dev(run.state.params)
    seconds = run.clock.exclude("eval_seconds", t0)
    if not scores:
        return
    run.log.write(step, {**scores, "eval_seconds": seconds})
    metric = run.evaluator.best_metric
    score = scores.get(f"eval/{metric}") if metric else None
    if score is not None and score > run.best_score:
        run.best_score, run.best_step = score, step
        t0 = time.perf_counter()
        ckpt_lib.save_params(run.checkpoints.best, step, run.state.params, {**run.checkpoints.meta, "best_score": score})
        ckpt_lib.finish_saves(run.checkpoints.best)
        run.clock.exclude("checkpoint_seconds", t0)
    run.log.message(run.evaluator.line(step, scores, run.best_score, run.best_step))


def save_checkpoint(run: Run, step: int) -> None:
    """Issues the save of the training state and the data position to `latest/` (asynchronous by default)."""
    read_measurements(run)
    t0 = time.perf_counter()
    ckpt_lib.save_train_state(run.checkpoints.latest, step, run.state, run.checkpoints.meta, {
        "iterator": run.position, "best_score": run.best_score, "best_step": run.best_step,
        "rng": {"seed": run.config.seed, "dropout_key": "fold_in(key(seed), step)"}})
    run.log.flush()  # gs://: metrics.jsonl and TensorBoard events reach the bucket with each checkpoint
    run.clock.exclude("checkpoint_seconds", t0)
    run.saved_step = step


def check_preemption(run: Run, step: int) -> None:
    """SIGTERM or a first Ctrl-C (on any host): save this step, unless it just was, and stop."""
    if run.preemption.should_stop(step, saving=run.saved_step == step):
        if run.saved_step != step:
            save_checkpoint(run, step)
        run.stopping = True


# ----------------------------------------------------------------------------- 3. the end of the run


def end_of_run(run: Run) -> dict:
    """Best parameters -> the evaluators' end of the run (STS test) -> export -> results.json."""
    config, clock = run.config, run.clock
    loop_seconds = time.perf_counter() - clock.start
    metric, found = run.evaluator.best_metric, run.best_step is not None
    results = {"status": "completed", "steps": run.step, "best_step": run.best_step,
               "best_dev_stsb": run.best_score if found and metric == "STSBenchmark" else None,
               "best_metric": metric, "best_score": run.best_score if found else None,
               "eval_pooler": eval_pooler(config.pooler, config.mlp_only_train, config.eval_pooler),
               "compute_dtype": config.compute_dtype, "eval_dtype": config.eval_dtype,
               "workdir": str(run.workdir), "global_batch_size": config.global_batch_size,
               "devices": jax.device_count(), "processes": jax.process_count(), "mesh": dict(run.mesh.shape),
               # train_seconds: the loop without its evaluations and checkpoint saves (loop_seconds has them)
               "train_seconds": round(loop_seconds - clock.spent["eval_seconds"] - clock.spent["checkpoint_seconds"], 2),
               "loop_seconds": round(loop_seconds, 2), **{k: round(v, 2) for k, v in clock.spent.items()}, **run.compile_info}
    if len(clock.rates) > 1:  # the first logged interval includes the first dispatch's warm-up
        results["sentences_per_s"] = float(np.median(clock.rates[1:]))
    params = run.state.params
    if found:
        params = ckpt_lib.restore_params(run.checkpoints.best, run.best_step, run.built.abstract.state.params,
                                         run.built.shardings.params)
    card_scores = None
    for final in run.evaluator.final(params, run.best_step or run.step):
        results.update(final.results)
        run.log.message(final.message)
        card_scores = card_scores or final.card_scores
    if config.do_export:
        results.update(export(run, params, card_scores))
    if run.is_lead:
        paths.write_text_atomic(run.workdir / "results.json", json.dumps(results, indent=2, default=float) + "\n")
        run.log.message(f"wrote {run.workdir / 'results.json'}")
    run.log.close()
    run.checkpoints.close()
    return results


def export(run: Run, params, card_scores: dict | None) -> dict:
    """Writes `params` as a Hugging Face folder in `<workdir>/export`; its results.json entries."""
    t0 = time.perf_counter()
    export_dir = run.workdir / "export"
    pooler = eval_pooler(run.config.pooler, run.config.mlp_only_train, run.config.eval_pooler)
    # Gather to every host (replicated) so process 0 can write the whole model.
    replicated = jax.jit(lambda p: p, out_shardings=NamedSharding(run.mesh, P()))(params)
    if run.is_lead:
        from simcse_jax.hf_export import export_model

        step = run.best_step or run.step
        export_model(nnx.merge(run.built.graphdef, replicated), run.tokenizer, export_dir, pooler=pooler,
                     hf_config=run.hf_config, meta={**run.checkpoints.meta, "step": step}, scores=card_scores, overwrite=True)
        which = f"best (step {run.best_step})" if run.best_step else "final"
        run.log.message(f"exported the {which} model to {export_dir} (transformers / sentence-transformers / simcse; pooler {pooler})")
    return {"export_dir": str(export_dir), "export_seconds": round(time.perf_counter() - t0, 2)}


def workdir_path(workdir: str | os.PathLike):
    """The workdir as the trainer addresses it: a gs:// URL stays one (an epath), a local path is absolute."""
    return paths.as_path(workdir) if paths.is_remote(workdir) else Path(workdir).expanduser().absolute()


def _check_workdir(workdir, remote: bool) -> None:
    """The workdir exists and takes files, or ConfigError (one line: the folder and the OS error),
    before anything is compiled."""
    if remote:
        try:  # up front: orbax would only fail at the first save, after compiling
            paths.check_bucket(workdir)
        except paths.PathError as e:
            raise ConfigError(f"workdir: {e}") from None
        return
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=workdir):  # a read-only disk refuses this, not the mkdir of an existing folder
            pass
    except OSError as e:
        raise ConfigError(f"workdir {workdir}: cannot write there ({e.strerror or type(e).__name__})") from None


def _check_and_record_config(config: TrainConfig, workdir: Path, is_lead: bool, *, resuming: bool) -> tuple[dict, dict]:
    """Every host checks a resume against `config.json` (ConfigError on a change of the run's
    identity, see config.check_resume); the lead then records the config. The recorded one a
    permitted change replaces is kept as `config.<time>.json`. Returns (run, free) changes."""
    path = workdir / "config.json"
    changes: tuple[dict, dict] = ({}, {})
    if resuming and path.is_file():
        try:
            recorded = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: unreadable ({e}); it records this run's config: restore it, or train in a new --workdir") from e
        changes = check_resume(recorded, config, path)
        if changes[0] and is_lead:
            paths.write_text_atomic(workdir / f"config.{time.strftime('%Y%m%d-%H%M%S')}.json", path.read_text())
    if is_lead:
        paths.write_text_atomic(path, json.dumps(dataclasses.asdict(config), indent=2) + "\n")
    return changes


def _listed(changes: dict) -> str:
    return ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items())


# ----------------------------------------------------------------------------- CLI


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="train SimCSE (resumes when the workdir has a checkpoint)")
    p.add_argument("--config", required=True, help="configs/NAME.py[:variant]")
    p.add_argument("--workdir", required=True, help="where checkpoints, metrics, the export and results.json go")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (repeatable), e.g. --set learning_rate=1e-5")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)  # jax-free: its timeouts configure the join
    watchdog = distributed.initialize(heartbeat_timeout_s=config.host_heartbeat_timeout_s,
                                      shutdown_timeout_s=config.host_shutdown_timeout_s)
    latest_dir = workdir_path(args.workdir) / "checkpoints" / "latest"  # a gs:// URL stays one
    if watchdog is not None:
        watchdog.note = lambda: last_checkpoint_note(latest_dir)
    done = False
    try:
        results = train(config, args.workdir, progress=not args.no_progress)
        done = True
    except KeyboardInterrupt:
        # A second Ctrl-C in the loop (distributed.Preemption), or the first before the loop began.
        print(f"error: train: interrupted: stopped at once without saving. {last_checkpoint_note(latest_dir)}",
              file=sys.stderr, flush=True)
        return INTERRUPTED_EXIT_CODE
    finally:
        if watchdog is not None:
            watchdog.finish(done=done)
    return 0 if results["status"] in ("completed", "preempted") else 1


def last_checkpoint_note(latest_dir: Path) -> str:
    """The sentence a stopped run ends with: where it can resume from."""
    steps = ckpt_lib.complete_steps(latest_dir)
    if not steps:
        return f"No complete checkpoint in {latest_dir} yet; rerunning the same command starts the run afresh."
    return f"The last complete checkpoint is step {max(steps)} in {latest_dir}; rerun the same command to resume from it."
