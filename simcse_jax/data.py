"""Training input: tokenize once (cached), then deterministic, per-host, resumable global batches.

Pipeline: `read_examples` (data_readers.py, reference semantics) -> `tokenize_examples` (the fast
tokenizer in chunks, `max_length=max_seq_length, truncation=True` as the reference) ->
`TokenizedDataset` (int32 ids [N, C, L] padded with the tokenizer's pad id, kept as .npy files in a
cache keyed by file + tokenizer + max length, memory-mapped on reuse) -> `DataIterator`.

Every sequence is padded to `max_seq_length`, so all batches share one shape [G, num_sent, L] and
the train step compiles once. (With SimCSE's L = 32 most Wikipedia sentences fill the window
anyway, so length buckets would save little and cost extra compiles.)

Order: epoch e visits `default_rng([seed, e]).permutation(N)`; global batch b of epoch e is
`perm[b*G:(b+1)*G]`, and the last partial batch is dropped (every contrastive batch is full).
Host p of P holds rows [p*G/P, (p+1)*G/P) of each global batch, so the global batch does not
depend on the host count. The iterator's position is the small dict `state()`, saved by the
trainer in its checkpoint (`data_state`) and given back to `restore`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from simcse_jax import paths
from simcse_jax.data_readers import RawExamples, file_fingerprint, read_examples
from simcse_jax.errors import DataError
from simcse_jax.masking import mask_tokens

log = logging.getLogger(__name__)

DEFAULT_MAX_SEQ_LENGTH = 32
TOKENIZE_CHUNK = 8192  # sentences per tokenizer call: large enough for the Rust batch path
CACHE_VERSION = 1
_MLM_STREAM = 0x4D4C4D  # separates the MLM masking stream from the shuffling stream


# ----------------------------------------------------------------------------- tokenized data


@dataclasses.dataclass
class TokenizedDataset:
    """Token ids of every example: `input_ids[i, c, :lengths[i, c]]` is sentence c of example i.

    C = 1 for unsupervised data (the sentence is used twice when batched), 2 for pairs, 3 for
    triples. Arrays may be memory-mapped from the cache. `lines[i]` is the source line (or row).
    """

    source: str
    kind: str
    input_ids: np.ndarray  # int32 [N, C, L], padded with pad_token_id
    lengths: np.ndarray  # int32 [N, C], special tokens included
    token_type_ids: np.ndarray | None  # int8 [N, C, L]; None where the tokenizer gives all zeros
    lines: np.ndarray  # int64 [N]
    pad_token_id: int
    special_ids: tuple[int, ...]  # tokenizer.all_special_ids (never MLM-masked)
    mask_token_id: int | None
    vocab_size: int  # len(tokenizer): the range of MLM's random replacement tokens
    warnings: tuple[str, ...] = ()

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def max_seq_length(self) -> int:
        return self.input_ids.shape[2]

    @property
    def num_sent(self) -> int:
        """Sentences per example in a batch: unsupervised rows are duplicated (two dropout views)."""
        return 2 if self.kind == "unsup" else self.input_ids.shape[1]

    def take(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Rows `indices` as int32 arrays [n, num_sent, L] (the train-batch contract)."""
        indices = np.asarray(indices)
        ids = np.asarray(self.input_ids[indices], dtype=np.int32)
        lengths = np.asarray(self.lengths[indices])
        types = (
            np.zeros_like(ids) if self.token_type_ids is None else np.asarray(self.token_type_ids[indices], dtype=np.int32)
        )
        if self.kind == "unsup":  # the reference's collator: features [s, s]
            ids, lengths, types = (np.repeat(a, 2, axis=1) for a in (ids, lengths, types))
        mask = (np.arange(ids.shape[-1], dtype=np.int32) < lengths[..., None]).astype(np.int32)
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the full fast-tokenizer definition (vocab, normalizer, special tokens)."""
    _require_fast(tokenizer)
    h = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode())
    h.update(json.dumps([type(tokenizer).__name__, tokenizer.pad_token_id, tokenizer.all_special_ids]).encode())
    return h.hexdigest()


def _require_fast(tokenizer) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(f"the data pipeline needs a fast (Rust) tokenizer; got {type(tokenizer).__name__}")
    if tokenizer.pad_token_id is None:
        raise DataError(f"tokenizer {tokenizer.name_or_path!r} has no pad token; set tokenizer.pad_token first")


def tokenize_examples(
    raw: RawExamples, tokenizer, *, max_seq_length: int = DEFAULT_MAX_SEQ_LENGTH, progress: bool = True
) -> TokenizedDataset:
    """Tokenizes every sentence as the reference: `tokenizer(s, max_length=L, truncation=True)`."""
    from tqdm.auto import tqdm

    _require_fast(tokenizer)
    if max_seq_length < tokenizer.num_special_tokens_to_add(pair=False) + 1:
        raise DataError(f"max_seq_length={max_seq_length} leaves no room for text between the special tokens")
    n, c, L = len(raw), len(raw.columns), max_seq_length
    ids = np.full((n, c, L), tokenizer.pad_token_id, dtype=np.int32)
    lengths = np.zeros((n, c), dtype=np.int32)
    types = np.zeros((n, c, L), dtype=np.int8)
    bar = tqdm(total=n * c, unit="sent", desc=f"tokenizing {Path(raw.source).name}", disable=not progress)
    for col, sentences in enumerate(raw.columns):
        for start in range(0, n, TOKENIZE_CHUNK):
            chunk = sentences[start : start + TOKENIZE_CHUNK]
            enc = tokenizer(chunk, max_length=L, truncation=True, padding=False, return_attention_mask=False)
            _fill(enc["input_ids"], ids[start : start + len(chunk), col], lengths[start : start + len(chunk), col])
            if "token_type_ids" in enc:
                _fill(enc["token_type_ids"], types[start : start + len(chunk), col], None)
            bar.update(len(chunk))
    bar.close()
    data = TokenizedDataset(
        source=raw.source,
        kind=raw.kind,
        input_ids=ids,
        lengths=lengths,
        token_type_ids=types if types.any() else None,
        lines=raw.lines,
        pad_token_id=int(tokenizer.pad_token_id),
        special_ids=tuple(int(i) for i in tokenizer.all_special_ids),
        mask_token_id=None if tokenizer.mask_token_id is None else int(tokenizer.mask_token_id),
        vocab_size=len(tokenizer),
        warnings=tuple(raw.warnings),
    )
    return _check_token_content(data, tokenizer.num_special_tokens_to_add(pair=False), raw.line_label)


def _fill(rows: list[list[int]], out: np.ndarray, lengths: np.ndarray | None) -> None:
    """Ragged lists -> the left part of `out` [n, L] (vectorised: the flat ids fill the mask)."""
    lens = np.fromiter(map(len, rows), dtype=np.int32, count=len(rows))
    flat = np.fromiter(itertools.chain.from_iterable(rows), dtype=out.dtype, count=int(lens.sum()))
    out[np.arange(out.shape[1]) < lens[:, None]] = flat  # row-major order = concatenation order
    if lengths is not None:
        lengths[:] = lens


def _check_token_content(data: TokenizedDataset, n_special: int, line_label: str) -> TokenizedDataset:
    """Sentences that tokenize to special tokens only (e.g. a line of control characters)."""
    empty = data.lengths <= n_special  # [N, C]
    if data.kind == "unsup":
        bad = empty[:, 0]
        if not bad.any():
            return data
        if bad.all():
            raise DataError(f"{data.source}: no sentence has any token")
        keep = np.flatnonzero(~bad)
        first = ", ".join(str(int(x)) for x in data.lines[bad][:5])
        msg = (f"{data.source}: skipped {int(bad.sum())} {line_label}(s) with no tokens besides special ones "
               f"(first at {line_label} {first})")
        log.warning("%s", msg)
        return dataclasses.replace(
            data,
            input_ids=data.input_ids[keep],
            lengths=data.lengths[keep],
            token_type_ids=None if data.token_type_ids is None else data.token_type_ids[keep],
            lines=data.lines[keep],
            warnings=data.warnings + (msg,),
        )
    all_empty = empty.all(axis=1)
    if all_empty.any():
        i = int(np.argmax(all_empty))
        raise DataError(
            f"{data.source}, {line_label} {int(data.lines[i])}: no field has any token besides special ones "
            f"({int(all_empty.sum())} such row(s)); remove them"
        )
    return data


# ----------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    """$SIMCSE_JAX_CACHE/tokenized, else ~/.cache/simcse_jax/tokenized."""
    root = os.environ.get("SIMCSE_JAX_CACHE") or Path.home() / ".cache" / "simcse_jax"
    return Path(root) / "tokenized"


def cache_key(fingerprint: dict, tokenizer, max_seq_length: int) -> str:
    blob = json.dumps(
        {"cache": CACHE_VERSION, "data": fingerprint, "tokenizer": tokenizer_fingerprint(tokenizer), "max_seq_length": max_seq_length},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


_ARRAYS = ("input_ids", "lengths", "lines", "token_type_ids")
_META = ("source", "kind", "pad_token_id", "special_ids", "mask_token_id", "vocab_size", "warnings")


def save_cache(data: TokenizedDataset, directory: Path) -> Path:
    """Writes into a temporary sibling, then renames: readers never see a half-written cache."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        for name in _ARRAYS:
            if getattr(data, name) is not None:
                np.save(tmp / f"{name}.npy", np.ascontiguousarray(getattr(data, name)))
        meta = {k: getattr(data, k) for k in _META} | {"cache_version": CACHE_VERSION}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        os.rename(tmp, directory)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (directory / "meta.json").is_file():  # not a lost race with another host: a real error
            raise
    return directory


