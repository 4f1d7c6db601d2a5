"""The SimCSE trainer: `simcse-jax train --config configs/NAME.py[:variant] --workdir DIR`.

`train` reads top to bottom in the order a run happens:

 1. hosts and devices: `jax.distributed.initialize()` when the environment names several
    processes; the config is validated before anything is compiled;
 2. the mesh, the tokenizer and the data iterator (each host reads its own rows);
 3. the model and optimizer: parameters born sharded (abstract shapes first; weights either
    restored from the latest checkpoint or read from the Hugging Face folder and placed by the
    sharding rules), the jitted update step;
 4. the loop: update, measurements, progress, periodic STS-B dev evaluation selecting the best
    checkpoint, periodic (async) checkpoints, preemption and non-finite checks;
 5. the end: restore the best parameters, STS test evaluation, export to a Hugging Face folder,
    `results.json`.

Determinism: the data order is a function of (seed, epoch) and the dropout key of update `s` is
`fold_in(key(seed), s)`, so a resumed run repeats exactly what an uninterrupted one would do.

Checkpoints (`<workdir>/checkpoints/`): `latest/` keeps the newest `keep_checkpoints` complete
training states (params, opt_state, data_state with the iterator position and the best-so-far,
meta) for resuming; `best/` keeps the parameters with the highest STS-B dev Spearman. orbax
writes each step to a temporary folder and renames it when complete, so a crash mid-save leaves
no checkpoint that a restart would load.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from simcse_jax import checkpoint as ckpt_lib
from simcse_jax import sts
from simcse_jax.config import ConfigError, TrainConfig, load_config, resolve_sts_dir, validate
from simcse_jax.corpus import BUILTIN_PREFIX, write_builtin_corpus
from simcse_jax.data import make_data_iterator
from simcse_jax.encode import SentenceEncoder
from simcse_jax.encoder import Encoder, EncoderConfig
from simcse_jax.hf_io import load_pretrained, load_tokenizer, minilm_dir, read_config, resolve_model_dir
from simcse_jax.metrics_log import MetricsLog
from simcse_jax.objective import ObjectiveConfig, embed_views
from simcse_jax.optim import OptimConfig, make_optimizer
from simcse_jax.sharding import batch_sharding, data_parallel_size, make_mesh
from simcse_jax.train_step import TrainState, init_train_state, make_train_step, state_shardings

MODEL_ALIASES = {"builtin:minilm": minilm_dir}
CPU_ONEDNN_OPTIONS = {"xla_cpu_use_onednn": True, "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}
DEV_TASKS = ("STSBenchmark", "SICKRelatedness")
BEST_METRIC = "STSBenchmark"


class TrainingError(RuntimeError):
    """A run that cannot continue (non-finite loss, ...); the message names the step."""


# ----------------------------------------------------------------------------- set-up helpers


def maybe_initialize_distributed() -> None:
    """Joins the other processes of a multi-host run (before any other jax call).

    Explicit: SIMCSE_COORDINATOR=host:port, SIMCSE_NUM_PROCESSES, SIMCSE_PROCESS_ID (the local
    launcher). Otherwise jax's own cluster detection (SLURM, TPU pods, ...) when such a cluster
    environment is present. A single process does nothing.
    """
    env = os.environ
    if "SIMCSE_COORDINATOR" in env:
        if jax.config.jax_platforms in (None, "", "cpu") and env.get("SIMCSE_CPU_COLLECTIVES", "gloo"):
            # Cross-process collectives between CPU devices (the local multi-process launcher).
            jax.config.update("jax_cpu_collectives_implementation", env.get("SIMCSE_CPU_COLLECTIVES", "gloo"))
        jax.distributed.initialize(
            coordinator_address=env["SIMCSE_COORDINATOR"],
            num_processes=int(env["SIMCSE_NUM_PROCESSES"]),
            process_id=int(env["SIMCSE_PROCESS_ID"]),
        )
    elif int(env.get("SLURM_NTASKS", "1")) > 1 or "TPU_WORKER_HOSTNAMES" in env or "MEGASCALE_COORDINATOR_ADDRESS" in env:
        jax.distributed.initialize()


def resolve_model(name: str) -> Path:
    return Path(MODEL_ALIASES[name]()) if name in MODEL_ALIASES else resolve_model_dir(name)


def resolve_train_file(config: TrainConfig, workdir: Path) -> tuple[str, Path | None]:
    """(train_file for the data pipeline, held-out text file or None)."""
    if config.train_file.startswith(BUILTIN_PREFIX):
        train, heldout = write_builtin_corpus(config.train_file[len(BUILTIN_PREFIX):], workdir / "corpus")
        return str(train), heldout
    return config.train_file, None


def objective_config(c: TrainConfig) -> ObjectiveConfig:
    return ObjectiveConfig(
        temperature=c.temperature,
        hard_negative_weight=c.hard_negative_weight,
        pooler=c.pooler,
        mlp_only_train=c.mlp_only_train,
        do_mlm=c.do_mlm,
        mlm_weight=c.mlm_weight,
        grad_cache_chunk_size=c.grad_cache_chunk_size or None,
        gradient_accumulation_steps=c.gradient_accumulation_steps,
    )


def optim_config(c: TrainConfig, total_steps: int) -> OptimConfig:
    return OptimConfig(
        total_steps=total_steps,
        learning_rate=c.learning_rate,
        warmup_steps=c.warmup_steps,
        weight_decay=c.weight_decay,
        adam_b1=c.adam_beta1,
        adam_b2=c.adam_beta2,
        adam_eps=c.adam_epsilon,
        max_grad_norm=c.max_grad_norm,
        reference_world_size=c.reference_world_size,
    )


def eval_pooler_of(c: TrainConfig) -> str:
    if c.eval_pooler:
        return c.eval_pooler
    return "cls_before_pooler" if c.pooler == "cls" and c.mlp_only_train else c.pooler


def fresh_mlp(model: Encoder, seed: int) -> None:
    """Re-initialises `pooler.dense` as the reference's new MLPLayer: N(0, initializer_range), bias 0.

    SimCSE's MLP is a new module (`cls.mlp`), not BERT's pretrained pooler, which it never loads.
    """
    std = model.config.initializer_range
    kernel = model.pooler.dense.kernel
    kernel.set_value(std * jax.random.normal(jax.random.key(seed + 7919), kernel.shape, jnp.float32))
    model.pooler.dense.bias.set_value(jnp.zeros(model.pooler.dense.bias.shape, jnp.float32))


class PreemptionFlag:
    """Set by SIGTERM (or a TPU preemption notice); checked at step boundaries on every host."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame):
        self.requested = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)

    def should_stop(self, step: int) -> bool:
        local = self.requested
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            with contextlib.suppress(Exception):  # only where the preemption service runs (TPU)
                local = local or multihost_utils.reached_preemption_sync_point(step)
            # Every host stops at the same step: one signalled host is enough.
            local = bool(np.any(multihost_utils.process_allgather(np.array([local]))))
        return local


