"""The SimCSE trainer: `simcse-jax train --config configs/NAME.py[:variant] --workdir DIR`.

`train` reads top to bottom in the order a run happens:

 1. the config is validated before anything is compiled and recorded in the workdir;
 2. the mesh, the tokenizer and the data iterator (each host reads its own rows);
 3. the model and optimizer: parameters born sharded (abstract shapes first; weights either
    restored from the latest checkpoint or read from the Hugging Face folder and placed by the
    sharding rules); the update step compiled ahead of time from the abstract batch;
 4. the loop (below);
 5. the end: restore the best parameters, STS test evaluation, export to a Hugging Face folder,
    `results.json`.

The loop never waits for the devices between steps: it dispatches update s+1 while update s
runs. Batches are assembled and placed on the devices by a prefetch thread (`data.Prefetch`).
Measurements stay on the devices and come to the host together only at log steps (one step
after they were dispatched, so the next update is already queued), evaluation steps and save
steps, which need the state anyway. The logged figures are each log step's own values, as
before. Non-finite detection is exact: every fetch checks every step since the last one, and a
fetch precedes every save, so `on_nonfinite=stop` names the first bad step and never saves a
state from it or after it.

Determinism: the data order is a function of (seed, epoch) and the dropout key of update `s` is
`fold_in(key(seed), s)` (derived inside the step from its counter), so a resumed run repeats exactly what an uninterrupted one would do.

Checkpoints (`<workdir>/checkpoints/`, see checkpoint.py): `latest/` keeps the newest
`keep_checkpoints` complete training states for resuming; `best/` keeps the parameters with the
highest STS-B dev Spearman. orbax makes a step visible only when it is complete, so a crash
mid-save leaves no checkpoint that a restart would load.

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
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from simcse_jax import checkpoint as ckpt_lib
from simcse_jax import distributed, paths, sts
from simcse_jax.config import TrainConfig, check_resume, load_config, resolve_sts_dir, validate
from simcse_jax.corpus import BUILTIN_PREFIX, write_builtin_corpus
from simcse_jax.data import Prefetch, make_data_iterator
from simcse_jax.encoder import Encoder, EncoderConfig, encoder_graphdef
from simcse_jax.errors import ConfigError, TrainingError
from simcse_jax.evaluate import BEST_METRIC, TrainingEvaluator, eval_line
from simcse_jax.hf_io import load_pretrained, load_tokenizer, read_config, resolve_model_dir
from simcse_jax.metrics_log import MetricsLog
from simcse_jax.optim import make_optimizer
from simcse_jax.poolers import eval_pooler
from simcse_jax.sharding import data_parallel_size, make_mesh
from simcse_jax.train_step import (
    abstract_train_state,
    compile_train_step,
    dropout_overrides,
    init_train_state,
    make_train_step,
    objective_config,
    optim_config,
)
from simcse_jax.xla_options import compiler_options

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
        self._pending: list[tuple[int, dict]] = []

    def add(self, step: int, meas: dict) -> None:
        self._pending.append((step, meas))

    def fetch(self, upto: int | None = None) -> list[tuple[int, dict[str, float]]]:
        """[(step, {name: float})] for the pending steps <= `upto` (all by default), in order."""
        ready = [(s, m) for s, m in self._pending if upto is None or s <= upto]
        self._pending = self._pending[len(ready):]
        if not ready:
            return []
        values = jax.device_get([m for _, m in ready])
        return [(s, {k: float(v) for k, v in m.items()}) for (s, _), m in zip(ready, values)]


def _is_finite(meas: dict[str, float]) -> bool:
    return math.isfinite(meas["loss"]) and math.isfinite(meas["grad_norm"])


# ----------------------------------------------------------------------------- the run


def train(config: TrainConfig, workdir: str | os.PathLike, *, progress: bool = True, callback=None) -> dict:
    """Trains (or resumes) in `workdir`; returns the results dict also written to results.json.

    `callback(event, step)`, if given, is called after every update is dispatched (`"step"`)
    and after a checkpoint save is issued (`"checkpoint"`): a hook for custom logging and for
    tests that interrupt a run at a chosen point.
    """
    remote = paths.is_remote(workdir)  # gs://: no shared disk; every host reads and writes the bucket
    workdir = workdir_path(workdir)
    is_lead = jax.process_index() == 0

    # --- 1. validate before compiling anything (the config, the model folder and its tokenizer,
    # the workdir) and before writing anything; refuse a resume that changes the run; record the config
    validate(config, num_devices=jax.device_count())
    sts_dir = resolve_sts_dir(config)
    model_dir = resolve_model_dir(config.model)
    hf_config = read_config(model_dir)
    tokenizer = load_tokenizer(model_dir)
    _check_workdir(workdir, remote)
    ckpt_root = workdir / "checkpoints"
    config_changes = _check_and_record_config(config, workdir, is_lead, resuming=bool(ckpt_lib.complete_steps(ckpt_root / "latest")))

    # --- 2. mesh, data
    mesh = make_mesh({"data": config.mesh_data, "fsdp": config.mesh_fsdp, "tensor": config.mesh_tensor})
    train_file, heldout = resolve_train_file(config, workdir)
    data = make_data_iterator(
        train_file, tokenizer, config.global_batch_size, max_seq_length=config.max_seq_length, seed=config.seed,
        mesh=mesh, mlm_probability=config.mlm_probability if config.do_mlm else None,
        cache_dir=config.data_cache_dir or (None if remote else workdir / "data_cache"),  # None: this host's cache
        progress=progress and is_lead, shuffle=config.shuffle,
    )
    total_steps = config.max_steps if config.max_steps > 0 else int(math.ceil(config.num_epochs * data.batches_per_epoch))

    # --- 3. model, optimizer, state: abstract first, then restore or import; compile the update
    overrides = dropout_overrides(config)
    enc_cfg = EncoderConfig.from_hf_dict(hf_config, compute_dtype=config.compute_dtype, with_mlm_head=config.do_mlm, **overrides)
    optimizer = make_optimizer(optim_config(config, total_steps))
    abstract_model, graphdef, abstract_state, shardings = abstract_train_state(enc_cfg, optimizer, mesh)
    abstract_params = abstract_state.params

    latest = ckpt_lib.manager(ckpt_root / "latest", max_to_keep=config.keep_checkpoints, async_save=config.async_checkpointing)
    best = ckpt_lib.manager(ckpt_root / "best", max_to_keep=1)
    meta = ckpt_lib.make_meta(abstract_model, hf_config=hf_config, pooler=config.pooler,
                              mlp_only_train=config.mlp_only_train, train_config=dataclasses.asdict(config))
    best_score, best_step = -math.inf, None
    start, restored, damaged = ckpt_lib.restore_newest(
        latest, lambda s: ckpt_lib.restore_train_state(latest, s, abstract_state, shardings), step=config.resume_step,
        agree=distributed.all_hosts, is_lead=is_lead, barrier=distributed.barrier)
    for d in damaged:
        if is_lead:
            print(f"checkpoint step {d.step} in {ckpt_root / 'latest'} is damaged: {d.reason}; moved it to {d.moved_to}",
                  file=sys.stderr, flush=True)
    if start is not None:
        state, _, saved = restored
        data.restore(saved["iterator"])
        best_score, best_step = saved.get("best_score", -math.inf), saved.get("best_step")
        for stale in [s for s in best.all_steps() if s > start]:  # from a lost future of the run
            best.delete(stale)
        later = [s for s in latest.all_steps() if s > start]
        if later:  # only with resume_step: a future of the run that this one replaces
            if is_lead:
                print(f"resume_step={start}: deleting the later step(s) {', '.join(map(str, later))} of {ckpt_root / 'latest'}",
                      file=sys.stderr, flush=True)
            for s in later:
                latest.delete(s)
        fallback = f"; newer step(s) {', '.join(str(d.step) for d in damaged)} damaged" if damaged else ""
        resumed = f"resumed from step {start} ({ckpt_root / 'latest' / str(start)}{fallback})"
    else:
        loaded = load_pretrained(model_dir, compute_dtype=config.compute_dtype, with_mlm_head=config.do_mlm, **overrides)
        if config.pooler == "cls" and config.mlp_init == "fresh":
            fresh_mlp(loaded.model, config.seed)
        graphdef, state, shardings = init_train_state(loaded.model, optimizer, mesh)
        del loaded
        start, resumed = 0, f"started from {model_dir}"
    if is_lead:
        for folder in ("latest", "best"):
            ckpt_lib.save_tokenizer(ckpt_root / folder, tokenizer)

    log = MetricsLog(workdir, enabled=is_lead, truncate_after=start)
    run_changes, free_changes = config_changes
    if run_changes:  # only with allow_config_change: the run's identity changed here, on the record
        log.write(start, {"allow_config_change": 1.0})
        log.message(f"note: resuming at step {start} with changed run keys (allow_config_change): {_listed(run_changes)}")
    if free_changes:
        log.message(f"note: resuming with changed settings: {_listed(free_changes)}")
    # One executable serves the whole run: a batch of another shape is an error, not a silent
    # recompilation.
    update_fn = make_train_step(graphdef, optimizer, mesh, shardings, objective_config(config),
                                optim_config(config, total_steps), skip_nonfinite=config.on_nonfinite == "skip", fold_in_step=True)
    update, compile_info = compile_train_step(update_fn, abstract_state, data.abstract_batch(),
                                              compiler_options(config.cpu_onednn, jax.devices()[0].platform),
                                              on_fallback=lambda why: log.message(f"note: {why}"))
    log.message(f"compiled the update step in {compile_info['compile_seconds']:.1f} s; peak memory per "
                f"device {compile_info.get('step_peak_memory_mib', 'n/a')} MiB")
    # Evaluation and the test table compute in `eval_dtype` (float32 by default) on the same
    # parameters: the numbers the exported float32 folder gives in transformers and SentEval.
    eval_graphdef = encoder_graphdef(dataclasses.replace(enc_cfg, compute_dtype=config.eval_dtype))
    evaluator = TrainingEvaluator(config, eval_graphdef, tokenizer, mesh, sts_dir, heldout)
    per_device = config.global_batch_size // data_parallel_size(mesh)
    log.message(
        f"mesh {dict(mesh.shape)} | {jax.device_count()} devices, {jax.local_device_count()} on each of "
        f"{jax.process_count()} host(s) ({jax.devices()[0].platform}) | global batch {config.global_batch_size} "
        f"sentences x {data.data.num_sent} views, {per_device} per data-parallel shard | {total_steps} steps "
        f"({data.batches_per_epoch} per epoch) | compute {config.compute_dtype}, evaluation {config.eval_dtype} | {resumed}"
    )

    # --- 4. the loop
    base_key = jax.random.key(config.seed)
    preemption = distributed.Preemption(config.preemption_check_steps)
    save_every = config.save_steps or config.eval_steps
    bar = log.progress(total_steps, start, config.global_batch_size) if progress else None
    pending = PendingMeasurements()
    rates: list[float] = []
    # A logged rate measures training only: time spent evaluating and issuing checkpoint saves
    # inside a log interval is taken out of its rate (logged as the interval's `excluded_seconds`;
    # each evaluation's own `eval_seconds` is in its record; the run's totals in results.json).
    clock = {"time": time.perf_counter(), "step": start, "paused": 0.0}
    spent = {"eval_seconds": 0.0, "checkpoint_seconds": 0.0}
    position = data.state()  # of the batches consumed so far: what a checkpoint records
    meas_epoch: dict[int, float] = {}  # epoch progress at each log step, for its metrics line
    status, step, log_due = "completed", start, None
    batches = Prefetch(data, config.prefetch_batches)
    t_start = time.perf_counter()

    def consume(upto: int | None = None) -> None:
        """Fetches pending measurements: stops on a non-finite step, logs the log steps."""
        for s, meas in pending.fetch(upto):
            if not _is_finite(meas):
                if config.on_nonfinite == "stop":
                    good = latest.latest_step()
                    raise TrainingError(
                        f"step {s}: non-finite loss {meas['loss']} / grad norm {meas['grad_norm']}; stopped "
                        f"without saving. The last good checkpoint is "
                        f"{'step ' + str(good) + ' in ' + str(ckpt_root / 'latest') if good is not None else 'none'}; "
                        f"lower learning_rate (with --set allow_config_change=true) or set on_nonfinite=skip"
                    )
                log.message(f"step {s}: non-finite loss; update skipped (on_nonfinite=skip)")
            if s % config.log_every == 0 or s == total_steps:
                now = time.perf_counter()
                rate = (s - clock["step"]) / max(now - clock["time"] - clock["paused"], 1e-9)
                excluded = {"excluded_seconds": clock["paused"]} if clock["paused"] else {}
                clock.update(time=now, step=s, paused=0.0)
                rates.append(rate * config.global_batch_size)
                epoch = meas_epoch.pop(s, None)
                log.write(s, {**meas, "steps_per_s": rate, "sentences_per_s": rate * config.global_batch_size,
                              **excluded, **({"epoch": epoch} if epoch is not None else {})})
                if bar is not None:
                    bar.show(meas)

    ended = "failed"
    try:
        while step < total_steps:
            batch, next_position = next(batches)
            state, meas = update(state, batch, base_key)  # dropout key: fold_in(base_key, state.step), in the step
            step += 1
            pending.add(step, meas)
            position = next_position
            if step % config.log_every == 0 or step == total_steps:
                meas_epoch[step] = position["epoch"] + position["batch"] / data.batches_per_epoch
            if log_due is not None:  # the previous log step's values: update `step` is queued behind them
                consume(log_due)
                log_due = None
            if bar is not None:
                bar.advance()
            if callback is not None:
                callback("step", step)
            is_eval = step % config.eval_steps == 0 or step == total_steps
            is_save = step % save_every == 0 or step == total_steps
            stop = preemption.should_stop(step, saving=is_save)
            if not (is_eval or is_save or stop):
                if step % config.log_every == 0:
                    log_due = step
                continue
            consume()  # before an evaluation or a save: every step so far is finite
            if is_eval:
                t0 = time.perf_counter()
                scores = evaluator.dev(state.params)
                seconds = time.perf_counter() - t0
                pause(clock, spent, "eval_seconds", seconds)
                if scores:
                    log.write(step, {**scores, "eval_seconds": seconds})
                    score = scores.get(f"eval/{BEST_METRIC}")
                    if score is not None and score > best_score:
                        best_score, best_step = score, step
                        t0 = time.perf_counter()
                        ckpt_lib.save_params(best, step, state.params, {**meta, "best_score": score})
                        ckpt_lib.finish_saves(best)
                        pause(clock, spent, "checkpoint_seconds", time.perf_counter() - t0)
                    log.message(eval_line(step, scores, best_score, best_step))
            if is_save or stop:
                t0 = time.perf_counter()
                ckpt_lib.save_train_state(latest, step, state, meta, {
                    "iterator": position, "best_score": best_score, "best_step": best_step,
                    "rng": {"seed": config.seed, "dropout_key": "fold_in(key(seed), step)"}})
                log.flush()  # gs://: metrics.jsonl and TensorBoard events reach the bucket with each checkpoint
                pause(clock, spent, "checkpoint_seconds", time.perf_counter() - t0)
                if callback is not None:
                    callback("checkpoint", step)
            if stop and step < total_steps:
                ckpt_lib.finish_saves(latest)
                status = "preempted"
                log.message(f"preempted: saved step {step} in {ckpt_root / 'latest'}; rerun the same command to resume")
                break
        ended = "ok"
    except KeyboardInterrupt:
        ended = "aborted"
        raise
    finally:
        batches.close()
        preemption.restore()
        if bar is not None:
            bar.close()
        if ended == "ok":
            ckpt_lib.finish_saves(latest)
        elif ended == "failed":  # let an in-flight save of a good step complete; its own error is secondary
            with contextlib.suppress(Exception):
                latest.wait_until_finished()
        # "aborted" (a second Ctrl-C): no waiting; an unfinished save leaves no visible step
    if status == "preempted":
        log.close()
        latest.close()
        best.close()
        return {"status": "preempted", "step": step}

    # --- 5. the end: best parameters -> STS test -> export -> results.json
    pooler = eval_pooler(config.pooler, config.mlp_only_train, config.eval_pooler)
    loop_seconds = time.perf_counter() - t_start
    results = {"status": status, "steps": step, "best_step": best_step, "best_dev_stsb": None if best_step is None else best_score,
               "eval_pooler": pooler, "compute_dtype": config.compute_dtype, "eval_dtype": config.eval_dtype,
               "workdir": str(workdir), "global_batch_size": config.global_batch_size,
               "devices": jax.device_count(), "processes": jax.process_count(), "mesh": dict(mesh.shape),
               # train_seconds: the loop without its evaluations and checkpoint saves (loop_seconds has them)
               "train_seconds": round(loop_seconds - spent["eval_seconds"] - spent["checkpoint_seconds"], 2),
               "loop_seconds": round(loop_seconds, 2), **{k: round(v, 2) for k, v in spent.items()}, **compile_info}
    if len(rates) > 1:  # the first logged interval includes the first dispatch's warm-up
        results["sentences_per_s"] = float(np.median(rates[1:]))
    final_params = state.params
    if best_step is not None:
        final_params = ckpt_lib.restore_params(best, best_step, abstract_params, shardings.params)
    scores = None
    if sts_dir is not None and config.do_test_eval:
        t0 = time.perf_counter()
        test = evaluator.test(final_params)
        results["sts_test"] = test
        results["test_eval_seconds"] = round(time.perf_counter() - t0, 2)
        scores = test["paper"]
        log.message(f"STS test (Spearman x 100, {pooler} pooler, {config.eval_dtype}, step {best_step or step}):\n"
                    + sts.format_table(scores))
    elif sts_dir is None and heldout is not None:
        results["heldout"] = evaluator.heldout_alignment_uniformity(final_params)
        log.message(f"held-out alignment {results['heldout']['alignment']:.4f}, uniformity {results['heldout']['uniformity']:.4f} "
                    f"(no STS folder: pass --set sts_dir=... or $SIMCSE_STS_DIR for the STS table)")
    if config.do_export:
        t0 = time.perf_counter()
        export_dir = workdir / "export"
        # Gather to every host (replicated) so process 0 can write the whole model.
        replicated = jax.jit(lambda p: p, out_shardings=NamedSharding(mesh, P()))(final_params)
        if is_lead:
            from simcse_jax.hf_export import export_model

            export_model(nnx.merge(graphdef, replicated), tokenizer, export_dir, pooler=pooler,
                         hf_config=hf_config, meta={**meta, "step": best_step or step}, scores=scores, overwrite=True)
            log.message(f"exported the {'best (step ' + str(best_step) + ')' if best_step else 'final'} model to {export_dir} "
                        f"(transformers / sentence-transformers / simcse; pooler {pooler})")
        results["export_dir"] = str(export_dir)
        results["export_seconds"] = round(time.perf_counter() - t0, 2)
    if is_lead:
        paths.write_text_atomic(workdir / "results.json", json.dumps(results, indent=2, default=float) + "\n")
        log.message(f"wrote {workdir / 'results.json'}")
    log.close()
    latest.close()
    best.close()
    return results


def pause(clock: dict, spent: dict, kind: str, seconds: float) -> None:
    """Takes `seconds` of `kind` (eval_seconds, checkpoint_seconds) out of the current log interval."""
    clock["paused"] += seconds
    spent[kind] += seconds


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
        return 130  # 128 + SIGINT, as a shell reports an interrupted command
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
