"""`simcse-jax launch-local`: N processes on this machine acting as the N hosts of a cluster.

    simcse-jax launch-local --num-processes 2 --devices-per-process 4 -- \\
        train --config configs/demo_cpu.py --workdir runs/mh

Each child is `python -m simcse_jax.cli <args after -->` with its own CPU devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=<d>`, `JAX_PLATFORMS=cpu`) and the trainer's
explicit multi-host environment (`SIMCSE_COORDINATOR=127.0.0.1:<port>`, `SIMCSE_NUM_PROCESSES`,
`SIMCSE_PROCESS_ID`): `distributed.initialize` then calls `jax.distributed.initialize`
with gloo CPU collectives, process 0 hosting the coordinator. Every multi-host code path (per-host
data rows, global arrays from process-local data, collective checkpoints, lead-only logging,
the all-host preemption vote) runs here exactly as on a pod, only over loopback.

The launcher prefixes each child's output lines with `[p<i>]`, forwards SIGTERM/SIGINT to every
child (one child can be signalled alone through its pid: `--pids-file`), and exits with the first
non-zero child status. When a child fails it says which one and how (exit status or signal),
then gives the others `--grace` seconds to stop by themselves (a trainer notices a lost peer
within its `host_heartbeat_timeout_s` and says where it can resume) before it kills them (a lone
survivor would otherwise wait forever in a collective). `--timeout` bounds the whole run (exit 124).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from simcse_jax.errors import UsageError

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
KILL_GRACE_S = 10.0  # after SIGTERM, how long a child may take (a preemption save) before SIGKILL
# After one child fails: how long the others may take to notice and stop by themselves. Above the
# trainer's default host_heartbeat_timeout_s (120 s) plus its check interval.
FAILURE_GRACE_S = 150.0
TIMEOUT_EXIT = 124


def free_port() -> int:
    """A loopback port free right now (the coordinator binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(base: dict[str, str], *, process_id: int, num_processes: int, devices: int, port: int) -> dict[str, str]:
    """The environment of child `process_id`: its own CPU device count and the coordinator."""
    # An inherited device-count flag (tests set 8) must not win over this child's count.
    flags = [f for f in base.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_COUNT_FLAG)]
    return {
        **base,
        "XLA_FLAGS": " ".join([*flags, f"{DEVICE_COUNT_FLAG}={devices}"]),
        "JAX_PLATFORMS": "cpu",
        "SIMCSE_COORDINATOR": f"127.0.0.1:{port}",
        "SIMCSE_NUM_PROCESSES": str(num_processes),
        "SIMCSE_PROCESS_ID": str(process_id),
        "PYTHONUNBUFFERED": "1",
    }


def _pump(prefix: str, stream, out, lock: threading.Lock) -> None:
    # Line by line so that the children's lines interleave whole; progress bars ('\r') pass as-is.
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", errors="replace")
        with lock:
            out.write(f"{prefix} {line}" if line.endswith("\n") else f"{prefix} {line}\n")
            out.flush()
    stream.close()


def _exit_status(code: int) -> int:
    return 128 - code if code < 0 else code  # killed by signal k -> 128 + k, as a shell reports it


