"""STS evaluation data and scoring with the SentEval protocol that the SimCSE paper reports.

Data (SentEval `data/downstream` layout, as `get_transfer_data.bash` prepares it):
- STS12-16: `STS1x-en-test/STS.input.<subset>.txt` (two tab-separated sentences a line) and
  `STS.gs.<subset>.txt` (one gold score a line; a blank gold line drops the pair, as SentEval does).
- STS-B: `STSBenchmark/sts-{train,dev,test}.csv`, tab-separated, columns 4-6 = score, s1, s2.
  SentEval keeps it at `STS/STSBenchmark`; both layouts are accepted.
- SICK-R: `SICK/SICK_{train,trial,test_annotated}.txt`, a header line, columns 1-3 = s1, s2, score
  (`trial` is the dev split).

Every sentence goes through SentEval's `.split()` and is joined back with single spaces.

Scoring (the same code for every backend): cosine similarity of the two embeddings of a pair;
per subset Pearson and Spearman; over a task, "mean" (plain average over subsets), "wmean"
(weighted by pair count) and "all" (one correlation over the pairs of all subsets pooled). The
number in the paper's convention is Spearman x 100: "all" for STS12-16, the test (or dev) split
for STS-B and SICK-R. The 7-number average is taken over the numbers rounded to 2 decimals, as
SimCSE's `evaluation.py` (princeton-nlp/SimCSE) prints them.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from scipy.stats import pearsonr, spearmanr

from simcse_jax import paths
from simcse_jax.errors import StsDataError

STS_YEARS = {
    "STS12": ("STS12-en-test", ("MSRpar", "MSRvid", "SMTeuroparl", "surprise.OnWN", "surprise.SMTnews")),
    "STS13": ("STS13-en-test", ("FNWN", "headlines", "OnWN")),  # SMT is LDC-licensed, absent in SentEval too
    "STS14": ("STS14-en-test", ("deft-forum", "deft-news", "headlines", "images", "OnWN", "tweet-news")),
    "STS15": ("STS15-en-test", ("answers-forums", "answers-students", "belief", "headlines", "images")),
    "STS16": ("STS16-en-test", ("answer-answer", "headlines", "plagiarism", "postediting", "question-question")),
}
STSB_FILES = {"train": "sts-train.csv", "dev": "sts-dev.csv", "test": "sts-test.csv"}
SICK_FILES = {"train": "SICK_train.txt", "dev": "SICK_trial.txt", "test": "SICK_test_annotated.txt"}
TASKS = (*STS_YEARS, "STSBenchmark", "SICKRelatedness")
DEV_TASKS = ("STSBenchmark", "SICKRelatedness")
STS_DIR_ENV = "SIMCSE_STS_DIR"
DEFAULT_STS_DIR = Path("data/sts")  # relative to the working directory, as config.resolve_sts_dir


@dataclasses.dataclass
class StsSubset:
    name: str
    sent1: list[str]
    sent2: list[str]
    gold: np.ndarray  # [n] float64

    def __len__(self) -> int:
        return len(self.gold)


@dataclasses.dataclass
class StsTask:
    name: str
    subsets: list[StsSubset]
    reported: str | None  # subset whose Spearman is the paper's number; None = pooled "all"

    def sentences(self) -> list[str]:
        """Unique sentences in first-seen order (each is embedded once)."""
        return list(dict.fromkeys(s for sub in self.subsets for s in (*sub.sent1, *sub.sent2)))


def default_sts_dir() -> Path:
    return Path(os.environ.get(STS_DIR_ENV) or DEFAULT_STS_DIR).expanduser()


def senteval_text(s: str) -> str:
    # SentEval stores `s.split()` tokens; the SimCSE batcher joins them with " ".
    return " ".join(s.split())


def _task_folder(sts_dir: Path, folder: str) -> Path:
    """`<sts_dir>/<folder>` or SentEval's `<sts_dir>/STS/<folder>`."""
    for cand in (sts_dir / folder, sts_dir / "STS" / folder):
        if cand.is_dir():
            return cand
    raise StsDataError(
        f"STS data folder {sts_dir / folder} not found (nor {sts_dir / 'STS' / folder}); pass --sts-dir "
        f"(or set {STS_DIR_ENV}) to a folder laid out like SentEval's data/downstream, "
        f"or fetch it with `simcse-jax download-sts`"
    )


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise StsDataError(f"{path}: file not found")
    try:
        # SentEval reads STS12-16 with io.open(...).read().splitlines().
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        line_no = path.read_bytes()[: e.start].count(b"\n") + 1
        raise StsDataError(f"{path}:{line_no}: not valid UTF-8") from None


