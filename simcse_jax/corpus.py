"""A built-in unsupervised corpus for the CPU demo: English sentences from the Python standard
library's docstrings.

Why this text: the demo must run on a fresh machine with nothing but what the set-up installs
and no network. Every Python ships its standard library's sources, whose docstrings are real
English prose written by people (not generated), and reading them with `ast` (no imports)
takes about a second. The text is technical, so the demo shows the pipeline working rather than
a state-of-the-art model; point `train_file` at wiki1m_for_simcse.txt for the paper's setting.

The extraction is deterministic for a given Python version: files in sorted order, docstrings
split into sentences, kept when they look like prose (6-40 words, mostly letters, no code
markers), de-duplicated, every `heldout_every`-th sentence held out for alignment/uniformity.
"""

from __future__ import annotations

import ast
import re
import sysconfig
from pathlib import Path

BUILTIN_PREFIX = "builtin:"
BUILTIN_CORPORA = ("docstrings",)

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_CODE_MARKERS = re.compile(r"(>>>|::|\(\)|==|->|\w\.\w+\(|[{}\[\]<>|`*_=#\\/])")


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


def docstring_sentences(max_sentences: int = 40_000) -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
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


def write_builtin_corpus(name: str, directory: Path, *, heldout_every: int = 20) -> tuple[Path, Path]:
    """Writes `<name>.train.txt` and `<name>.heldout.txt` under `directory`; returns both paths."""
    if name not in BUILTIN_CORPORA:
        raise ValueError(f"train_file: unknown built-in corpus {BUILTIN_PREFIX}{name}; choose one of "
                         f"{', '.join(BUILTIN_PREFIX + c for c in BUILTIN_CORPORA)}")
    sentences = docstring_sentences()
    train = [s for i, s in enumerate(sentences) if i % heldout_every]
    heldout = [s for i, s in enumerate(sentences) if not i % heldout_every]
    directory.mkdir(parents=True, exist_ok=True)
    train_path, heldout_path = directory / f"{name}.train.txt", directory / f"{name}.heldout.txt"
    for path, rows in ((train_path, train), (heldout_path, heldout)):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("\n".join(rows) + "\n", encoding="utf-8")
        tmp.replace(path)
    return train_path, heldout_path