def load_cache(directory: Path) -> TokenizedDataset:
    meta = json.loads((directory / "meta.json").read_text())
    arrays = {
        name: np.load(directory / f"{name}.npy", mmap_mode="r") if (directory / f"{name}.npy").is_file() else None
        for name in _ARRAYS
    }
    meta["special_ids"] = tuple(meta["special_ids"])
    meta["warnings"] = tuple(meta["warnings"])
    meta.pop("cache_version")
    return TokenizedDataset(**meta, **arrays)


def load_tokenized(
    source: str | os.PathLike,
    tokenizer,
    *,
    max_seq_length: int = DEFAULT_MAX_SEQ_LENGTH,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    progress: bool = True,
    hf_split: str = "train",
) -> TokenizedDataset:
    """Reads and tokenizes `source`, or memory-maps the cached result of an identical earlier run.

    The cache key covers the file (path, size, mtime; a gs:// object's generation and md5; a HF
    dataset's fingerprint), the whole tokenizer definition, `max_seq_length` and the reader
    version. The cache is on this host's disk even for a gs:// source. Warnings from the first read
    (skipped lines, filled fields) are shown again when the cache is reused.
    """
    path = paths.as_path(source)  # gs:// too: the cache below stays on this host's disk
    raw = None
    fingerprint = file_fingerprint(path)  # a file needs no read: check the cache before parsing
    if fingerprint is None:
        raw = read_examples(source, hf_split=hf_split)
        fingerprint = raw.fingerprint
    directory = None
    if use_cache:
        root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        directory = root / f"{path.stem or 'data'}-{cache_key(fingerprint, tokenizer, max_seq_length)}"
        if (directory / "meta.json").is_file():
            data = load_cache(directory)
            for w in data.warnings:
                log.warning("%s (cached)", w)
            return data
    if raw is None:
        raw = read_examples(source, hf_split=hf_split)
    data = tokenize_examples(raw, tokenizer, max_seq_length=max_seq_length, progress=progress)
    if directory is not None:
        save_cache(data, directory)
        data = load_cache(directory)  # memory-mapped, like every later run
    return data


