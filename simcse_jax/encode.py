"""Embedding sentences with a (possibly sharded) encoder: the `encode` command and the JAX
backend of the STS evaluation.

Shapes are kept static for XLA: batches are padded to `batch_size` rows and sequences to a
multiple of `LENGTH_BUCKET` tokens, so a whole corpus compiles a handful of programs. Sentences
are embedded in order of length (less padding) and returned in input order.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from simcse_jax.config import POOLERS, check_pooler
from simcse_jax.encoder import Encoder
from simcse_jax.errors import DataError, UsageError
from simcse_jax.poolers import needs_hidden_states, pool
from simcse_jax.sharding import batch_sharding, data_parallel_size

LENGTH_BUCKET = 16


@partial(jax.jit, static_argnames=("graphdef", "pooler", "apply_mlp", "normalize"))
def embed_batch(graphdef, params, input_ids, attention_mask, token_type_ids, *, pooler, apply_mlp, normalize):
    """Pooled sentence vectors [b, H] float32 for one padded batch (deterministic encoder)."""
    model = nnx.merge(graphdef, params)
    out = model(input_ids, attention_mask, token_type_ids, output_hidden_states=needs_hidden_states(pooler))
    z = pool(pooler, out, attention_mask, model, apply_mlp=apply_mlp)
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
        self.pooler = check_pooler(pooler)
        self.apply_mlp = apply_mlp
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

    def __call__(self, sentences: Sequence[str], *, progress: bool = False, desc: str = "encode") -> np.ndarray:
        ids = tokenize(self.tokenizer, sentences, self.max_length)
        return embed_in_length_order([len(x) for x in ids], self.batch_size, lambda rows: self._embed([ids[i] for i in rows]),
                                     progress=progress, desc=desc)

    def _embed(self, batch: list[list[int]]) -> np.ndarray:
        input_ids, mask = self._pad(batch)
        arrays = (input_ids, mask, np.zeros_like(input_ids))
        if self.mesh is not None:
            arrays = jax.device_put(arrays, batch_sharding(self.mesh))
        with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
            z = embed_batch(
                self.graphdef, self.params, *arrays,
                pooler=self.pooler, apply_mlp=self.apply_mlp, normalize=self.normalize,
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


# ----------------------------------------------------------------------------- CLI


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("encode", help="embed one sentence per line into a float32 .npy")
    p.add_argument("--model", default=None, help="Hugging Face model folder or hub id (default: the installed all-MiniLM-L6-v2)")
    p.add_argument("--pooler", default="avg", choices=POOLERS)
    p.add_argument("--input", required=True, help="text file, one sentence per line")
    p.add_argument("--output", required=True, help="where to write the [n, H] float32 .npy")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--max-length", type=int, default=None, help="truncate to this many tokens (default: the model's limit)")
    p.add_argument("--normalize", action="store_true", help="L2-normalise the embeddings")
    p.add_argument("--no-mlp", action="store_true", help="with --pooler cls: drop the MLP (mlp_only_train models)")
    p.add_argument("--mesh", default="data=-1", help="mesh axes, e.g. data=4,tensor=2 (default: all devices data-parallel)")
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
    from pathlib import Path

    from simcse_jax import paths
    from simcse_jax.hf_io import load_pretrained, load_tokenizer, minilm_dir
    from simcse_jax.sharding import make_mesh, shard_model

    # A gs:// input is read from a local copy; a gs:// output is written locally, then uploaded.
    in_path = paths.local_copy(args.input) if paths.is_remote(args.input) else Path(args.input)
    if paths.is_remote(args.output):
        paths.check_bucket(args.output)
    if not in_path.is_file():
        raise UsageError(f"--input {in_path}: no such file")
    try:
        lines = in_path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        line_no = in_path.read_bytes()[: e.start].count(b"\n") + 1
        raise DataError(f"{in_path}:{line_no}: not valid UTF-8") from None
    model_path = args.model or minilm_dir()
    loaded = load_pretrained(model_path)
    tokenizer = load_tokenizer(loaded.path)
    mesh = make_mesh(parse_mesh_arg(args.mesh))
    model = shard_model(loaded.model, mesh)
    encoder = SentenceEncoder(
        model, tokenizer, pooler=args.pooler, apply_mlp=not args.no_mlp, mesh=mesh,
        batch_size=args.batch_size, max_length=args.max_length, normalize=args.normalize,
    )
    emb = encoder(lines, progress=True)
    if paths.is_remote(args.output):
        with tempfile.TemporaryDirectory(prefix="simcse_encode_") as tmp:
            np.save(Path(tmp) / "emb.npy", emb)
            paths.upload_file(Path(tmp) / "emb.npy", args.output)
    else:
        np.save(args.output, emb)
    print(f"wrote {args.output}: {emb.shape[0]} x {emb.shape[1]} float32 ({args.pooler} pooler, model {loaded.path})", file=sys.stderr)
    return 0