# ----------------------------------------------------------------------------- checkpoint items


def _opt_leaves(opt_state) -> dict:
    # Saved as a flat {index: array} dict: orbax then needs no knowledge of optax's NamedTuples,
    # and restoring into the current optimizer's tree checks the count and shapes.
    return {str(i): x for i, x in enumerate(jax.tree.leaves(opt_state))}


def save_train_state(mngr, step, state: TrainState, graphdef, meta: dict, data_state: dict) -> None:
    items = {
        "params": nnx.to_pure_dict(state.params),
        "opt_state": _opt_leaves(state.opt_state),
        "meta": {**meta, "step": int(step)},
        "data_state": data_state,
    }
    mngr.save(step, args=ckpt_lib.save_args(items))


def restore_train_state(mngr, step, abstract: TrainState, shardings: TrainState) -> tuple[TrainState, dict, dict]:
    """Restores into the *current* shardings (a different mesh or device count reshards)."""
    abstract_params = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        nnx.to_pure_dict(abstract.params), nnx.to_pure_dict(shardings.params),
    )
    opt_leaves, opt_def = jax.tree.flatten(abstract.opt_state)
    opt_sh = jax.tree.leaves(shardings.opt_state)
    abstract_opt = {str(i): jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s) for i, (a, s) in enumerate(zip(opt_leaves, opt_sh))}
    restored = mngr.restore(
        step, args=ckpt_lib.restore_args({"params": abstract_params, "opt_state": abstract_opt, "meta": None, "data_state": None})
    )
    params = jax.tree.map(lambda x: x, abstract.params)
    nnx.replace_by_pure_dict(params, restored["params"])
    opt_state = jax.tree.unflatten(opt_def, [restored["opt_state"][str(i)] for i in range(len(opt_leaves))])
    state = TrainState(step=jax.device_put(jnp.asarray(step, jnp.int32), shardings.step), params=params, opt_state=opt_state)
    return state, restored["meta"], restored["data_state"]


