"""Checkpoints: every save and restore of model and train state goes through this module.

An orbax `CheckpointManager` directory of named items per step. `manager` is the one factory
(retention, async saves); `restore` is the one routine that reads items into given shardings
(the current mesh, whatever mesh wrote them), used by the trainer's resume
(`restore_train_state`), its best-model restore (`restore_params`) and `load_checkpoint`
(export, eval). `restore_newest` is the trainer's resume: the newest step that reads back
completely, reporting (and moving aside) the damaged ones; a save that fails (a full disk)
raises `CheckpointWriteError` naming the folder and the OS error.

Layout of `<dir>/`:
- `<step>/params`: the encoder's parameters, `nnx.to_pure_dict(nnx.state(model, nnx.Param))`;
- `<step>/meta`: JSON with `hf_config` (config.json of the model, for export), `encoder_config`
  (`dataclasses.asdict(EncoderConfig)`), `pooler`, `mlp_only_train`, `step`, `train_config`;
- `<step>/<other>`: whatever the trainer adds (`opt_state`, `data_state`, `rng`), each a pytree
  saved with `StandardSave` (or JSON for names in `JSON_ITEMS`);
- `tokenizer/`: the tokenizer files (`save_pretrained`), shared by all steps.

Items are passed as a plain dict {name: value}; `save_args` / `restore_args` turn such a dict into
orbax's Composite args, so adding an item is one more dict entry. Restoring rebuilds the encoder
from `meta.encoder_config` with `nnx.eval_shape` (no random init) and reads the arrays straight
into their final shardings when a mesh is given.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from simcse_jax import paths
from simcse_jax.encoder import Encoder, EncoderConfig
from simcse_jax.errors import CheckpointError, CheckpointWriteError
from simcse_jax.poolers import eval_pooler

TOKENIZER_SUBDIR = "tokenizer"
JSON_ITEMS = frozenset({"meta", "data_state"})
META_KEYS = ("hf_config", "encoder_config", "pooler", "mlp_only_train", "step")
DAMAGED_SUBDIR = "damaged"  # beside latest/ and best/: damaged steps are moved here, never deleted


@dataclasses.dataclass
class LoadedCheckpoint:
    model: Encoder
    meta: dict[str, Any]
    step: int
    directory: Path
    extra: dict[str, Any]  # restored trainer items (opt_state, ...) when asked for

    @property
    def tokenizer_dir(self) -> Path:
        return self.directory / TOKENIZER_SUBDIR

    @property
    def eval_pooler(self) -> str:
        return eval_pooler(self.meta.get("pooler", "cls"), bool(self.meta.get("mlp_only_train")))


def make_meta(
    model: Encoder,
    *,
    hf_config: Mapping[str, Any],
    pooler: str,
    mlp_only_train: bool = False,
    step: int = 0,
    train_config: Mapping[str, Any] | None = None,
    **extra,
) -> dict[str, Any]:
    return {
        "hf_config": dict(hf_config),
        "encoder_config": dataclasses.asdict(model.config),
        "pooler": pooler,
        "mlp_only_train": bool(mlp_only_train),
        "step": int(step),
        "train_config": dict(train_config or {}),
        **extra,
    }


def params_item(model: Encoder) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def save_args(items: Mapping[str, Any]) -> ocp.args.Composite:
    """{name: value} -> Composite of JsonSave (names in JSON_ITEMS) / StandardSave (pytrees)."""
    def one(k, v):
        if k in JSON_ITEMS:
            return ocp.args.JsonSave(v)
        # StandardSave takes containers only; a lone array (e.g. the trainer's rng key) is an ArraySave.
        return ocp.args.ArraySave(v) if _is_array(v) else ocp.args.StandardSave(v)

    return ocp.args.Composite(**{k: one(k, v) for k, v in items.items()})


def restore_args(abstract_items: Mapping[str, Any]) -> ocp.args.Composite:
    """{name: abstract pytree (ShapeDtypeStruct leaves, shardings set) or None for JSON} -> Composite."""
    def one(k, v):
        if k in JSON_ITEMS:
            return ocp.args.JsonRestore()
        if isinstance(v, jax.ShapeDtypeStruct):
            sharding = v.sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
            return ocp.args.ArrayRestore(restore_args=ocp.ArrayRestoreArgs(sharding=sharding, global_shape=v.shape, dtype=v.dtype))
        return ocp.args.StandardRestore(v)

    return ocp.args.Composite(**{k: one(k, v) for k, v in abstract_items.items()})


def _is_array(v) -> bool:
    return isinstance(v, (jax.Array, np.ndarray, jax.ShapeDtypeStruct))


def manager(directory, *, max_to_keep: int | None = None, async_save: bool = False, create: bool = True) -> ocp.CheckpointManager:
    """The one CheckpointManager factory: `max_to_keep` newest steps (None: all), async saves.

    A gs:// folder works as a local one: orbax writes each step in place there and marks it
    complete with `commit_success.txt`; a step without it is invisible to `all_steps()` and
    `latest_step()`, so a resume never loads a half-written step.
    """
    directory = _dir(directory)
    opts = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create, enable_async_checkpointing=async_save)
    return ocp.CheckpointManager(directory, options=opts)


def with_shardings(abstract, shardings):
    """Abstract arrays (shape, dtype) carrying the shardings to restore into, leaf by leaf."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def restore(mngr: ocp.CheckpointManager, step: int, abstract_items: Mapping[str, Any]) -> dict[str, Any]:
    """Reads `abstract_items` ({name: abstract pytree with shardings, or None for JSON}) of `step`.

    The arrays land directly in the given shardings: a checkpoint written on another mesh or
    device count is resharded on read. Errors name the step folder.
    """
    try:
        return dict(mngr.restore(step, args=restore_args(abstract_items)))
    except Exception as e:  # orbax/tensorstore raise many types; the user needs the folder
        raise CheckpointError(f"{paths.as_path(mngr.directory) / str(step)}: cannot restore ({root_cause(e)})") from e


