"""STS evaluation of a model: the `eval` command (JAX or PyTorch backend). The trainer's
evaluators (dev scores during training, the test table at the end) are in evaluators.py.

Both backends only turn sentences into vectors; scoring is `sts.evaluate` for both, so they can
differ by floating-point noise alone. `jax` runs our encoder (`encode.SentenceEncoder`: batches of
128, the model's length limit, no other truncation) on a checkpoint or a Hugging Face folder;
`torch` runs `transformers.AutoModel` on a Hugging Face folder (e.g. an export) with the same
pooling formulas, batches of 128 padded to their longest sentence.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

import numpy as np

from simcse_jax import paths, sts
from simcse_jax.encode import SentenceEncoder
from simcse_jax.encoder import EncoderConfig
from simcse_jax.errors import CheckpointError, UsageError
from simcse_jax.poolers import POOLERS, check_pooler, needs_hidden_states, torch_pool


class TorchEmbedder:
    """Sentences -> [n, H] float32 through `transformers.AutoModel` (CPU, eval mode, float32)."""

    def __init__(self, folder, *, pooler: str, batch_size: int = 128, max_length: int | None = None):
        from transformers import AutoModel

        from simcse_jax.hf_io import load_tokenizer

        self.pooler = check_pooler(pooler)
        self.tokenizer = load_tokenizer(folder)  # refuses a folder without a real tokenizer
        self.model = AutoModel.from_pretrained(str(folder)).eval().float()
        limit = EncoderConfig.from_hf_dict(self.model.config.to_dict()).max_length
        self.max_length = min(max_length, limit) if max_length else limit
        self.batch_size = batch_size

    def __call__(self, sentences: Sequence[str]) -> np.ndarray:
        import torch

        from simcse_jax.encode import embed_in_length_order

        sentences = list(sentences)
        lengths = [len(x) for x in self.tokenizer(sentences, truncation=True, max_length=self.max_length)["input_ids"]]
        hidden = needs_hidden_states(self.pooler)

        def embed_rows(rows):
            batch = self.tokenizer([sentences[i] for i in rows], padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt")
            outputs = self.model(**batch, output_hidden_states=hidden, return_dict=True)
            return torch_pool(self.pooler, outputs, batch["attention_mask"]).numpy()

        with torch.inference_mode():
            return embed_in_length_order(lengths, self.batch_size, embed_rows)


def jax_embedder(model_path, *, pooler: str | None, batch_size: int = 128, max_length: int | None = None,
                 mesh_axes: dict[str, int] | None = None, dtype: str = "float32"):
    """(SentenceEncoder, pooler) for a simcse-jax checkpoint or a Hugging Face folder, computing in
    `dtype` (float32 by default, also for a checkpoint trained in bfloat16: the numbers of its export)."""
    from simcse_jax.checkpoint import is_checkpoint_dir, load_checkpoint
    from simcse_jax.hf_io import load_pretrained, load_tokenizer
    from simcse_jax.sharding import make_mesh, shard_model

    mesh = make_mesh(mesh_axes or {"data": -1})
    if is_checkpoint_dir(model_path):
        ckpt = load_checkpoint(model_path, mesh=mesh, compute_dtype=dtype)
        model, tokenizer = ckpt.model, load_tokenizer(ckpt.tokenizer_dir, vocab_size=ckpt.model.config.vocab_size)
        pooler = pooler or ckpt.eval_pooler
    else:
        if pooler is None:
            raise UsageError(f"{model_path} is a Hugging Face folder: pass --pooler ({', '.join(POOLERS)})")
        loaded = load_pretrained(model_path, compute_dtype=dtype)
        model, tokenizer = shard_model(loaded.model, mesh), load_tokenizer(loaded.path)
    enc = SentenceEncoder(model, tokenizer, pooler=pooler, mesh=mesh, batch_size=batch_size, max_length=max_length)
    return enc, pooler


def load_tasks(sts_dir, tasks: Sequence[str], split: str, *, all_splits: bool = False, limit: int | None = None):
    sts_dir = sts.local_sts_dir(sts_dir)  # a gs:// folder: fetched (or found in the cache) once, not per task
    return [sts.load_task(sts_dir, t, split, all_splits=all_splits, limit=limit) for t in tasks]


def local_model_dir(model_path):
    """A gs:// Hugging Face folder -> its local cached copy (both backends read local files), a
    `builtin:` name -> its folder (`hf_io.resolve_model_dir`); anything else unchanged (a gs://
    checkpoint is read by orbax where it is)."""
    from simcse_jax.hf_io import BUILTIN_MODEL_PREFIX, resolve_model_dir

    if str(model_path).startswith(BUILTIN_MODEL_PREFIX):
        return resolve_model_dir(model_path)
    if not paths.is_remote(model_path):
        return model_path
    try:
        paths.check_readable(model_path, kind="folder")
    except paths.PathError as e:
        raise CheckpointError(f"model {e}") from None
    if (paths.as_path(model_path) / "config.json").is_file():
        return resolve_model_dir(model_path)
    return model_path


def run_eval(model_path, *, sts_dir, tasks: Sequence[str] | None = None, split: str = "test", backend: str = "jax",
             pooler: str | None = None, batch_size: int = 128, max_length: int | None = None,
             limit: int | None = None, all_splits: bool = False, mesh_axes=None, dtype: str = "float32") -> dict:
    """Everything `simcse-jax eval` computes, as the JSON-ready dict it writes."""
    tasks = list(tasks or (sts.TASKS if split == "test" else sts.DEV_TASKS))
    loaded_tasks = load_tasks(sts_dir, tasks, split, all_splits=all_splits, limit=limit)  # data errors first
    t0 = time.perf_counter()
    model_dir = local_model_dir(model_path)
    if backend == "jax":
        embed, pooler = jax_embedder(model_dir, pooler=pooler, batch_size=batch_size, max_length=max_length,
                                     mesh_axes=mesh_axes, dtype=dtype)
    elif backend == "torch":
        if pooler is None:
            raise UsageError("the torch backend needs --pooler")
        if not (paths.as_path(model_dir) / "config.json").is_file():
            raise UsageError(f"{model_path}: the torch backend reads a Hugging Face folder (config.json); "
                             "export a checkpoint first with `simcse-jax export`")
        embed = TorchEmbedder(model_dir, pooler=pooler, batch_size=batch_size, max_length=max_length)
    else:
        raise UsageError(f"backend must be jax or torch, not {backend!r}")
    res = sts.evaluate(embed, loaded_tasks)
    return {"model": str(model_path), "backend": backend, "pooler": pooler, "dtype": dtype if backend == "jax" else "float32",
            "split": split, "sts_dir": str(sts_dir),
            "limit": limit, **res, "seconds": round(time.perf_counter() - t0, 1)}


# ----------------------------------------------------------------------------- CLI


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help="STS12-16 / STS-B / SICK-R scores (SentEval protocol, Spearman x 100)")
    p.add_argument("model", help="simcse-jax checkpoint directory or Hugging Face folder")
    p.add_argument("--sts-dir", default=None, help=f"SentEval-layout STS data (default: ${sts.STS_DIR_ENV} or {sts.DEFAULT_STS_DIR})")
    p.add_argument("--pooler", default=None, choices=POOLERS, help="default for checkpoints: the trained pooler")
    p.add_argument("--backend", default="jax", choices=("jax", "torch"))
    p.add_argument("--tasks", nargs="+", default=None, choices=sts.TASKS, help="default: all 7 (test) or STS-B + SICK-R (dev)")
    p.add_argument("--split", default="test", choices=("dev", "test"), help="split of STS-B / SICK-R")
    p.add_argument("--all-splits", action="store_true", help="also score train/dev/test subsets of STS-B / SICK-R, as SentEval does")
    p.add_argument("--limit", type=int, default=None, help="first N pairs of each subset only (quick checks)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--max-length", type=int, default=None, help="truncate to N tokens (default: the model's limit)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="jax backend compute dtype (default float32, also for bf16-trained checkpoints: the export's numbers)")
    p.add_argument("--output", default=None, help="write every number to this JSON file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from simcse_jax.malloc_tuning import keep_freed_memory

    keep_freed_memory()  # XLA-CPU's per-batch buffers without page faults (malloc_tuning.py)
    sts_dir = paths.as_path(args.sts_dir) if args.sts_dir else sts.default_sts_dir()
    res = run_eval(args.model, sts_dir=sts_dir, tasks=args.tasks, split=args.split, backend=args.backend,
                   pooler=args.pooler, batch_size=args.batch_size, max_length=args.max_length, limit=args.limit,
                   all_splits=args.all_splits, dtype=args.dtype)
    limited = f", first {args.limit} pairs" if args.limit else ""
    print(f"{args.backend} backend, pooler {res['pooler']}, {res['dtype']}, {args.split} split{limited}:")
    print(sts.format_table(res["paper"]))
    if "align_uniform" in res:
        au = res["align_uniform"]
        print(f"STS-B alignment {au['alignment']:.4f}  uniformity {au['uniformity']:.4f}")
    if args.output:
        paths.write_text_atomic(args.output, json.dumps(res, indent=2) + "\n")
        print(f"wrote {args.output}", file=sys.stderr)
    return 0
