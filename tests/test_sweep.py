"""Scaling sweeps and their report: the plan (grid, lr scaling, folders, commands), the table and
plots from run folders, and one small real sweep trained end to end."""

import json
import math
import shlex
from pathlib import Path

import pytest
from PIL import Image

from simcse_jax import cli
from simcse_jax.config import load_config
from simcse_jax.errors import ConfigError
from simcse_jax.studies.report import PLOTS, collect, markdown_table, series, table_rows
from simcse_jax.studies.sweep import parse_grid, plan_sweep, run_name, scaled_learning_rate, shell_command

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs" / "demo_cpu.py")


# ----------------------------------------------------------------------------- the plan


def test_grid_is_the_cartesian_product_in_order_with_one_folder_per_point(tmp_path):
    grid = parse_grid(["global_batch_size=16,32,64", "grad_cache_chunk_size=0,16"])
    runs = plan_sweep(DEMO, str(tmp_path), grid)
    points = [(r.grid["global_batch_size"], r.grid["grad_cache_chunk_size"]) for r in runs]
    assert points == [(b, c) for b in ("16", "32", "64") for c in ("0", "16")]  # the last key varies fastest
    assert [r.name for r in runs] == [f"global_batch_size={b},grad_cache_chunk_size={c}" for b, c in points]
    assert [r.workdir for r in runs] == [str(tmp_path / r.name) for r in runs]
    assert all(r.skipped is None for r in runs)
    # Names are safe folder names: a path separator in a value does not make a subfolder.
    assert "/" not in run_name({"train_file": "../shared/x.txt"})
    assert run_name({}) == "default"


def test_grid_over_the_contrastive_loss_implementation(tmp_path):
    """A scaling study grids over contrastive_impl like any key: each run trains with its loss; a
    value no run could take is left out of the plan with the reason naming the key."""
    grid = parse_grid(["global_batch_size=16,32", "contrastive_impl=dense,blockwise,ring,flash"])
    runs = plan_sweep(DEMO, str(tmp_path), grid, overrides=["contrastive_block_size=8"])
    assert [r.name for r in runs[:4]] == [f"global_batch_size=16,contrastive_impl={i}" for i in ("dense", "blockwise", "ring", "flash")]
    for run in runs:
        config = load_config(DEMO, list(run.overrides))
        assert config.contrastive_impl == run.grid["contrastive_impl"] and config.contrastive_block_size == 8
        if run.grid["contrastive_impl"] == "flash":
            assert run.skipped.startswith("contrastive_impl: choose one of dense, blockwise, ring")
        else:
            assert run.skipped is None


@pytest.mark.parametrize("rule", ["none", "linear", "sqrt"])
def test_learning_rate_scaling_rules(rule, tmp_path):
    base_lr = load_config(DEMO).learning_rate
    runs = plan_sweep(DEMO, str(tmp_path), parse_grid(["global_batch_size=16,32,64,128"]), lr_scaling=rule, base_batch_size=32)
    lrs = {int(r.grid["global_batch_size"]): r.learning_rate for r in runs}
    assert lrs[32] == pytest.approx(base_lr, rel=1e-12)  # the base batch keeps the config's rate
    for batch, lr in lrs.items():
        # each rule as a property: lr proportional to B^0, B^1 or B^(1/2)
        exponent = {"none": 0.0, "linear": 1.0, "sqrt": 0.5}[rule]
        assert math.log(lr / base_lr) == pytest.approx(exponent * math.log(batch / 32), abs=1e-12)
        assert scaled_learning_rate(base_lr, batch, 32, rule) == lr
    # Without --base-batch-size the config's own global batch is the base.
    default_base = load_config(DEMO).global_batch_size
    runs = plan_sweep(DEMO, str(tmp_path), parse_grid([f"global_batch_size={default_base}"]), lr_scaling="linear")
    assert runs[0].learning_rate == base_lr