# ----------------------------------------------------------------------------- order and batches


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The visiting order of epoch `epoch`: a function of (seed, epoch) only."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def host_rows(global_batch_size: int, process_index: int, process_count: int) -> slice:
    """Rows of a global batch that host `process_index` of `process_count` holds."""
    if global_batch_size % process_count:
        raise DataError(f"global_batch_size={global_batch_size} is not divisible by the {process_count} hosts")
    if not 0 <= process_index < process_count:
        raise DataError(f"process_index={process_index} is outside 0..{process_count - 1}")
    per_host = global_batch_size // process_count
    return slice(process_index * per_host, (process_index + 1) * per_host)


def sharded_rows(sharding, global_shape: tuple[int, ...]) -> slice:
    """The contiguous block of rows that this process's devices hold under `sharding`."""
    spans = {(s[0].start or 0, global_shape[0] if s[0].stop is None else s[0].stop)
             for s in sharding.addressable_devices_indices_map(global_shape).values()}
    start, stop = min(a for a, _ in spans), max(b for _, b in spans)
    covered = sum(b - a for a, b in spans)
    if covered != stop - start:
        raise DataError(f"this process's devices hold non-contiguous batch rows {sorted(spans)}; use a mesh whose "
                        f"data axes give each host one block of rows")
    return slice(start, stop)