def root_cause(e: BaseException, limit: int = 400) -> str:
    """The innermost error's message, on one line: tensorstore's names the file and the byte range,
    the wrappers above it repeat a page of spec."""
    while (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit] + " ..."


@dataclasses.dataclass
class DamagedStep:
    step: int
    reason: str  # names the file (or item folder) and what is wrong with it
    moved_to: Path | None = None


def restore_newest(
    mngr: ocp.CheckpointManager,
    read: Callable[[int], Any],
    *,
    step: int | None = None,
    agree: Callable[[bool], bool] = lambda ok: ok,
    is_lead: bool = True,
    barrier: Callable[[], None] = lambda: None,
) -> tuple[int | None, Any, list[DamagedStep]]:
    """(step, read(step), damaged steps) for the newest step that `read` reads back completely.

    `read(step)` restores every item of a step (raising CheckpointError when one cannot be
    read: a missing or truncated array file, unreadable metadata). Newer steps that fail are
    damaged: the lead moves them to `<dir>/../damaged/<step>-<time>` (kept for inspection, and out
    of the way of the steps the resumed run saves again). `step` asks for one step explicitly (no
    fallback). (None, None, []) when the folder holds no step: a fresh start. Nothing readable
    over existing steps is a CheckpointError, never a silent start from scratch.

    Multi-host: `agree(ok)` must return True on every host only when it is True on all (each
    host reads its own shards, so one host can fail alone); `barrier()` waits for every host
    after the lead moved the damaged steps.
    """
    directory = paths.as_path(mngr.directory)
    steps = sorted(mngr.all_steps(), reverse=True)
    if step is not None:
        if step not in steps:
            raise CheckpointError(f"{directory}: no step {step} to resume from (resume_step); available: {sorted(steps)}")
        steps = [step]
    damaged: list[DamagedStep] = []
    for s in steps:
        try:
            value, error = read(s), None
        except CheckpointError as e:
            value, error = None, e
        if agree(error is None):
            _quarantine(mngr, damaged, is_lead, barrier)
            return s, value, damaged
        damaged.append(DamagedStep(s, _damage(error) if error is not None else "unreadable on another host"))
    if not steps:
        return None, None, []
    listed = "; ".join(f"step {d.step}: {d.reason}" for d in damaged)
    if step is not None:
        raise CheckpointError(f"{directory / str(step)}: resume_step={step} does not read back completely ({listed})")
    raise CheckpointError(
        f"{directory}: no checkpoint step reads back completely ({listed}); not starting over from the pretrained "
        f"model over an existing run: repair or move {directory} away, or train in a new --workdir"
    )


