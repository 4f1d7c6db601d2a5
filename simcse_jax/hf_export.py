"""simcse-jax encoder -> Hugging Face PyTorch folder (the export direction), and the `export` /
`import` commands that move models between checkpoints and Hugging Face folders.

Weights are written by inverting `hf_io`'s import rules: a parameter path joined by "." is the
PyTorch key, with Dense `kernel` -> `weight` transposed ([in, out] -> [out, in]), LayerNorm
`scale` -> `weight`, Embedding `embedding` -> `weight`. The architecture is `BertModel` /
`RobertaModel`: the MLM head, an auxiliary training objective, is dropped. The SimCSE MLP is
the encoder's `pooler.dense`, so Hugging Face's `pooler_output` *is* the SimCSE `cls` output.

Besides config.json / model.safetensors / tokenizer, the folder holds sentence-transformers
files for the evaluation pooler (`avg` -> mean pooling; `cls_before_pooler` -> CLS pooling;
`cls` -> CLS pooling + a tanh `Dense` that carries the MLP weights) and a model card. The export
then reloads the folder with transformers (when torch is installed) and fails on a mismatch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from simcse_jax import paths
from simcse_jax.encoder import Encoder, with_compute_dtype
from simcse_jax.errors import CheckpointError, ExportError
from simcse_jax.poolers import POOLERS, check_pooler, spec, st_pooling_mode

VERIFY_TOL = 1e-5
VERIFY_SENTENCES = (
    "A man is playing a guitar.",
    "The committee postponed its decision until next week because several members were absent.",
    "Stocks fell.",
)
_ENCODER_ONLY_FIELDS = ("compute_dtype", "with_mlm_head")
_MLM_HEADS = ("cls", "lm_head")
ARCHITECTURES = {"bert": "BertModel", "roberta": "RobertaModel"}


def hf_state_dict(model: Encoder) -> dict[str, np.ndarray]:
    """PyTorch `BertModel`/`RobertaModel` state dict (float32 numpy) of the encoder, MLM head dropped."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        path = tuple(str(p) for p in path)
        if path[0] in _MLM_HEADS:
            continue
        value = np.asarray(var[...], np.float32)
        leaf = path[-1]
        if leaf == "kernel":
            value = value.T  # Dense [in, out] -> torch Linear [out, in]
        elif leaf not in ("scale", "embedding", "bias"):
            raise ExportError(f"parameter {'.'.join(path)}: no Hugging Face name rule for leaf {leaf!r}")
        name = ".".join(path[:-1] + (("bias",) if leaf == "bias" else ("weight",)))
        out[name] = np.ascontiguousarray(value)
    return out


def hf_config_dict(model: Encoder, hf_config: Mapping[str, Any] | None) -> dict[str, Any]:
    """config.json: the stored one with the architecture fields of the encoder and a bare-model class."""
    cfg = dict(hf_config or {})
    for k, v in dataclasses.asdict(model.config).items():
        if k not in _ENCODER_ONLY_FIELDS:
            cfg[k] = v
    cfg["architectures"] = [ARCHITECTURES[model.config.model_type]]
    cfg.pop("_name_or_path", None)
    cfg.setdefault("position_embedding_type", "absolute")
    return cfg


