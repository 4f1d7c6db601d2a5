"""Embedding sentences with a (possibly sharded) encoder: the `encode` command and the JAX
backend of the STS evaluation.

Shapes are kept static for XLA: batches are padded to `batch_size` rows and sequences to a
multiple of `LENGTH_BUCKET` tokens, so a whole corpus compiles a handful of programs. Sentences
are embedded in order of length (less padding) and returned in input order.

`encode_file` (the `encode` command) streams: it counts the lines, then reads, embeds and writes
them `chunk_lines` at a time straight into the `.npy` (header first, rows in input order), so its
memory does not grow with the file. Each chunk goes through the same `SentenceEncoder.__call__`
as the in-memory path (length order within the chunk).

The forward jit keeps XLA's own CPU kernels: with the oneDNN dot options that speed up the update
step (`xla_options.py`), jaxlib 0.10.2 dies compiling it (SIGILL, "partition compile failed", at
every length bucket: oneDNN's fusion of softmax(QK^T) into the dot with V), and a crash cannot
be caught and retried without the options.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from simcse_jax.encoder import Encoder
from simcse_jax.errors import DataError, UsageError
from simcse_jax.poolers import POOLERS, check_pooler, eval_pooler, needs_hidden_states, pool, without_mlp
from simcse_jax.sharding import batch_sharding, data_parallel_size

LENGTH_BUCKET = 16
# Lines read, tokenized and embedded at a time by `encode_file`: large enough that sorting by
# length within a chunk pads as little as sorting the whole corpus (128 batches of 128), small
# enough that the chunk's tokens (Python lists) stay ~100 MB.
CHUNK_LINES = 16384


@functools.partial(jax.jit, static_argnames=("graphdef", "pooler", "normalize"))
def embed_batch(graphdef, params, input_ids, attention_mask, token_type_ids, *, pooler, normalize):
    """Pooled sentence vectors [b, H] float32 for one padded batch (deterministic encoder)."""
    model = nnx.merge(graphdef, params)
    out = model(input_ids, attention_mask, token_type_ids, output_hidden_states=needs_hidden_states(pooler))
    z = pool(pooler, out, attention_mask, model)
    if normalize:
        z = z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
    if not jax.sharding.get_abstract_mesh().empty:
        # Replicated result: every host (multi-host runs) can read all rows of the batch.
        z = jax.lax.with_sharding_constraint(z, jax.sharding.PartitionSpec())
    return z


def tokenize(tokenizer, sentences: Sequence[str], max_length: int | None) -> list[list[int]]:
    enc = tokenizer(
        list(sentences),
        add_special_tokens=True,
        truncation=max_length is not None,
        max_length=max_length,
        padding=False,
        return_attention_mask=False,
        return_token_type_ids=False,
    )
    return enc["input_ids"]


def embed_in_length_order(lengths: Sequence[int], batch_size: int, embed_rows, *, progress: bool = False,
                          desc: str = "encode") -> np.ndarray:
    """`embed_rows(row indices) -> [len(rows), H]` over batches of similar length (less padding);
    the result is [n, H] float32 in input order. Shared by the JAX and torch backends."""
    order = np.argsort(lengths, kind="stable")
    starts = range(0, len(order), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=desc, unit="batch", file=sys.stderr)
    out = None
    for start in starts:
        rows = order[start : start + batch_size]
        z = embed_rows(rows)
        if out is None:
            out = np.zeros((len(order), z.shape[1]), np.float32)
        out[rows] = z
    if out is None:
        raise ValueError("no sentences to encode")
    return out


class SentenceEncoder:
    """Callable: list of sentences -> float32 array [n, H] in input order."""

    def __init__(
        self,
        model: Encoder,
        tokenizer,
        *,
        pooler: str = "cls",
        apply_mlp: bool = True,
        mesh: Mesh | None = None,
        batch_size: int = 128,
        max_length: int | None = None,
        normalize: bool = False,
    ):
        # apply_mlp=False: the pooler without its MLP (an mlp_only_train model's, poolers.without_mlp).
        self.pooler = check_pooler(pooler) if apply_mlp else without_mlp(pooler)
        self.tokenizer = tokenizer
        self.mesh = mesh
        self.normalize = normalize
        dp = data_parallel_size(mesh) if mesh is not None else 1
        # Rows must split evenly over the data-parallel devices.
        self.batch_size = -(-batch_size // dp) * dp
        self.max_length = min(max_length, model.config.max_length) if max_length else model.config.max_length
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else model.config.pad_token_id
        self.set_model(model)

    def set_model(self, model: Encoder):
        """Points the encoder at new parameters (e.g. during training) without recompiling."""
        self.graphdef, self.params = nnx.split(model, nnx.Param)

    def __call__(self, sentences: Sequence[str], *, progress: bool = False, desc: str = "encode", on_rows=None) -> np.ndarray:
        """[n, H] float32 in input order. `on_rows(k)` is told after each batch of k rows."""
        ids = tokenize(self.tokenizer, sentences, self.max_length)

        def embed_rows(rows):
            z = self._embed([ids[i] for i in rows])
            if on_rows is not None:
                on_rows(len(rows))
            return z

        return embed_in_length_order([len(x) for x in ids], self.batch_size, embed_rows, progress=progress, desc=desc)

    def _embed(self, batch: list[list[int]]) -> np.ndarray:
        input_ids, mask = self._pad(batch)
        arrays = (input_ids, mask, np.zeros_like(input_ids))
        if self.mesh is not None:
            arrays = jax.device_put(arrays, batch_sharding(self.mesh))
        with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
            z = embed_batch(
                self.graphdef, self.params, *arrays,
                pooler=self.pooler, normalize=self.normalize,
            )
        return np.asarray(z if z.is_fully_addressable else z.addressable_data(0))[: len(batch)]

    def _pad(self, batch: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        longest = max(len(x) for x in batch)
        length = min(-(-longest // LENGTH_BUCKET) * LENGTH_BUCKET, max(self.max_length, longest))
        input_ids = np.full((self.batch_size, length), self.pad_id, np.int32)
        mask = np.zeros((self.batch_size, length), np.int32)
        for r, x in enumerate(batch):
            input_ids[r, : len(x)] = x
            mask[r, : len(x)] = 1
        mask[len(batch):, 0] = 1  # filler rows attend to one token so they stay finite
        return input_ids, mask


# ----------------------------------------------------------------------------- streaming files


def count_lines(path: Path) -> int:
    """Lines as `read_line_chunks` yields them (a last line without a newline counts), read in blocks."""
    n, last = 0, b"\n"
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            n += block.count(b"\n")
            last = block[-1:]
    return n + (last != b"\n")


def read_line_chunks(path: Path, chunk_lines: int) -> Iterator[list[str]]:
    """The file's lines (split on \\n, a trailing \\r dropped) `chunk_lines` at a time; a line that
    is not UTF-8 raises ValueError naming `path:line`."""
    chunk = []
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                chunk.append(raw.decode("utf-8").removesuffix("\n").removesuffix("\r"))
            except UnicodeDecodeError:
                raise ValueError(f"{path}:{line_no}: not valid UTF-8") from None
            if len(chunk) == chunk_lines:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


def npy_path(output: str | Path) -> Path:
    """Where `np.save(output, ...)` would write (it appends .npy when missing)."""
    out = Path(output)
    return out if out.suffix == ".npy" else out.with_name(out.name + ".npy")


def encode_file(encoder: SentenceEncoder, in_path: str | Path, output: str | Path, *, chunk_lines: int = CHUNK_LINES,
                progress: bool = False) -> tuple[Path, tuple[int, int]]:
    """Embeds every line of `in_path` into the float32 `.npy` `output`, streaming: memory stays
    flat in the number of lines. Written to `<output>.partial` and renamed when complete, so an
    interrupted run never leaves a truncated array under the final name. Returns (path, shape)."""
    in_path, out = Path(in_path), npy_path(output)
    n = count_lines(in_path)
    if n == 0:
        raise ValueError(f"{in_path}: no lines to encode")
    partial = out.with_name(out.name + ".partial")
    bar = None
    if progress:  # sentences/s and the ETA of the whole file
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc="encode", unit="sent", file=sys.stderr, smoothing=0.05)
    written, width = 0, None
    try:
        with open(partial, "wb") as f:
            for chunk in read_line_chunks(in_path, chunk_lines):
                z = encoder(chunk, on_rows=bar.update if bar is not None else None)
                if width is None:
                    width = z.shape[1]
                    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
                              "shape": (n, width)}
                    np.lib.format.write_array_header_1_0(f, header)
                np.ascontiguousarray(z, dtype=np.float32).tofile(f)
                written += len(chunk)
        if written != n:
            raise ValueError(f"{in_path} changed while encoding: counted {n} lines, read {written}")
        os.replace(partial, out)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    return out, (n, width)


# ----------------------------------------------------------------------------- CLI


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("encode", help="embed one sentence per line into a float32 .npy")
    p.add_argument("--model", default="builtin:minilm",
                   help="Hugging Face model folder, gs:// folder, hub id or builtin:minilm (default: the installed all-MiniLM-L6-v2)")
    p.add_argument("--pooler", default="avg", choices=POOLERS)
    p.add_argument("--input", required=True, help="text file, one sentence per line")
    p.add_argument("--output", required=True, help="where to write the [n, H] float32 .npy")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--max-length", type=int, default=None, help="truncate to this many tokens (default: the model's limit)")
    p.add_argument("--normalize", action="store_true", help="L2-normalise the embeddings")
    p.add_argument("--no-mlp", action="store_true", help="with --pooler cls: drop the MLP (mlp_only_train models)")
    p.add_argument("--mesh", default="data=-1", help="mesh axes, e.g. data=4,tensor=2 (default: all devices data-parallel)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="compute dtype: bfloat16 for GPUs/TPUs (slower on CPUs without bf16 units); the .npy is float32")
    p.add_argument("--chunk-lines", type=int, default=CHUNK_LINES, help="lines read and embedded at a time (memory)")
    p.set_defaults(func=run)


def parse_mesh_arg(text: str) -> dict[str, int]:
    axes = {}
    for part in filter(None, text.split(",")):
        name, _, size = part.partition("=")
        try:
            axes[name.strip()] = int(size)
        except ValueError:
            raise UsageError(f"--mesh: {part!r} is not NAME=SIZE") from None
    return axes


def run(args: argparse.Namespace) -> int:
    import tempfile

    from simcse_jax import paths
    from simcse_jax.hf_io import load_pretrained, load_tokenizer
    from simcse_jax.malloc_tuning import keep_freed_memory
    from simcse_jax.sharding import make_mesh, shard_model

    keep_freed_memory()  # before the first large buffer
    # A gs:// input is read from a local copy; a gs:// output is written locally, then uploaded.
    in_path = paths.local_copy(args.input) if paths.is_remote(args.input) else Path(args.input)
    if paths.is_remote(args.output):
        paths.check_bucket(args.output)
    if not in_path.is_file():
        raise UsageError(f"--input {in_path}: no such file")
    if args.chunk_lines < 1:
        raise UsageError(f"--chunk-lines must be >= 1, got {args.chunk_lines}")
    # --no-mlp: the model was trained with mlp_only_train (cls -> cls_before_pooler).
    pooler = eval_pooler(args.pooler, mlp_only_train=args.no_mlp)
    loaded = load_pretrained(args.model, compute_dtype=args.dtype)  # hf_io.resolve_model_dir: every kind of name
    tokenizer = load_tokenizer(loaded.path)
    mesh = make_mesh(parse_mesh_arg(args.mesh))
    model = shard_model(loaded.model, mesh)
    encoder = SentenceEncoder(
        model, tokenizer, pooler=pooler, mesh=mesh, batch_size=args.batch_size,
        max_length=args.max_length, normalize=args.normalize,
    )
    try:
        if paths.is_remote(args.output):
            with tempfile.TemporaryDirectory(prefix="simcse_encode_") as tmp:
                local, shape = encode_file(encoder, in_path, Path(tmp) / "emb.npy", chunk_lines=args.chunk_lines, progress=True)
                paths.upload_file(local, args.output)
            out = args.output
        else:
            out, shape = encode_file(encoder, in_path, args.output, chunk_lines=args.chunk_lines, progress=True)
    except ValueError as e:
        raise DataError(str(e)) from None
    print(f"wrote {out}: {shape[0]} x {shape[1]} float32 ({pooler} pooler, {args.dtype} compute, model {loaded.path})",
          file=sys.stderr)
    return 0
