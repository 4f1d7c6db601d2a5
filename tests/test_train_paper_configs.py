"""The paper configs run to their end on this CPU: bfloat16 compute (as every paper setting), the
STS test table, a verified export and results.json; and the table is the export's table.

Each run goes through the command line, as a user starts it (`simcse-jax train --config
configs/...:VARIANT --set ...`), with a few steps of a small batch.
"""

import json
from pathlib import Path

import pytest

from simcse_jax import cli, sts

REPO = Path(__file__).resolve().parents[1]
WIKI = "wiki1m_for_simcse.head11914.txt"
NLI = "snli_dev_triples_simcse_format.csv"
pytestmark = pytest.mark.slow  # whole training runs with evaluation and export


def cli_train(config: str, workdir: Path, **overrides) -> int:
    sets = [x for k, v in overrides.items() for x in ("--set", f"{k}={v}")]
    return cli.main(["train", "--config", str(REPO / "configs" / config), "--workdir", str(workdir), "--no-progress", *sets])


def short_run(model_dir, train_file, **changes) -> dict:
    """A few steps of batch 16 with the paper config's objective, dtype and poolers."""
    return {"model": model_dir, "train_file": train_file, "global_batch_size": 16, "max_steps": 4, "eval_steps": 2,
            "log_every": 1, "learning_rate": 1e-4, **changes}


@pytest.mark.parametrize("config, sample", [("unsup_simcse.py:bert-base-uncased", WIKI), ("sup_simcse.py:bert-base-uncased", NLI)])
def test_paper_config_in_bf16_completes_with_table_export_and_results(config, sample, tiny_model_dir, train_samples_dir,
                                                                      sts_dir, tmp_path, capfd):
    """A 2-layer random BERT in the paper config: exit 0, `completed`, the STS table, a verified
    export (transformers reproduces the float32 embeddings to 1e-5) and results.json."""
    workdir = tmp_path / "run"
    code = cli_train(config, workdir, **short_run(tiny_model_dir, train_samples_dir / sample, sts_dir=sts_dir))
    err = capfd.readouterr().err
    assert code == 0, err[-3000:]
    results = json.loads((workdir / "results.json").read_text())
    assert results["status"] == "completed" and results["steps"] == 4
    assert results["compute_dtype"] == "bfloat16" and results["eval_dtype"] == "float32"
    assert set(results["sts_test"]["paper"]) == set(sts.TASKS) | {"Avg."}
    assert (workdir / "export" / "model.safetensors").is_file() and results["export_dir"] == str(workdir / "export")
    assert "exported the" in err and "STS test (Spearman x 100, " in err and ", float32, step " in err
    for key in ("eval_seconds", "checkpoint_seconds", "test_eval_seconds", "export_seconds", "train_seconds", "loop_seconds"):
        assert results[key] >= 0, key
    assert results["train_seconds"] <= results["loop_seconds"]


def test_bf16_run_test_table_equals_the_torch_evaluation_of_its_export(minilm_dir, train_samples_dir, sts_dir, tmp_path, capfd):
    """Real weights (MiniLM) trained in bfloat16: the `sts_test` of results.json equals
    `simcse-jax eval <workdir>/export --backend torch` within 0.01 on each of the 7 tasks and the
    average. (With random weights, float32 rounding alone moves Spearman by up to 0.03: ties.)"""
    workdir = tmp_path / "run"
    code = cli_train("unsup_simcse.py:bert-base-uncased", workdir,
                     **short_run(minilm_dir, train_samples_dir / WIKI, sts_dir=sts_dir, max_steps=3, eval_steps=3))
    assert code == 0, capfd.readouterr().err[-3000:]
    results = json.loads((workdir / "results.json").read_text())
    assert results["compute_dtype"] == "bfloat16"
    ours = results["sts_test"]["paper"]
    out = tmp_path / "torch.json"
    assert cli.main(["eval", str(workdir / "export"), "--backend", "torch", "--pooler", results["eval_pooler"],
                     "--sts-dir", str(sts_dir), "--output", str(out)]) == 0
    theirs = json.loads(out.read_text())["paper"]
    assert set(ours) == set(theirs) == set(sts.TASKS) | {"Avg."}
    worst = max(abs(ours[k] - theirs[k]) for k in ours)
    print(f"bf16-trained MiniLM: results.json vs torch eval of the export, worst task difference {worst:.4f}")
    assert worst <= 0.01 + 1e-9, (ours, theirs)