def test_emitted_commands_parse_back_to_the_planned_configs(tmp_path):
    common = ["max_steps=3", "sts_dir=none"]
    runs = plan_sweep(DEMO, str(tmp_path / "sw"), parse_grid(["global_batch_size=16,64", "seed=1,2"]),
                      lr_scaling="sqrt", base_batch_size=64, overrides=common)
    for run in runs:
        argv = shlex.split(shell_command(DEMO, run))
        assert argv[:2] == ["simcse-jax", "train"]
        args = cli.build_parser().parse_args(argv[1:])
        assert args.workdir == run.workdir
        config = load_config(args.config, args.overrides)
        assert config.global_batch_size == int(run.grid["global_batch_size"])
        assert config.seed == int(run.grid["seed"])
        assert config.learning_rate == run.learning_rate  # exactly: the float round-trips
        assert config.max_steps == 3 and config.sts_dir is None
        # The launch scripts' form: CONFIG/WORKDIR/EXTRA_ARGS, then the launcher command.
        line = shlex.split(shell_command(DEMO, run, launcher="sbatch --nodes=2 launch/slurm.sh"))
        env = dict(item.split("=", 1) for item in line[:3])
        assert line[3:] == ["sbatch", "--nodes=2", "launch/slurm.sh"]
        assert env["CONFIG"] == DEMO and env["WORKDIR"] == run.workdir
        extra = shlex.split(env["EXTRA_ARGS"])
        assert load_config(env["CONFIG"], extra[1::2]) == config and set(extra[::2]) == {"--set"}


