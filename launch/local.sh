#!/usr/bin/env bash
# Train simcse-jax as several processes on THIS machine, each with its own CPU devices, joined by
# jax.distributed over loopback with gloo CPU collectives: a pod's multi-host code paths (per-host
# data rows, cross-process gradients, collective checkpoints, the all-host preemption vote) on a laptop.
#
# Needs: this checkout installed in a venv (`pip install -e .`; VENV, default <repo>/.venv) and
#   nothing else: no accelerator, no network beyond 127.0.0.1. Memory: one model copy per device.
#
# Run from the repository root (parameters are environment variables, defaults below):
#   WORKDIR=runs/mh launch/local.sh                      # 2 processes x 4 CPU devices, configs/demo_cpu.py
#   NUM_PROCESSES=4 DEVICES_PER_PROCESS=2 WORKDIR=runs/mh CONFIG=configs/demo_cpu.py:wiki launch/local.sh
#   EXTRA_ARGS="--set max_steps=10 --set global_batch_size=32" WORKDIR=runs/mh launch/local.sh
#   kill -TERM <launcher pid>     # every process saves the same step; rerun the same command to resume
#   kill -KILL <a child's pid>    # a lost host: the others stop within host_heartbeat_timeout_s (--set ...),
#                                 # saying which process was lost and the last complete checkpoint step
#   DRY_RUN=1 WORKDIR=/tmp/x bash launch/local.sh        # print the command only
#
# This is `simcse-jax launch-local` (simcse_jax/studies/launch_local.py) with the trainer as its command;
# child output is prefixed [p0], [p1], ...; the exit status is the first failing child's.
set -euo pipefail

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-${REPO_DIR}/.venv}"
CONFIG="${CONFIG:-configs/demo_cpu.py}"
WORKDIR="${WORKDIR:-}"
NUM_PROCESSES="${NUM_PROCESSES:-2}"
DEVICES_PER_PROCESS="${DEVICES_PER_PROCESS:-4}"
PORT="${PORT:-0}"                                      # coordinator port on 127.0.0.1; 0 = a free one
TIMEOUT="${TIMEOUT:-}"                                 # seconds; empty = no limit
GRACE="${GRACE:-}"                                     # after a child fails, seconds the others may take to stop; empty = 150
EXTRA_ARGS="${EXTRA_ARGS:-}"                           # extra trainer flags, e.g. "--set learning_rate=1e-5"
DRY_RUN="${DRY_RUN:-0}"

die() { echo "local.sh: $*" >&2; exit 1; }

[[ -n "${WORKDIR}" ]] || die "set WORKDIR (where checkpoints, metrics and the export go)"
[[ -f "${REPO_DIR}/${CONFIG%%:*}" || -f "${CONFIG%%:*}" ]] || die "${CONFIG%%:*} not found"
[[ "${NUM_PROCESSES}" =~ ^[1-9][0-9]*$ ]] || die "NUM_PROCESSES must be a positive integer, got '${NUM_PROCESSES}'"
[[ "${DEVICES_PER_PROCESS}" =~ ^[1-9][0-9]*$ ]] || die "DEVICES_PER_PROCESS must be a positive integer, got '${DEVICES_PER_PROCESS}'"

read -r -a extra <<< "${EXTRA_ARGS}"
launcher=(--num-processes "${NUM_PROCESSES}" --devices-per-process "${DEVICES_PER_PROCESS}" --port "${PORT}")
[[ -z "${TIMEOUT}" ]] || launcher+=(--timeout "${TIMEOUT}")
[[ -z "${GRACE}" ]] || launcher+=(--grace "${GRACE}")
cmd=("${VENV}/bin/python" -m simcse_jax.cli launch-local "${launcher[@]}" --
     train --config "${CONFIG}" --workdir "${WORKDIR}" --no-progress "${extra[@]}")

cd "${REPO_DIR}"
if [[ "${DRY_RUN}" == "1" ]]; then
  echo "${NUM_PROCESSES} process(es) x ${DEVICES_PER_PROCESS} CPU device(s) on 127.0.0.1"
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
# exec: the launcher takes this shell's pid, so `kill -TERM` reaches it and it forwards to every process.
exec "${cmd[@]}"