def _write_sentence_transformers(out: Path, model: Encoder, pooler: str, max_seq_length: int) -> bool:
    mode = st_pooling_mode(pooler)  # None: sentence-transformers cannot express this pooler
    if mode is None:
        return False
    hidden = model.config.hidden_size
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    # Legacy boolean keys: read by old and new sentence-transformers releases alike.
    pooling = {
        "word_embedding_dimension": hidden,
        "pooling_mode_cls_token": mode == "cls",
        "pooling_mode_mean_tokens": mode == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    }
    (out / "1_Pooling").mkdir()
    (out / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2) + "\n")
    if spec(pooler).mlp:
        # sentence-transformers has no "MLP over [CLS]" pooling: a tanh Dense after CLS pooling with
        # pooler.dense's weights computes the same tanh(W h + b).
        from safetensors.numpy import save_file

        (out / "2_Dense").mkdir()
        dense_cfg = {"in_features": hidden, "out_features": hidden, "bias": True,
                     "activation_function": "torch.nn.modules.activation.Tanh"}
        (out / "2_Dense" / "config.json").write_text(json.dumps(dense_cfg, indent=2) + "\n")
        w = np.asarray(model.pooler.dense.kernel[...], np.float32)
        b = np.asarray(model.pooler.dense.bias[...], np.float32)
        save_file({"linear.weight": np.ascontiguousarray(w.T), "linear.bias": b},
                  str(out / "2_Dense" / "model.safetensors"), metadata={"format": "pt"})
        modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    (out / "modules.json").write_text(json.dumps(modules, indent=2) + "\n")
    (out / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length, "do_lower_case": False}, indent=2) + "\n")
    return True


def _model_card(model: Encoder, pooler: str, meta: Mapping[str, Any], scores: Mapping[str, float] | None, st: bool) -> str:
    arch = ARCHITECTURES[model.config.model_type]
    trained = meta.get("pooler")
    lines = [
        "---", "library_name: transformers", "tags: [sentence-similarity, simcse, simcse-jax]", "---", "",
        "# SimCSE sentence encoder (trained with simcse-jax)", "",
        f"A `{arch}` ({model.config.num_hidden_layers} layers, hidden {model.config.hidden_size}) exported from a "
        "simcse-jax checkpoint. The MLM head, if trained, is not included.", "",
        f"**Sentence embedding: pooler `{pooler}`.** ",
    ]
    if pooler == "cls":
        lines.append("`pooler_output` is the trained SimCSE MLP over [CLS]; use it as the embedding.")
    elif pooler == "cls_before_pooler":
        why = " (trained with `mlp_only_train`: the MLP is for training only)" if meta.get("mlp_only_train") else ""
        lines.append(f"Use the [CLS] vector `last_hidden_state[:, 0]`, not `pooler_output`{why}.")
    else:
        lines.append(f"Mean-pool the token states as the `{pooler}` pooler does; `pooler_output` is not a trained "
                     "SimCSE output.")
    lines += ["", "```python", "from simcse import SimCSE" if pooler.startswith("cls") else "from transformers import AutoModel",
              f"model = SimCSE('PATH', pooler='{pooler}')" if pooler.startswith("cls") else "model = AutoModel.from_pretrained('PATH')",
              "```", ""]
    if st:
        lines += ["Loads in sentence-transformers with the same pooling: "
                  "`SentenceTransformer('PATH').encode(sentences)`.", ""]
    if trained is not None:
        lines += [f"Trained with pooler `{trained}`, mlp_only_train={bool(meta.get('mlp_only_train'))}, "
                  f"step {meta.get('step', '?')}.", ""]
    if scores:
        names = list(scores)
        lines += ["## STS (Spearman x 100, SentEval protocol)", "",
                  "| " + " | ".join(names) + " |", "|" + "---|" * len(names),
                  "| " + " | ".join(f"{scores[k]:.2f}" for k in names) + " |", ""]
    if meta.get("train_config"):
        config_json = json.dumps(meta["train_config"], indent=2, sort_keys=True, default=str)
        lines += ["## Training configuration", "", "```json", config_json, "```", ""]
    return "\n".join(lines)


STALE_FOLDERS = ("1_Pooling", "2_Dense")  # modules of an earlier export that would be loaded
STALE_FILES = ("modules.json", "sentence_bert_config.json", "README.md")