class DataIterator:
    """Endless global batches over epochs; `state()` / `restore()` make it resumable.

    With a `mesh`, `next()` returns dicts of global `jax.Array`s [G, num_sent, L] whose rows are
    sharded over the data axes (`sharding.batch_sharding(mesh, 3)`), each host contributing its
    rows through `jax.make_array_from_process_local_data`. Without one it returns this host's
    numpy rows (`process_index` / `process_count` default to jax's; pass them to simulate hosts).

    `mlm_probability` adds `mlm_input_ids` / `mlm_labels` (reference 80/10/10 masking of every
    view), drawn from (seed, epoch, batch) on the global batch: the same masks on any host count
    and after a resume.
    """

    def __init__(
        self,
        data: TokenizedDataset,
        global_batch_size: int,
        *,
        seed: int = 42,
        mesh=None,
        mlm_probability: float | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
        state: dict | None = None,
        shuffle: bool = True,
    ):
        if global_batch_size < 1:
            raise DataError(f"global_batch_size must be positive, got {global_batch_size}")
        if len(data) < global_batch_size:
            raise DataError(
                f"{data.source}: {len(data)} examples, fewer than one global batch of {global_batch_size} "
                f"(the last partial batch is dropped, so no step would run); lower global_batch_size or add data"
            )
        if mlm_probability is not None and data.mask_token_id is None:
            raise DataError(f"mlm_probability is set but the tokenizer of {data.source} has no mask token")
        self.data, self.global_batch_size, self.seed = data, int(global_batch_size), int(seed)
        self.shuffle = bool(shuffle)  # False: file order every epoch (parity tests, curricula)
        self.mlm_probability, self.mesh = mlm_probability, mesh
        if mesh is not None:
            if process_index is not None or process_count is not None:
                raise DataError("pass either a mesh (real hosts) or process_index/process_count (simulated), not both")
            from simcse_jax.sharding import batch_sharding, data_parallel_size

            if global_batch_size % data_parallel_size(mesh):
                raise DataError(
                    f"global_batch_size={global_batch_size} is not divisible by the {data_parallel_size(mesh)} "
                    f"data-parallel shards of the mesh {dict(mesh.shape)}"
                )
            self.sharding = batch_sharding(mesh, 3)
            self.shape = (self.global_batch_size, data.num_sent, data.max_seq_length)
            self.rows = sharded_rows(self.sharding, self.shape)
        else:
            import jax

            p = jax.process_index() if process_index is None else process_index
            n = jax.process_count() if process_count is None else process_count
            self.sharding, self.rows = None, host_rows(self.global_batch_size, p, n)
        self.batches_per_epoch = len(data) // self.global_batch_size
        self._perm_epoch, self._perm = None, None
        self.epoch, self.batch = 0, 0
        if state is not None:
            self.restore(state)

    # -- position -----------------------------------------------------------------------------

    def state(self) -> dict:
        """JSON-able position: the next batch to produce is batch `batch` of epoch `epoch`."""
        return {"seed": self.seed, "epoch": self.epoch, "batch": self.batch,
                "num_examples": len(self.data), "global_batch_size": self.global_batch_size}

    def restore(self, state: dict) -> None:
        for key, now in (("num_examples", len(self.data)), ("global_batch_size", self.global_batch_size)):
            if int(state[key]) != now:
                raise DataError(
                    f"data_state: saved for {key}={state[key]}, but now {key}={now} ({self.data.source}); the "
                    f"order would differ -- resume with the same data and global batch size"
                )
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if not (epoch >= 0 and 0 <= batch < self.batches_per_epoch):
            raise DataError(f"data_state: position epoch={epoch} batch={batch} is outside the data")
        # The saved seed wins: a resumed run continues the order it started with.
        self.seed, self.epoch, self.batch = int(state["seed"]), epoch, batch
        self._perm_epoch = None

    # -- batches ------------------------------------------------------------------------------

    def global_indices(self, epoch: int, batch: int) -> np.ndarray:
        """Example indices of global batch `batch` of epoch `epoch`, [G]."""
        if self._perm_epoch != epoch:
            self._perm_epoch = epoch
            self._perm = epoch_permutation(len(self.data), self.seed, epoch) if self.shuffle else np.arange(len(self.data))
        g = self.global_batch_size
        return self._perm[batch * g : (batch + 1) * g]

    def host_batch(self, epoch: int, batch: int, rows: slice | None = None) -> dict[str, np.ndarray]:
        """numpy rows `rows` (default: this host's) of global batch `batch` of epoch `epoch`."""
        rows = self.rows if rows is None else rows
        idx = self.global_indices(epoch, batch)
        out = self.data.take(idx[rows])
        if self.mlm_probability is not None:
            # Masks are drawn for the whole global batch, then sliced: identical for any host split.
            full = self.data.take(idx)["input_ids"] if (rows.start, rows.stop) != (0, len(idx)) else out["input_ids"]
            rng = np.random.default_rng([self.seed, epoch, batch, _MLM_STREAM])
            masked, labels = mask_tokens(
                full, self.data.special_ids, mask_token_id=self.data.mask_token_id,
                vocab_size=self.data.vocab_size, rng=rng, mlm_probability=self.mlm_probability,
            )
            out["mlm_input_ids"], out["mlm_labels"] = masked[rows], labels[rows]
        return out

    def batch_keys(self) -> tuple[str, ...]:
        keys = ("input_ids", "attention_mask", "token_type_ids")
        return keys + (("mlm_input_ids", "mlm_labels") if self.mlm_probability is not None else ())

    def abstract_batch(self) -> dict:
        """The global batch as `jax.ShapeDtypeStruct`s with their shardings (needs a mesh): what
        the update step is compiled for before the first batch exists."""
        import jax

        if self.sharding is None:
            raise DataError("abstract_batch needs the iterator's mesh")
        return {k: jax.ShapeDtypeStruct(self.shape, np.int32, sharding=self.sharding) for k in self.batch_keys()}

    def __iter__(self):
        return self

    def __next__(self):
        local = self.host_batch(self.epoch, self.batch)
        self.batch += 1
        if self.batch == self.batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
        if self.sharding is None:
            return local
        import jax

        return {k: jax.make_array_from_process_local_data(self.sharding, v, self.shape) for k, v in local.items()}