def load_sts_year(sts_dir: Path, task: str) -> StsTask:
    folder_name, subsets = STS_YEARS[task]
    folder = _task_folder(Path(sts_dir), folder_name)
    out = []
    for name in subsets:
        inp, gs = folder / f"STS.input.{name}.txt", folder / f"STS.gs.{name}.txt"
        lines, gold_lines = _read_lines(inp), _read_lines(gs)
        if len(lines) != len(gold_lines):
            raise StsDataError(
                f"{gs}: {len(gold_lines)} lines but {inp} has {len(lines)}; each input line needs one gold line"
            )
        s1, s2, gold = [], [], []
        for i, (line, g) in enumerate(zip(lines, gold_lines), 1):
            if g.strip() == "":
                continue  # unscored pair: SentEval drops it
            parts = line.split("\t")
            if len(parts) != 2:
                raise StsDataError(f"{inp}:{i}: expected 2 tab-separated sentences, found {len(parts)} fields")
            try:
                gold.append(float(g))
            except ValueError:
                raise StsDataError(f"{gs}:{i}: gold score {g!r} is not a number") from None
            s1.append(senteval_text(parts[0]))
            s2.append(senteval_text(parts[1]))
        out.append(StsSubset(name, s1, s2, np.asarray(gold, np.float64)))
    return StsTask(task, out, None)


def _read_table(path: Path, *, header: bool, cols: tuple[int, int, int]) -> StsSubset:
    """Tab-separated rows; `cols` = (sentence 1, sentence 2, score) columns."""
    if not path.is_file():
        raise StsDataError(f"{path}: file not found")
    s1, s2, gold = [], [], []
    # SentEval iterates the file (universal newlines) and strips each line before splitting.
    with path.open(encoding="utf-8") as f:
        try:
            rows = list(f)
        except UnicodeDecodeError as e:
            raise StsDataError(f"{path}: not valid UTF-8 ({e})") from None
    for i, line in enumerate(rows[1:] if header else rows, 2 if header else 1):
        fields = line.strip().split("\t")
        if len(fields) <= max(cols):
            raise StsDataError(f"{path}:{i}: expected at least {max(cols) + 1} tab-separated columns, found {len(fields)}")
        try:
            gold.append(float(fields[cols[2]]))
        except ValueError:
            raise StsDataError(f"{path}:{i}: score {fields[cols[2]]!r} is not a number") from None
        s1.append(senteval_text(fields[cols[0]]))
        s2.append(senteval_text(fields[cols[1]]))
    return StsSubset(path.stem, s1, s2, np.asarray(gold, np.float64))


def load_split_task(sts_dir: Path, task: str, split: str = "test", *, all_splits: bool = False) -> StsTask:
    """STS-B or SICK-R: the `split` subset (plus the other two with `all_splits`, as SentEval runs)."""
    if split not in ("dev", "test"):
        raise ValueError(f"split must be 'dev' or 'test', not {split!r}")
    if task == "STSBenchmark":
        folder, files, kw = _task_folder(Path(sts_dir), "STSBenchmark"), STSB_FILES, dict(header=False, cols=(5, 6, 4))
    elif task == "SICKRelatedness":
        folder, files, kw = _task_folder(Path(sts_dir), "SICK"), SICK_FILES, dict(header=True, cols=(1, 2, 3))
    else:
        raise ValueError(f"{task} has no train/dev/test splits")
    subsets = []
    for name in (("train", "dev", "test") if all_splits else (split,)):
        sub = _read_table(folder / files[name], **kw)
        sub.name = name
        subsets.append(sub)
    return StsTask(task, subsets, split)


def local_sts_dir(sts_dir) -> Path:
    """`sts_dir` itself, or for gs:// its copy in the local cache (downloaded once per object version)."""
    if not paths.is_remote(sts_dir):
        return Path(sts_dir).expanduser()
    try:
        paths.check_readable(sts_dir, kind="folder")
        return paths.local_copy(sts_dir)
    except paths.PathError as e:
        raise StsDataError(f"STS data {e}") from None


def load_task(sts_dir, task: str, split: str = "test", *, all_splits: bool = False, limit: int | None = None) -> StsTask:
    """One task by its SentEval name. `limit` keeps the first n pairs of each subset (smoke tests).

    `sts_dir` may be a gs:// folder (read from a local copy)."""
    sts_dir = local_sts_dir(sts_dir)
    if task in STS_YEARS:
        if split != "test":
            raise StsDataError(f"{task} has only a test set; with --split dev evaluate {' / '.join(DEV_TASKS)}")
        t = load_sts_year(Path(sts_dir), task)
    elif task in DEV_TASKS:
        t = load_split_task(Path(sts_dir), task, split, all_splits=all_splits)
    else:
        raise ValueError(f"unknown STS task {task!r}; choose from {', '.join(TASKS)}")
    if limit:
        for sub in t.subsets:
            sub.sent1, sub.sent2, sub.gold = sub.sent1[:limit], sub.sent2[:limit], sub.gold[:limit]
    return t


# ----------------------------------------------------------------------------- scoring