def describe_exit(index: int, pid: int, code: int) -> str:
    """'process 1 (pid 123) was killed by SIGKILL' / 'process 0 (pid 122) exited with status 75'."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"process {index} (pid {pid}) was killed by {name}"
    return f"process {index} (pid {pid}) exited with status {code}"


def _start_child(index: int, argv: list[str], *, num_processes: int, devices: int, port: int,
                 isolate: str | os.PathLike | None) -> subprocess.Popen:
    """Child `index` of the job; with `isolate`, in its own HOME, cache and working directory."""
    env = child_env(dict(os.environ), process_id=index, num_processes=num_processes, devices=devices, port=port)
    cwd = None
    if isolate is not None:
        cwd = Path(isolate).absolute() / f"p{index}"
        cwd.mkdir(parents=True, exist_ok=True)
        env.update(HOME=str(cwd), SIMCSE_JAX_CACHE=str(cwd / "cache"))
        env.pop("JAX_COMPILATION_CACHE_DIR", None)
    # Own session: a terminal's Ctrl-C reaches the children once, through the launcher's forwarding.
    return subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _write_pids(pids_file: str | os.PathLike, pids: dict[str, int]) -> None:
    """The launcher's and children's pids, written whole (a reader never sees half a file)."""
    tmp = Path(pids_file).with_suffix(".tmp")
    tmp.write_text(json.dumps({"launcher": os.getpid(), **pids}) + "\n")
    tmp.replace(pids_file)


def launch(
    command: list[str],
    *,
    num_processes: int,
    devices_per_process: int,
    port: int = 0,
    timeout: float | None = None,
    pids_file: str | os.PathLike | None = None,
    out=None,
    program: list[str] | None = None,
    isolate: str | os.PathLike | None = None,
    grace: float = FAILURE_GRACE_S,
) -> int:
    """Runs `python -m simcse_jax.cli <command>` as `num_processes` coordinated processes.

    `program` replaces `python -m simcse_jax.cli` (the children's environment is the same).
    `isolate=DIR` gives child i its own HOME, cache (`SIMCSE_JAX_CACHE`) and working directory
    under DIR/p<i>, as hosts of a pod that share no disk: with a gs:// workdir nothing local is
    shared between them.

    Returns 0 when every child exits 0; else the first non-zero status (signals as 128 + k);
    124 when `timeout` seconds pass first. After a child fails, the others have `grace` seconds
    to stop by themselves before they are stopped.
    """
    if num_processes < 1 or devices_per_process < 1:
        raise UsageError(f"--num-processes and --devices-per-process must be >= 1, got {num_processes}, {devices_per_process}")
    if not command:
        raise UsageError("nothing to run: give the simcse-jax subcommand after '--', e.g. -- train --config ...")
    out = sys.stdout if out is None else out
    program = [sys.executable, "-m", "simcse_jax.cli"] if program is None else list(program)
    port = port or free_port()
    lock = threading.Lock()
    procs = [_start_child(i, [*program, *command], num_processes=num_processes, devices=devices_per_process, port=port,
                          isolate=isolate) for i in range(num_processes)]
    pumps = [threading.Thread(target=_pump, args=(f"[p{i}]", p.stdout, out, lock), daemon=True) for i, p in enumerate(procs)]
    for t in pumps:
        t.start()
    pids = {f"p{i}": p.pid for i, p in enumerate(procs)}
    with lock:
        out.write(f"[launch] {num_processes} process(es) x {devices_per_process} CPU device(s), coordinator "
                  f"127.0.0.1:{port}, pids {json.dumps(pids)}\n")
        out.flush()
    if pids_file is not None:
        _write_pids(pids_file, pids)

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    deadline = None if timeout is None else time.monotonic() + timeout
    status = 0
    reported: set[int] = set()
    grace_end = None

    def say(text: str) -> None:
        with lock:
            out.write(f"[launch] {text}\n")
            out.flush()

    def report_failures() -> None:
        for i, p in enumerate(procs):
            if p.returncode not in (None, 0) and i not in reported:
                reported.add(i)
                say(describe_exit(i, p.pid, p.returncode))

    try:
        while [p.poll() for p in procs].count(None):  # poll every child: any() would stop at the first
            report_failures()
            failed = [p for p in procs if p.returncode not in (None, 0)]
            if failed and grace_end is None:
                status = _exit_status(failed[0].returncode)
                grace_end = time.monotonic() + grace
                say(f"waiting up to {grace:g} s for the other processes to stop by themselves")
            if grace_end is not None and time.monotonic() > grace_end:
                _stop(procs, out, lock, f"they did not stop within {grace:g} s")
                break
            if deadline is not None and time.monotonic() > deadline:
                status = TIMEOUT_EXIT
                _stop(procs, out, lock, f"timeout after {timeout:g} s")
                break
            time.sleep(0.1)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        for p in procs:  # never leave a child behind, whatever happened here
            if p.poll() is None:
                p.kill()
            p.wait()
        for t in pumps:
            t.join(timeout=5)
    report_failures()
    if status == 0:
        status = next((_exit_status(p.returncode) for p in procs if p.returncode != 0), 0)
    return status


def _stop(procs, out, lock, reason: str) -> None:
    with lock:
        out.write(f"[launch] {reason}: stopping the other processes\n")
        out.flush()
    for p in procs:
        if p.poll() is None:
            p.terminate()
    end = time.monotonic() + KILL_GRACE_S
    while time.monotonic() < end and any(p.poll() is None for p in procs):
        time.sleep(0.1)
    for p in procs:
        if p.poll() is None:
            p.kill()


# ----------------------------------------------------------------------------- CLI


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "launch-local", help="run a simcse-jax command as N coordinated processes on this machine (multi-host on CPU)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--num-processes", type=int, default=2, help="processes (simulated hosts), default 2")
    p.add_argument("--devices-per-process", type=int, default=4, help="CPU devices each process sees, default 4")
    p.add_argument("--port", type=int, default=0, help="coordinator port on 127.0.0.1 (default: a free one)")
    p.add_argument("--timeout", type=float, default=None, help="kill everything after this many seconds (exit 124)")
    p.add_argument("--pids-file", default=None, help="write {'p0': pid, ...} here once the processes have started")
    p.add_argument("--isolate", default=None, metavar="DIR",
                   help="give each process its own HOME, cache and working directory under DIR/p<i> (hosts sharing no disk)")
    p.add_argument("--grace", type=float, default=FAILURE_GRACE_S,
                   help=f"after a process fails, seconds the others may take to stop by themselves (default {FAILURE_GRACE_S:g})")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the simcse-jax subcommand and its arguments")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    return launch(command, num_processes=args.num_processes, devices_per_process=args.devices_per_process,
                  port=args.port, timeout=args.timeout, pids_file=args.pids_file, isolate=args.isolate,
                  grace=args.grace)