# ----------------------------------------------------------------------------- evaluation


class Evaluator:
    """Dev/test STS scores (JAX backend) or, without STS data, held-out alignment/uniformity."""

    def __init__(self, config: TrainConfig, graphdef, tokenizer, mesh, sts_dir: Path | None, heldout: Path | None):
        self.config, self.graphdef, self.tokenizer, self.mesh = config, graphdef, tokenizer, mesh
        self.sts_dir, self.heldout = sts_dir, heldout
        self.pooler = eval_pooler_of(config)
        self.dev_tasks = [sts.load_task(sts_dir, t, "dev") for t in DEV_TASKS] if sts_dir else []
        self.encoder = None
        self._heldout = None

    def _encoder(self, params) -> SentenceEncoder:
        model = nnx.merge(self.graphdef, params)
        if self.encoder is None:
            self.encoder = SentenceEncoder(model, self.tokenizer, pooler=self.pooler, mesh=self.mesh,
                                           batch_size=self.config.eval_batch_size)
        else:
            self.encoder.set_model(model)
        return self.encoder

    def dev(self, params) -> dict[str, float]:
        """{'eval/STSBenchmark': ..., 'eval/SICKRelatedness': ...} (Spearman x 100), or held-out stats."""
        if self.dev_tasks:
            res = sts.evaluate(self._encoder(params), self.dev_tasks, align_uniform=False)
            return {f"eval/{k}": v for k, v in res["paper"].items() if k != "Avg."}
        if self.heldout is not None:
            return {f"eval/heldout_{k}": v for k, v in self.heldout_alignment_uniformity(params).items()}
        return {}

    def test(self, params) -> dict:
        tasks = [sts.load_task(self.sts_dir, t, "test") for t in sts.TASKS]
        return sts.evaluate(self._encoder(params), tasks)

    def heldout_alignment_uniformity(self, params, max_sentences: int = 1024) -> dict[str, float]:
        """Wang & Isola on held-out sentences: alignment between two dropout views of each
        sentence (the unsupervised positives), uniformity of the evaluation embeddings."""
        if self._heldout is None:  # tokenized, placed and compiled once per run
            lines = [s for s in self.heldout.read_text(encoding="utf-8").splitlines() if s.strip()]
            dp = data_parallel_size(self.mesh)
            lines = lines[: (min(len(lines), max_sentences) // dp) * dp]
            ids = self.tokenizer(lines, max_length=self.config.max_seq_length, truncation=True,
                                 padding="max_length", return_tensors="np")
            batch = {k: np.repeat(ids[k][:, None].astype(np.int32), 2, axis=1) for k in ("input_ids", "attention_mask")}
            batch["token_type_ids"] = np.zeros_like(batch["input_ids"])
            cfg, graphdef = objective_config(self.config), self.graphdef
            views = jax.jit(lambda p, b, k: embed_views(nnx.merge(graphdef, p), b, cfg, k))
            self._heldout = (lines, jax.device_put(batch, batch_sharding(self.mesh, 3)), views)
        lines, batch, views = self._heldout
        with jax.set_mesh(self.mesh):
            z = views(params, batch, jax.random.key(0))
        z = np.asarray(z, np.float64)
        z = z / np.linalg.norm(z, axis=-1, keepdims=True)
        e = self._encoder(params)(lines).astype(np.float64)
        return {"alignment": float(((z[:, 0] - z[:, 1]) ** 2).sum(-1).mean()),
                "uniformity": sts.uniformity(e / np.linalg.norm(e, axis=-1, keepdims=True))}


# ----------------------------------------------------------------------------- the run


def train(config: TrainConfig, workdir: str | os.PathLike, *, progress: bool = True, callback=None) -> dict:
    """Trains (or resumes) in `workdir`; returns the results dict also written to results.json.

    `callback(event, step)`, if given, is called after every update (`"step"`) and after a
    checkpoint save is issued (`"checkpoint"`): a hook for custom logging and for tests that
    interrupt a run at a chosen point.
    """
    workdir = Path(workdir).expanduser().absolute()
    is_lead = jax.process_index() == 0

    # --- 1. validate before compiling anything; record the config
    validate(config, num_devices=jax.device_count())
    sts_dir = resolve_sts_dir(config)
    workdir.mkdir(parents=True, exist_ok=True)
    _record_config(config, workdir, is_lead)

    # --- 2. mesh, tokenizer, data
    mesh = make_mesh({"data": config.mesh_data, "fsdp": config.mesh_fsdp, "tensor": config.mesh_tensor})
    model_dir = resolve_model(config.model)
    hf_config = read_config(model_dir)
    tokenizer = load_tokenizer(model_dir)
    train_file, heldout = resolve_train_file(config, workdir)
    data = make_data_iterator(
        train_file, tokenizer, config.global_batch_size, max_seq_length=config.max_seq_length, seed=config.seed,
        mesh=mesh, mlm_probability=config.mlm_probability if config.do_mlm else None,
        cache_dir=config.data_cache_dir or workdir / "data_cache", progress=progress and is_lead, shuffle=config.shuffle,
    )
    total_steps = config.max_steps if config.max_steps > 0 else int(math.ceil(config.num_epochs * data.batches_per_epoch))

    # --- 3. model, optimizer, state: abstract first, then restore or import
    overrides = {k: getattr(config, k) for k in ("hidden_dropout_prob", "attention_probs_dropout_prob") if getattr(config, k) is not None}
    enc_cfg = EncoderConfig.from_hf_dict(hf_config, compute_dtype=config.compute_dtype, with_mlm_head=config.do_mlm, **overrides)
    optimizer = make_optimizer(optim_config(config, total_steps))
    abstract_model = nnx.eval_shape(lambda: Encoder(enc_cfg, rngs=nnx.Rngs(0)))
    graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
    shardings = state_shardings(abstract_params, optimizer, mesh)
    abstract_state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params,
                                opt_state=jax.eval_shape(optimizer.init, abstract_params))

    ckpt_root = workdir / "checkpoints"
    latest = _manager(ckpt_root / "latest", config.keep_checkpoints, config.async_checkpointing)
    best = _manager(ckpt_root / "best", 1, False)
    meta = ckpt_lib.make_meta(abstract_model, hf_config=hf_config, pooler=config.pooler,
                              mlp_only_train=config.mlp_only_train, train_config=dataclasses.asdict(config))
    best_score, best_step = -math.inf, None
    start = latest.latest_step()
    if start is not None:
        state, _, saved = restore_train_state(latest, start, abstract_state, shardings)
        data.restore(saved["iterator"])
        best_score, best_step = saved.get("best_score", -math.inf), saved.get("best_step")
        for stale in [s for s in best.all_steps() if s > start]:  # from a lost future of the run
            best.delete(stale)
        resumed = f"resumed from step {start} ({ckpt_root / 'latest' / str(start)})"
    else:
        loaded = load_pretrained(model_dir, compute_dtype=config.compute_dtype, with_mlm_head=config.do_mlm, **overrides)
        if config.pooler == "cls" and config.mlp_init == "fresh":
            fresh_mlp(loaded.model, config.seed)
        graphdef, state, shardings = init_train_state(loaded.model, optimizer, mesh)
        del loaded
        start, resumed = 0, f"started from {model_dir}"
    if is_lead:  # each checkpoint folder is self-contained for `simcse-jax export` / `eval`
        for folder in ("latest", "best"):
            tokenizer_dir = ckpt_root / folder / ckpt_lib.TOKENIZER_SUBDIR
            if not tokenizer_dir.is_dir():
                tokenizer.save_pretrained(str(tokenizer_dir))
    def build_step(compiler_options):
        return make_train_step(graphdef, optimizer, mesh, shardings, objective_config(config),
                               optim_config(config, total_steps), skip_nonfinite=config.on_nonfinite == "skip",
                               compiler_options=compiler_options)

    step_options = CPU_ONEDNN_OPTIONS if config.cpu_onednn and jax.devices()[0].platform == "cpu" else None
    step_fn = build_step(step_options)
    evaluator = Evaluator(config, graphdef, tokenizer, mesh, sts_dir, heldout)
    log = MetricsLog(workdir, enabled=is_lead, truncate_after=start)
    per_device = config.global_batch_size // data_parallel_size(mesh)
    log.message(
        f"mesh {dict(mesh.shape)} | {jax.device_count()} devices, {jax.local_device_count()} on each of "
        f"{jax.process_count()} host(s) ({jax.devices()[0].platform}) | global batch {config.global_batch_size} "
        f"sentences x {data.data.num_sent} views, {per_device} per data-parallel shard | {total_steps} steps "
        f"({data.batches_per_epoch} per epoch) | {resumed}"
    )

    # --- 4. the loop
    base_key = jax.random.key(config.seed)
    preemption = PreemptionFlag()
    save_every = config.save_steps or config.eval_steps
    bar = log.progress(total_steps, start, config.global_batch_size) if progress else None
    step, t_last, n_last = start, time.perf_counter(), start
    status, compiled, results_extra = "completed", None, {}
    t_start = time.perf_counter()
    try:
        while step < total_steps:
            batch = next(data)
            key = jax.random.fold_in(base_key, step)
            if compiled is None:
                try:
                    compiled, compile_info = compile_step(step_fn, state, batch, key)
                except Exception as e:  # a jaxlib without these XLA-CPU options: compile without them
                    if step_options is None:
                        raise
                    log.message(f"note: this jaxlib rejects the oneDNN options ({type(e).__name__}: "
                                f"{str(e).splitlines()[0][:200]}); compiling without them (cpu_onednn=false)")
                    step_fn = build_step(None)
                    compiled, compile_info = compile_step(step_fn, state, batch, key)
                results_extra.update(compile_info)
                log.message(f"compiled the update step in {compile_info['compile_seconds']:.1f} s; peak memory per "
                            f"device {compile_info.get('step_peak_memory_mib', 'n/a')} MiB")
            # The one executable serves the whole run: a batch of another shape is an error, not a
            # silent recompilation.
            state, meas = compiled(state, batch, key)
            step += 1
            meas = {k: float(v) for k, v in jax.device_get(meas).items()}
            if not (math.isfinite(meas["loss"]) and math.isfinite(meas["grad_norm"])):
                if config.on_nonfinite == "stop":
                    good = latest.latest_step()
                    raise TrainingError(
                        f"step {step}: non-finite loss {meas['loss']} / grad norm {meas['grad_norm']}; stopped "
                        f"without saving. The last good checkpoint is "
                        f"{'step ' + str(good) + ' in ' + str(ckpt_root / 'latest') if good is not None else 'none'}; "
                        f"lower learning_rate or set on_nonfinite=skip"
                    )
                log.message(f"step {step}: non-finite loss; update skipped (on_nonfinite=skip)")
            if step % config.log_every == 0 or step == total_steps:
                now = time.perf_counter()
                rate = (step - n_last) / max(now - t_last, 1e-9)
                t_last, n_last = now, step
                log.write(step, {**meas, "steps_per_s": rate, "sentences_per_s": rate * config.global_batch_size,
                                 "epoch": data.epoch + data.batch / data.batches_per_epoch})
            if bar is not None:
                bar.update(meas)
            if callback is not None:
                callback("step", step)
            if step % config.eval_steps == 0 or step == total_steps:
                scores = evaluator.dev(state.params)
                if scores:
                    log.write(step, scores)
                    score = scores.get(f"eval/{BEST_METRIC}")
                    if score is not None and score > best_score:
                        best_score, best_step = score, step
                        best.save(step, args=ckpt_lib.save_args({"params": nnx.to_pure_dict(state.params),
                                                                  "meta": {**meta, "step": step, "best_score": score}}))
                        best.wait_until_finished()
                    log.message(_eval_line(step, scores, best_score, best_step))
            stop = preemption.should_stop(step)
            if step % save_every == 0 or step == total_steps or stop:
                save_train_state(latest, step, state, graphdef, meta,
                                 {"iterator": data.state(), "best_score": best_score, "best_step": best_step,
                                  "rng": {"seed": config.seed, "dropout_key": "fold_in(key(seed), step)"}})
                if callback is not None:
                    callback("checkpoint", step)
            if stop and step < total_steps:
                latest.wait_until_finished()
                status = "preempted"
                log.message(f"preempted: saved step {step} in {ckpt_root / 'latest'}; rerun the same command to resume")
                break
    finally:
        preemption.restore()
        if bar is not None:
            bar.close()
        latest.wait_until_finished()
    if status == "preempted":
        log.close()
        latest.close()
        best.close()
        return {"status": "preempted", "step": step}

    # --- 5. the end: best parameters -> STS test -> export -> results.json
    results = {"status": status, "steps": step, "best_step": best_step, "best_dev_stsb": None if best_step is None else best_score,
               "eval_pooler": eval_pooler_of(config), "workdir": str(workdir), "global_batch_size": config.global_batch_size,
               "devices": jax.device_count(), "processes": jax.process_count(), "mesh": dict(mesh.shape),
               "train_seconds": round(time.perf_counter() - t_start, 2), **results_extra}
    throughput = [json.loads(x)["sentences_per_s"] for x in (workdir / "metrics.jsonl").read_text().splitlines()
                  if '"sentences_per_s"' in x][1:] if is_lead and (workdir / "metrics.jsonl").is_file() else []
    if throughput:  # the first logged interval includes compilation
        results["sentences_per_s"] = float(np.median(throughput))
    final_params = state.params
    if best_step is not None:
        restored = best.restore(best_step, args=ckpt_lib.restore_args({"params": jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            nnx.to_pure_dict(abstract_params), nnx.to_pure_dict(shardings.params)), "meta": None}))
        final_params = jax.tree.map(lambda x: x, abstract_params)
        nnx.replace_by_pure_dict(final_params, restored["params"])
    scores = None
    if sts_dir is not None and config.do_test_eval:
        test = evaluator.test(final_params)
        results["sts_test"] = test
        scores = test["paper"]
        log.message("STS test (Spearman x 100, " + evaluator.pooler + " pooler, step " + str(best_step or step) + "):\n"
                    + sts.format_table(scores))
    elif sts_dir is None and heldout is not None:
        results["heldout"] = evaluator.heldout_alignment_uniformity(final_params)
        log.message(f"held-out alignment {results['heldout']['alignment']:.4f}, uniformity {results['heldout']['uniformity']:.4f} "
                    f"(no STS folder: pass --set sts_dir=... or $SIMCSE_STS_DIR for the STS table)")
    if config.do_export:
        export_dir = workdir / "export"
        # Gather to every host (replicated) so process 0 can write the whole model.
        replicated = jax.jit(lambda p: p, out_shardings=NamedSharding(mesh, P()))(final_params)
        if is_lead:
            from simcse_jax.hf_export import export_model

            export_model(nnx.merge(graphdef, replicated), tokenizer, export_dir, pooler=evaluator.pooler,
                         hf_config=hf_config, meta={**meta, "step": best_step or step}, scores=scores, overwrite=True)
            log.message(f"exported the {'best (step ' + str(best_step) + ')' if best_step else 'final'} model to {export_dir} "
                        f"(transformers / sentence-transformers / simcse; pooler {evaluator.pooler})")
        results["export_dir"] = str(export_dir)
    if is_lead:
        (workdir / "results.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
        log.message(f"wrote {workdir / 'results.json'}")
    log.close()
    latest.close()
    best.close()
    return results


def compile_step(step_fn, state, batch, key):
    """Compiles the update ahead of time: the executable, its compile time and peak memory."""
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, batch, key).compile()
    info = {"compile_seconds": round(time.perf_counter() - t0, 2)}
    mem = compiled.memory_analysis()
    if mem is not None:  # per device: arguments + outputs - donated aliases + temporaries
        peak = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
        info["step_peak_memory_mib"] = round(peak / 2**20, 1)
    return compiled, info


