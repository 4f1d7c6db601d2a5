"""Training-file readers with the reference SimCSE semantics (princeton-nlp/SimCSE `train.py`).

The reference reads its training file with `datasets.load_dataset("text" | "csv")` and takes
columns by *position*:

- `.txt`: one sentence per line; the sentence is both views (unsupervised SimCSE);
- `.csv` (tab-separated when "tsv" is in the file name, as the reference's `delimiter` rule), first
  row a header: 1 column -> unsupervised, 2 -> (sent0, sent1) pairs, 3 -> (sent0, sent1, hard_neg);
- any Hugging Face dataset (a `save_to_disk` folder, a local .json/.jsonl/.parquet file, or a hub
  name when online): same rule on its `column_names`.

Any of these may be a gs:// URL (simcse_jax/paths.py): a .txt/.csv/.tsv object is read whole from
the bucket by every host (no shared disk needed) and identified by its generation and md5 instead
of an mtime; a remote dataset folder or data file is first copied to the host's local cache.

Missing fields (`None`, or empty / whitespace-only text) become `" "` exactly as the reference's
`prepare_features` does, with a warning that counts them. We parse the files ourselves (Python's
`csv` module, strict UTF-8) rather than through `datasets`, so every error can name the file and
line. Deliberate differences from the reference, each of which would otherwise change the
training objective without a word:

- Blank (empty or whitespace-only) lines of a `.txt` are skipped with a warning giving the count.
  The reference's `text` loader keeps them as `""` sentences, i.e. `[CLS] [SEP]` positives that
  every blank line shares -- easy duplicates that teach nothing. Blank lines of a CSV are skipped
  by both (pandas' `skip_blank_lines`).
- A CSV row whose fields are *all* empty is an error (it is no example at all), not `(" ", " ")`.
- CSV text such as `NA`, `None` or `null` stays literal text; pandas (the reference's CSV parser)
  silently turns those strings into missing values and then `" "`.
- A row with the wrong number of fields is an error; pandas pads short rows with missing values.
- Non-UTF-8 bytes are an error naming the line; a leading byte-order mark is dropped.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import os
import re
from pathlib import Path

import numpy as np

from simcse_jax import paths
from simcse_jax.errors import DataError

log = logging.getLogger(__name__)

READER_VERSION = 1  # part of the tokenized-cache key: bump when reading semantics change
EMPTY_FIELD = " "  # what the reference substitutes for a missing field
HF_FILE_TYPES = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".arrow": "arrow"}


@dataclasses.dataclass
class RawExamples:
    """Sentences by column: `columns[c][i]` is sentence c of example i.

    `lines[i]` is the 1-based line of example i in the file (the row index for a HF dataset), so
    later checks can point at it. `kind` is "unsup" (1 column, used twice), "pairs" or "triples".
    `fingerprint` identifies the content for the tokenized cache.
    """

    source: str
    columns: list[list[str]]
    lines: np.ndarray  # int64 [n]
    kind: str
    fingerprint: dict
    line_label: str = "line"  # "line" for files, "row" for Hugging Face datasets
    warnings: list[str] = dataclasses.field(default_factory=list)  # kept in the cache, re-shown on reuse

    def warn(self, message: str) -> None:
        log.warning("%s", message)
        self.warnings.append(message)

    def __len__(self) -> int:
        return len(self.lines)

    def where(self, i: int) -> str:
        return f"{self.source}, {self.line_label} {int(self.lines[i])}"


KINDS = {1: "unsup", 2: "pairs", 3: "triples"}


def read_examples(source: str | os.PathLike, *, hf_split: str = "train") -> RawExamples:
    """Reads `.txt`, `.csv`/`.tsv`, or a Hugging Face dataset (local or, online, a hub name)."""
    text = os.fspath(source)
    path = paths.as_path(text)
    if paths.is_remote(text):
        _check_remote(text)
    if path.is_dir():
        return read_hf_dataset(text, split=hf_split)
    suffix = path.suffix.lower()
    if suffix in HF_FILE_TYPES:
        if not path.is_file():
            raise DataError(f"training file {path} does not exist")
        return read_hf_dataset(text, split=hf_split)
    if suffix in (".txt", ".csv", ".tsv"):
        if not path.is_file():
            raise DataError(f"training file {path} does not exist")
        return read_txt(path) if suffix == ".txt" else read_csv(path)
    if path.exists() or not _looks_like_hub_name(text):
        raise DataError(
            f"training data {path}: expected a .txt (one sentence per line), a .csv/.tsv (1-3 "
            f"columns with a header row), a Hugging Face dataset folder, or a hub dataset name"
            + ("" if path.exists() else "; no such file")
        )
    return read_hf_dataset(text, split=hf_split)


def _looks_like_hub_name(text: str) -> bool:
    return re.fullmatch(r"[\w.-]+(/[\w.-]+)?", text) is not None and not text.startswith(".")


def _check_remote(url: str) -> None:
    """A missing bucket or object, no credentials, an unreachable endpoint: one line naming the URL."""
    try:
        paths.check_readable(url)
    except paths.PathError as e:
        raise DataError(f"training data {e}") from None


def file_fingerprint(path) -> dict | None:
    """Identity of a .txt/.csv/.tsv file from its metadata (no read); None for other sources.

    Local: resolved path, size, mtime. gs://: URL, size, generation, md5 (paths.fingerprint).
    """
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".csv", ".tsv") or not path.is_file():
        return None
    fmt = {"format": "txt"} if suffix == ".txt" else {"format": "csv", "delimiter": _delimiter(path)}
    return {"reader": READER_VERSION, **fmt, **paths.fingerprint(path)}


def _delimiter(path: Path) -> str:
    return "\t" if "tsv" in path.name else ","


def _decode(path: Path) -> str:
    data = path.read_bytes()
    if not data.strip():
        raise DataError(f"training file {path} is empty")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"{path}, line {line}: not valid UTF-8 ({e.reason} at byte {e.start}: {data[e.start:e.start + 4]!r}); "
            f"re-encode the file as UTF-8"
        ) from None
    return text.removeprefix("\ufeff")


def read_txt(path: Path) -> RawExamples:
    """One sentence per line (universal newlines, as the `text` loader); blank lines skipped."""
    text = _decode(path)
    # str.splitlines would also split on \x0b, \x1c, \u2028 ...; the reference splits on newlines only.
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline ends the last line; it does not start another
    keep = [i for i, s in enumerate(lines) if s.strip()]
    blank = len(lines) - len(keep)
    if not keep:
        raise DataError(f"training file {path} has no sentences ({blank} blank lines)")
    sentences = [lines[i] for i in keep]
    raw = RawExamples(
        source=str(path),
        columns=[sentences],
        lines=np.asarray(keep, dtype=np.int64) + 1,
        kind="unsup",
        fingerprint=file_fingerprint(path),
    )
    if blank:
        first = [i + 1 for i, s in enumerate(lines) if not s.strip()][:5]
        raw.warn(
            f"{path}: skipped {blank} blank line(s) (first at line(s) {', '.join(map(str, first))}); "
            f"the reference would train on them as empty sentences"
        )
    return raw


def read_csv(path: Path) -> RawExamples:
    """Header row, then 1-3 columns taken by position (tab-separated when "tsv" is in the name)."""
    delimiter = _delimiter(path)
    text = _decode(path)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    rows, lines, header, header_line = [], [], None, 0
    blank, start = 0, 1
    try:
        for row in reader:
            line = start  # the row's first physical line (quoted fields may span several)
            start = reader.line_num + 1
            if not row or (len(row) == 1 and not row[0].strip()):
                blank += 1
                continue
            if header is None:
                header, header_line = row, line
                if len(header) not in KINDS:
                    raise DataError(
                        f"{path}, line {line}: the header has {len(header)} columns ({', '.join(map(repr, header))}); "
                        f"SimCSE training data has 1 (unsupervised), 2 (pairs) or 3 (sent0, sent1, hard_neg)"
                    )
                continue
            if len(row) != len(header):
                raise DataError(
                    f"{path}, line {line}: {len(row)} field(s) where the header (line {header_line}) has "
                    f"{len(header)}; check the quoting and the delimiter ({delimiter!r})"
                )
            rows.append(row)
            lines.append(line)
    except csv.Error as e:
        raise DataError(f"{path}, line {reader.line_num}: malformed CSV ({e})") from None
    if header is None:
        raise DataError(f"training file {path} is empty")
    if not rows:
        raise DataError(f"training file {path} has a header row (line {header_line}) but no examples")
    columns = [list(col) for col in zip(*rows)]
    raw = RawExamples(
        source=str(path),
        columns=columns,
        lines=np.asarray(lines, dtype=np.int64),
        kind=KINDS[len(header)],
        fingerprint=file_fingerprint(path),
    )
    if blank:
        raw.warn(f"{path}: skipped {blank} blank line(s)")
    return fill_empty_fields(raw)


def fill_empty_fields(raw: RawExamples) -> RawExamples:
    """Missing / blank fields -> " " (the reference); a row with no text at all is an error.

    With a single column (unsupervised) an empty row is a blank line: skipped with a warning.
    """
    empty = np.array([[s is None or not str(s).strip() for s in col] for col in raw.columns])  # [C, n]
    all_empty = empty.all(axis=0)
    if len(raw.columns) == 1 and all_empty.any():
        keep = np.flatnonzero(~all_empty)
        if not len(keep):
            raise DataError(f"{raw.source}: every example is empty")
        first = ", ".join(str(int(raw.lines[i])) for i in np.flatnonzero(all_empty)[:5])
        out = dataclasses.replace(raw, columns=[[raw.columns[0][i] for i in keep]], lines=raw.lines[keep])
        out.warn(f"{raw.source}: skipped {int(all_empty.sum())} empty example(s) (first at {raw.line_label}(s) {first})")
        return out
    if all_empty.any():
        i = int(np.argmax(all_empty))
        raise DataError(
            f"{raw.where(i)}: every field is empty ({int(all_empty.sum())} such row(s) in all); "
            f"remove the row(s) -- an empty example cannot be a contrastive pair"
        )
    n_empty = int(empty.sum())
    if n_empty:
        for c, col in enumerate(raw.columns):
            for i in np.flatnonzero(empty[c]):
                col[i] = EMPTY_FIELD
        i = int(np.argmax(empty.any(axis=0)))
        raw.warn(
            f"{raw.source}: {n_empty} empty field(s) replaced by {EMPTY_FIELD!r} as the reference does "
            f"(first at {raw.line_label} {int(raw.lines[i])})"
        )
    return raw


def read_hf_dataset(name: str, *, split: str = "train") -> RawExamples:
    """A `save_to_disk` folder, a local data file, or (online) a hub dataset name."""
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a dependency
        raise DataError(f"reading {name} needs the `datasets` package") from e

    # A remote dataset folder or data file is read from a local copy (datasets memory-maps Arrow files).
    path = paths.local_copy(name) if paths.is_remote(name) else Path(name).expanduser()
    try:
        if path.is_dir() and (
            (path / "dataset_info.json").is_file() or (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()
        ):
            ds = datasets.load_from_disk(str(path))
        elif path.is_file():
            ds = datasets.load_dataset(HF_FILE_TYPES[path.suffix.lower()], data_files=str(path), split=split)
        else:
            ds = datasets.load_dataset(name, split=split)
    except DataError:
        raise
    except Exception as e:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
        raise DataError(
            f"{name}: cannot load it as a Hugging Face dataset ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''})"
            + ("; HF_HUB_OFFLINE is set" if offline else "")
            + ". Offline, pass a local .txt (one sentence per line) or .csv (header + 1-3 columns)"
        ) from e
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{name}: no split {split!r}; it has {sorted(ds)}")
        ds = ds[split]
    names = list(ds.column_names)
    if len(names) not in KINDS:
        raise DataError(
            f"{name}: {len(names)} columns ({', '.join(names)}); SimCSE training data has 1, 2 or 3 "
            f"(taken by position, as the reference does)"
        )
    if len(ds) == 0:
        raise DataError(f"{name}: the {split!r} split is empty")
    columns = []
    for c in names:
        col = ds[c]
        col = list(col) if not isinstance(col, list) else col
        bad = next((i for i, s in enumerate(col) if s is not None and not isinstance(s, str)), None)
        if bad is not None:
            raise DataError(f"{name}, row {bad}: column {c!r} holds {type(col[bad]).__name__}, not text")
        columns.append(col)
    fingerprint = getattr(ds, "_fingerprint", None) or name
    raw = RawExamples(
        source=name,
        columns=columns,
        lines=np.arange(len(ds), dtype=np.int64),
        kind=KINDS[len(names)],
        fingerprint={"reader": READER_VERSION, "format": "hf", "name": str(path.resolve()) if path.exists() else name,
                     "split": split, "dataset_fingerprint": fingerprint},
        line_label="row",
    )
    return fill_empty_fields(raw)
