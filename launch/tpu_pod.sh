#!/usr/bin/env bash
# Train simcse-jax on a Cloud TPU VM slice (single host or pod), one process per TPU VM worker.
#
# Needs: the gcloud CLI, authenticated (`gcloud auth login`), with a project set
#   (`gcloud config set project P` or PROJECT=...), TPU quota in ZONE, and a WORKDIR every worker
#   reaches: a gs://BUCKET/runs/NAME URL (the usual choice on a pod, which has no shared disk; the
#   TPU VM's service account needs read/write access to the bucket), or a directory every worker
#   sees at the same path (Filestore/NFS). With gs://, each worker keeps its tokenized-data cache
#   and downloaded folders on its own disk ($SIMCSE_JAX_CACHE, default ~/.cache/simcse_jax).
#
# Run (from anywhere; parameters are environment variables, defaults below):
#   WORKDIR=gs://BUCKET/runs/unsup-bert-base ACCELERATOR_TYPE=v4-32 ZONE=us-central2-b \
#     EXTRA_ARGS="--set train_file=gs://BUCKET/data/wiki1m_for_simcse.txt" launch/tpu_pod.sh
#   CODE_SOURCE=git REPO_URL=https://github.com/ORG/simcse-jax GIT_REF=main ... launch/tpu_pod.sh
#   STEPS=setup,train launch/tpu_pod.sh      # skip create/copy (the VM and code are already there)
#
# What it does: (1) create the TPU VM unless `describe` finds it; (2) put the code on every
# worker (`copy`: a tarball of this checkout, or `git`: clone/fetch REPO_URL at GIT_REF);
# (3) install on every worker (a Python 3.11 venv made by uv, `pip install -e . "jax[tpu]"`); (4) run
# `simcse-jax train --config CONFIG --workdir WORKDIR [EXTRA_ARGS]` on all workers at once.
# For more than one worker it exports SIMCSE_COORDINATOR / SIMCSE_NUM_PROCESSES /
# SIMCSE_PROCESS_ID from the TPU VM metadata server (worker 0 is the coordinator); the trainer
# then calls jax.distributed.initialize() with them.
set -euo pipefail

TPU_NAME="${TPU_NAME:-simcse-jax}"
ZONE="${ZONE:-us-central2-b}"
PROJECT="${PROJECT:-}"                          # empty: gcloud's configured project
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-8}"    # v4-8: 1 host; v4-32: 4 hosts; v5litepod-16: 4 hosts
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
SPOT="${SPOT:-0}"                               # 1: a preemptible (spot) slice
CODE_SOURCE="${CODE_SOURCE:-copy}"              # copy | git
REPO_URL="${REPO_URL:-}"                        # for CODE_SOURCE=git
GIT_REF="${GIT_REF:-main}"
REMOTE_DIR="${REMOTE_DIR:-simcse-jax}"          # on each worker, relative to $HOME
VENV="${VENV:-simcse-venv}"                     # on each worker, relative to $HOME
JAX_SPEC="${JAX_SPEC:-jax[tpu]}"                # pin with e.g. 'jax[tpu]==0.10.2'
PYTHON_VERSION="${PYTHON_VERSION:-3.11}"
CONFIG="${CONFIG:-configs/unsup_simcse.py:bert-base-uncased}"
WORKDIR="${WORKDIR:-}"
EXTRA_ARGS="${EXTRA_ARGS:-}"                    # e.g. "--set global_batch_size=512 --set learning_rate=1e-5"
DATA_URL="${DATA_URL:-}"                        # optional gs:// folder copied to REMOTE_DIR/data on every worker
STEPS="${STEPS:-create,code,setup,train}"
COORDINATOR_PORT="${COORDINATOR_PORT:-8476}"
DRY_RUN="${DRY_RUN:-0}"                         # 1: print the gcloud commands and worker scripts, run nothing

die() { echo "tpu_pod.sh: $*" >&2; exit 1; }
has_step() { [[ ",${STEPS}," == *",$1,"* ]]; }

[[ -n "${WORKDIR}" ]] || die "set WORKDIR (gs://BUCKET/runs/NAME, or a directory every worker shares)"
[[ "${CODE_SOURCE}" == copy || "${CODE_SOURCE}" == git ]] || die "CODE_SOURCE must be copy or git, got ${CODE_SOURCE}"
[[ "${CODE_SOURCE}" != git || -n "${REPO_URL}" ]] || die "CODE_SOURCE=git needs REPO_URL"
[[ "${DRY_RUN}" == 1 ]] || command -v gcloud >/dev/null || die "the gcloud CLI is not installed (https://cloud.google.com/sdk/docs/install)"

GCLOUD_FLAGS=(--zone="${ZONE}")
[[ -z "${PROJECT}" ]] || GCLOUD_FLAGS+=(--project="${PROJECT}")
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# Runs a command here, or prints it under DRY_RUN=1.
run() {
  if [[ "${DRY_RUN}" == 1 ]]; then
    printf '+'; printf ' %q' "$@"; printf '\n'
  else
    "$@"
  fi
}

