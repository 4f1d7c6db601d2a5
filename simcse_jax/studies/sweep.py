"""Scaling sweeps: `simcse-jax sweep --config C --workdir DIR --grid key=v1,v2 ... [--emit-commands]`.

A sweep is the cartesian product of its `--grid` keys, each run a plain `simcse-jax train` in
its own folder `DIR/<key=value,key=value>`. The learning rate of every run is scaled from the
config's `learning_rate`, taken as right for `--base-batch-size` sentences per step:

    none:   lr                    (the same step size at every batch)
    linear: lr * B / B0           (Goyal et al. 2017: SGD's rule; big steps at big batches)
    sqrt:   lr * sqrt(B / B0)     (keeps the update's noise scale for Adam-like optimizers)

and written into the run's command as an explicit `--set learning_rate=...`, so that a run's
folder (config.json) and the printed commands say what was trained.

Two ways to run it. Locally the runs go one after another, each as a subprocess (`python -m
simcse_jax.cli train`), so that every run starts with free memory and its own compile cache;
a run whose results.json already exists is skipped, so an interrupted sweep is resumed by
repeating the command. With `--emit-commands` nothing is trained: one shell command per run
is printed (for a cluster queue; `--launcher` formats them for `launch/slurm.sh` or
`launch/tpu_pod.sh`). Either way `DIR/sweep.json` records the plan, which `simcse-jax report`
reads beside the runs' results.

With `--plan --topology v5e:4x4` nothing is trained either: each grid point is planned by
`simcse-jax plan` (its update step compiled ahead of time for that topology, see plan.py) in its
own subprocess, writing `DIR/<run>/plan.json` (memory per chip and whether it fits, FLOPs,
collectives, the roofline's step time and sentences/s); a point already planned is skipped. The
report then shows planned next to measured figures where a run has both. A point that does not
fit is planned too: its plan.json says `fits: false` (with `--memory-limit-gib`, or the chip's
HBM), or, where the compiler itself refused the program (a TPU topology: `plan` exits 1), holds
`"refused"` with `peak_bytes: null`.

The planner's word is kept: training (locally, or the `--emit-commands` lines) leaves out a run
whose plan.json says it does not fit (`skipped (refused by the planner: ...)`, and a commented
command line), so that a sweep past the point where one loss runs out of memory trains every
other run and exits 0; deleting the run's plan.json trains it anyway.

Every grid and `--set` value is parsed by the config's declared type before anything starts
(an unknown key is an error that names it). This process never imports jax: on a GPU it would
take the memory the runs need. Checks that need the device count run in each training process;
here each run is checked as on one device (batch/chunk divisibility, ranges, ...), and a
combination that can never be valid (e.g. a grad-cache chunk larger than the batch) is left out
of the plan with the reason, instead of failing halfway through the sweep.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from simcse_jax.config import TrainConfig, load_config, parse_value, validate
from simcse_jax.errors import ConfigError, UsageError

LR_SCALING = ("none", "linear", "sqrt")
PLAN_FILE = "sweep.json"
RUN_LOG = "train.log"
RUN_PLAN = "plan.json"  # `simcse-jax plan --json` of the run's grid point (sweep --plan)
PLAN_LOG = "plan.log"
_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]")  # what may appear in a run folder's name


@dataclasses.dataclass(frozen=True)
class Run:
    name: str  # folder name under the sweep's workdir, from the grid values
    workdir: str
    grid: dict  # {key: value text} of this run's grid point, in grid order
    learning_rate: float
    overrides: tuple  # every --set KEY=VALUE the run is given (common, grid, learning rate)
    skipped: str | None = None  # why the combination is left out, or None


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """['global_batch_size=16,32', 'seed=1,2'] -> {'global_batch_size': ['16', '32'], 'seed': [...]}.

    Each value is parsed by the key's type now (ConfigError naming the key otherwise).
    """
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or not values.strip():
            raise ConfigError(f"--grid {item!r} is not KEY=V1,V2,...")
        if key in grid:
            raise ConfigError(f"{key}: given in two --grid options; list all its values in one")
        texts = [v.strip() for v in values.split(",")]
        if any(not t for t in texts):
            raise ConfigError(f"{key}: empty value in --grid {item!r}")
        if len(set(texts)) != len(texts):
            raise ConfigError(f"{key}: repeated value in --grid {item!r}")
        for text in texts:
            parse_value(key, text)
        grid[key] = texts
    return grid


def scaled_learning_rate(lr: float, batch: int, base_batch: int, rule: str) -> float:
    if rule not in LR_SCALING:
        raise ConfigError(f"lr scaling {rule!r}: choose one of {', '.join(LR_SCALING)}")
    if base_batch <= 0:
        raise ConfigError(f"base batch size must be positive (got {base_batch})")
    ratio = batch / base_batch
    return lr * {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[rule]


def run_name(point: dict[str, str]) -> str:
    """Folder name of a grid point: 'key=value,key=value' (path separators etc. replaced by '_')."""
    if not point:
        return "default"
    return ",".join(_UNSAFE.sub("_", f"{k}={v}") for k, v in point.items())


def plan_sweep(config_spec: str, workdir: str, grid: dict[str, list[str]], *, lr_scaling: str = "none",
               base_batch_size: int | None = None, overrides: list[str] = ()) -> list[Run]:
    """The runs of a sweep, in grid order (the last key varies fastest)."""
    base = load_config(config_spec, list(overrides))  # parses every --set (unknown key -> error)
    set_keys = {item.partition("=")[0].strip() for item in overrides}
    for key in grid:
        if key in set_keys:
            raise ConfigError(f"{key}: both in --set and in --grid; keep one")
    if "learning_rate" in grid and lr_scaling != "none":
        raise ConfigError("learning_rate: a grid over it and --lr-scaling " + lr_scaling + " contradict; use --lr-scaling none")
    base_batch = base_batch_size if base_batch_size is not None else base.global_batch_size
    scaled_learning_rate(base.learning_rate, base_batch, base_batch, lr_scaling)  # checks rule and base batch
    runs, names = [], set()
    for values in itertools.product(*grid.values()):
        point = dict(zip(grid, values))
        config = base.replace(**{k: parse_value(k, v) for k, v in point.items()})
        if "learning_rate" in point:
            lr = config.learning_rate
        else:
            lr = scaled_learning_rate(base.learning_rate, config.global_batch_size, base_batch, lr_scaling)
        config = config.replace(learning_rate=lr)
        name = run_name(point)
        if name in names:
            raise ConfigError(f"two grid points share the folder name {name!r}; use values that differ in letters or digits")
        names.add(name)
        run_overrides = tuple(overrides) + tuple(f"{k}={v}" for k, v in point.items() if k != "learning_rate")
        run_overrides += (f"learning_rate={lr!r}",)  # repr: the exact float, read back unchanged
        runs.append(Run(name=name, workdir=str(Path(workdir) / name), grid=point, learning_rate=lr,
                        overrides=run_overrides, skipped=_why_invalid(config)))
    return runs


def _why_invalid(config: TrainConfig) -> str | None:
    # As on one device: the device count is known only to the training process (see the module doc).
    try:
        validate(config.replace(mesh_data=1, mesh_fsdp=1, mesh_tensor=1), num_devices=1, check_files=False)
    except ConfigError as e:
        return str(e)
    return None


def train_argv(config_spec: str, run: Run) -> list[str]:
    """The run's `train` arguments (after the program name)."""
    argv = ["train", "--config", config_spec, "--workdir", run.workdir]
    for item in run.overrides:
        argv += ["--set", item]
    return argv


