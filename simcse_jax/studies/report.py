"""Sweep reports: `simcse-jax report runs/sweep [more sweep folders] [--out DIR]`.

Collects every run under the given folders (a folder holding results.json is a run; so is each
subfolder holding one; runs that `sweep.json` planned but that have no results yet are listed as
such) and writes to `--out` (default `<first folder>/report`):

- `report.md`: one table row per run (also printed): global batch, learning rate, steps, best
  STS-B dev (or the held-out alignment/uniformity of runs without STS data), throughput,
  compile time, the update step's peak memory per device, grad-cache chunk, devices;
- `report.json`: the same rows, with each run's dev curve from metrics.jsonl;
- `stsb_dev_vs_batch.png`: best STS-B dev vs global batch, and the dev curves vs step;
- `throughput_vs_batch.png`: sentences/s vs global batch, a line per device count (and, when
  the runs span several device counts, sentences/s vs devices, a line per batch);
- `memory_vs_batch.png`: peak memory vs global batch, a line with and one per chunk without
  gradient caching.

Planned next to measured: a run folder holding `plan.json` (written by `simcse-jax sweep
--plan`, i.e. `simcse-jax plan` for that grid point) adds the planned peak memory per device
and the roofline's sentences/s bound to the table, and as dashed lines to the throughput and
memory plots, whether or not the run has been trained yet. The table's "planner" column says
whether the plan fits its per-device limit (fits / refused / – without a limit or a plan); the
memory plot draws that limit as a horizontal line labelled with its source (`--memory-limit-gib`,
the chip's HBM) and marks each refused point with a red cross (at its planned peak, else at what
the compiler said it needed, else on the limit line). A refused run is not trained by `sweep`
(status "not trained: refused by the planner"); a plan the compiler refused has no planned peak
("refused" in the planned peak column, no dashed point).

Lines: runs that differ in anything besides the batch and its scaled learning rate (a grid key
such as seed, grad_cache_chunk_size or contrastive_impl, the device count) are drawn as separate
lines, named by those differences. A run not trained (no config.json) takes its settings from its
grid point in sweep.json, parsed as config.json would hold them; a key only some runs record is
no difference. A value no run recorded (no STS folder, no memory analysis on the backend)
makes its panel say so instead of failing. Plots use matplotlib's Agg backend (files only).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

from simcse_jax.config import parse_value
from simcse_jax.errors import ConfigError, SimcseError, UsageError
from simcse_jax.studies.sweep import PLAN_FILE, RUN_LOG, RUN_PLAN, planner_refusal

PLOTS = ("stsb_dev_vs_batch.png", "throughput_vs_batch.png", "memory_vs_batch.png")
DEV_KEY = "eval/STSBenchmark"
HELDOUT_KEY = "eval/heldout_uniformity"
# Config fields that differ between runs without making them different experiments.
_NOT_A_SETTING = {"global_batch_size", "learning_rate", "data_cache_dir"}


@dataclasses.dataclass
class RunRecord:
    name: str
    folder: str
    status: str  # results.json's status, or "no results" for a planned run without one
    global_batch: int | None = None
    learning_rate: float | None = None
    steps: int | None = None
    best_step: int | None = None
    best_dev_stsb: float | None = None
    heldout_alignment: float | None = None
    heldout_uniformity: float | None = None
    sts_test_avg: float | None = None
    sentences_per_s: float | None = None
    compile_s: float | None = None
    peak_memory_mib: float | None = None
    grad_cache_chunk: int | None = None
    devices: int | None = None
    train_s: float | None = None
    planned_peak_memory_mib: float | None = None  # plan.json: XLA's peak for the planned topology
    planned_sentences_per_s: float | None = None  # plan.json: the roofline's upper bound
    planned_topology: str | None = None
    planner_fits: bool | None = None  # plan.json's memory.fits: None without a plan or a limit
    planner_refusal: str | None = None  # why the plan does not fit (sweep.planner_refusal)
    planned_needed_memory_mib: float | None = None  # plan.json: peak + code, or what the compiler said it wanted
    planned_limit_mib: float | None = None  # plan.json: the per-device limit the plan was checked against
    planned_limit_source: str | None = None  # where that limit comes from (--memory-limit-gib, the chip's HBM)
    settings: dict = dataclasses.field(default_factory=dict)  # config.json, else the sweep.json grid point
    dev_curve: list = dataclasses.field(default_factory=list)  # [(step, value)] of DEV_KEY or HELDOUT_KEY
    dev_curve_key: str | None = None


# ----------------------------------------------------------------------------- collecting


def read_run(folder: Path, planned: dict | None = None) -> RunRecord:
    """One run folder (results.json, config.json, metrics.jsonl) -> RunRecord."""
    folder = Path(folder)
    settings = _read_json(folder / "config.json")
    if settings is None:  # not trained (yet): what the sweep will train it with
        settings = _grid_settings((planned or {}).get("grid") or {})
    record = RunRecord(name=folder.name, folder=str(folder), status="no results", settings=settings,
                       global_batch=settings.get("global_batch_size"), learning_rate=settings.get("learning_rate"),
                       grad_cache_chunk=settings.get("grad_cache_chunk_size"))
    if planned is not None:  # sweep.json: what the run will be trained with, before config.json exists
        record.learning_rate = record.learning_rate if record.learning_rate is not None else planned.get("learning_rate")
        for key, attr in (("global_batch_size", "global_batch"), ("grad_cache_chunk_size", "grad_cache_chunk")):
            if getattr(record, attr) is None and key in planned.get("grid", {}):
                setattr(record, attr, int(planned["grid"][key]))
    plan = _read_json(folder / RUN_PLAN)
    if plan is not None:
        memory = plan["memory"]
        mib = lambda key: None if memory.get(key) is None else memory[key] / 2**20  # noqa: E731
        # peak_bytes is null where the compiler refused the program (no memory analysis to read).
        record.planned_peak_memory_mib, record.planned_needed_memory_mib = mib("peak_bytes"), mib("needed_bytes")
        record.planned_limit_mib, record.planned_limit_source = mib("limit_bytes"), memory.get("limit_source")
        record.planner_fits, record.planner_refusal = memory.get("fits"), planner_refusal(plan)
        record.planned_sentences_per_s = (plan.get("roofline") or {}).get("sentences_per_s")
        record.planned_topology = plan.get("topology")
        record.devices = plan.get("devices")
        record.global_batch = record.global_batch or plan["config"]["global_batch_size"]
        if record.grad_cache_chunk is None:
            record.grad_cache_chunk = plan["config"]["grad_cache_chunk_size"]
    results = _read_json(folder / "results.json")
    if results is None:
        if record.planner_fits is False:  # what `sweep` does with it: skips it (see sweep.run_locally)
            record.status = "not trained: refused by the planner"
        elif (folder / RUN_LOG).is_file():
            record.status = "no results (failed or running; see train.log)"
        return record
    record.status = results.get("status", "?")
    record.global_batch = results.get("global_batch_size", record.global_batch)
    record.steps = results.get("steps")
    record.best_step = results.get("best_step")
    record.best_dev_stsb = results.get("best_dev_stsb")
    heldout = results.get("heldout") or {}
    record.heldout_alignment, record.heldout_uniformity = heldout.get("alignment"), heldout.get("uniformity")
    record.sts_test_avg = ((results.get("sts_test") or {}).get("paper") or {}).get("Avg.")
    record.sentences_per_s = results.get("sentences_per_s")
    record.compile_s = results.get("compile_seconds")
    record.peak_memory_mib = results.get("step_peak_memory_mib")
    record.devices = results.get("devices")
    record.train_s = results.get("train_seconds")
    record.dev_curve_key, record.dev_curve = _dev_curve(folder / "metrics.jsonl")
    return record


def _grid_settings(grid: dict[str, str]) -> dict:
    """sweep.json's {key: value text} typed as config.json holds them (so that '0' and 0 are one
    setting); a key this version no longer knows keeps its text rather than failing the report."""
    settings = {}
    for key, text in grid.items():
        try:
            settings[key] = parse_value(key, text)
        except ConfigError:
            settings[key] = text
    return settings


def _dev_curve(path: Path) -> tuple[str | None, list]:
    curves: dict[str, dict[int, float]] = {DEV_KEY: {}, HELDOUT_KEY: {}}
    if path.is_file():
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise ValueError(f"{path}:{n}: not a JSON line") from None
            for key, curve in curves.items():
                if row.get(key) is not None:
                    curve[int(row["step"])] = float(row[key])  # a resumed run's later line wins
    for key in (DEV_KEY, HELDOUT_KEY):
        if curves[key]:
            return key, sorted(curves[key].items())
    return None, []


def _read_json(path: Path):
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise ValueError(f"{path}: not valid JSON") from None


def collect(folders: list[Path]) -> list[RunRecord]:
    """Every run in `folders` (see the module doc), ordered by settings, devices, batch."""
    records, seen = [], set()
    for root in map(Path, folders):
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: no such folder")
        plan = _read_json(root / PLAN_FILE) or {}
        planned = {Path(r["workdir"]).name: r for r in plan.get("runs", []) if not r.get("skipped")}
        candidates = [root] if (root / "results.json").is_file() else []
        candidates += sorted(p.parent for p in root.glob("*/results.json"))
        candidates += [root / name for name in planned if not (root / name / "results.json").is_file()]
        for folder in candidates:
            key = folder.resolve()
            if key not in seen:
                seen.add(key)
                records.append(read_run(folder, planned.get(folder.name)))
    keys = _series_keys(records)
    return sorted(records, key=lambda r: (_series_label(r, keys), r.global_batch or 0, r.devices or 0, r.name))


# ----------------------------------------------------------------------------- table


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def table_rows(records: list[RunRecord]) -> tuple[list[str], list[list[str]]]:
    has = lambda attr: any(getattr(r, attr) is not None for r in records)  # noqa: E731
    columns = [("run", lambda r: r.name), ("status", lambda r: r.status),
               ("global batch", lambda r: _fmt(r.global_batch, "d")), ("lr", lambda r: _fmt(r.learning_rate, ".3g")),
               ("steps", lambda r: _fmt(r.steps, "d"))]
    if has("best_dev_stsb") or not has("heldout_alignment"):
        columns.append(("best STS-B dev (step)", lambda r: "–" if r.best_dev_stsb is None
                        else f"{r.best_dev_stsb:.2f} ({r.best_step})"))
    if has("heldout_alignment"):
        columns.append(("held-out align / uniform", lambda r: "–" if r.heldout_alignment is None
                        else f"{r.heldout_alignment:.3f} / {r.heldout_uniformity:.3f}"))
    if has("sts_test_avg"):
        columns.append(("STS test avg", lambda r: _fmt(r.sts_test_avg, ".2f")))
    columns.append(("sentences/s", lambda r: _fmt(r.sentences_per_s, ".1f")))
    if has("planned_sentences_per_s"):
        columns.append(("planned sentences/s (bound)", lambda r: _fmt(r.planned_sentences_per_s, ",.0f")))
    columns += [("compile s", lambda r: _fmt(r.compile_s, ".1f")), ("peak MiB/device", lambda r: _fmt(r.peak_memory_mib, ".0f"))]
    if has("planned_peak_memory_mib") or has("planner_refusal"):
        columns.append(("planned peak MiB/device", lambda r: "refused" if r.planned_peak_memory_mib is None and r.planner_refusal
                        else _fmt(r.planned_peak_memory_mib, ".0f")))
    if has("planned_topology") or has("planned_limit_mib"):
        columns.append(("planner", lambda r: "–" if r.planner_fits is None else "fits" if r.planner_fits else "refused"))
    if has("planned_topology"):
        columns.append(("planned for", lambda r: r.planned_topology or "–"))
    columns += [
                ("grad cache chunk", lambda r: "off" if r.grad_cache_chunk == 0 else _fmt(r.grad_cache_chunk, "d")),
                ("devices", lambda r: _fmt(r.devices, "d")), ("train s", lambda r: _fmt(r.train_s, ".0f"))]
    return [c for c, _ in columns], [[f(r) for _, f in columns] for r in records]


def markdown_table(records: list[RunRecord]) -> str:
    header, rows = table_rows(records)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- series


def _series_keys(records: list[RunRecord], always: tuple = ()) -> list[str]:
    """Settings that tell runs of the same global batch apart (and so deserve separate lines)."""
    keys = set(always)
    by_batch: dict = {}
    for r in records:
        by_batch.setdefault(r.global_batch, []).append(r)
    fields = sorted({k for r in records for k in r.settings} - _NOT_A_SETTING) + ["devices"]
    for group in by_batch.values():
        for key in fields:
            # A value a run did not record (an untrained run knows its grid point, and its device
            # count only from a plan that compiled) is unknown, not different.
            known = [_setting(r, key) for r in group if _records(r, key)]
            if len({json.dumps(v) for v in known}) > 1:
                keys.add(key)
    return sorted(keys)


def _records(r: RunRecord, key: str) -> bool:
    if key in ("devices", "grad_cache_chunk_size"):
        return _setting(r, key) is not None
    return key in r.settings


def _setting(r: RunRecord, key: str):
    if key == "devices":
        return r.devices
    if key == "grad_cache_chunk_size":
        return r.grad_cache_chunk
    return r.settings.get(key)


def _series_label(r: RunRecord, keys: list[str]) -> str:
    parts = []
    for key in keys:
        value = _setting(r, key)
        if key == "devices":
            parts.append(f"{value} device{'s' if value != 1 else ''}" if value is not None else "devices ?")
        elif key == "grad_cache_chunk_size":
            parts.append("no grad cache" if not value else f"grad cache chunk {value}")
        else:
            parts.append(f"{key}={value}")
    return ", ".join(parts) or "all runs"


def series(records: list[RunRecord], attr: str, always: tuple = ()) -> dict[str, list[tuple[int, float]]]:
    """{line label: [(global batch, value), ...] sorted by batch}, runs lacking the value left out."""
    keys = _series_keys(records, always)
    out: dict[str, list] = {}
    for r in records:
        value = getattr(r, attr)
        if value is not None and r.global_batch is not None:
            out.setdefault(_series_label(r, keys), []).append((r.global_batch, float(value)))
    return {label: sorted(points) for label, points in sorted(out.items())}


# ----------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node or in CI
    import matplotlib.pyplot as plt

    return plt


def _batch_axis(ax, batches) -> None:
    ax.set_xscale("log", base=2)
    ticks = sorted(set(batches))
    ax.set_xticks(ticks, [str(b) for b in ticks])
    ax.minorticks_off()
    ax.set_xlabel("global batch (sentences per step)")
    ax.grid(True, alpha=0.3)


def _lines(ax, data: dict, ylabel: str, empty: str, fmt: str = ".1f", planned: dict | None = None) -> None:
    """One line per series of `data`; `planned` (same shape) dashed beside them, labelled so."""
    data = {**data, **{f"planned: {label}": points for label, points in (planned or {}).items()}}
    if not data:
        ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes, wrap=True, fontsize=10)
        ax.set_xticks([]), ax.set_yticks([])
        return
    colors: dict[str, str] = {}
    for label, points in data.items():
        xs, ys = zip(*points)
        is_plan = label.startswith("planned: ")
        # A series and its plan share a colour; the plan's open squares leave the measured dots
        # visible where the two agree (the planner compiles the very program the trainer runs).
        color = colors.setdefault(label.removeprefix("planned: "), f"C{len(colors) % 10}")
        ax.plot(xs, ys, "s--" if is_plan else "o-", color=color, markerfacecolor="none" if is_plan else color, label=label)
        for x, y in points:  # the plan's figures below its points, the measured ones above
            ax.annotate(format(y, fmt), (x, y), textcoords="offset points", xytext=(0, -12 if is_plan else 6), ha="center",
                        fontsize=8, color=color if is_plan else "black")
    _batch_axis(ax, [x for points in data.values() for x, _ in points])
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)


def plot_dev(records: list[RunRecord], path: Path) -> None:
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    best = series(records, "best_dev_stsb")
    if best or not any(r.heldout_uniformity is not None for r in records):
        _lines(left, best, "best STS-B dev Spearman x 100",
               "no STS-B dev scores in these runs\n(train with --set sts_dir=... for them)", ".2f")
        left.set_title("best STS-B dev vs global batch")
    else:
        _lines(left, series(records, "heldout_uniformity"), "held-out uniformity (lower: more uniform)",
               "no held-out statistics", ".3f")
        left.set_title("no STS-B dev scores: held-out uniformity vs global batch")
    curves = [r for r in records if r.dev_curve]
    key = DEV_KEY if any(r.dev_curve_key == DEV_KEY for r in curves) else HELDOUT_KEY
    curves = [r for r in curves if r.dev_curve_key == key]
    if curves:
        for r in curves:
            steps, values = zip(*r.dev_curve)
            right.plot(steps, values, "o-", markersize=3, label=r.name)
        right.set_xlabel("step")
        right.set_ylabel("STS-B dev Spearman x 100" if key == DEV_KEY else "held-out uniformity")
        right.grid(True, alpha=0.3)
        right.legend(fontsize=8)
    else:
        right.text(0.5, 0.5, "no dev evaluations in metrics.jsonl", ha="center", va="center", transform=right.transAxes)
        right.set_xticks([]), right.set_yticks([])
    right.set_title("dev curves" if key == DEV_KEY else "held-out uniformity curves")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_throughput(records: list[RunRecord], path: Path) -> None:
    plt = _pyplot()
    device_counts = sorted({r.devices for r in records if r.devices is not None and r.sentences_per_s is not None})
    panels = 2 if len(device_counts) > 1 else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.5), squeeze=False)
    _lines(axes[0][0], series(records, "sentences_per_s", always=("devices",)), "sentences / s (median over logs)",
           "no throughput recorded (runs too short to log twice?)",
           planned=series(records, "planned_sentences_per_s", always=("devices",)))
    axes[0][0].set_title("throughput vs global batch")
    if panels == 2:
        ax = axes[0][1]
        by_batch: dict = {}
        for r in records:
            if r.devices is not None and r.sentences_per_s is not None:
                by_batch.setdefault(r.global_batch, []).append((r.devices, r.sentences_per_s))
        for batch, points in sorted(by_batch.items()):
            xs, ys = zip(*sorted(points))
            ax.plot(xs, ys, "o-", label=f"global batch {batch}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(device_counts, [str(d) for d in device_counts])
        ax.minorticks_off()
        ax.set_xlabel("devices")
        ax.set_ylabel("sentences / s")
        ax.set_title("throughput vs devices")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def refused_points(records: list[RunRecord]) -> list[tuple[int, float]]:
    """(global batch, MiB) of each run the planner refused: its planned peak, else what the
    compiler said it needed, else the limit itself (a refusal with no figure)."""
    points = []
    for r in records:
        if r.planner_fits is False and r.global_batch is not None:
            y = next((v for v in (r.planned_peak_memory_mib, r.planned_needed_memory_mib, r.planned_limit_mib) if v is not None), None)
            if y is not None:
                points.append((r.global_batch, y))
    return sorted(points)


def plot_memory(records: list[RunRecord], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    draw_memory(ax, records)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw_memory(ax, records: list[RunRecord]) -> None:
    """memory_vs_batch.png's panel: measured peaks (solid), planned peaks (dashed), the planner's
    per-device limits (dotted, labelled with their source) and the refused points (red crosses)."""
    measured = series(records, "peak_memory_mib", always=("grad_cache_chunk_size",))
    planned = series(records, "planned_peak_memory_mib", always=("grad_cache_chunk_size",))
    _lines(ax, measured, "update step peak memory per device (MiB)",
           "no peak memory recorded\n(the backend gave no memory analysis)", ".0f", planned=planned)
    if measured or planned:
        limits = sorted({(r.planned_limit_mib, r.planned_limit_source) for r in records if r.planned_limit_mib is not None})
        for mib, source in limits:
            ax.axhline(mib, color="black", linestyle=":", linewidth=1.2, label=f"planner's limit: {source} ({mib:,.0f} MiB)")
        refused = refused_points(records)
        if refused:
            xs, ys = zip(*refused)
            ax.plot(xs, ys, "X", color="red", markersize=11, linestyle="none", label="refused by the planner (not trained)")
        batches = [b for points in (*measured.values(), *planned.values(), refused) for b, _ in points]
        _batch_axis(ax, batches)  # again: a refused batch may have no other point
        ax.legend(fontsize=8)
    chunks = {r.grad_cache_chunk for r in records if r.peak_memory_mib is not None}
    # The hint only where gradient caching is the study's one question (not, e.g., dense vs ring).
    other_question = _series_keys(records, ("grad_cache_chunk_size",)) != ["grad_cache_chunk_size"]
    note = "" if not chunks or other_question or (any(chunks) and 0 in chunks) else (
        "\n(no grad-cache runs: add --grid grad_cache_chunk_size=0,N)" if not any(chunks) else "\n(no runs without grad cache)")
    ax.set_title("peak memory vs global batch" + note, fontsize=10)


def write_report(folders: list[Path], out: Path) -> tuple[list[RunRecord], str]:
    """Table and JSON always; then the plots (ImportError when matplotlib is missing)."""
    records = collect(folders)
    if not records:
        raise FileNotFoundError(f"no runs (*/results.json or {PLAN_FILE}) under {', '.join(map(str, folders))}")
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(records)
    (out / "report.md").write_text(
        f"# Sweep report\n\nRuns from {', '.join(map(str, folders))}. Plots: "
        + ", ".join(f"![{p}]({p})" for p in PLOTS) + "\n\n" + table)
    (out / "report.json").write_text(json.dumps({"runs": [dataclasses.asdict(r) for r in records], "plots": list(PLOTS)},
                                                indent=2, default=_json_default) + "\n")
    for name, plot in zip(PLOTS, (plot_dev, plot_throughput, plot_memory)):
        plot(records, out / name)
    return records, table


def _json_default(x):
    return None if isinstance(x, float) and not math.isfinite(x) else str(x)


# ----------------------------------------------------------------------------- CLI


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("report", help="table and plots (STS-B dev, throughput, memory vs batch) from sweep runs")
    p.add_argument("folders", nargs="+", type=Path, help="sweep folders (or run folders) holding results.json files")
    p.add_argument("--out", type=Path, default=None, help="where report.md/.json and the PNGs go (default: FIRST/report)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = args.out or args.folders[0] / "report"
    try:
        records, table = write_report(args.folders, out)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None
    except ImportError as e:
        raise SimcseError(f"the plots need matplotlib ({e}); pip install 'simcse-jax[report]'. "
                          f"The table is in {out / 'report.md'}") from None
    print(table, end="")
    print(f"{len(records)} runs; wrote {out / 'report.md'}, report.json, " + ", ".join(PLOTS) + f" in {out}")
    return 0