COSINE_DECIMALS = 12


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of [n, H] arrays in float64; a zero vector scores 0 (SentEval's nan_to_num).

    Rounded to 1e-12 so that pairs whose cosines differ only by summation-order noise (a sentence
    paired with itself scores 1 +- 1 ulp) tie, as they should: otherwise their ranks, and Spearman
    in the 4th decimal, would depend on the backend's or BLAS's arithmetic order.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        c = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    return np.round(np.nan_to_num(c), COSINE_DECIMALS)


def _corr(sys: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    return {"pearson": float(pearsonr(sys, gold)[0]), "spearman": float(spearmanr(sys, gold)[0])}


def score_task(task: StsTask, vectors: dict[str, np.ndarray]) -> dict:
    """Correlations of one task given `vectors[sentence] -> [H]`.

    Returns {"subsets": {name: {pearson, spearman, n}}, "all": {pearson|spearman: {all, mean,
    wmean}}, "score": the paper's number (Spearman x 100)}.
    """
    subsets, sys_all, gold_all = {}, [], []
    for sub in task.subsets:
        e1 = np.stack([vectors[s] for s in sub.sent1])
        e2 = np.stack([vectors[s] for s in sub.sent2])
        sys = cosine(e1, e2)
        subsets[sub.name] = {**_corr(sys, sub.gold), "n": len(sub)}
        sys_all.append(sys)
        gold_all.append(sub.gold)
    n = np.array([v["n"] for v in subsets.values()], np.float64)
    pooled = _corr(np.concatenate(sys_all), np.concatenate(gold_all))
    agg = {}
    for kind in ("pearson", "spearman"):
        vals = np.array([v[kind] for v in subsets.values()])
        agg[kind] = {"all": pooled[kind], "mean": float(vals.mean()), "wmean": float(np.average(vals, weights=n))}
    score = agg["spearman"]["all"] if task.reported is None else subsets[task.reported]["spearman"]
    return {"subsets": subsets, "all": agg, "score": 100.0 * score, "n": int(n.sum())}


def paper_numbers(results: dict[str, dict]) -> dict[str, float]:
    """{task: score rounded to 2 decimals} in TASKS order, plus "Avg." over the tasks present."""
    out = {t: round(results[t]["score"], 2) for t in TASKS if t in results}
    if out:
        out["Avg."] = round(sum(out.values()) / len(out), 2)
    return out


def format_table(numbers: dict[str, float]) -> str:
    """The paper's row: STS12 ... SICK-R Avg., as SimCSE's evaluation.py prints it."""
    short = {"STSBenchmark": "STSB", "SICKRelatedness": "SICKR"}
    names = [short.get(k, k) for k in numbers]
    cells = [f"{v:.2f}" for v in numbers.values()]
    widths = [max(len(a), len(b)) + 2 for a, b in zip(names, cells)]
    sep = "+" + "+".join("-" * w for w in widths) + "+"
    row = lambda xs: "|" + "|".join(x.center(w) for x, w in zip(xs, widths)) + "|"  # noqa: E731
    return "\n".join([sep, row(names), sep, row(cells), sep])


def alignment_uniformity(task: StsTask, vectors: dict[str, np.ndarray], *, threshold: float = 4.0) -> dict:
    """Wang & Isola (2020) on normalised embeddings, as the SimCSE paper measures them on STS-B.

    alignment = mean ||f(x) - f(y)||^2 over pairs with gold > threshold (positive pairs);
    uniformity = log mean exp(-2 ||f(x) - f(y)||^2) over all pairs of distinct sentences
    (`losses.alignment` / `losses.uniformity`, in float64).
    """
    # Imported here: reading and scoring STS (download-sts, the torch backend) needs no jax.
    from simcse_jax.losses import alignment, uniformity

    def rows(vecs):
        return np.stack(vecs).astype(np.float64)

    # The reported split only (STS-B test or dev), not train, when SentEval's three are loaded.
    subs = [sub for sub in task.subsets if task.reported in (None, sub.name)]
    s1 = [s for sub in subs for s in sub.sent1]
    s2 = [s for sub in subs for s in sub.sent2]
    gold = np.concatenate([sub.gold for sub in subs])
    pos = np.flatnonzero(gold > threshold)
    align = float(alignment(rows([vectors[s1[i]] for i in pos]), rows([vectors[s2[i]] for i in pos])))
    e = rows([vectors[s] for s in dict.fromkeys(s1 + s2)])
    uniform = float(uniformity(e))
    return {"alignment": align, "uniformity": uniform, "positive_pairs": int(len(pos)), "sentences": int(len(e))}


def evaluate(
    embed: Callable[[Sequence[str]], np.ndarray],
    tasks: Sequence[StsTask],
    *,
    align_uniform: bool = True,
) -> dict:
    """Scores every task with `embed(sentences) -> [n, H]`; the one code path for all backends.

    Each task's unique sentences are embedded in one call. Returns {"tasks": {name: score_task},
    "paper": paper_numbers, "align_uniform": {...} (STS-B, when present)}.
    """
    results, au = {}, None
    for task in tasks:
        sentences = task.sentences()
        emb = np.asarray(embed(sentences))
        if emb.shape[0] != len(sentences):
            raise ValueError(f"embed returned {emb.shape[0]} rows for {len(sentences)} sentences")
        vectors = dict(zip(sentences, emb))
        results[task.name] = score_task(task, vectors)
        if align_uniform and task.name == "STSBenchmark":
            au = alignment_uniformity(task, vectors)
    out = {"tasks": results, "paper": paper_numbers(results)}
    if au is not None:
        out["align_uniform"] = au
    return out
