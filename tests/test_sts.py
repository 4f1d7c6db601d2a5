"""STS data reading and scoring (`simcse_jax.sts`) against an independent SentEval-style computation."""

import csv
import shutil
import zlib

import numpy as np
import pytest
from scipy.spatial.distance import pdist
from scipy.stats import pearsonr, spearmanr

from simcse_jax import sts

# The pair counts the SimCSE paper's SentEval data has (the acceptance list).
PAIRS = {"STS12": 3108, "STS13": 1500, "STS14": 3750, "STS15": 3000, "STS16": 1186,
         "STSBenchmark": 1379, "SICKRelatedness": 4927}


def fake_vec(sentence: str, dim: int = 8) -> np.ndarray:
    """A deterministic pseudo-embedding: same text, same vector, for any caller."""
    rng = np.random.default_rng(zlib.crc32(sentence.encode("utf-8")))
    base = rng.standard_normal(dim)
    base[0] += 0.05 * len(sentence.split())  # some correlation with length, so scores are not ~0
    return base.astype(np.float32)


def fake_embed(sentences):
    return np.stack([fake_vec(s) for s in sentences])


# ---- independent reader + scorer, written the way SentEval's STSEval does it


def _senteval_pairs(sts_dir, task):
    """{subset: (sent1, sent2, gold)} read with csv / plain file I/O, SentEval's .split() tokens."""
    if task in sts.STS_YEARS:
        folder, subsets = sts.STS_YEARS[task]
        out = {}
        for name in subsets:
            with open(sts_dir / folder / f"STS.input.{name}.txt", encoding="utf8") as f:
                pairs = [line.split("\t") for line in f.read().splitlines()]
            with open(sts_dir / folder / f"STS.gs.{name}.txt", encoding="utf8") as f:
                gold = f.read().splitlines()
            keep = [i for i, g in enumerate(gold) if g != ""]
            out[name] = ([pairs[i][0].split() for i in keep], [pairs[i][1].split() for i in keep],
                         np.array([float(gold[i]) for i in keep]))
        return out
    if task == "STSBenchmark":
        path, skip, cols = sts_dir / "STSBenchmark" / "sts-test.csv", 0, (5, 6, 4)
    else:
        path, skip, cols = sts_dir / "SICK" / "SICK_test_annotated.txt", 1, (1, 2, 3)
    with open(path, encoding="utf8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[skip:]
    rows = [[c.strip() for c in r] for r in rows]
    return {"test": ([r[cols[0]].split() for r in rows], [r[cols[1]].split() for r in rows],
                     np.array([float(r[cols[2]]) for r in rows]))}


def senteval_cosine(u, v):
    # senteval.utils.cosine, in float64 (SentEval runs it on the batcher's float32 output)
    u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
    # rounded like sts.cosine: identical sentences tie at 1.0 instead of ranking by rounding noise
    return round(np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v)), 12)


def _senteval_scores(pairs):
    res, all_sys, all_gs = {}, [], []
    for name, (s1, s2, gold) in pairs.items():
        sys = np.array([senteval_cosine(fake_vec(" ".join(a)), fake_vec(" ".join(b))) for a, b in zip(s1, s2)])
        res[name] = (pearsonr(sys, gold)[0], spearmanr(sys, gold)[0], len(gold))
        all_sys += list(sys)
        all_gs += list(gold)
    n = [r[2] for r in res.values()]
    agg = {}
    for k, kind in enumerate(("pearson", "spearman")):
        vals = [r[k] for r in res.values()]
        pooled = (pearsonr if kind == "pearson" else spearmanr)(all_sys, all_gs)[0]
        agg[kind] = {"all": pooled, "mean": np.mean(vals), "wmean": np.average(vals, weights=n)}
    return res, agg


@pytest.fixture(scope="module")
def all_tasks(sts_dir):
    return [sts.load_task(sts_dir, t) for t in sts.TASKS]


def test_pair_counts(all_tasks):
    assert {t.name: sum(len(s) for s in t.subsets) for t in all_tasks} == PAIRS


@pytest.mark.parametrize("task", sts.TASKS)
def test_scores_equal_independent_scipy(sts_dir, all_tasks, task):
    t = next(x for x in all_tasks if x.name == task)
    ours = sts.evaluate(fake_embed, [t])["tasks"][task]
    res, agg = _senteval_scores(_senteval_pairs(sts_dir, task))
    assert set(ours["subsets"]) == set(res)
    for name, (p, s, n) in res.items():
        got = ours["subsets"][name]
        assert got["n"] == n
        np.testing.assert_allclose([got["pearson"], got["spearman"]], [p, s], rtol=0, atol=1e-7)
    for kind in ("pearson", "spearman"):
        for a in ("all", "mean", "wmean"):
            np.testing.assert_allclose(ours["all"][kind][a], agg[kind][a], rtol=0, atol=1e-7)
    paper = agg["spearman"]["all"] if task in sts.STS_YEARS else res["test"][1]
    np.testing.assert_allclose(ours["score"], 100 * paper, rtol=0, atol=1e-5)