def _damage(error: CheckpointError) -> str:
    """What is wrong, naming the file: tensorstore names the database folder and the byte range of
    a truncated value but not the data file, so the file of that (too small) size is looked up."""
    text = root_cause(error)
    m = re.search(r'OCDBT database at local file "([^"]+)".*not valid for value of size (\d+)', text)
    if m:
        folder, size = Path(m.group(1)), int(m.group(2))
        short = [p for p in folder.rglob("*") if p.is_file() and p.stat().st_size == size]
        if len(short) == 1:
            text = f"{short[0]}: truncated to {size} bytes ({text})"
    return text


def _quarantine(mngr, damaged: list[DamagedStep], is_lead: bool, barrier) -> None:
    if not damaged:
        return
    directory = paths.as_path(mngr.directory)
    target = directory.parent / DAMAGED_SUBDIR
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for d in damaged:
        d.moved_to = target / f"{directory.name}-{d.step}-{stamp}"
        if is_lead:
            paths.move(directory / str(d.step), d.moved_to)
    barrier()
    mngr.reload()


def complete_steps(directory) -> list[int]:
    """The steps of a manager folder that orbax finished, without opening them; [] when there is
    no folder. Locally orbax renames a step folder to its number only once every host's part is
    written; on gs:// it writes in place and marks a finished step with `commit_success.txt`."""
    if paths.is_remote(directory):
        try:
            files = paths.list_files(directory)
        except paths.PathError:
            return []
        return sorted(int(f.split("/")[0]) for f in files if f.count("/") == 1 and f.endswith("/commit_success.txt")
                      and f.split("/")[0].isdigit())
    d = Path(directory)
    return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit()) if d.is_dir() else []


def finish_saves(mngr: ocp.CheckpointManager) -> None:
    """Waits for the in-flight async save; a failed one raises CheckpointWriteError."""
    with _writing(mngr, mngr.latest_step()):
        mngr.wait_until_finished()


class _writing:
    """Turns a failed (async) save into CheckpointWriteError naming the folder and the OS error.

    orbax reports an async save's failure at the next save or wait; the previous complete step
    is untouched (a step becomes visible only once complete)."""

    def __init__(self, mngr, step):
        self.mngr, self.step = mngr, step

    def __enter__(self):
        return self

    def __exit__(self, typ, e, tb):
        if e is None or not isinstance(e, Exception) or isinstance(e, CheckpointWriteError):
            return False
        os_error = _os_error(e)
        kept = _previous_complete(self.mngr)
        raise CheckpointWriteError(
            f"{paths.as_path(self.mngr.directory)}: writing a checkpoint failed ({os_error or root_cause(e)}); the run stopped. "
            f"{'The last complete step is ' + str(kept) if kept is not None else 'No complete step was written'}; "
            f"free space (or fix the folder) and rerun the same command to resume"
        ) from e


def _os_error(e: BaseException) -> str | None:
    seen = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno:
            return f"[Errno {seen.errno}] {seen.strerror}" + (f": {seen.filename}" if seen.filename else "")
        seen = seen.__cause__ or seen.__context__
    # tensorstore: 'Failed writing: "<file>": Failed to write N bytes ...: No space left on device [os_error_code='28']'
    text = root_cause(e, limit=10_000)
    code = re.search(r"os_error_code='(\d+)'", text)
    if code is None:
        return None
    file = re.search(r'Failed writing: "([^"]+)"', text)
    return f"[Errno {code.group(1)}] {os.strerror(int(code.group(1)))}" + (f": {file.group(1)}" if file else "")


def _previous_complete(mngr) -> int | None:
    try:
        mngr.reload()
        return mngr.latest_step()
    except Exception:  # noqa: BLE001 - only for the message
        return None


# ----------------------------------------------------------------------------- the trainer's items


def _opt_leaves(opt_state) -> dict:
    # Saved as a flat {index: array} dict: orbax then needs no knowledge of optax's NamedTuples,
    # and restoring into the current optimizer's tree checks the count and shapes.
    return {str(i): x for i, x in enumerate(jax.tree.leaves(opt_state))}


