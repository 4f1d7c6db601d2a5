"""A built-in unsupervised corpus for the CPU demo: English sentences from the Python standard
library's docstrings, shipped frozen as package data.

Why this text: the demo must run on a fresh machine with nothing but what the set-up installs
and no network. The standard library's docstrings are real English prose written by people (not
generated), and their licence lets them ship with the package. The text is technical, so the
demo shows the pipeline working rather than a state-of-the-art model; point `train_file` at
wiki1m_for_simcse.txt for the paper's setting.

Why frozen: extracted from the running Python, the corpus changed with the Python version (8,183
sentences from 3.11.7, 7,902 from 3.12.1), and with it every demo figure in the README. So the
sentence list is package data, `corpus_data/docstrings.txt.gz` (one sentence a line), the same on
every Python. It was built from CPython 3.11.7's standard library, the version the README's demo
figures come from; rebuilding it from another Python changes the corpus (and those figures):

    python -m simcse_jax.corpus --regenerate

The extraction: files in sorted order, docstrings split into sentences, kept when they look like
prose (6-40 words, mostly letters, no code markers), de-duplicated. Writing the demo's files holds
out every `heldout_every`-th sentence for alignment/uniformity.

This module imports only the standard library (no jax), so any Python can read the corpus.
"""

from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import importlib.resources
import re
import sys
import sysconfig
from pathlib import Path

BUILTIN_PREFIX = "builtin:"
BUILTIN_CORPORA = ("docstrings",)
DATA_DIR = "corpus_data"  # inside the simcse_jax package

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_CODE_MARKERS = re.compile(r"(>>>|::|\(\)|==|->|\w\.\w+\(|[{}\[\]<>|`*_=#\\/])")


# ----------------------------------------------------------------------------- the frozen corpus


def _data_file(name: str):
    return importlib.resources.files("simcse_jax").joinpath(DATA_DIR, f"{name}.txt.gz")


def corpus_sentences(name: str) -> list[str]:
    """The sentences of built-in corpus `name`, as shipped."""
    if name not in BUILTIN_CORPORA:
        raise ValueError(f"train_file: unknown built-in corpus {BUILTIN_PREFIX}{name}; choose one of "
                         f"{', '.join(BUILTIN_PREFIX + c for c in BUILTIN_CORPORA)}")
    return gzip.decompress(_data_file(name).read_bytes()).decode("utf-8").splitlines()


def corpus_sha256(name: str) -> str:
    """The sha256 of the corpus text (the sentences, one a line): what tests pin across Pythons."""
    return hashlib.sha256(("\n".join(corpus_sentences(name)) + "\n").encode("utf-8")).hexdigest()


def write_builtin_corpus(name: str, directory: Path, *, heldout_every: int = 20) -> tuple[Path, Path]:
    """Writes `<name>.train.txt` and `<name>.heldout.txt` under `directory`; returns both paths."""
    sentences = corpus_sentences(name)
    train = [s for i, s in enumerate(sentences) if i % heldout_every]
    heldout = [s for i, s in enumerate(sentences) if not i % heldout_every]
    directory.mkdir(parents=True, exist_ok=True)
    train_path, heldout_path = directory / f"{name}.train.txt", directory / f"{name}.heldout.txt"
    for path, rows in ((train_path, train), (heldout_path, heldout)):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("\n".join(rows) + "\n", encoding="utf-8")
        tmp.replace(path)
    return train_path, heldout_path


# ----------------------------------------------------------------------------- regeneration


def _docstrings(path: Path):
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                yield doc


def _prose_sentences(doc: str):
    # Paragraphs: text blocks separated by blank lines; indented blocks are examples or tables.
    for para in re.split(r"\n\s*\n", doc):
        if any(line.startswith((" ", "\t")) for line in para.splitlines()):
            continue
        text = " ".join(para.split())
        for sentence in _SENTENCE_END.split(text):
            words = sentence.split()
            if not 6 <= len(words) <= 40 or not sentence[0].isupper() or sentence[-1] not in ".!?":
                continue
            if _CODE_MARKERS.search(sentence):
                continue
            letters = sum(ch.isalpha() for ch in sentence)
            if letters < 0.75 * len(sentence.replace(" ", "")):
                continue
            yield sentence


def extract_docstring_sentences(stdlib: Path | None = None, max_sentences: int = 40_000) -> list[str]:
    """The prose sentences of a standard library's docstrings (the running Python's by default)."""
    stdlib = Path(stdlib or sysconfig.get_paths()["stdlib"])
    seen, out = set(), []
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib).parts
        if any(p in ("test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3") for p in rel):
            continue
        for doc in _docstrings(path):
            for sentence in _prose_sentences(doc):
                if sentence not in seen:
                    seen.add(sentence)
                    out.append(sentence)
                    if len(out) >= max_sentences:
                        return out
    return out


def write_corpus_data(sentences: list[str], path: Path) -> None:
    """One sentence a line, gzip with no name or time in its header: the same list gives the same bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(("\n".join(sentences) + "\n").encode("utf-8"), compresslevel=9, mtime=0))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simcse_jax.corpus", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--regenerate", action="store_true",
                        help="rebuild corpus_data/docstrings.txt.gz from this Python's standard library")
    parser.add_argument("--stdlib", type=Path, default=None, help="the standard library folder to read (default: this Python's)")
    args = parser.parse_args(argv)
    if args.regenerate:
        sentences = extract_docstring_sentences(args.stdlib)
        out = Path(__file__).resolve().parent / DATA_DIR / "docstrings.txt.gz"
        write_corpus_data(sentences, out)
        print(f"wrote {out}: {len(sentences)} sentences from Python {sys.version.split()[0]}", file=sys.stderr)
    for name in BUILTIN_CORPORA:
        print(f"{BUILTIN_PREFIX}{name}: {len(corpus_sentences(name))} sentences, sha256 {corpus_sha256(name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
