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
from simcse_jax.studies.report import PLOTS, collect, draw_memory, markdown_table, refused_points, series, table_rows
from simcse_jax.studies.sweep import parse_grid, plan_locally, plan_sweep, run_name, scaled_learning_rate, shell_command

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
              compile_s=None, steps=20, seed=42, settings=None):
    """A run folder as the trainer leaves it: config.json (plus `settings`), results.json, metrics.jsonl."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(
        {"global_batch_size": batch, "learning_rate": lr, "grad_cache_chunk_size": chunk, "seed": seed, "max_steps": steps,
         **(settings or {})}))
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


# ----------------------------------------------------------------------------- the planner's word

MIB = 2**20
LIMIT_041 = int(0.04 * 2**30)  # `--memory-limit-gib 0.04`, as plan.resolve_limit turns it into bytes


def write_plan_json(folder: Path, *, batch, chunk=64, peak_mib=None, needed_mib=None, limit=LIMIT_041,
                    source="--memory-limit-gib 0.04", topology="cpu:2", devices=2, refused=None):
    """plan.json as `simcse-jax plan --json` writes it: with a peak (fits judged against `limit`),
    or, with `refused`, the compiler's refusal (exit 1, no memory analysis: peak_bytes null)."""
    folder.mkdir(parents=True, exist_ok=True)
    needed = None if needed_mib is None else int(needed_mib * MIB)
    plan = {"config": {"global_batch_size": batch, "grad_cache_chunk_size": chunk}, "topology": topology,
            "memory": {"peak_bytes": None if peak_mib is None else int(peak_mib * MIB), "needed_bytes": needed,
                       "limit_bytes": limit, "limit_source": source,
                       "fits": False if refused else (None if limit is None else needed <= limit)}}
    if refused:
        plan["refused"] = refused
    else:
        plan.update(devices=devices, roofline=None)
    (folder / "plan.json").write_text(json.dumps(plan))
    return plan


def study_folder(root: Path, batch: int, impl: str) -> Path:
    return root / f"global_batch_size={batch},contrastive_impl={impl}"


STUDY_GRID = ["--grid", "global_batch_size=256,2048", "--grid", "contrastive_impl=dense,ring"]


