#!/usr/bin/env bash
# The GPU check: runs on the lent GPU machine as it is (no install, no download, no network), with
# `python3` from PATH (torch >= 2.11; Python 3.11 or 3.12) and PYTHONPATH set to this repository:
#   bash benchmarks/gpu_check.sh                                        # on a CUDA machine, <= 6 minutes
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_BUDGET_S=60 bash benchmarks/gpu_check.sh   # the dry run, < 2 minutes
# 1. the environment (nvidia-smi, what torch sees); 2. the tests marked gpu of tests/training/test_graphed.py
# (graphed vs eager over 20 steps, resume of a graphed run; CUDA only, if pytest is importable);
# 3. benchmarks/gpu_bench.py: correctness on the device (on the real Fashion-MNIST files too, where found: carry
# them to the GPU machine as .fashion-mnist/, which `make fashion-files` fills from Debian's package and git
# ignores; 30 MB), then the time-limited throughput matrix and
# the per-epoch evaluation and checkpoint cost, each with the projected Table 1 grid wall-clock.
# Results: one JSON line per measurement appended to $OUT/gpu_check.jsonl as it goes, and the log
# $OUT/gpu_check.log (2 files; $OUT is a new temp dir when unset). Imports only torch and training/.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
[ -d .fashion-mnist ] && export ADAREG_DATA=${ADAREG_DATA:-$PWD/.fashion-mnist}
PY=${GPU_CHECK_PYTHON:-python3}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
BUDGET=${GPU_CHECK_BUDGET_S:-240}   # the benchmark's seconds; the gpu tests get at most 90 more
OUT=${OUT:-$(mktemp -d -t adareg-gpu-check-XXXX)}
mkdir -p "$OUT"
LINES="$OUT/gpu_check.jsonl" LOG="$OUT/gpu_check.log"
echo "== results in $OUT" | tee -a "$LOG"

if [ "$DEVICE" != cpu ]; then
  echo "== nvidia-smi" | tee -a "$LOG"
  (nvidia-smi 2>&1 || echo "nvidia-smi: not found") | tee -a "$LOG"
  if "$PY" -c "import pytest" 2>/dev/null; then
    echo "== tests marked gpu (tests/training/test_graphed.py)" | tee -a "$LOG"
    start=$(date +%s)
    timeout 90 "$PY" -m pytest -q --noconftest -p no:cacheprovider -m gpu tests/training/test_graphed.py 2>&1 \
      | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    echo "{\"kind\": \"check\", \"name\": \"pytest-gpu\", \"passed\": $([ "$rc" = 0 ] && echo true || echo false), \
\"exit_code\": $rc, \"seconds\": $(( $(date +%s) - start ))}" >> "$LINES"
  fi
fi

echo "== gpu_bench on $DEVICE (budget ${BUDGET}s)" | tee -a "$LOG"
timeout $(( ${BUDGET%.*} + 60 )) "$PY" benchmarks/gpu_bench.py --device "$DEVICE" --budget "$BUDGET" --out "$LINES" \
  2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
echo "== done (exit $rc)" | tee -a "$LOG"
exit "$rc"