def _prepare_remote_out(url: str, overwrite: bool) -> None:
    """As `_prepare_out` for a gs:// prefix (which "exists" exactly while objects lie under it)."""
    try:
        paths.check_bucket(url)
        out = paths.as_path(url)
        if out.is_file():
            raise ExportError(f"{url} exists and is an object, not a folder")
        if out.exists():
            if not overwrite:
                raise ExportError(f"{url} is not empty; choose another folder or pass --overwrite")
            for sub in STALE_FOLDERS:
                paths.remove(f"{url}/{sub}", recursive=True)
            for f in STALE_FILES:
                paths.remove(f"{url}/{f}")
    except paths.PathError as e:
        raise ExportError(str(e)) from None


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is a file")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ExportError(f"{out} is not empty; choose another folder or pass --overwrite")
        for sub in STALE_FOLDERS:
            shutil.rmtree(out / sub, ignore_errors=True)
        for f in STALE_FILES:
            (out / f).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def export_model(
    model: Encoder,
    tokenizer,
    out_dir,
    *,
    pooler: str,
    hf_config: Mapping[str, Any] | None = None,
    meta: Mapping[str, Any] | None = None,
    scores: Mapping[str, float] | None = None,
    overwrite: bool = False,
    verify: bool = True,
) -> Path:
    """Writes the Hugging Face folder of an in-memory encoder and (with torch) verifies it.

    `pooler` is the evaluation pooler the sentence-transformers files and model card describe;
    `meta` (checkpoint meta) feeds the model card; `scores` = {task: number} for the card.
    A gs:// `out_dir` is written to a local temporary folder, verified there, then uploaded: a
    folder that fails verification never reaches the bucket. Returns the folder (an epath for gs://).
    """
    from safetensors.numpy import save_file

    check_pooler(pooler, "export pooler")
    if paths.is_remote(out_dir):
        url = os.fspath(out_dir).rstrip("/")
        _prepare_remote_out(url, overwrite)
        with tempfile.TemporaryDirectory(prefix="simcse_export_") as tmp:
            local = export_model(model, tokenizer, Path(tmp) / "hf", pooler=pooler, hf_config=hf_config, meta=meta,
                                 scores=scores, verify=verify)
            try:
                paths.upload_folder(local, url)
            except paths.PathError as e:
                raise ExportError(str(e)) from None
        return paths.as_path(url)
    out = Path(out_dir).expanduser()
    _prepare_out(out, overwrite)
    meta = dict(meta or {})
    cfg = hf_config_dict(model, hf_config if hf_config is not None else meta.get("hf_config"))
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    save_file(hf_state_dict(model), str(out / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(str(out))
    max_len = model.config.max_length
    st = _write_sentence_transformers(out, model, pooler, max_len)
    if not st:
        print(f"note: sentence-transformers cannot express pooler {pooler!r}; no modules.json written", file=sys.stderr)
    (out / "README.md").write_text(_model_card(model, pooler, meta, scores, st))
    if verify:
        verify_export(out, model, tokenizer, pooler)
    return out


def verify_export(out: Path, model: Encoder, tokenizer, pooler: str, sentences: Sequence[str] = VERIFY_SENTENCES) -> float | None:
    """Max abs difference of `pooler` embeddings, transformers vs JAX; None without torch.

    Both sides compute in float32 on the same parameters: the folder holds the float32
    parameters, and a model trained in bfloat16 is compared through its float32 twin
    (`with_compute_dtype`), so the 1e-5 limit checks the weights, not bf16 rounding.
    """
    try:
        import torch  # noqa: F401
    except ImportError:
        print("note: torch not installed; the export was not reloaded for verification", file=sys.stderr)
        return None
    from simcse_jax.encode import SentenceEncoder
    from simcse_jax.evaluate import TorchEmbedder

    ours = SentenceEncoder(with_compute_dtype(model, "float32"), tokenizer, pooler=pooler, batch_size=len(sentences))(list(sentences))
    theirs = TorchEmbedder(out, pooler=pooler, batch_size=len(sentences))(list(sentences))
    diff = float(np.abs(ours - theirs).max())
    if not diff <= VERIFY_TOL:
        raise ExportError(f"{out}: transformers reproduces the {pooler} embeddings only to {diff:.3g} (limit {VERIFY_TOL})")
    return diff


def export_checkpoint(ckpt_dir, out_dir, *, pooler: str | None = None, step: int | None = None,
                      scores: Mapping[str, float] | None = None, overwrite: bool = False, verify: bool = True) -> Path:
    """Orbax checkpoint (latest or given step) -> Hugging Face folder; pooler defaults to the trained one."""
    from simcse_jax.checkpoint import load_checkpoint
    from simcse_jax.hf_io import load_tokenizer

    ckpt = load_checkpoint(ckpt_dir, step)
    if not ckpt.tokenizer_dir.is_dir():
        raise CheckpointError(f"{ckpt.tokenizer_dir}: tokenizer folder missing from the checkpoint")
    tokenizer = load_tokenizer(ckpt.tokenizer_dir, vocab_size=ckpt.model.config.vocab_size)
    return export_model(ckpt.model, tokenizer, out_dir, pooler=pooler or ckpt.eval_pooler, meta=ckpt.meta,
                        scores=scores, overwrite=overwrite, verify=verify)


def import_hf(hf_dir, out_dir, *, pooler: str = "cls", mlp_only_train: bool = False, overwrite: bool = False) -> Path:
    """Hugging Face BERT/RoBERTa folder -> checkpoint at step 0 (released SimCSE models: pooler.dense = MLP)."""
    from simcse_jax.checkpoint import save_checkpoint
    from simcse_jax.hf_io import load_pretrained, load_tokenizer

    check_pooler(pooler, "import pooler")
    out = paths.as_path(out_dir)  # a gs:// prefix too: orbax writes there, the tokenizer is uploaded
    if not paths.is_remote(out):
        out = out.expanduser()
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CheckpointError(f"{out} is not empty; choose another folder or pass --overwrite")
    loaded = load_pretrained(hf_dir)
    tokenizer = load_tokenizer(loaded.path)
    if overwrite and out.is_dir():  # only once the new model and its tokenizer have loaded
        paths.remove(out, recursive=True)
    save_checkpoint(out, 0, loaded.model, hf_config=loaded.hf_config, pooler=pooler, mlp_only_train=mlp_only_train,
                    train_config={"imported_from": str(loaded.path)}, tokenizer=tokenizer)
    return out


# ----------------------------------------------------------------------------- CLI


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("export", help="checkpoint -> Hugging Face folder (+ sentence-transformers files)")
    p.add_argument("checkpoint", help="simcse-jax checkpoint directory")
    p.add_argument("--out", required=True, help="output folder or gs:// prefix (must be empty unless --overwrite)")
    p.add_argument("--pooler", default=None, choices=POOLERS, help="evaluation pooler (default: the trained one; "
                   "cls with mlp_only_train -> cls_before_pooler)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--scores", default=None, help="results.json of `simcse-jax eval`, for the model card")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-verify", action="store_true", help="skip reloading the folder with transformers")
    p.set_defaults(func=run_export)

    p = subparsers.add_parser("import", help="Hugging Face BERT/RoBERTa folder -> checkpoint")
    p.add_argument("hf_dir", help="Hugging Face model folder (or hub id when online)")
    p.add_argument("--out", required=True, help="checkpoint directory to create")
    p.add_argument("--pooler", default="cls", choices=POOLERS, help="pooler recorded in the checkpoint meta")
    p.add_argument("--mlp-only-train", action="store_true", help="record mlp_only_train (unsupervised SimCSE models)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=run_import)


def run_export(args: argparse.Namespace) -> int:
    scores = None
    if args.scores:
        scores = json.loads(paths.as_path(args.scores).read_text()).get("paper")
    out = export_checkpoint(args.checkpoint, args.out, pooler=args.pooler, step=args.step, scores=scores,
                            overwrite=args.overwrite, verify=not args.no_verify)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def run_import(args: argparse.Namespace) -> int:
    out = import_hf(args.hf_dir, args.out, pooler=args.pooler, mlp_only_train=args.mlp_only_train, overwrite=args.overwrite)
    print(f"wrote checkpoint {out} (step 0)", file=sys.stderr)
    return 0