def test_sweep_skips_what_the_planner_refused_and_comments_its_command(tmp_path, capsys):
    """Local training leaves out a run whose plan.json does not fit (one line saying why and how to
    train it anyway) and still exits 0; --emit-commands comments its line; either refusal format."""
    sweep = tmp_path / "sw"
    for batch, impl in ((256, "dense"), (256, "ring"), (2048, "ring")):  # trained already: nothing to train
        write_run(study_folder(sweep, batch, impl), batch=batch, lr=3e-5, chunk=64, peak=28.0,
                  settings={"contrastive_impl": impl})
        write_plan_json(study_folder(sweep, batch, impl), batch=batch, peak_mib=28.3, needed_mib=28.3)
    refused = study_folder(sweep, 2048, "dense")
    write_plan_json(refused, batch=2048, peak_mib=49.1, needed_mib=49.1)
    argv = ["sweep", "--config", DEMO, "--workdir", str(sweep), *STUDY_GRID, "--set", "grad_cache_chunk_size=64"]

    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("already done") == 3 and out.count("refused by the planner: ") == 1
    line = next(x for x in out.splitlines() if refused.name in x)
    assert line.endswith(f": skipped (refused by the planner: needs 49.1 MiB per device > limit 41.0 MiB "
                         f"(--memory-limit-gib 0.04); delete {refused / 'plan.json'} to train it anyway)")
    assert "3/4 runs complete" in out and "1 refused by the planner (not trained)" in out
    assert sorted(p.name for p in refused.iterdir()) == ["plan.json"]  # no train.log: nothing was started

    assert cli.main(argv + ["--emit-commands"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    commands = {r["name"]: r["command"] for r in json.loads((sweep / "sweep.json").read_text())["runs"]}
    assert len(lines) == 4 and [x for x in lines if x.startswith("#")] == [
        f"# refused by the planner (needs 49.1 MiB per device > limit 41.0 MiB (--memory-limit-gib 0.04)): {commands[refused.name]}"]
    assert sorted(x for x in lines if not x.startswith("#")) == sorted(c for n, c in commands.items() if n != refused.name)

    # The compiler's refusal on a TPU topology (plan exits 1): no peak, with or without what it wanted.
    hbm = 16 * 2**30
    write_plan_json(refused, batch=2048, needed_mib=17_695, limit=hbm, source="v5e HBM", topology="v5e:2x2",
                    refused="does not fit: the compiler for v5e:2x2 ran out of memory at global batch 2048")
    assert cli.main(argv) == 0
    assert "(refused by the planner: needs 17,695.0 MiB per device > limit 16,384.0 MiB (v5e HBM); " in capsys.readouterr().out
    write_plan_json(refused, batch=2048, limit=hbm, source="v5e HBM", topology="v5e:2x2", refused="does not fit: ...")
    assert cli.main(argv) == 0
    assert "(refused by the planner: the compiler ran out of memory (> limit 16,384.0 MiB (v5e HBM)); " in capsys.readouterr().out

    # Deleting plan.json is what trains it anyway; a plan.json that is no plan stops the sweep before anything trains.
    (refused / "plan.json").write_text('{"memory": {}}')
    assert cli.main(argv) == 2
    assert f"{refused / 'plan.json'}: not a `simcse-jax plan --json` file" in capsys.readouterr().err
    assert not (refused / "train.log").exists()


STAND_IN_PLAN = '''import json, sys
from pathlib import Path

args = sys.argv[1:]  # -m simcse_jax.cli plan --config C --topology T --json PATH --set KEY=VALUE ...
path = Path(args[args.index("--json") + 1])
batch = int(next(a.split("=", 1)[1] for a in args if a.startswith("global_batch_size=")))
memory = {"peak_bytes": 1000 * batch, "needed_bytes": 1000 * batch, "limit_bytes": 2**30, "limit_source": "v5e HBM", "fits": True}
if batch == 64:  # a plan that fails for another reason: exit 1, nothing written
    sys.exit("Traceback ...: some bug")
if batch == 32:  # the compiler's refusal, in the format plan.py writes for it
    memory.update(peak_bytes=None, needed_bytes=None, fits=False)
    path.write_text(json.dumps({"memory": memory, "refused": "does not fit: the compiler ran out of memory",
                                "config": {"global_batch_size": batch}, "topology": "v5e:2x2"}))
    print("does not fit: the compiler for v5e:2x2 ran out of memory at global batch 32")
    sys.exit(1)
path.write_text(json.dumps({"memory": memory, "config": {"global_batch_size": batch, "grad_cache_chunk_size": 0},
                            "topology": "v5e:2x2", "devices": 4, "roofline": None}))
'''


def test_sweep_plan_counts_the_compilers_refusal_as_planned_not_failed(tmp_path):
    """`plan` on a TPU topology exits 1 when the compiler refuses the program, writing plan.json with
    fits false and no peak: that point is planned (does not fit); an exit 1 without one is a failure.
    The compiler is not on this machine: a stand-in for `python -m simcse_jax.cli plan` answers as
    plan.py does for each batch."""
    import io
    import os
    import sys

    (tmp_path / "plan_stand_in.py").write_text(STAND_IN_PLAN)
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(str(tmp_path / "plan_stand_in.py"))} "$@"\n')
    os.chmod(python, 0o755)
    sweep = tmp_path / "sw"
    runs = plan_sweep(DEMO, str(sweep), parse_grid(["global_batch_size=16,32,64"]))
    out = io.StringIO()
    status = plan_locally(DEMO, runs, "v5e:2x2", python=str(python), out=out)
    assert status == {"global_batch_size=16": "planned", "global_batch_size=32": "planned: does not fit",
                      "global_batch_size=64": "failed (exit 1)"}
    assert "[2/3] global_batch_size=32: planned in " in out.getvalue()
    assert "refused by the compiler, DOES NOT FIT (v5e HBM 1,024 MiB)" in out.getvalue()
    assert "plan FAILED (exit 1): Traceback ...: some bug" in out.getvalue()
    # Planned again: the refusal is kept (not planned anew), the failure is retried.
    status = plan_locally(DEMO, runs, "v5e:2x2", python=str(python), out=out)
    assert status["global_batch_size=32"] == "skipped (plan.json exists)" and status["global_batch_size=64"] == "failed (exit 1)"


def test_report_shows_the_study_past_the_planners_limit(tmp_path, capsys):
    """A dense vs ring study: dense at 2048 refused by the planner (peak above the limit), dense at
    4096 refused by the compiler (no peak); neither trained. Their rows, the planner column, the
    series they belong to (from sweep.json's grid), the limit line and the refused marks."""
    plt = pytest.importorskip("matplotlib.pyplot")
    sweep = tmp_path / "sw"
    batches, peaks = (256, 2048, 4096), {("dense", 256): 27.8, ("dense", 2048): 49.1, ("ring", 256): 27.8,
                                         ("ring", 2048): 28.3, ("ring", 4096): 28.9}
    grid = {"global_batch_size": [str(b) for b in batches], "contrastive_impl": ["dense", "ring"]}
    runs = []
    for batch in batches:
        for impl in ("dense", "ring"):
            folder = study_folder(sweep, batch, impl)
            runs.append({"name": folder.name, "workdir": str(folder), "learning_rate": 3e-5, "skipped": None,
                         "grid": {"global_batch_size": str(batch), "contrastive_impl": impl}})
            if (impl, batch) == ("dense", 4096):
                write_plan_json(folder, batch=batch, needed_mib=None, refused="does not fit: the compiler ran out of memory")
                continue
            write_plan_json(folder, batch=batch, peak_mib=peaks[impl, batch], needed_mib=peaks[impl, batch])
            if (impl, batch) != ("dense", 2048):
                write_run(folder, batch=batch, lr=3e-5, chunk=64, devices=2, peak=round(peaks[impl, batch], 1), steps=2,
                          settings={"contrastive_impl": impl, "contrastive_block_size": 64})
    (sweep / "sweep.json").write_text(json.dumps({"grid": grid, "runs": runs}))

    assert cli.main(["report", str(sweep)]) == 0
    table = capsys.readouterr().out
    rows = {(r["settings"]["contrastive_impl"], r["global_batch"]): r
            for r in json.loads((sweep / "report" / "report.json").read_text())["runs"]}
    assert len(rows) == 6
    for key in (("dense", 2048), ("dense", 4096)):
        assert rows[key]["status"] == "not trained: refused by the planner" and rows[key]["planner_fits"] is False
        assert rows[key]["steps"] is None and rows[key]["peak_memory_mib"] is None
    assert rows["dense", 2048]["planned_peak_memory_mib"] == pytest.approx(49.1, abs=1e-6)
    assert rows["dense", 4096]["planned_peak_memory_mib"] is None
    assert rows["dense", 4096]["planner_refusal"] == "the compiler ran out of memory (> limit 41.0 MiB (--memory-limit-gib 0.04))"
    assert rows["ring", 4096]["status"] == "completed" and rows["ring", 4096]["planner_fits"] is True
    assert rows["dense", 2048]["settings"] == {"global_batch_size": 2048, "contrastive_impl": "dense"}  # typed as config.json

    header, cells = table_rows(collect([sweep]))
    col = {name: i for i, name in enumerate(header)}
    by_name = {row[col["run"]]: row for row in cells}
    assert by_name[study_folder(sweep, 2048, "dense").name][col["planner"]] == "refused"
    assert by_name[study_folder(sweep, 2048, "dense").name][col["planned peak MiB/device"]] == "49"
    assert by_name[study_folder(sweep, 4096, "dense").name][col["planned peak MiB/device"]] == "refused"
    assert by_name[study_folder(sweep, 4096, "ring").name][col["planner"]] == "fits"
    assert markdown_table(collect([sweep])) in table

    # Trained and untrained runs of one loss are one line: the untrained ones' settings come from the grid.
    records = collect([sweep])
    planned = {label: [(b, round(mib, 3)) for b, mib in points]
               for label, points in series(records, "planned_peak_memory_mib", always=("grad_cache_chunk_size",)).items()}
    assert planned == {"contrastive_impl=dense, grad cache chunk 64": [(256, 27.8), (2048, 49.1)],
                       "contrastive_impl=ring, grad cache chunk 64": [(256, 27.8), (2048, 28.3), (4096, 28.9)]}
    assert refused_points(records) == [(2048, pytest.approx(49.1)), (4096, pytest.approx(LIMIT_041 / MIB))]
    fig, ax = plt.subplots()
    draw_memory(ax, records)
    lines = {line.get_label(): line for line in ax.get_lines()}
    limit_line = lines["planner's limit: --memory-limit-gib 0.04 (41 MiB)"]
    assert set(limit_line.get_ydata()) == {LIMIT_041 / MIB}
    crosses = lines["refused by the planner (not trained)"]
    assert list(crosses.get_xdata()) == [2048, 4096] and crosses.get_ydata()[0] > LIMIT_041 / MIB
    assert list(lines["contrastive_impl=ring, grad cache chunk 64"].get_xdata()) == [256, 2048, 4096]  # measured, solid
    plt.close(fig)
    check_png(sweep / "report" / "memory_vs_batch.png")


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


@pytest.mark.slow
def test_study_past_the_dense_limit_trains_ring_where_the_planner_refuses_dense(tiny_model_dir, train_samples_dir,
                                                                               tmp_path, capsys, monkeypatch):
    """Issue 21's scaling study through the CLI: `sweep --plan` over global batch x loss with a
    per-device limit that dense at the largest batch exceeds and ring there fits, then `sweep`
    trains every run but that one (skipped as refused, exit 0), then `report`."""
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")  # the runs' devices (see above)
    train_file = train_samples_dir / "wiki1m_for_simcse.head11914.txt"
    batches, steps = (256, 2048), 2
    with train_file.open() as f:
        assert sum(1 for _ in f) >= batches[-1] * steps  # every step of the largest run reads new sentences
    # 0.04 GiB = 41 MiB per device. Measured on cpu:2 (needed_bytes, MiB): ~28 for both losses at
    # 256 and for ring at 2048 (the parameters and Adam state), ~49 for dense at 2048 (its
    # [1024, 2048] fp32 logits and their gradient on each device); the limit sits between, which
    # the assertions below check from the plans rather than trusting these numbers.
    limit_gib = 0.04
    sweep = tmp_path / "sweep"
    argv = ["sweep", "--config", DEMO, "--workdir", str(sweep), "--grid", f"global_batch_size={','.join(map(str, batches))}",
            "--grid", "contrastive_impl=dense,ring",
            # Gradient caching in chunks of 64 and ring blocks of 64 keys: the encoder's activations
            # and ring's working set stop growing with the batch, so dense's logits are what grows.
            "--set", f"model={tiny_model_dir}", "--set", "max_seq_length=16", "--set", "grad_cache_chunk_size=64",
            "--set", "contrastive_block_size=64", "--set", f"train_file={train_file}",
            "--set", f"data_cache_dir={tmp_path / 'cache'}", "--set", f"max_steps={steps}", "--set", "log_every=1",
            "--set", "evaluators=", "--set", "do_test_eval=false", "--set", "do_export=false",
            "--set", "async_checkpointing=false",
            # Without oneDNN the plan's compiled step goes into the persistent cache and each run
            # loads that very program instead of compiling it again (~10 s a run here).
            "--set", "cpu_onednn=false"]

    assert cli.main(argv + ["--plan", "--topology", "cpu:2", "--plan-args", f"--memory-limit-gib {limit_gib}"]) == 0
    out = capsys.readouterr().out
    plans = {(impl, b): json.loads((study_folder(sweep, b, impl) / "plan.json").read_text())["memory"]
             for b in batches for impl in ("dense", "ring")}
    limit = int(limit_gib * 2**30)
    largest = batches[-1]
    assert all(m["limit_bytes"] == limit for m in plans.values())
    assert plans["dense", largest]["needed_bytes"] > limit >= plans["ring", largest]["needed_bytes"]
    assert [key for key, m in plans.items() if not m["fits"]] == [("dense", largest)]
    # dense grows with the batch, ring (almost) does not: 8x the batch adds > 5x more to dense's peak.
    growth = {impl: plans[impl, largest]["peak_bytes"] - plans[impl, batches[0]]["peak_bytes"] for impl in ("dense", "ring")}
    assert growth["dense"] > 5 * max(growth["ring"], 2**20)
    assert "(1 does not fit: `sweep` without --plan will skip it)" in out

    assert cli.main(argv) == 0, [p.joinpath("train.log").read_text()[-2000:] for p in sweep.glob("*/train.log")]
    out = capsys.readouterr().out
    assert out.count(": done in ") == 3 and "3/4 runs complete" in out
    refused = study_folder(sweep, largest, "dense")
    assert f"{refused.name} (lr 3e-05): skipped (refused by the planner: needs " in out
    assert not (refused / "results.json").exists() and not (refused / "train.log").exists()
    for (impl, batch), memory in plans.items():
        if (impl, batch) == ("dense", largest):
            continue
        results = json.loads((study_folder(sweep, batch, impl) / "results.json").read_text())
        assert results["status"] == "completed" and results["steps"] == steps and results["devices"] == 2
        # The trainer ran the program the planner compiled: the same peak (results round to 0.1 MiB).
        assert results["step_peak_memory_mib"] == pytest.approx(memory["peak_bytes"] / 2**20, abs=0.06)

    assert cli.main(["report", str(sweep)]) == 0
    rows = {(r["settings"]["contrastive_impl"], r["global_batch"]): r
            for r in json.loads((sweep / "report" / "report.json").read_text())["runs"]}
    assert rows["ring", largest]["status"] == "completed" and rows["ring", largest]["steps"] == steps
    assert rows["ring", largest]["planner_fits"] is True and rows["ring", largest]["peak_memory_mib"] is not None
    assert rows["dense", largest]["status"] == "not trained: refused by the planner"
    assert rows["dense", largest]["planner_fits"] is False and rows["dense", largest]["steps"] is None
    assert rows["dense", largest]["planned_peak_memory_mib"] > rows["dense", largest]["planned_limit_mib"] == limit / 2**20
    check_png(sweep / "report" / "memory_vs_batch.png")
