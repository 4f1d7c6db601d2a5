"""Training configuration: one flat, typed dataclass; Python config files; command-line overrides.

A config file (`configs/NAME.py`) defines `get_config(arg: str | None) -> TrainConfig`; the
optional `:variant` after the file name is passed as `arg` (big_vision style). On the command
line, `--set key=value` replaces a field; the value is parsed by the field's declared type and
an unknown key is an error that names it (and the closest known keys).

`validate` checks every value that can be checked before anything is compiled and names the key
of the first problem.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import os
import types
import typing
from pathlib import Path

from simcse_jax import paths
from simcse_jax.errors import ConfigError, StsDataError
from simcse_jax.poolers import check_pooler

# The contrastive loss's implementations (simcse_jax/losses/): the same loss and gradients.
CONTRASTIVE_IMPLS = ("dense", "blockwise", "ring")


@dataclasses.dataclass
class TrainConfig:
    # --- model
    model: str = "bert-base-uncased"  # Hugging Face folder, gs:// folder, hub id, or builtin:minilm (hf_io.resolve_model_dir)
    compute_dtype: str = "float32"  # "bfloat16" on TPU/GPU; parameters and optimizer state stay float32
    hidden_dropout_prob: float | None = None  # None: the checkpoint's config.json (0.1 for BERT/RoBERTa)
    attention_probs_dropout_prob: float | None = None
    # --- data
    train_file: str = "data/wiki1m_for_simcse.txt"  # .txt (unsup), .csv/.tsv (1/2/3 columns), or a datasets name
    max_seq_length: int = 32
    shuffle: bool = True  # False: file order (the reference shuffles; parity tests do not)
    data_cache_dir: str | None = None  # None: <workdir>/data_cache
    # --- objective
    pooler: str = "cls"
    mlp_only_train: bool = False  # unsup recipe: the MLP is used in training, dropped at evaluation
    # "fresh": a new MLP, N(0, initializer_range), as the reference's MLPLayer; "checkpoint": keep
    # the checkpoint's pooler.dense (continuing a released SimCSE model, whose pooler is the MLP).
    mlp_init: str = "fresh"
    temperature: float = 0.05
    hard_negative_weight: float = 0.0  # added to the hard-negative logit (log-weight; 0 = weight 1)
    do_mlm: bool = False
    mlm_weight: float = 0.1
    mlm_probability: float = 0.15
    # How the contrastive loss is computed (the same loss and gradients, see simcse_jax/losses/):
    # "dense" materialises the B/devices x B logits (the reference's numerics, the paper configs);
    # "blockwise" an online log-sum-exp over contrastive_block_size columns at a time; "ring"
    # that, with the keys passed around the data-parallel devices. Memory linear in B for both.
    contrastive_impl: str = "dense"
    contrastive_block_size: int = 1024
    # --- optimisation
    global_batch_size: int = 64  # sentences (not views) per step, over all devices and hosts
    num_epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides num_epochs
    learning_rate: float = 3e-5
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0  # <= 0 disables clipping
    reference_world_size: int = 1  # clip as the reference would on this many GPUs (see optim.py)
    grad_cache_chunk_size: int = 0  # 0: off; else sentences per chunk (global), see grad_cache.py
    gradient_accumulation_steps: int = 1  # must be 1: micro-batch accumulation changes this loss
    seed: int = 42
    # XLA-CPU only: oneDNN matmuls for the update step's jit (simcse_jax/xla_options.py): 1.47x
    # PyTorch's step speed instead of 1.17x on the 2-core benchmark machine; the loss moves by
    # rounding only (~3e-5 relative, bounded in tests/test_xla_options.py). Per-jit on purpose:
    # the same options crash jaxlib 0.10.2 compiling the inference forward (see encode.py).
    cpu_onednn: bool = True
    on_nonfinite: str = "stop"  # "stop" (keep the last good checkpoint) or "skip" the update
    # --- the loop (see train.py): how often the host looks at the device
    # Multi-host runs vote on preemption (one small collective) every this many steps and at every
    # save; a single process checks its own SIGTERM flag at every step for free.
    preemption_check_steps: int = 10
    prefetch_batches: int = 2  # global batches assembled and placed on the devices ahead of the step
    # --- mesh: one of the sizes may be -1 (all remaining devices)
    mesh_data: int = -1
    mesh_fsdp: int = 1
    mesh_tensor: int = 1
    # --- evaluation and checkpoints
    sts_dir: str | None = None  # None: $SIMCSE_STS_DIR, then ./data/sts; no folder: held-out align/uniform
    eval_steps: int = 125
    eval_batch_size: int = 128
    eval_pooler: str | None = None  # None: pooler (with mlp_only_train, the MLP is dropped)
    # Evaluation compute dtype (dev and test). float32, whatever compute_dtype trained: the test
    # table is then what transformers / SentEval compute on the exported (float32) folder, and the
    # best checkpoint is chosen on the numbers its export will have. The dev sets are ~4,000
    # sentences, a small cost next to training in either dtype.
    eval_dtype: str = "float32"
    # Comma-separated names of evaluators.EVALUATORS (e.g. "sts", "heldout"); None: STS with STS
    # data, else held-out alignment/uniformity with a builtin: corpus (see evaluators.py).
    evaluators: str | None = None
    best_metric: str | None = None  # the metric (higher is better) that selects the best checkpoint; None: STS-B dev
    save_steps: int = 0  # 0: save at every evaluation
    # Latest checkpoints kept besides the best: >= 2, so that when the newest step turns out to be
    # damaged (a truncated file, a disk that filled) the resume falls back to the one before.
    keep_checkpoints: int = 2
    resume_step: int | None = None  # None: the newest step that reads back completely; N: step N
    async_checkpointing: bool = True
    do_export: bool = True
    do_test_eval: bool = True
    log_every: int = 10
    # --- faults (see distributed.py, and RUN_KEYS below)
    # A host silent this long is lost: every other process stops with a message naming it and
    # the last complete checkpoint. Long enough for a pod's transient network stalls.
    host_heartbeat_timeout_s: int = 120
    host_shutdown_timeout_s: int = 300  # how long a finished process waits at exit for the others
    allow_config_change: bool = False  # resume although a key of RUN_KEYS differs from config.json

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)


# Keys that do not change what a run computes (how it is observed, laid out, saved or fed): a
# resumed run may change them freely; the change is noted. Every other key is the run's identity
# (model, data and its order, objective, optimiser and schedule, seed, dtype): changing one on
# resume is refused unless allow_config_change. A new key is identity until listed here.
FREE_KEYS = frozenset({
    "eval_steps", "eval_batch_size", "eval_pooler", "eval_dtype", "sts_dir", "log_every", "save_steps", "keep_checkpoints",
    "evaluators", "best_metric",  # what is measured and kept as best, not what is trained
    "resume_step", "async_checkpointing", "do_export", "do_test_eval", "data_cache_dir", "preemption_check_steps",
    "prefetch_batches", "mesh_data", "mesh_fsdp", "mesh_tensor",  # resharding on resume is a feature
    "grad_cache_chunk_size",  # the same loss and gradients, in chunks (a memory knob)
    "contrastive_impl", "contrastive_block_size",  # the same loss and gradients, computed another way
    "cpu_onednn", "on_nonfinite", "host_heartbeat_timeout_s", "host_shutdown_timeout_s", "allow_config_change",
})


def run_key_changes(recorded: dict, config: TrainConfig) -> tuple[dict, dict]:
    """({identity key: (recorded, now)}, {free key: (recorded, now)}) between a workdir's
    config.json and `config`. Keys the recorded file lacks (added since) count as unchanged."""
    now = dataclasses.asdict(config)
    changed = {k: (recorded[k], v) for k, v in now.items() if k in recorded and recorded[k] != v}
    run = {k: v for k, v in changed.items() if k not in FREE_KEYS}
    return run, {k: v for k, v in changed.items() if k in FREE_KEYS}


def check_resume(recorded: dict, config: TrainConfig, path) -> tuple[dict, dict]:
    """Refuses (ConfigError, one line) a resume whose identity keys differ from `recorded` (the
    workdir's config.json at `path`) unless `allow_config_change`; returns run_key_changes."""
    run, free = run_key_changes(recorded, config)
    if run and not config.allow_config_change:
        listed = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in run.items())
        raise ConfigError(
            f"{path} records another run: {listed}. These keys change the run; to proceed, train in a new "
            f"--workdir, or continue this one with them by adding --set allow_config_change=true "
            f"(recorded in metrics.jsonl)"
        )
    return run, free