def shell_command(config_spec: str, run: Run, launcher: str | None = None) -> str:
    """One line for a shell: `simcse-jax train ...`, or with `launcher` (e.g. 'sbatch --nodes=2
    launch/slurm.sh') the launch scripts' interface: CONFIG=... WORKDIR=... EXTRA_ARGS=... launcher."""
    if launcher is None:
        return shlex.join(["simcse-jax", *train_argv(config_spec, run)])
    extra = shlex.join(a for item in run.overrides for a in ("--set", item))
    env = f"CONFIG={shlex.quote(config_spec)} WORKDIR={shlex.quote(run.workdir)} EXTRA_ARGS={shlex.quote(extra)}"
    return f"{env} {launcher}"


def write_plan(path: Path, args_record: dict, runs: list[Run], commands: list[str | None]) -> None:
    plan = {**args_record, "runs": [{**dataclasses.asdict(r), "overrides": list(r.overrides), "command": c}
                                    for r, c in zip(runs, commands)]}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(plan, indent=2) + "\n")
    tmp.replace(path)


def read_run_plan(run: Run) -> dict | None:
    """The run's plan.json (None when it has none); UsageError naming the file when unreadable."""
    path = Path(run.workdir) / RUN_PLAN
    if not path.is_file():
        return None
    try:
        plan = json.loads(path.read_text())
    except ValueError:
        plan = None
    # Every plan.json has memory.fits (true, false, or null without a limit): without it, not a plan.
    if not isinstance(plan, dict) or not isinstance(plan.get("memory"), dict) or "fits" not in plan["memory"]:
        raise UsageError(f"{path}: not a `simcse-jax plan --json` file (no memory.fits); "
                         f"delete it or plan again (sweep --plan)")
    return plan