def test_paper_numbers_average_rounded_scores(sts_dir, all_tasks):
    out = sts.evaluate(fake_embed, all_tasks, align_uniform=False)
    nums = out["paper"]
    assert list(nums) == [*sts.TASKS, "Avg."]
    rounded = [round(out["tasks"][t]["score"], 2) for t in sts.TASKS]
    assert nums["Avg."] == round(sum(rounded) / 7, 2)
    table = sts.format_table(nums)
    assert "STSB" in table and "SICKR" in table and f"{nums['STS12']:.2f}" in table


def test_alignment_uniformity_match_formula(sts_dir, all_tasks):
    t = next(x for x in all_tasks if x.name == "STSBenchmark")
    au = sts.evaluate(fake_embed, [t])["align_uniform"]
    s1, s2, gold = _senteval_pairs(sts_dir, "STSBenchmark")["test"]

    def unit(v):
        v = np.asarray(v, np.float64)
        return v / np.linalg.norm(v)

    pos = [i for i, g in enumerate(gold) if g > 4]
    align = np.mean([np.sum((unit(fake_vec(" ".join(s1[i]))) - unit(fake_vec(" ".join(s2[i])))) ** 2) for i in pos])
    sents = sorted({" ".join(s) for s in s1 + s2})
    e = np.stack([unit(fake_vec(s).astype(np.float64)) for s in sents])
    uniform = np.log(np.mean(np.exp(-2 * pdist(e, "sqeuclidean"))))
    assert au["positive_pairs"] == len(pos) and au["sentences"] == len(sents)
    np.testing.assert_allclose([au["alignment"], au["uniformity"]], [align, uniform], rtol=1e-9)


def test_senteval_whitespace_join():
    assert sts.senteval_text("  a\tb \u00a0c  d\n") == "a b c d"


def test_dev_split_and_senteval_layout(sts_dir, tmp_path):
    # SentEval keeps STS-B at STS/STSBenchmark; our data has it at the top level. Both load alike.
    (tmp_path / "STS").mkdir()
    shutil.copytree(sts_dir / "STSBenchmark", tmp_path / "STS" / "STSBenchmark")
    a = sts.load_task(tmp_path, "STSBenchmark", "dev", all_splits=True)
    b = sts.load_task(sts_dir, "STSBenchmark", "dev", all_splits=True)
    assert [s.name for s in a.subsets] == ["train", "dev", "test"] and a.reported == "dev"
    assert [len(s) for s in a.subsets] == [len(s) for s in b.subsets]
    assert a.subsets[1].sent1 == b.subsets[1].sent1
    with pytest.raises(sts.StsDataError, match="only a test set"):
        sts.load_task(sts_dir, "STS12", "dev")


def test_missing_task_folder_names_expected_path(tmp_path):
    with pytest.raises(sts.StsDataError, match=str(tmp_path / "STS13-en-test")):
        sts.load_task(tmp_path, "STS13")


def test_missing_file_named(sts_dir, tmp_path):
    shutil.copytree(sts_dir / "STS13-en-test", tmp_path / "STS13-en-test")
    (tmp_path / "STS13-en-test" / "STS.gs.FNWN.txt").unlink()
    with pytest.raises(sts.StsDataError, match=r"STS\.gs\.FNWN\.txt: file not found"):
        sts.load_task(tmp_path, "STS13")


def test_gold_line_count_mismatch_named(sts_dir, tmp_path):
    shutil.copytree(sts_dir / "STS13-en-test", tmp_path / "STS13-en-test")
    gs = tmp_path / "STS13-en-test" / "STS.gs.OnWN.txt"
    gs.write_text("\n".join(gs.read_text().splitlines()[:-3]) + "\n")
    with pytest.raises(sts.StsDataError, match=r"STS\.gs\.OnWN\.txt: 558 lines but .*STS\.input\.OnWN\.txt has 561"):
        sts.load_task(tmp_path, "STS13")


def test_malformed_rows_named(sts_dir, tmp_path):
    shutil.copytree(sts_dir / "SICK", tmp_path / "SICK")
    f = tmp_path / "SICK" / "SICK_test_annotated.txt"
    lines = f.read_text(encoding="utf-8").splitlines()
    lines[5] = lines[5].replace("\t", " ", 3)
    f.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(sts.StsDataError, match=r"SICK_test_annotated\.txt:6: expected at least 4"):
        sts.load_task(tmp_path, "SICKRelatedness")
