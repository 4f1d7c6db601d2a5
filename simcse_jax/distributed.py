"""Hosts: joining a multi-process run, noticing a lost host, and agreeing on when to stop.

`initialize()` must run before any other jax call of a multi-process run. `HostWatchdog` ends a
process whose peer has died (a crashed or killed process, an unreachable host) within a bounded
time, with a message naming the lost process; without it the survivors would wait in their next
collective until jax's coordination service aborts them with no word about checkpoints.
`Preemption` turns a SIGTERM (a TPU maintenance event, SLURM's pre-kill signal, the local
launcher) or a first Ctrl-C into a stop at a step boundary that every host takes at the same
step, so all of them save the same checkpoint; a second Ctrl-C aborts at once.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable

import jax
import numpy as np

LOST_HOST_EXIT = 75  # EX_TEMPFAIL: the run can be resumed once the lost host is back
HEARTBEAT_KEY = "simcse_jax/heartbeat/{}"
DONE_KEY = "simcse_jax/done/{}"


def initialize(*, heartbeat_timeout_s: int = 120, shutdown_timeout_s: int = 300) -> HostWatchdog | None:
    """Joins the other processes of a multi-host run (before any other jax call).

    Explicit: SIMCSE_COORDINATOR=host:port, SIMCSE_NUM_PROCESSES, SIMCSE_PROCESS_ID (the local
    launcher). Otherwise jax's own cluster detection (SLURM, TPU pods, ...) when such a cluster
    environment is present. A single process does nothing and returns None.

    A peer silent for `heartbeat_timeout_s` is lost (`HostWatchdog`, started here). jax's own
    heartbeat timeout is set to twice that: the backstop for a process whose Python is stuck,
    after our message has had its chance. `shutdown_timeout_s` is how long a finished process
    waits at exit for the others (the lead still exporting).
    """
    env = os.environ
    timeouts = {"heartbeat_timeout_seconds": 2 * int(heartbeat_timeout_s), "shutdown_timeout_seconds": int(shutdown_timeout_s)}
    if "SIMCSE_COORDINATOR" in env:
        collectives = env.get("SIMCSE_CPU_COLLECTIVES", "gloo")
        if jax.config.jax_platforms in (None, "", "cpu") and collectives:
            # Cross-process collectives between CPU devices (the local multi-process launcher).
            jax.config.update("jax_cpu_collectives_implementation", collectives)
        jax.distributed.initialize(
            coordinator_address=env["SIMCSE_COORDINATOR"],
            num_processes=int(env["SIMCSE_NUM_PROCESSES"]),
            process_id=int(env["SIMCSE_PROCESS_ID"]),
            **timeouts,
        )
    elif int(env.get("SLURM_NTASKS", "1")) > 1 or "TPU_WORKER_HOSTNAMES" in env or "MEGASCALE_COORDINATOR_ADDRESS" in env:
        jax.distributed.initialize(**timeouts)
    if jax.process_count() == 1:
        return None
    return HostWatchdog(heartbeat_timeout_s).start()


class HostWatchdog:
    """Every process beats a counter in the coordination service's key-value store; a peer whose
    counter has not moved for `timeout_s` (measured on this host's clock, so clock skew between
    hosts does not matter), or a coordinator that no longer answers for that long, is lost: this
    process prints which one and `note()` (the trainer's last complete checkpoint) and exits.

    A daemon thread, independent of the training loop: a host busy compiling or evaluating keeps
    beating. A process that finishes marks itself done first, so a peer still exporting does not
    mistake the finished one for a lost one.
    """

    def __init__(self, timeout_s: float, *, exit_code: int = LOST_HOST_EXIT):
        from jax._src import distributed as jax_distributed  # the client jax.distributed made

        self.client = jax_distributed.global_state.client
        self.me, self.count = jax.process_index(), jax.process_count()
        self.timeout_s = float(timeout_s)
        self.interval_s = max(0.2, min(5.0, self.timeout_s / 10))
        self.exit_code = exit_code
        self.note: Callable[[], str] = lambda: ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="simcse-host-watchdog", daemon=True)

    def start(self) -> HostWatchdog:
        self._thread.start()
        return self

    def finish(self, *, done: bool = True) -> None:
        """Stops watching. `done`: this process finished its work, tell the others (a failed one
        says nothing: the peers still waiting for it in a collective must notice it is gone)."""
        if self._stop.is_set():
            return
        self._stop.set()
        if not done:
            return
        try:
            self.client.key_value_set(DONE_KEY.format(self.me), "1", allow_overwrite=True)
        except Exception:  # noqa: BLE001 - the coordinator may be gone already; nothing to tell
            pass

    def _run(self) -> None:
        beats = 0
        seen: dict[int, tuple[str | None, float]] = {}  # peer -> (its last counter, when it last moved here)
        unreachable_since = None
        while not self._stop.wait(self.interval_s):
            now = time.monotonic()
            try:
                beats += 1
                self.client.key_value_set(HEARTBEAT_KEY.format(self.me), str(beats), allow_overwrite=True)
                for peer in range(self.count):
                    if peer == self.me or _try_get(self.client, DONE_KEY.format(peer)) is not None:
                        continue
                    value = _try_get(self.client, HEARTBEAT_KEY.format(peer))
                    last, moved = seen.get(peer, (None, now))
                    if value != last:
                        seen[peer] = (value, now)
                    elif now - moved > self.timeout_s and not self._stop.is_set():
                        self._lost(f"lost process {peer} of {self.count}: no heartbeat for {now - moved:.0f} s "
                                   f"(it crashed, was killed, or its host is unreachable)")
                unreachable_since = None
            except Exception as e:  # noqa: BLE001 - the coordination service (on process 0) does not answer
                unreachable_since = unreachable_since or now
                if now - unreachable_since > self.timeout_s and not self._stop.is_set():
                    self._lost(f"lost process 0 of {self.count} (the coordinator): no answer for "
                               f"{now - unreachable_since:.0f} s ({_first_line(e)})")

    def _lost(self, what: str) -> None:
        note = ""
        try:
            note = self.note()
        except Exception as e:  # noqa: BLE001 - the message must go out whatever the note does
            note = f"(no checkpoint summary: {e})"
        print(f"error: process {self.me}: {what}; stopping. {note}".rstrip(), file=sys.stderr, flush=True)
        # The survivors cannot finish a collective without the lost host, and jax's atexit
        # shutdown would wait for it too: leave now. Checkpoints are atomic, so nothing is torn.
        os._exit(self.exit_code)


def _try_get(client, key: str) -> str | None:
    try:
        return client.key_value_try_get(key)
    except Exception as e:
        if "NOT_FOUND" in str(e) or "not found" in str(e).lower():
            return None
        raise


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return re.sub(r"\s+", " ", text[0])[:200] if text else type(e).__name__


def all_hosts(ok: bool) -> bool:
    """True on every host only if `ok` is True on all of them (one host's failure is everyone's)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.array([ok]))))