def planner_refusal(plan: dict | None) -> str | None:
    """Why the plan says the run does not fit, e.g. 'needs 49.1 MiB per device > limit 41.0 MiB
    (--memory-limit-gib 0.04)'; None when it fits, no limit was known, or there is no plan."""
    memory = (plan or {}).get("memory") or {}
    if memory.get("fits") is not False:
        return None
    limit = f"limit {_mib(memory.get('limit_bytes'))} MiB ({memory.get('limit_source') or 'unknown source'})"
    needed = memory.get("needed_bytes")
    if needed is None:  # the compiler refused the program without saying how much it wanted
        return f"the compiler ran out of memory (> {limit})"
    return f"needs {_mib(needed)} MiB per device > {limit}"


def _mib(x: int | None) -> str:
    return "?" if x is None else f"{x / 2**20:,.1f}"


def run_locally(config_spec: str, runs: list[Run], *, python: str = sys.executable, env: dict | None = None,
                out=None) -> dict[str, str]:
    """Trains the runs in sequence, each in a subprocess logging to `<run>/train.log`.

    Returns {run name: 'done' | 'skipped (...)' | 'failed (...)'}; a failed run does not stop
    the sweep, and neither does one the planner refused (its plan.json says it does not fit: it
    is skipped untrained). One status line per run goes to `out` (default: sys.stdout).
    """
    out = out or sys.stdout  # looked up now: the caller may have redirected it
    todo = [r for r in runs if r.skipped is None]
    status = {}
    for i, run in enumerate(todo, 1):
        head = f"[{i}/{len(todo)}] {run.name} (lr {run.learning_rate:.3g})"
        results = Path(run.workdir) / "results.json"
        if _completed(results):
            status[run.name] = "skipped (results.json exists)"
            print(f"{head}: already done, {_summary(results)}", file=out, flush=True)
            continue
        why = planner_refusal(read_run_plan(run))
        if why is not None:
            status[run.name] = (f"skipped (refused by the planner: {why}; "
                                f"delete {Path(run.workdir) / RUN_PLAN} to train it anyway)")
            print(f"{head}: {status[run.name]}", file=out, flush=True)
            continue
        Path(run.workdir).mkdir(parents=True, exist_ok=True)
        log = Path(run.workdir) / RUN_LOG
        print(f"{head}: training, log {log}", file=out, flush=True)
        t0 = time.perf_counter()
        with log.open("a") as f:
            rc = subprocess.run([python, "-m", "simcse_jax.cli", *train_argv(config_spec, run), "--no-progress"],
                                stdout=f, stderr=subprocess.STDOUT, env=env).returncode
        seconds = time.perf_counter() - t0
        if rc == 0 and _completed(results):
            status[run.name] = "done"
            print(f"{head}: done in {seconds:.0f} s, {_summary(results)}", file=out, flush=True)
        else:
            status[run.name] = f"failed (exit {rc})"
            print(f"{head}: FAILED (exit {rc}) after {seconds:.0f} s: {_last_line(log)}", file=out, flush=True)
    return status


def plan_argv(config_spec: str, run: Run, topology: str, extra: list[str] = ()) -> list[str]:
    """The run's `plan` arguments: its config and overrides, compiled for `topology`."""
    argv = ["plan", "--config", config_spec, "--topology", topology, "--json", str(Path(run.workdir) / RUN_PLAN)]
    for item in run.overrides:
        argv += ["--set", item]
    return argv + list(extra)


