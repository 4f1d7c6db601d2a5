"""A random-init BERT as a Hugging Face folder, for runs that measure speed rather than quality.

    python benchmarks/make_random_bert.py --tokenizer device_data/minilm --out /tmp/bert-base-random
    python benchmarks/make_random_bert.py --tokenizer device_data/minilm --out /tmp/tiny-bert --tiny

The architecture is bert-base-uncased's (`transformers.BertConfig()` defaults: 12 layers, hidden
768, vocabulary 30522); `--tiny` is a 2-layer, 64-wide BERT with the same vocabulary. The tokenizer
files are copied from `--tokenizer`: all-MiniLM-L6-v2's tokenizer is the bert-base-uncased
WordPiece vocabulary (30522 tokens), so any such folder serves. Used by benchmarks/gpu_check.sh to
run `configs/unsup_simcse.py:bert-base-uncased` where the hub cannot be reached.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, max_position_embeddings=64)


def make_random_bert(out: Path, tokenizer_dir: Path, *, tiny: bool = False, seed: int = 0) -> Path:
    import torch
    import transformers

    if not (tokenizer_dir / "vocab.txt").is_file():
        raise SystemExit(f"{tokenizer_dir}: no vocab.txt; pass a folder holding a bert-base-uncased tokenizer")
    torch.manual_seed(seed)
    config = transformers.BertConfig(**(TINY if tiny else {}))
    out.mkdir(parents=True, exist_ok=True)
    transformers.BertModel(config).save_pretrained(out)  # config.json + model.safetensors, float32
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, out / name)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--tokenizer", required=True, type=Path, help="a folder with a bert-base-uncased vocabulary (vocab.txt, tokenizer.json)")
    p.add_argument("--tiny", action="store_true", help="2 layers, hidden 64 (CPU runs of gpu_check.sh)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    out = make_random_bert(args.out, args.tokenizer, tiny=args.tiny, seed=args.seed)
    print(f"wrote a random-init {'tiny ' if args.tiny else 'bert-base-uncased '}BERT to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