def _manager(path: Path, max_to_keep: int, async_save: bool) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save)
    return ocp.CheckpointManager(path, options=options)


def _record_config(config: TrainConfig, workdir: Path, is_lead: bool) -> None:
    if not is_lead:
        return
    path = workdir / "config.json"
    now = dataclasses.asdict(config)
    if path.is_file():
        before = json.loads(path.read_text())
        changed = {k: (before.get(k), v) for k, v in now.items() if before.get(k) != v}
        if changed:
            print(f"note: config differs from the one recorded in {path}: {changed}", file=sys.stderr)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(now, indent=2) + "\n")
    tmp.replace(path)


def _eval_line(step, scores, best_score, best_step) -> str:
    parts = ", ".join(f"{k.split('/', 1)[1]} {v:.2f}" if "STS" in k or "SICK" in k else f"{k.split('/', 1)[1]} {v:.4f}"
                      for k, v in scores.items())
    best = f" (best {best_score:.2f} at step {best_step})" if best_step is not None else ""
    return f"step {step} dev: {parts}{best}"


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
    maybe_initialize_distributed()
    try:
        config = load_config(args.config, args.overrides)
        results = train(config, args.workdir, progress=not args.no_progress)
    except (ConfigError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    return 0 if results["status"] in ("completed", "preempted") else 1
