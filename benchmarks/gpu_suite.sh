#!/usr/bin/env bash
# Every GPU measurement of benchmarks/RESULTS.md and the CUDA tests, in one pass on one GPU machine.
#
#   OUT=gpu-results DEADLINE=500 bash benchmarks/gpu_suite.sh bench  # CUDA tests + benchmarks
#   OUT=gpu-results bash benchmarks/gpu_suite.sh grokking [SECONDS]  # fb1 grid on the GPU
#
# Needs a CUDA torch and the project's dependencies importable (PYTHONPATH=client:server is set
# here). Appends every part's output to $OUT/suite.txt; the grokking grid's runs go to $GROK_DIR
# (default /tmp/grok-gpu) and its report to $OUT/grokking_fb1.md. Parts run one after another
# (no two share the GPU while timed); each has its own time limit, so one failure costs only
# its part. SECONDS (default 300: the 18 runs need ~260 s at once on an H200) bounds the grid.
set -uo pipefail
OUT="${OUT:-gpu-results}"
GROK_DIR="${GROK_DIR:-/tmp/grok-gpu}"
WHAT="${1:-bench}"
GROK_SECONDS="${2:-300}"
PY="${PY:-python3}"
mkdir -p "$OUT"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}client:server" PYTHONUNBUFFERED=1

DEADLINE="${DEADLINE:-0}"  # seconds: parts that would start later are skipped, limits cut to fit
ONLY="${ONLY:-}"  # space-separated part names: run only those

LOG="$OUT/suite.txt"  # one file: the device tool brings back at most 8

part() {  # part NAME SECONDS CMD...: run CMD with a time limit, its output appended to $LOG
  local name="$1" limit="$2"
  shift 2
  if [[ -n "$ONLY" && " $ONLY " != *" $name "* ]]; then return; fi
  if ((DEADLINE > 0)); then
    local left=$((DEADLINE - SECONDS))
    if ((left < 20)); then echo "== $name: skipped (deadline)"; return; fi
    ((limit > left)) && limit=$left
  fi
  local t0=$SECONDS
  echo "== $name: $*" >>"$LOG"
  timeout "$limit" "$@" >>"$LOG" 2>&1
  echo "== $name: exit $? after $((SECONDS - t0)) s" | tee -a "$LOG"
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  lscpu | grep -E "Model name|^CPU\(s\)"
  "$PY" -c "import torch, numpy; print('torch', torch.__version__, 'numpy', numpy.__version__)"
} >"$LOG" 2>&1
cat "$LOG"

if [[ "$WHAT" == bench ]]; then
# in order of what the open targets need; later parts are skipped if DEADLINE comes first
part tests 150 "$PY" -m pytest -q -p no:cacheprovider -W default -m gpu \
  tests/unit/test_analyze.py tests/unit/test_client_capture.py tests/unit/test_conditioning.py \
  tests/unit/test_htsr.py tests/unit/test_polar.py tests/unit/test_sed.py \
  tests/unit/test_sketch_triton.py tests/unit/test_eigen.py
part sketch 120 "$PY" benchmarks/sketch_gpu.py --device cuda --repeat 20
# the client runs below use the fastest Triton knobs found above (its BEST line), if any
best="$(grep -o '^BEST .*' "$LOG" | tail -n 1 | cut -c6-)"
if [[ -n "$best" ]]; then export $best; echo "== using $best" | tee -a "$LOG"; fi
# bf16, hooks on and off in the same process (ABBA blocks): the between-process spread of the
# bf16 step (0.021-0.028 s on an H200) left session 10's one-process-per-condition runs unsettled
part client_paired_bf16 120 "$PY" benchmarks/client_overhead.py --device cuda --amp bf16 \
  --batch 8 --seq 256 --paired 8 --steps 30 --warmup 10 --reps 2 --threads 4
# the same with the sketch launched eagerly each step (no CUDA graph): what the graph saves
part client_paired_bf16_eager 120 env SPECTRAWATCH_SKETCH_GRAPH=0 "$PY" \
  benchmarks/client_overhead.py --device cuda --amp bf16 --batch 8 --seq 256 --paired 8 \
  --steps 30 --warmup 10 --reps 2 --threads 4
part client_paired 120 "$PY" benchmarks/client_overhead.py --device cuda --batch 8 --seq 256 \
  --paired 8 --steps 20 --warmup 10 --reps 2 --threads 4