# Runs a bash script (read from stdin of this function) on every worker, in parallel.
on_all_workers() {
  local script
  script="$(cat)"
  if [[ "${DRY_RUN}" == 1 ]]; then
    printf '### worker script begin\n%s\n### worker script end\n' "${script}"
  else
    gcloud compute tpus tpu-vm ssh "${TPU_NAME}" "${GCLOUD_FLAGS[@]}" --worker=all --command="${script}"
  fi
}

if has_step create; then
  if [[ "${DRY_RUN}" != 1 ]] && gcloud compute tpus tpu-vm describe "${TPU_NAME}" "${GCLOUD_FLAGS[@]}" --format="value(state)" >/dev/null 2>&1; then
    echo "reusing TPU VM ${TPU_NAME} ($(gcloud compute tpus tpu-vm describe "${TPU_NAME}" "${GCLOUD_FLAGS[@]}" --format='value(state)'))"
  else
    create_flags=(--accelerator-type="${ACCELERATOR_TYPE}" --version="${RUNTIME_VERSION}")
    [[ "${SPOT}" != 1 ]] || create_flags+=(--spot)
    run gcloud compute tpus tpu-vm create "${TPU_NAME}" "${GCLOUD_FLAGS[@]}" "${create_flags[@]}"
  fi
fi

if has_step code; then
  if [[ "${CODE_SOURCE}" == copy ]]; then
    tarball="$(mktemp -t simcse-jax-XXXXXX.tar.gz)"
    trap 'rm -f "${tarball}"' EXIT
    # The working tree as it is (uncommitted edits included), without environments and runs.
    run tar -C "${REPO_ROOT}" --exclude=.git --exclude=.venv --exclude='*.egg-info' --exclude=__pycache__ \
      --exclude=runs -czf "${tarball}" .
    run gcloud compute tpus tpu-vm scp "${tarball}" "${TPU_NAME}:simcse-jax.tar.gz" "${GCLOUD_FLAGS[@]}" --worker=all
    on_all_workers <<EOF
set -euo pipefail
mkdir -p ~/$(printf '%q' "${REMOTE_DIR}")
tar -C ~/$(printf '%q' "${REMOTE_DIR}") -xzf ~/simcse-jax.tar.gz
rm -f ~/simcse-jax.tar.gz
EOF
  else
    on_all_workers <<EOF
set -euo pipefail
if [ -d ~/$(printf '%q' "${REMOTE_DIR}")/.git ]; then
  git -C ~/$(printf '%q' "${REMOTE_DIR}") fetch --quiet origin
else
  git clone --quiet $(printf '%q' "${REPO_URL}") ~/$(printf '%q' "${REMOTE_DIR}")
fi
git -C ~/$(printf '%q' "${REMOTE_DIR}") checkout --quiet $(printf '%q' "${GIT_REF}")
EOF
  fi
fi

if has_step setup; then
  on_all_workers <<EOF
set -euo pipefail
# TPU VM images ship Python 3.10; simcse-jax needs >= 3.11, so uv provides the interpreter.
python3 -m pip install --quiet --user --upgrade uv
~/.local/bin/uv venv --quiet --allow-existing --python $(printf '%q' "${PYTHON_VERSION}") ~/$(printf '%q' "${VENV}")
~/.local/bin/uv pip install --quiet --python ~/$(printf '%q' "${VENV}")/bin/python \
  -e ~/$(printf '%q' "${REMOTE_DIR}")'[gcs]' $(printf '%q' "${JAX_SPEC}")
EOF
  if [[ -n "${DATA_URL}" ]]; then
    on_all_workers <<EOF
set -euo pipefail
mkdir -p ~/$(printf '%q' "${REMOTE_DIR}")/data
gcloud storage cp --recursive $(printf '%q' "${DATA_URL%/}/*") ~/$(printf '%q' "${REMOTE_DIR}")/data/
EOF
  fi
fi

if has_step train; then
  on_all_workers <<EOF
set -euo pipefail
md() { curl -sf -H 'Metadata-Flavor: Google' "http://metadata.google.internal/computeMetadata/v1/instance/attributes/\$1"; }
endpoints="\$(md worker-network-endpoints || true)"
IFS=',' read -r -a workers <<< "\${endpoints}"
if [ "\${#workers[@]}" -gt 1 ]; then
  first="\${workers[0]}"
  # Entries are either hostnames or name:id:ip triples; the coordinator is worker 0.
  case "\${first}" in *:*:*) first="\${first##*:}" ;; esac
  export SIMCSE_COORDINATOR="\${first}:$(printf '%q' "${COORDINATOR_PORT}")"
  export SIMCSE_NUM_PROCESSES="\${#workers[@]}"
  SIMCSE_PROCESS_ID="\$(md agent-worker-number)"
  export SIMCSE_PROCESS_ID
  export SIMCSE_CPU_COLLECTIVES=""   # TPU collectives; no CPU (gloo) backend needed
fi
cd ~/$(printf '%q' "${REMOTE_DIR}")
# EXTRA_ARGS (expanded by the launching shell) is a list of flags, split here on purpose.
~/$(printf '%q' "${VENV}")/bin/simcse-jax train --config $(printf '%q' "${CONFIG}") \
  --workdir $(printf '%q' "${WORKDIR}") --no-progress ${EXTRA_ARGS}
EOF
fi