def save_train_state(mngr: ocp.CheckpointManager, step: int, state, meta: Mapping[str, Any], data_state: Mapping[str, Any]) -> None:
    """Issues the (possibly async) save of a `train_step.TrainState` with its meta and data position.

    Raises CheckpointWriteError when this save, or the previous async one, cannot be written."""
    with _writing(mngr, step):
        mngr.save(step, args=save_args({
            "params": nnx.to_pure_dict(state.params),
            "opt_state": _opt_leaves(state.opt_state),
            "meta": {**meta, "step": int(step)},
            "data_state": dict(data_state),
        }))


def restore_train_state(mngr: ocp.CheckpointManager, step: int, abstract_state, shardings):
    """(TrainState, meta, data_state) of `step`, placed in `shardings` (a TrainState of shardings)."""
    from simcse_jax.train_step import TrainState

    opt_leaves, opt_def = jax.tree.flatten(abstract_state.opt_state)
    abstract_opt = _opt_leaves(with_shardings(opt_leaves, jax.tree.leaves(shardings.opt_state)))
    restored = restore(mngr, step, {
        "params": with_shardings(nnx.to_pure_dict(abstract_state.params), nnx.to_pure_dict(shardings.params)),
        "opt_state": abstract_opt, "meta": None, "data_state": None,
    })
    for name in ("meta", "data_state"):
        if not isinstance(restored.get(name), dict):
            raise CheckpointError(f"{paths.as_path(mngr.directory) / str(step) / name}: missing or unreadable")
    params = _params_state(abstract_state.params, restored["params"])
    opt_state = jax.tree.unflatten(opt_def, [restored["opt_state"][str(i)] for i in range(len(opt_leaves))])
    step_array = jax.device_put(np.asarray(step, np.int32), shardings.step)
    return TrainState(step=step_array, params=params, opt_state=opt_state), restored["meta"], restored["data_state"]


def save_params(mngr: ocp.CheckpointManager, step: int, params: nnx.State, meta: Mapping[str, Any]) -> None:
    """Saves parameters + meta only (the best-model checkpoint; what export and eval read)."""
    with _writing(mngr, step):
        mngr.save(step, args=save_args({"params": nnx.to_pure_dict(params), "meta": {**meta, "step": int(step)}}))


def restore_params(mngr: ocp.CheckpointManager, step: int, abstract_params: nnx.State, shardings: nnx.State) -> nnx.State:
    """The parameters (an nnx.State like `abstract_params`) of `step`, placed in `shardings`."""
    restored = restore(mngr, step, {
        "params": with_shardings(nnx.to_pure_dict(abstract_params), nnx.to_pure_dict(shardings)), "meta": None})
    return _params_state(abstract_params, restored["params"])


def _params_state(abstract_params: nnx.State, pure: dict) -> nnx.State:
    params = jax.tree.map(lambda x: x, abstract_params)  # a fresh State to fill
    nnx.replace_by_pure_dict(params, pure)
    return params


def _dir(directory):
    """A local checkpoint folder made absolute; a gs:// one as its epath (orbax reads both)."""
    d = paths.as_path(directory)
    return d if paths.is_remote(d) else d.expanduser().absolute()


def save_tokenizer(directory, tokenizer) -> None:
    """The tokenizer files beside the steps (once): each checkpoint folder is self-contained.

    On gs:// they are written locally, then uploaded (`save_pretrained` needs a disk)."""
    import tempfile

    folder = paths.as_path(directory) / TOKENIZER_SUBDIR
    if paths.is_remote(folder):
        if (folder / "tokenizer_config.json").is_file():
            return
        with tempfile.TemporaryDirectory(prefix="simcse_tokenizer_") as tmp:
            tokenizer.save_pretrained(tmp)
            paths.upload_folder(tmp, folder)
    elif not folder.is_dir():
        tokenizer.save_pretrained(str(folder))


