"""Hosts: joining a multi-process run, and agreeing on when to stop for a preemption.

`initialize()` must run before any other jax call of a multi-process run. `Preemption` turns a
SIGTERM (a TPU maintenance event, SLURM's pre-kill signal, the local launcher) into a stop at a
step boundary that every host takes at the same step, so all of them save the same checkpoint.
"""

from __future__ import annotations

import os
import signal

import jax
import numpy as np


def initialize() -> None:
    """Joins the other processes of a multi-host run (before any other jax call).

    Explicit: SIMCSE_COORDINATOR=host:port, SIMCSE_NUM_PROCESSES, SIMCSE_PROCESS_ID (the local
    launcher). Otherwise jax's own cluster detection (SLURM, TPU pods, ...) when such a cluster
    environment is present. A single process does nothing.
    """
    env = os.environ
    if "SIMCSE_COORDINATOR" in env:
        collectives = env.get("SIMCSE_CPU_COLLECTIVES", "gloo")
        if jax.config.jax_platforms in (None, "", "cpu") and collectives:
            # Cross-process collectives between CPU devices (the local multi-process launcher).
            jax.config.update("jax_cpu_collectives_implementation", collectives)
        jax.distributed.initialize(
            coordinator_address=env["SIMCSE_COORDINATOR"],
            num_processes=int(env["SIMCSE_NUM_PROCESSES"]),
            process_id=int(env["SIMCSE_PROCESS_ID"]),
        )
    elif int(env.get("SLURM_NTASKS", "1")) > 1 or "TPU_WORKER_HOSTNAMES" in env or "MEGASCALE_COORDINATOR_ADDRESS" in env:
        jax.distributed.initialize()


class Preemption:
    """SIGTERM -> stop at a step boundary, the same step on every host.

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
        self._sync_point_available = True
        self._previous = signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame):
        self.requested = True

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)

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