@pytest.mark.parametrize("grid, overrides, lr_scaling, message", [
    (["global_batch_sze=16,32"], [], "none", "global_batch_sze"),
    (["global_batch_size=16,big"], [], "none", "global_batch_size"),
    (["global_batch_size=16,16"], [], "none", "repeated"),
    (["seed=1", "seed=2"], [], "none", "seed"),
    (["global_batch_size=16"], ["global_batch_size=32"], "none", "both in --set and in --grid"),
    (["learning_rate=1e-5,3e-5"], [], "sqrt", "learning_rate"),
    (["global_batch_size=16"], ["temprature=0.1"], "none", "temprature"),
])
def test_bad_sweeps_are_refused_naming_the_key(grid, overrides, lr_scaling, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        plan_sweep(DEMO, str(tmp_path), parse_grid(grid), lr_scaling=lr_scaling, overrides=overrides)


def test_cli_emits_commands_writes_the_plan_and_leaves_out_invalid_points(tmp_path, capsys):
    workdir = tmp_path / "sw"
    rc = cli.main(["sweep", "--config", DEMO, "--workdir", str(workdir), "--grid", "global_batch_size=16,64",
                   "--grid", "grad_cache_chunk_size=0,32", "--lr-scaling", "linear", "--base-batch-size", "64",
                   "--emit-commands"])
    out, err = capsys.readouterr()
    assert rc == 0
    lines = out.strip().splitlines()
    assert len(lines) == 3  # (16, chunk 32) is left out: the chunk must divide the batch
    assert "global_batch_size=16,grad_cache_chunk_size=32" in err and "grad_cache_chunk_size" in err
    plan = json.loads((workdir / "sweep.json").read_text())
    assert plan["lr_scaling"] == "linear" and plan["grid"]["global_batch_size"] == ["16", "64"]
    assert [r["command"] for r in plan["runs"] if r["command"]] == lines
    assert [r["name"] for r in plan["runs"] if r["skipped"]] == ["global_batch_size=16,grad_cache_chunk_size=32"]
    assert not any(p.is_dir() for p in workdir.iterdir())  # nothing was trained
    # No valid point at all: an error before anything starts (the runs would train otherwise).
    assert cli.main(["sweep", "--config", DEMO, "--workdir", str(workdir), "--grid", "global_batch_size=8",
                     "--grid", "grad_cache_chunk_size=16", "--emit-commands"]) == 2
    assert cli.main(["sweep", "--config", DEMO, "--workdir", str(workdir), "--grid", "pooler=nope,cls_typo",
                     "--emit-commands"]) == 2
    assert "pooler: unknown pooler" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the report


def write_run(folder: Path, *, batch, lr, chunk=0, devices=1, dev=None, heldout=None, sps=None, peak=None,
              compile_s=None, steps=20, seed=42):
    """A run folder as the trainer leaves it: config.json, results.json, metrics.jsonl."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(
        {"global_batch_size": batch, "learning_rate": lr, "grad_cache_chunk_size": chunk, "seed": seed, "max_steps": steps}))
    results = {"status": "completed", "steps": steps, "global_batch_size": batch, "devices": devices, "processes": 1,
               "mesh": {"data": devices, "fsdp": 1, "tensor": 1}, "train_seconds": 12.5, "best_step": None,
               "best_dev_stsb": None}
    metrics = [{"step": s, "loss": 1.0 / s, "accuracy": 0.5, "sentences_per_s": sps or 1.0} for s in range(1, steps + 1)]
    if dev:
        best_step = max(dev, key=dev.get)
        results.update(best_step=best_step, best_dev_stsb=dev[best_step])
        metrics += [{"step": s, "eval/STSBenchmark": v, "eval/SICKRelatedness": v - 1} for s, v in dev.items()]
    if heldout:
        results["heldout"] = heldout
        metrics.append({"step": steps, "eval/heldout_alignment": heldout["alignment"],
                        "eval/heldout_uniformity": heldout["uniformity"]})
    for key, value in (("sentences_per_s", sps), ("step_peak_memory_mib", peak), ("compile_seconds", compile_s)):
        if value is not None:
            results[key] = value
    (folder / "results.json").write_text(json.dumps(results))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))


def check_png(path: Path) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] >= 500 and image.size[1] >= 300
        image.verify()


def test_report_table_json_and_plots_from_run_folders(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    spec = {}  # (batch, chunk) -> values written
    for i, batch in enumerate((16, 32, 64)):
        for chunk in (0, 16):
            values = dict(lr=3e-5 * math.sqrt(batch / 64), dev={10: 60.0 + i, 20: 61.5 + i + chunk / 100},
                          sps=100.0 * (i + 1) - chunk, peak=500.0 * (i + 1) / (2 if chunk else 1), compile_s=5.0 + i)
            spec[batch, chunk] = values
            write_run(sweep / f"global_batch_size={batch},grad_cache_chunk_size={chunk}", batch=batch, chunk=chunk, **values)
    (sweep / "sweep.json").write_text(json.dumps({"runs": [
        {"name": "global_batch_size=128,grad_cache_chunk_size=0", "workdir": str(sweep / "global_batch_size=128,grad_cache_chunk_size=0"),
         "grid": {"global_batch_size": "128", "grad_cache_chunk_size": "0"}, "learning_rate": 4.2e-5, "skipped": None}]}))

    assert cli.main(["report", str(sweep)]) == 0
    out = capsys.readouterr().out
    report = sweep / "report"
    for name in PLOTS:
        check_png(report / name)
    rows = json.loads((report / "report.json").read_text())["runs"]
    assert len(rows) == 7
    by_key = {(r["global_batch"], r["grad_cache_chunk"]): r for r in rows}
    for (batch, chunk), v in spec.items():
        row = by_key[batch, chunk]
        assert row["status"] == "completed" and row["best_dev_stsb"] == max(v["dev"].values())
        assert row["best_step"] == max(v["dev"], key=v["dev"].get) and row["peak_memory_mib"] == v["peak"]
        assert row["learning_rate"] == v["lr"] and row["sentences_per_s"] == v["sps"]
        assert row["dev_curve"] == [list(p) for p in sorted(v["dev"].items())]
    planned = by_key[128, 0]  # in sweep.json, not trained yet: listed, not invented
    assert planned["status"] == "no results" and planned["learning_rate"] == 4.2e-5 and planned["best_dev_stsb"] is None

    # The printed table is report.md's, one row per run with the values formatted from the runs.
    header, cells = table_rows(collect([sweep]))
    assert markdown_table(collect([sweep])) in (report / "report.md").read_text()
    assert markdown_table(collect([sweep])) in out
    col = {name: i for i, name in enumerate(header)}
    for row in cells:
        if row[col["status"]] != "completed":
            assert row[col["best STS-B dev (step)"]] == "–"
            continue
        batch = int(row[col["global batch"]])
        chunk = 0 if row[col["grad cache chunk"]] == "off" else int(row[col["grad cache chunk"]])
        v = spec[batch, chunk]
        best = max(v["dev"], key=v["dev"].get)
        assert row[col["best STS-B dev (step)"]] == f"{v['dev'][best]:.2f} ({best})"
        assert row[col["sentences/s"]] == f"{v['sps']:.1f}" and row[col["peak MiB/device"]] == f"{v['peak']:.0f}"
        assert row[col["lr"]] == f"{v['lr']:.3g}"

    # The memory plot's lines: with and without grad caching, each over the batches.
    mem = series(collect([sweep]), "peak_memory_mib", always=("grad_cache_chunk_size",))
    assert mem == {"grad cache chunk 16": [(b, spec[b, 16]["peak"]) for b in (16, 32, 64)],
                   "no grad cache": [(b, spec[b, 0]["peak"]) for b in (16, 32, 64)]}
    # Throughput: one line per device count even when only one count is present.
    assert set(series(collect([sweep]), "sentences_per_s", always=("devices",))) == {
        "1 device, grad cache chunk 16", "1 device, no grad cache"}


def test_report_without_sts_uses_heldout_statistics_and_several_device_counts(tmp_path, capsys):
    runs = tmp_path / "runs"
    for devices in (1, 8):
        for batch in (16, 64):
            write_run(runs / f"d{devices}_b{batch}", batch=batch, lr=3e-5, devices=devices, sps=10.0 * devices + batch,
                      heldout={"alignment": batch / 100, "uniformity": -batch / 10})
    out_dir = tmp_path / "out"
    assert cli.main(["report", str(runs), "--out", str(out_dir)]) == 0
    header, cells = table_rows(collect([runs]))
    assert "held-out align / uniform" in header and "best STS-B dev (step)" not in header
    for row in cells:
        batch = int(row[header.index("global batch")])
        assert row[header.index("held-out align / uniform")] == f"{batch / 100:.3f} / {-batch / 10:.3f}"
    lines = series(collect([runs]), "sentences_per_s", always=("devices",))
    assert lines == {f"{d} device{'s' if d > 1 else ''}": [(b, 10.0 * d + b) for b in (16, 64)] for d in (1, 8)}
    for name in PLOTS:  # no STS-B, no memory analysis: the plots say so instead of failing
        check_png(out_dir / name)
    assert cli.main(["report", str(tmp_path / "nothing_here")]) == 2


# ----------------------------------------------------------------------------- a real sweep


@pytest.mark.slow
def test_small_real_sweep_trains_resumes_and_reports(tiny_model_dir, train_samples_dir, sts_dir, tmp_path, capsys, monkeypatch):
    """Two runs (global batch 8 and 16, sqrt scaling), each trained in a subprocess."""
    # The runs inherit the environment: 2 devices (not the suite's 8) halve their compile time
    # and still show that the device count is the run's own.
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    sweep = tmp_path / "sweep"
    argv = ["sweep", "--config", DEMO, "--workdir", str(sweep), "--grid", "global_batch_size=8,16",
            "--lr-scaling", "sqrt", "--base-batch-size", "16",
            "--set", f"model={tiny_model_dir}", "--set", f"train_file={train_samples_dir / 'wiki1m_for_simcse.head11914.txt'}",
            "--set", f"data_cache_dir={tmp_path / 'cache'}", "--set", f"sts_dir={sts_dir}", "--set", "max_steps=2",
            "--set", "eval_steps=2", "--set", "log_every=1", "--set", "do_test_eval=false", "--set", "do_export=false",
            "--set", "async_checkpointing=false"]
    assert cli.main(argv) == 0, [p.joinpath("train.log").read_text()[-2000:] for p in sweep.glob("*/")]
    out = capsys.readouterr().out
    assert out.count(": done in ") == 2
    base_lr = load_config(DEMO).learning_rate
    for batch in (8, 16):
        results = json.loads((sweep / f"global_batch_size={batch}" / "results.json").read_text())
        config = json.loads((sweep / f"global_batch_size={batch}" / "config.json").read_text())
        assert results["status"] == "completed" and results["steps"] == 2 and results["devices"] == 2
        assert results["global_batch_size"] == batch and config["learning_rate"] == pytest.approx(base_lr * math.sqrt(batch / 16))
        assert results["best_dev_stsb"] is not None
    # Repeating the command trains nothing: both runs have results.json.
    assert cli.main(argv) == 0
    assert capsys.readouterr().out.count("already done") == 2

    assert cli.main(["report", str(sweep)]) == 0
    rows = {r["global_batch"]: r for r in json.loads((sweep / "report" / "report.json").read_text())["runs"]}
    for batch in (8, 16):
        results = json.loads((sweep / f"global_batch_size={batch}" / "results.json").read_text())
        assert rows[batch]["best_dev_stsb"] == results["best_dev_stsb"]
        assert rows[batch]["sentences_per_s"] == results.get("sentences_per_s")
        assert rows[batch]["dev_curve"][-1][0] == 2
    for name in PLOTS:
        check_png(sweep / "report" / name)