def _field_types() -> dict[str, typing.Any]:
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(TrainConfig)}


def parse_value(key: str, text: str):
    """`text` parsed as the declared type of `key` (int, float, bool, str, or X | None)."""
    types_ = _field_types()
    if key not in types_:
        close = difflib.get_close_matches(key, types_, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown config key {key!r}{hint}")
    typ = types_[key]
    options = typing.get_args(typ) if isinstance(typ, types.UnionType) or typing.get_origin(typ) is typing.Union else (typ,)
    if type(None) in options and text.strip().lower() in ("none", "null"):
        return None
    base = next(t for t in options if t is not type(None))
    try:
        if base is bool:
            lowered = text.strip().lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return lowered in ("true", "1", "yes")
        if base is int:
            return int(text)
        if base is float:
            return float(text)
        return text
    except ValueError:
        raise ConfigError(f"{key}: {text!r} is not a valid {base.__name__}") from None


def apply_overrides(config: TrainConfig, overrides: list[str]) -> TrainConfig:
    changes = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not KEY=VALUE")
        changes[key.strip()] = parse_value(key.strip(), value)
    return config.replace(**changes)


def load_config(spec: str, overrides: list[str] = ()) -> TrainConfig:
    """`configs/NAME.py[:variant]` -> TrainConfig, with `--set` overrides applied."""
    path, _, arg = spec.partition(":")
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file {file} not found")
    module_spec = importlib.util.spec_from_file_location(f"simcse_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{file}: defines no get_config(arg)")
    config = module.get_config(arg or None)
    if not isinstance(config, TrainConfig):
        raise ConfigError(f"{file}: get_config returned {type(config).__name__}, not TrainConfig")
    return apply_overrides(config, list(overrides))


def resolve_sts_dir(config: TrainConfig) -> Path | None:
    """--set sts_dir, else $SIMCSE_STS_DIR, else ./data/sts; None when no such folder exists.

    A gs:// folder is checked and copied to this host's cache once (`sts.local_sts_dir`); the
    local copy is returned, so every evaluation of the run reads local files.
    """
    for candidate in (config.sts_dir, os.environ.get("SIMCSE_STS_DIR"), "data/sts"):
        if not candidate:
            continue
        if paths.is_remote(candidate):
            from simcse_jax.sts import local_sts_dir

            try:
                return local_sts_dir(candidate)
            except StsDataError as e:
                raise ConfigError(f"sts_dir: {e}") from None
        path = Path(candidate).expanduser()
        if path.is_dir():
            return path
        if candidate == config.sts_dir:
            raise ConfigError(f"sts_dir: {path} is not a folder")
    return None


# ----------------------------------------------------------------------------- shared rules
# Rules for the keys that the objective and the optimiser take over (train_step.objective_config,
# optim_config): `validate` and ObjectiveConfig / OptimConfig call these same functions, so each
# rule is written once. `prefix` names the section ("objective.") for a config built directly.


def _refuse(key: str, value, why: str):
    raise ConfigError(f"{key}: {why} (got {value!r})")


def check_objective(c, prefix: str = "") -> None:
    """The rules on the objective's keys; `c` has ObjectiveConfig's fields (a TrainConfig does)."""
    check_pooler(c.pooler, f"{prefix}pooler")
    if not c.temperature > 0:
        _refuse(f"{prefix}temperature", c.temperature, "must be positive")
    for key in ("mlm_weight", "grad_cache_chunk_size"):
        value = getattr(c, key)
        if value is not None and value < 0:
            _refuse(prefix + key, value, "must not be negative")
    if c.contrastive_impl not in CONTRASTIVE_IMPLS:
        _refuse(f"{prefix}contrastive_impl", c.contrastive_impl, f"choose one of {', '.join(CONTRASTIVE_IMPLS)}")
    if c.contrastive_block_size < 1:
        _refuse(f"{prefix}contrastive_block_size", c.contrastive_block_size,
                "must be >= 1 (key columns per block of the blockwise/ring loss)")
    if c.gradient_accumulation_steps != 1:
        _refuse(
            prefix + "gradient_accumulation_steps", c.gradient_accumulation_steps,
            "micro-batch accumulation is not equivalent for the contrastive loss: each row's negatives are the "
            "whole batch, so accumulating micro-batch gradients would shrink the in-batch negatives to each "
            "micro-batch and change the contrastive objective; use grad_cache_chunk_size for batches larger "
            "than memory (the exact full-batch gradient)",
        )


def check_optim(c, prefix: str = "") -> None:
    """The rules on the optimiser's keys; `c` has OptimConfig's fields except total_steps."""
    if not c.learning_rate > 0:
        _refuse(f"{prefix}learning_rate", c.learning_rate, "must be positive")
    for key in ("warmup_steps", "weight_decay"):
        if getattr(c, key) < 0:
            _refuse(prefix + key, getattr(c, key), "must not be negative")
    if c.reference_world_size < 1:
        _refuse(f"{prefix}reference_world_size", c.reference_world_size, "must be >= 1")


def grad_cache_chunks(chunk_size: int | None, global_batch: int, data_parallel: int) -> int:
    """How many chunks gradient caching makes of a global batch (1: off); the rule on
    global_batch_size and grad_cache_chunk_size, whoever asks (`validate`, the update step)."""
    if global_batch % data_parallel:
        _refuse("global_batch_size", global_batch, f"must be a multiple of the data-parallel size data*fsdp = {data_parallel}")
    if not chunk_size or chunk_size == global_batch:
        return 1
    if global_batch % chunk_size or chunk_size % data_parallel:
        _refuse(
            "grad_cache_chunk_size", chunk_size,
            f"must divide global_batch_size {global_batch} and be a multiple of the data-parallel size {data_parallel} "
            "(every chunk spans all the data-parallel devices)",
        )
    return global_batch // chunk_size


def validate(config: TrainConfig, *, num_devices: int, check_files: bool = True) -> None:
    """Raises ConfigError naming the first bad key; called before any compilation."""
    c = config

    def bad(key, why):
        raise ConfigError(f"{key}: {why} (got {getattr(c, key)!r})")

    check_objective(c)
    check_optim(c)
    for key in ("log_every", "preemption_check_steps", "prefetch_batches"):
        if getattr(c, key) < 1:
            bad(key, "must be >= 1")
    if c.eval_pooler is not None:
        check_pooler(c.eval_pooler, "eval_pooler")
    for key in ("compute_dtype", "eval_dtype"):
        if getattr(c, key) not in ("float32", "bfloat16", "float16"):
            bad(key, "must be float32, bfloat16 or float16")
    for key in ("global_batch_size", "max_seq_length", "eval_batch_size"):
        if not getattr(c, key) > 0:
            bad(key, "must be positive")
    if c.save_steps < 0:
        bad("save_steps", "must not be negative")
    for key in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
        value = getattr(c, key)
        if value is not None and not 0.0 <= value < 1.0:
            bad(key, "must be in [0, 1)")
    if not 0.0 < c.mlm_probability < 1.0:
        bad("mlm_probability", "must be in (0, 1)")
    if c.max_steps <= 0 and not c.num_epochs > 0:
        bad("num_epochs", "must be positive when max_steps is not set")
    if c.eval_steps <= 0:
        bad("eval_steps", "must be positive")
    if c.keep_checkpoints < 1:
        bad("keep_checkpoints", "must be >= 1 (2 or more keep a step to fall back to when the newest is damaged)")
    if c.resume_step is not None and c.resume_step < 0:
        bad("resume_step", "must be a step number >= 0, or none for the newest complete step")
    for key in ("host_heartbeat_timeout_s", "host_shutdown_timeout_s"):
        if getattr(c, key) < 1:
            bad(key, "must be >= 1 second")
    if c.mlp_init not in ("fresh", "checkpoint"):
        bad("mlp_init", "must be 'fresh' or 'checkpoint'")
    if c.on_nonfinite not in ("stop", "skip"):
        bad("on_nonfinite", "must be 'stop' or 'skip'")
    sizes = {"data": c.mesh_data, "fsdp": c.mesh_fsdp, "tensor": c.mesh_tensor}
    if list(sizes.values()).count(-1) > 1 or any(v == 0 or v < -1 for v in sizes.values()):
        bad("mesh_data", f"mesh sizes {sizes}: each positive, at most one -1")
    fixed = 1
    for v in sizes.values():
        fixed *= v if v > 0 else 1
    if num_devices % fixed:
        bad("mesh_data", f"mesh sizes {sizes} do not fit {num_devices} devices")
    resolved = {k: (num_devices // fixed if v == -1 else v) for k, v in sizes.items()}
    if resolved["data"] * resolved["fsdp"] * resolved["tensor"] != num_devices:
        bad("mesh_data", f"mesh sizes {resolved} use {resolved['data'] * resolved['fsdp'] * resolved['tensor']} of {num_devices} devices")
    grad_cache_chunks(c.grad_cache_chunk_size, c.global_batch_size, resolved["data"] * resolved["fsdp"])
    if check_files and paths.is_remote(c.train_file):
        try:  # a missing bucket or object, no credentials, an unreachable endpoint: one line naming the URL
            paths.check_readable(c.train_file)
        except paths.PathError as e:
            raise ConfigError(f"train_file: {e}") from None
    elif check_files:
        looks_local = c.train_file.endswith((".txt", ".csv", ".tsv", ".json", ".jsonl")) or os.sep in c.train_file
        if looks_local and not Path(c.train_file).expanduser().exists():
            bad("train_file", "no such file")
