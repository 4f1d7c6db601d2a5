"""`simcse-jax download-sts`: fetch and lay out the SentEval STS data that `eval` reads.

The default source is the archive SimCSE's `SentEval/data/download_senteval.sh` fetches (SentEval's
preprocessed `data/downstream` tree), so scores are comparable to the paper's. Any tar/zip archive
or folder holding the same files works too (`--source`): each needed file is found by its
trailing path (`STS12-en-test/STS.input.MSRpar.txt`, `STSBenchmark/sts-test.csv`, ...) wherever
it sits, the shallowest match winning, and copied byte for byte into

    OUT/STS12-en-test ... STS16-en-test/   OUT/STSBenchmark/   OUT/SICK/

The result is then loaded with the evaluation's own reader and its pair counts checked.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
from pathlib import Path

from simcse_jax import sts

SIMCSE_SENTEVAL_URL = "https://huggingface.co/datasets/princeton-nlp/datasets-for-simcse/resolve/main/senteval.tar"
# Pairs with a gold score as SentEval counts them (test splits; STS-B/SICK-R as reported).
EXPECTED_PAIRS = {"STS12": 3108, "STS13": 1500, "STS14": 3750, "STS15": 3000, "STS16": 1186,
                  "STSBenchmark": 1379, "SICKRelatedness": 4927}


def required_files() -> list[str]:
    """Relative paths (our layout) of every file the evaluation reads."""
    files = []
    for folder, subsets in sts.STS_YEARS.values():
        for name in subsets:
            files += [f"{folder}/STS.input.{name}.txt", f"{folder}/STS.gs.{name}.txt"]
    files += [f"STSBenchmark/{f}" for f in sts.STSB_FILES.values()]
    files += [f"SICK/{f}" for f in sts.SICK_FILES.values()]
    return files


def _pick(names: list[str], rel: str) -> str | None:
    """The shallowest name that is `rel` or ends with `/rel`."""
    hits = [n for n in names if n == rel or n.endswith("/" + rel)]
    return min(hits, key=lambda n: (n.count("/"), n)) if hits else None


def _missing_error(source, missing: list[str]) -> sts.StsDataError:
    return sts.StsDataError(f"{source}: no file matching {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''} "
                            f"({len(missing)} of {len(required_files())} STS files missing)")


def _copy_picks(source: Path, names: list[str], read, out: Path) -> list[Path]:
    """Writes each required file, found among `names` and read by `read(name) -> bytes`, to `out`."""
    picks = {rel: _pick(names, rel) for rel in required_files()}
    missing = [r for r, n in picks.items() if n is None]
    if missing:
        raise _missing_error(source, missing)
    written = []
    for rel, name in picks.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(read(name))
        written.append(out / rel)
    return written


def extract(source: Path, out: Path) -> list[Path]:
    """Copies the needed files from an archive or folder `source` into `out` (our layout)."""
    if source.is_dir():
        names = [p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file()]
        return _copy_picks(source, names, lambda name: (source / name).read_bytes(), out)
    if zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as zf:
            names = [n for n in zf.namelist() if not n.endswith("/")]
            return _copy_picks(source, names, zf.read, out)
    if tarfile.is_tarfile(source):
        with tarfile.open(source) as tf:
            members = {m.name.removeprefix("./"): m for m in tf.getmembers() if m.isfile()}
            return _copy_picks(source, list(members), lambda name: tf.extractfile(members[name]).read(), out)
    raise sts.StsDataError(f"{source}: neither a folder nor a tar/zip archive")


def check_counts(out: Path) -> dict[str, int]:
    """Loads every task from `out` and compares pair counts with SentEval's."""
    counts = {}
    for task, expected in EXPECTED_PAIRS.items():
        n = sum(len(s) for s in sts.load_task(out, task, "test").subsets)
        if n != expected:
            raise sts.StsDataError(f"{out}: {task} has {n} scored pairs, SentEval's data has {expected}")
        counts[task] = n
    return counts


def download_sts(out_dir, source: str | None = None, *, overwrite: bool = False) -> dict[str, int]:
    """Fetches (URL) or reads (local archive/folder) the STS data into `out_dir`; returns pair counts."""
    out = Path(out_dir).expanduser()
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise sts.StsDataError(f"{out} is not empty; pass --overwrite to replace the STS files there")
    source = source or SIMCSE_SENTEVAL_URL
    with tempfile.TemporaryDirectory() as tmp:
        if source.startswith(("http://", "https://")):
            local = Path(tmp) / "download"
            print(f"downloading {source}", file=sys.stderr)
            try:
                with urllib.request.urlopen(source) as r, local.open("wb") as f:
                    shutil.copyfileobj(r, f)
            except OSError as e:
                raise sts.StsDataError(f"cannot download {source} ({e}); pass --source with a local copy") from e
        else:
            local = Path(source).expanduser()
            if not local.exists():
                raise sts.StsDataError(f"--source {local}: no such file or folder")
        out.mkdir(parents=True, exist_ok=True)
        extract(local, out)
    return check_counts(out)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("download-sts", help="fetch SentEval's STS12-16 / STS-B / SICK-R data for `eval`")
    p.add_argument("--out", default=None, help=f"target folder (default: ${sts.STS_DIR_ENV} or {sts.DEFAULT_STS_DIR})")
    p.add_argument("--source", default=None, help="URL, tar/zip archive or folder (default: SimCSE's senteval.tar)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out).expanduser() if args.out else sts.default_sts_dir()
    counts = download_sts(out, args.source, overwrite=args.overwrite)
    print(f"wrote {out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + " pairs", file=sys.stderr)
    return 0