def plan_locally(config_spec: str, runs: list[Run], topology: str, *, extra: list[str] = (), python: str = sys.executable,
                 env: dict | None = None, out=None) -> dict[str, str]:
    """Plans the runs in sequence (`simcse-jax plan` subprocesses logging to `<run>/plan.log`);
    returns {run name: 'planned' | 'skipped (...)' | 'failed (...)'} and prints one line per run."""
    out = out or sys.stdout
    todo = [r for r in runs if r.skipped is None]
    status = {}
    for i, run in enumerate(todo, 1):
        head = f"[{i}/{len(todo)}] {run.name}"
        plan_file = Path(run.workdir) / RUN_PLAN
        if plan_file.is_file():
            status[run.name] = "skipped (plan.json exists)"
            print(f"{head}: already planned, {_plan_summary(plan_file)}", file=out, flush=True)
            continue
        Path(run.workdir).mkdir(parents=True, exist_ok=True)
        log = Path(run.workdir) / PLAN_LOG
        t0 = time.perf_counter()
        with log.open("w") as f:
            rc = subprocess.run([python, "-m", "simcse_jax.cli", *plan_argv(config_spec, run, topology, extra)],
                                stdout=f, stderr=subprocess.STDOUT, env=env).returncode
        # Exit 1 with a plan.json that says "does not fit" is the compiler refusing the program for
        # lack of memory (a TPU topology): an answer about the run, not a failure to plan it.
        too_big = plan_file.is_file() and _says_does_not_fit(plan_file)
        if plan_file.is_file() and (rc == 0 or (rc == 1 and too_big)):
            status[run.name] = "planned: does not fit" if too_big else "planned"
            print(f"{head}: planned in {time.perf_counter() - t0:.0f} s, {_plan_summary(plan_file)}", file=out, flush=True)
        else:
            status[run.name] = f"failed (exit {rc})"
            print(f"{head}: plan FAILED (exit {rc}): {_last_line(log)}", file=out, flush=True)
    return status


def _says_does_not_fit(plan_file: Path) -> bool:
    try:
        return json.loads(plan_file.read_text())["memory"]["fits"] is False
    except (ValueError, KeyError, TypeError):
        return False


def _plan_summary(plan_file: Path) -> str:
    p = json.loads(plan_file.read_text())
    m = p["memory"]
    if m.get("peak_bytes") is None:  # the compiler refused the program: no memory analysis
        parts = ["refused by the compiler" + (f" (wanted {_mib(m['needed_bytes'])} MiB)" if m.get("needed_bytes") else "")]
    else:
        parts = [f"peak {m['peak_bytes'] / 2**20:,.0f} MiB per chip"]
    if m.get("fits") is not None:
        parts.append(f"{'fits' if m['fits'] else 'DOES NOT FIT'} ({m['limit_source']} {m['limit_bytes'] / 2**20:,.0f} MiB)")
    if p.get("roofline"):
        r = p["roofline"]
        parts.append(f"step >= {r['step_s'] * 1e3:.2f} ms ({r['bound']}-bound), <= {r['sentences_per_s']:,.0f} sentences/s")
    return ", ".join(parts)


def _completed(results: Path) -> bool:
    try:
        return json.loads(results.read_text()).get("status") == "completed"
    except (OSError, ValueError):
        return False


def _summary(results: Path) -> str:
    r = json.loads(results.read_text())
    parts = [f"{r.get('steps')} steps"]
    if r.get("best_dev_stsb") is not None:
        parts.append(f"best STS-B dev {r['best_dev_stsb']:.2f} (step {r.get('best_step')})")
    elif "heldout" in r:
        parts.append(f"held-out alignment {r['heldout']['alignment']:.3f} uniformity {r['heldout']['uniformity']:.3f}")
    if r.get("sentences_per_s") is not None:
        parts.append(f"{r['sentences_per_s']:.1f} sentences/s")
    if r.get("step_peak_memory_mib") is not None:
        parts.append(f"peak {r['step_peak_memory_mib']:.0f} MiB")
    return ", ".join(parts)


def _last_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][-300:] if lines else "(empty log)"