def save_checkpoint(
    directory,
    step: int,
    model: Encoder,
    *,
    hf_config: Mapping[str, Any],
    pooler: str,
    mlp_only_train: bool = False,
    train_config: Mapping[str, Any] | None = None,
    tokenizer=None,
    extra_items: Mapping[str, Any] | None = None,
    mngr: ocp.CheckpointManager | None = None,
    wait: bool = True,
) -> Path:
    """Saves `params` + `meta` (+ `extra_items`) at `step`, and the tokenizer once.

    Pass the trainer's long-lived `mngr` to keep its retention policy and async saves; without one a
    manager is made and closed here.
    """
    own = mngr is None
    mngr = mngr or manager(directory)
    meta = make_meta(model, hf_config=hf_config, pooler=pooler, mlp_only_train=mlp_only_train, step=step, train_config=train_config)
    items = {"params": params_item(model), "meta": meta, **(extra_items or {})}
    mngr.save(step, args=save_args(items))
    if wait or own:
        mngr.wait_until_finished()
    if own:
        mngr.close()
    if tokenizer is not None:
        save_tokenizer(directory, tokenizer)
    return paths.as_path(directory)


def is_checkpoint_dir(directory) -> bool:
    d = paths.as_path(directory)
    return d.is_dir() and any(p.is_dir() and p.name.isdigit() and (p / "meta").exists() for p in d.iterdir())


def _check_dir(directory) -> Path:
    if paths.is_remote(directory):
        try:
            paths.check_readable(directory, kind="folder")
        except paths.PathError as e:
            raise CheckpointError(f"checkpoint directory {e}") from None
    d = _dir(directory)
    if not d.is_dir():
        raise CheckpointError(f"checkpoint directory {d} does not exist")
    if not is_checkpoint_dir(d):
        hint = " (it holds a Hugging Face config.json: use `simcse-jax import` first)" if (d / "config.json").is_file() else ""
        raise CheckpointError(
            f"{d} is not a simcse-jax checkpoint: expected step folders <step>/params and <step>/meta "
            f"written by orbax{hint}"
        )
    return d


def _pick_step(mngr: ocp.CheckpointManager, d: Path, step: int | None) -> int:
    steps = mngr.all_steps()
    if not steps:
        raise CheckpointError(f"{d}: no finished checkpoint step (an interrupted save leaves none)")
    if step is None:
        return mngr.latest_step()
    if step not in steps:
        raise CheckpointError(f"{d}: no step {step}; available: {sorted(steps)}")
    return step


def load_meta(directory, step: int | None = None) -> dict[str, Any]:
    d = _check_dir(directory)
    with manager(d, create=False) as mngr:
        step = _pick_step(mngr, d, step)
        meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise CheckpointError(f"{d / str(step) / 'meta'}: missing keys {', '.join(missing)}")
    return meta


def abstract_model(cfg: EncoderConfig, mesh: Mesh | None = None):
    """(graphdef, abstract param state, abstract pure dict) without allocating or initialising."""
    model = nnx.eval_shape(lambda: Encoder(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model, nnx.Param)
    if mesh is not None:
        from simcse_jax.sharding import param_shardings

        shardings = nnx.to_pure_dict(param_shardings(state, mesh))
    else:
        single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: single, nnx.to_pure_dict(state))
    return graphdef, state, with_shardings(nnx.to_pure_dict(state), shardings)


def load_checkpoint(
    directory,
    step: int | None = None,
    *,
    mesh: Mesh | None = None,
    compute_dtype: str | None = None,
    extra_items: Mapping[str, Any] | None = None,
) -> LoadedCheckpoint:
    """Rebuilds the encoder of a checkpoint (latest step by default), sharded over `mesh` if given.

    `extra_items` = {name: abstract pytree, or None for JSON items} restores trainer state too.
    """
    d = _check_dir(directory)
    meta = load_meta(d, step)
    enc = dict(meta["encoder_config"])
    if compute_dtype:
        enc["compute_dtype"] = compute_dtype
    try:
        cfg = EncoderConfig(**enc)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{d}: meta.encoder_config is not a valid EncoderConfig ({e})") from e
    graphdef, state, abstract = abstract_model(cfg, mesh)
    with manager(d, create=False) as mngr:
        step = _pick_step(mngr, d, step)
        restored = restore(mngr, step, {"params": abstract, **(extra_items or {})})
    nnx.replace_by_pure_dict(state, restored["params"])
    model = nnx.merge(graphdef, state)
    extra = {k: restored[k] for k in (extra_items or {})}
    return LoadedCheckpoint(model, meta, step, d, extra)