# bf16 with overhead_budget=0.01: the cadence the CUDA-event timing picks, and its paired cost
part client_budget_bf16 120 "$PY" benchmarks/client_overhead.py --device cuda --amp bf16 \
  --batch 8 --seq 256 --paired 4 --steps 40 --warmup 15 --reps 2 --threads 4 --budget 0.01
# where the hooks' host time per step goes with the real (Triton) sketch, by part (--parts)
part hook_host 90 "$PY" benchmarks/hook_host_cost.py --device cuda --steps 100 --parts --primitives
part hook_host_eager 60 env SPECTRAWATCH_SKETCH_GRAPH=0 "$PY" benchmarks/hook_host_cost.py \
  --device cuda --steps 100
# the same hooks on this host's CPU with a tiny faked sketch: their Python and op dispatch alone,
# to set against the CUDA run's parts (55 us per step on the 2-core CI box, session 25)
part hook_host_cpu_d8 60 "$PY" benchmarks/hook_host_cost.py --steps 64 --repeat 7 --parts --dim 8
# the side-stream sketch overlaps the next step only where steps are not synchronised one by one
part client_block 90 "$PY" benchmarks/client_overhead.py --device cuda --batch 8 --seq 256 \
  --steps 60 --warmup 5 --reps 2 --threads 4 --block --conditions none,spectrawatch
part client_bf16 150 "$PY" benchmarks/client_overhead.py --device cuda --amp bf16 --batch 8 \
  --seq 256 --steps 20 --warmup 5 --reps 2 --threads 4 \
  --conditions none,spectrawatch,sw_every10
part client 120 "$PY" benchmarks/client_overhead.py --device cuda --batch 8 --seq 256 \
  --steps 20 --warmup 5 --reps 2 --threads 4 --conditions none,spectrawatch,sw_every10
part htsr 100 "$PY" benchmarks/htsr_gpu.py --repeat 5 --ww-blocks 2 --ww-threads 8
# the 49 whole matrices' ESDs by syevd of their Grams (the route before session 20), to compare
part htsr_syevd 60 env SPECTRAWATCH_CUDA_SVD=stacks "$PY" benchmarks/htsr_gpu.py --repeat 5 \
  --ww-blocks 0 --only "f64, no MP fit" "f64 + MP fit"
part htsr_breakdown 90 "$PY" benchmarks/htsr_breakdown.py --device cuda --repeat 3
part client_block_bf16 90 "$PY" benchmarks/client_overhead.py --device cuda --amp bf16 \
  --batch 8 --seq 256 --steps 100 --warmup 5 --reps 2 --threads 4 --block \
  --conditions none,spectrawatch
part sed 60 "$PY" benchmarks/sed_cost.py --device cuda --rows 1 10 --repeat 5
part tensorboard 90 "$PY" benchmarks/client_overhead.py --device cuda --amp bf16 --batch 8 \
  --seq 256 --steps 4 --warmup 1 --reps 1 --threads 4 --conditions none,tensorboard
part polar 60 "$PY" benchmarks/polar_express.py --device cuda --sizes 512 1024 2048 4096 \
  --bf16-max 1024 --repeat 3
part activations 40 "$PY" benchmarks/activations_cost.py --device cuda --repeat 5

exit 0
fi

# grokking, 1-layer full-batch regime (tier 2: 18 runs at once on the one GPU)
part grokking_grid "$GROK_SECONDS" "$PY" benchmarks/grokking.py grid --tiers 2 --jobs 18 \
  --nice 0 --device cuda --out-dir "$GROK_DIR"
part grokking_report 120 "$PY" benchmarks/grokking.py report "$GROK_DIR" \
  --md "$OUT/grokking_fb1.md"
# the evaluation-level series of every run (no per-step sketches): small enough to bring home
"$PY" - "$GROK_DIR" "$OUT/grokking_fb1_series.npz" <<'EOF'
import sys
from pathlib import Path

import numpy as np

runs = {}
for path in sorted(Path(sys.argv[1]).glob("fb1_*.npz")):
    if path.stem.endswith(".tmp"):
        continue
    z = np.load(path)
    for key in z.files:
        if key != "upd":
            runs[f"{path.stem}/{key}"] = z[key]
np.savez_compressed(sys.argv[2], **runs)
print(f"{len({k.split('/')[0] for k in runs})} runs -> {sys.argv[2]}")
EOF
