#!/usr/bin/env bash
# The GPU check of issue 15, unattended, in under 8 minutes on one H100/H200:
#   1. throughput and MFU, tiny and BASE, SVQ-MAE (fast and plain paths) against HF wav2vec 2.0, the bf16
#      matmul peak measured in the same run (benchmarks/pretrain_throughput.py)         ~4.5 min at most
#   2. a 2-minute tiny pre-training on the shared data with the speed paths on and one with them off,
#      side by side (the same data, seed and step-based schedule: the losses compare step by step), and
#      meanwhile the automatic batch search for BASE (train.max_batch_seconds=auto, margin 0.7 here so
#      that the runs beside it keep their memory)                                           ~2.8 min at most
#   3. the summary: tables and PASS/FAIL per goal (benchmarks/gpu_check.py summary)
# Each part runs under its own timeout; a failure is recorded in status.tsv and the rest goes on.
#
#   benchmarks/gpu_check.sh [OUTDIR]            # OUTDIR, else $OUT, else runs/gpu_check
#   benchmarks/gpu_check.sh --dry-run [OUTDIR]  # every part, tiny sizes, on the CPU (1 to 2 minutes on 2 cores)
#   PYTHON=/path/to/python benchmarks/gpu_check.sh   # default: .venv/bin/python if present, else python3
set -u
cd "$(dirname "$0")/.."
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUTDIR="${1:-${OUT:-runs/gpu_check}}"
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false
: > "$OUTDIR/status.tsv"
T_START=$(date +%s)

# part NAME TIMEOUT_S COMMAND...: run it with its output in OUTDIR/NAME.log; record its exit status and time
part() {
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  echo "== $name (at most ${limit} s): $*" >&2
  timeout --kill-after=15 "$limit" "$@" > "$OUTDIR/$name.log" 2>&1
  local rc=$?
  local what=$rc
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && what="$rc (timed out)"
  printf '%s\t%s\t%s\n' "$name" "$what" "$(( $(date +%s) - t0 ))" >> "$OUTDIR/status.tsv"
  echo "   $name: exit $what after $(( $(date +%s) - t0 )) s" >&2
  return 0
}

if [ $DRY -eq 1 ]; then
  DEVICE=cpu; SIZES="tiny"; BATCH="2"; W2V_BATCH="1"; SECONDS_PER_UTT=3; STEPS=2; WARMUP=1
  T_TINY=420; T_BASE=1; PRE_MIN=5; PRE_STEPS=6; PRE_T=300; AUTO_T=300; AUTO_PRESET=tiny
  PRE_SET=(--set train.max_batch_seconds=16 --set train.max_utt_seconds=4 --set train.val_every=20
           --set train.num_workers=0 --set train.log_every=1)
else
  DEVICE=cuda; SIZES="tiny base"; BATCH_tiny="256,1024"; BATCH_base="256,512"; W2V_BATCH="16,64"
  SECONDS_PER_UTT=15; STEPS=8; WARMUP=3
  T_TINY=120; T_BASE=150; PRE_MIN=2; PRE_STEPS=5000; PRE_T=170; AUTO_T=170; AUTO_PRESET=base
  PRE_SET=(--set train.max_batch_seconds=240 --set train.val_every=200 --set train.num_workers=6)
fi

part env 60 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null; \
  $PYTHON -c 'import torch, sys; print(sys.version.split()[0], \"torch\", torch.__version__, \"cuda\", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else \"\")'"

# 1. throughput: the fast path first, then the reference, then the plain path (if time runs out, the most
#    important rows are in); each (model, path) in its own process
for SIZE in $SIZES; do
  if [ $DRY -eq 1 ]; then B=$BATCH; else eval "B=\$BATCH_$SIZE"; fi
  if [ "$SIZE" = tiny ]; then T=$T_TINY; else T=$T_BASE; fi
  part "throughput_$SIZE" "$T" "$PYTHON" benchmarks/pretrain_throughput.py --device $DEVICE --sizes "$SIZE" \
    --runs svqmae:fast,wav2vec2:hf,svqmae:plain --batch "$B" --w2v-batch "$W2V_BATCH" --seconds $SECONDS_PER_UTT \
    --steps $STEPS --warmup $WARMUP --json "$OUTDIR/throughput_$SIZE.json"
done

# 2. pre-training, speed paths on (this device's defaults) and off, side by side; the automatic batch search
DATA=()
while IFS= read -r d; do DATA+=(--data "$d"); done < <("$PYTHON" benchmarks/gpu_check.py data "$OUTDIR" 2>>"$OUTDIR/data.log")
COMMON=(-m svqmae.cli pretrain "${DATA[@]}" --preset tiny --max-minutes $PRE_MIN --max-steps $PRE_STEPS
        --set train.time_schedule=false --set train.warmup_steps=100 --set train.ckpt_every_minutes=0
        --set train.ckpt_every_steps=100000 "${PRE_SET[@]}")
OFF=(--set train.torch_compile=off --set train.pack=off --set train.fused_adamw=off --set train.shape_bucket=1)
rm -rf "$OUTDIR/pretrain_on" "$OUTDIR/pretrain_off" "$OUTDIR/auto"
part pretrain_on "$PRE_T" "$PYTHON" "${COMMON[@]}" --out "$OUTDIR/pretrain_on" &
part pretrain_off "$PRE_T" "$PYTHON" "${COMMON[@]}" --out "$OUTDIR/pretrain_off" "${OFF[@]}" &
part auto "$AUTO_T" "$PYTHON" -m svqmae.cli pretrain "${DATA[@]}" --preset $AUTO_PRESET --out "$OUTDIR/auto" \
  --max-steps 2 --set train.max_batch_seconds=auto --set train.max_utt_seconds=15 --set train.torch_compile=off \
  --set train.auto_batch_margin=0.7 --set train.val_items=1 --set train.num_workers=1 &
wait

# 3. summary
part summary 60 "$PYTHON" benchmarks/gpu_check.py summary "$OUTDIR"
cat "$OUTDIR/summary.md" 2>/dev/null || { echo "no summary (see $OUTDIR/summary.log)"; cat "$OUTDIR/status.tsv"; }
echo "gpu_check: $(( $(date +%s) - T_START )) s; results in $OUTDIR" >&2
# a dry run checks that every part works: any part that failed fails it (on a GPU, the summary says what failed)
if [ $DRY -eq 1 ] && awk -F'\t' '$2 != "0" {bad=1} END {exit !bad}' "$OUTDIR/status.tsv"; then
  echo "gpu_check --dry-run: a part failed (status.tsv above)" >&2
  exit 1
fi