class Prefetch:
    """The next `depth` global batches, assembled and placed on the devices by a background thread.

    The host builds batch s+1 (gather rows, mask, `make_array_from_process_local_data`) while the
    devices run step s, so neither waits for the other. Each item is `(batch, position)` where
    `position` is the iterator's `state()` right after that batch: the trainer saves the position
    of the batches it *consumed*, not of the ones waiting in the queue, so a resume is exact.
    An error in the thread is raised by the `next()` that would have returned its batch.
    """

    def __init__(self, iterator: DataIterator, depth: int = 2):
        import queue
        import threading

        self._iterator = iterator
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, int(depth)))
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._fill, name="simcse-prefetch", daemon=True)
        self._thread.start()

    def _fill(self) -> None:
        import queue

        while not self._closed.is_set():
            try:
                item = (next(self._iterator), self._iterator.state())
            except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
                item = e
            while not self._closed.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return

    def __iter__(self):
        return self

    def __next__(self) -> tuple[dict, dict]:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        """Stops the thread; the batches still queued are dropped (they were never consumed)."""
        self._closed.set()
        self._thread.join(timeout=30)


def make_data_iterator(
    source: str | os.PathLike,
    tokenizer,
    global_batch_size: int,
    *,
    max_seq_length: int = DEFAULT_MAX_SEQ_LENGTH,
    seed: int = 42,
    mesh=None,
    mlm_probability: float | None = None,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    progress: bool = True,
    state: dict | None = None,
    shuffle: bool = True,
) -> DataIterator:
    """`load_tokenized` + `DataIterator`: what the trainer calls."""
    data = load_tokenized(
        source, tokenizer, max_seq_length=max_seq_length, cache_dir=cache_dir, use_cache=use_cache, progress=progress
    )
    return DataIterator(data, global_batch_size, seed=seed, mesh=mesh, mlm_probability=mlm_probability, state=state,
                        shuffle=shuffle)