def barrier(name: str = "simcse_jax") -> None:
    """Waits until every host has reached this point (nothing on a single process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


class Preemption:
    """SIGTERM, or a first SIGINT (Ctrl-C) -> stop at a step boundary, the same step on every host.

    A second SIGINT raises KeyboardInterrupt at once (no save; the last complete checkpoint stays).

    One process: its own flag, read at every step (free). Several: a host's flag reaches the
    others through a vote (an all-gather of one bool, which waits for the devices), taken only
    every `check_every` steps and at every save step, so the loop does not stall on it each
    step. On TPU, jax's preemption sync point (`reached_preemption_sync_point`, the step the
    coordination service chose for a maintenance event) is consulted at every step; it is
    already the same on every host.
    """

    def __init__(self, check_every: int = 10):
        self.check_every = max(1, int(check_every))
        self.requested = False
        self.interrupts = 0
        self._sync_point_available = True
        self._previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

    def _on_signal(self, signum, frame):
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts > 1:
                raise KeyboardInterrupt("second interrupt")
            print("interrupt: saving at the next step boundary, then stopping (resumable); "
                  "press Ctrl-C again to abort at once", file=sys.stderr, flush=True)
        self.requested = True

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def should_stop(self, step: int, *, saving: bool) -> bool:
        """Whether to save and stop after update `step`; `saving`: this step saves anyway."""
        if jax.process_count() == 1:
            return self.requested
        if self._sync_point_available:
            from jax.experimental import multihost_utils

            try:
                if multihost_utils.reached_preemption_sync_point(step):
                    return True
            except Exception:  # noqa: BLE001 - no preemption service (not a TPU pod): stop asking
                self._sync_point_available = False
        if not saving and step % self.check_every:
            return False
        return self.vote(self.requested)

    @staticmethod
    def vote(local: bool) -> bool:
        """True on every host if it is True on any (one signalled host stops them all)."""
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.array([local]))))
