#!/usr/bin/env bash
# Train simcse-jax on a SLURM GPU cluster: an sbatch script; srun starts the training processes.
#
# Needs: a shared file system holding this checkout, a Python >= 3.11 venv on it with
#   `pip install -e . "jax[cuda12]"` (VENV, default <repo>/.venv), the training data, and a
#   WORKDIR every node can write (checkpoints are written by all processes together).
#
# Run from the repository root (parameters are environment variables, defaults below):
#   WORKDIR=/shared/runs/unsup-bert-base sbatch --nodes=2 --gpus-per-node=8 launch/slurm.sh
#       one process per node, each driving all of its GPUs (sbatch default: 1 task per node)
#   WORKDIR=... sbatch --nodes=2 --gpus-per-node=8 --ntasks-per-node=8 launch/slurm.sh
#       one process per GPU
#   CONFIG=configs/sup_simcse.py:bert-base-uncased EXTRA_ARGS="--set global_batch_size=512" WORKDIR=... sbatch ...
#   DRY_RUN=1 WORKDIR=/tmp/x bash launch/slurm.sh     # print the environment and the srun command only
#
# Multi-host set-up: with more than one task, the trainer calls jax.distributed.initialize(),
# which reads SLURM's variables (SLURM_PROCID, SLURM_NTASKS, SLURM_STEP_NODELIST, ...) to find
# the coordinator (the first node) and its own process id. jax then gives each process the
# single GPU numbered SLURM_LOCALID (one process per GPU); with one task per node this script sets
# JAX_LOCAL_DEVICE_IDS to all of the node's GPUs instead.
#SBATCH --job-name=simcse-jax
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --time=12:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail

REPO_DIR="${REPO_DIR:-${SLURM_SUBMIT_DIR:-${PWD}}}"   # sbatch runs a spooled copy: use the submit dir
VENV="${VENV:-${REPO_DIR}/.venv}"
CONFIG="${CONFIG:-configs/unsup_simcse.py:bert-base-uncased}"
WORKDIR="${WORKDIR:-}"
EXTRA_ARGS="${EXTRA_ARGS:-}"                           # extra trainer flags, e.g. "--set learning_rate=1e-5"
TASKS_PER_NODE="${SLURM_NTASKS_PER_NODE:-1}"
GPUS_PER_NODE="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}"
DRY_RUN="${DRY_RUN:-0}"

die() { echo "slurm.sh: $*" >&2; exit 1; }

[[ -n "${WORKDIR}" ]] || die "set WORKDIR to a directory on the shared file system (e.g. /shared/runs/NAME)"
[[ "${DRY_RUN}" == 1 || -x "${VENV}/bin/simcse-jax" ]] || die "${VENV}/bin/simcse-jax not found: set VENV or run 'pip install -e . \"jax[cuda12]\"' in it"
[[ "${CONFIG%%:*}" = /* || -f "${REPO_DIR}/${CONFIG%%:*}" ]] \
  || die "config file ${CONFIG%%:*} not found under ${REPO_DIR}"

if [[ -z "${GPUS_PER_NODE}" ]]; then
  if command -v nvidia-smi >/dev/null; then
    GPUS_PER_NODE="$(nvidia-smi -L | grep -c '^GPU')"
  else
    GPUS_PER_NODE=1
  fi
fi

# One process per node drives every local GPU; jax's SLURM detection would otherwise give it only
# GPU number SLURM_LOCALID (= 0).
if [[ "${TASKS_PER_NODE}" == 1 && "${GPUS_PER_NODE}" -gt 1 ]]; then
  JAX_LOCAL_DEVICE_IDS="$(seq -s, 0 $((GPUS_PER_NODE - 1)))"
  export JAX_LOCAL_DEVICE_IDS
fi
# Let XLA use most of each GPU's memory for the step (jax's default preallocates 75 %).
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"

read -r -a extra <<< "${EXTRA_ARGS}"
cmd=(srun --kill-on-bad-exit=1 --cpu-bind=none --chdir="${REPO_DIR}"
     "${VENV}/bin/simcse-jax" train --config "${CONFIG}" --workdir "${WORKDIR}" --no-progress "${extra[@]}")

echo "slurm.sh: ${SLURM_JOB_NUM_NODES:-1} node(s) x ${TASKS_PER_NODE} process(es), ${GPUS_PER_NODE} GPU(s) per node" \
     "JAX_LOCAL_DEVICE_IDS=${JAX_LOCAL_DEVICE_IDS:-<one GPU per process>}"
if [[ "${DRY_RUN}" == 1 ]]; then
  printf '+'; printf ' %q' "${cmd[@]}"; printf '\n'
  exit 0
fi
exec "${cmd[@]}"