# ----------------------------------------------------------------------------- CLI


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("sweep", help="scaling sweep over global batch (lr scaling rules) and other keys")
    p.add_argument("--config", required=True, help="configs/NAME.py[:variant]")
    p.add_argument("--workdir", required=True, help="sweep folder: one subfolder per run, and sweep.json")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="values of one config key (repeatable: the runs are the cartesian product)")
    p.add_argument("--lr-scaling", choices=LR_SCALING, default="none",
                   help="learning rate per global batch B from the config's lr at --base-batch-size B0: "
                        "none, linear (lr*B/B0) or sqrt (lr*sqrt(B/B0))")
    p.add_argument("--base-batch-size", type=int, default=None,
                   help="global batch the config's learning_rate is meant for (default: the config's global_batch_size)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field in every run (repeatable)")
    p.add_argument("--emit-commands", action="store_true",
                   help="print one shell command per run instead of training (commented out where plan.json does not fit)")
    p.add_argument("--plan", action="store_true",
                   help="train nothing: plan every run for --topology (simcse-jax plan) into <run>/plan.json")
    p.add_argument("--topology", default=None, help="with --plan: e.g. v5e:4x4, v5e-16, cpu:8")
    p.add_argument("--plan-args", default="", metavar="ARGS",
                   help="with --plan: more `simcse-jax plan` options for every run, e.g. '--layers 2 --libtpu-path DIR'")
    p.add_argument("--launcher", default=None, metavar="CMD",
                   help="with --emit-commands: format each run as CONFIG=.. WORKDIR=.. EXTRA_ARGS=.. CMD "
                        "(e.g. 'sbatch --nodes=2 launch/slurm.sh')")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    grid = parse_grid(args.grid)  # a ConfigError goes to cli.main, the one place that reports errors
    runs = plan_sweep(args.config, args.workdir, grid, lr_scaling=args.lr_scaling,
                      base_batch_size=args.base_batch_size, overrides=args.overrides)
    for r in runs:
        if r.skipped:
            print(f"left out {r.name}: {r.skipped}", file=sys.stderr)
    valid = [r for r in runs if r.skipped is None]
    if not valid:
        raise UsageError("no valid run in the sweep")
    commands = [None if r.skipped else shell_command(args.config, r, args.launcher if args.emit_commands else None)
                for r in runs]
    record = {"config": args.config, "workdir": args.workdir, "grid": grid, "lr_scaling": args.lr_scaling,
              "base_batch_size": args.base_batch_size, "overrides": list(args.overrides),
              "base_learning_rate": load_config(args.config, args.overrides).learning_rate}
    write_plan(Path(args.workdir) / PLAN_FILE, record, runs, commands)
    if args.plan:
        if not args.topology:
            raise UsageError("--plan needs --topology (e.g. v5e:4x4 or cpu:8)")
        status = plan_locally(args.config, runs, args.topology, extra=shlex.split(args.plan_args))
        failed = [n for n, s in status.items() if s.startswith("failed")]
        too_big = sum(s == "planned: does not fit" for s in status.values())
        print(f"sweep --plan: {len(status) - len(failed)}/{len(status)} runs planned for {args.topology}"
              + (f" ({too_big} {'does' if too_big == 1 else 'do'} not fit: `sweep` without --plan will skip "
                 f"{'it' if too_big == 1 else 'them'})" if too_big else "")
              + f"; `simcse-jax report {args.workdir}` for the table", flush=True)
        return 1 if failed else 0
    # Every plan.json read now, before anything trains: an unreadable one stops the sweep here.
    refusals = {r.name: planner_refusal(read_run_plan(r)) for r in valid}
    if args.emit_commands:
        for r, c in zip(runs, commands):
            if c is not None and refusals[r.name] is not None:
                # Commented, not dropped: the line is there to run once plan.json is deleted.
                print(f"# refused by the planner ({refusals[r.name]}): {c}")
            elif c is not None:
                print(c)
        return 0
    t0 = time.perf_counter()
    status = run_locally(args.config, runs)
    failed = [n for n, s in status.items() if s.startswith("failed")]
    refused = [n for n, s in status.items() if s.startswith("skipped (refused")]
    print(f"sweep: {len(status) - len(failed) - len(refused)}/{len(status)} runs complete in {time.perf_counter() - t0:.0f} s"
          + (f", {len(refused)} refused by the planner (not trained)" if refused else "")
          + f"; `simcse-jax report {args.workdir}` for the table and plots", flush=True)
    return 1 if failed else 0
