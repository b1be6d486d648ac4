#!/usr/bin/env bash
# GPU check, about 6 minutes (at most 12), run from anywhere in the repo on a machine with a CUDA GPU:
#   bash benchmarks/gpu_check.sh
# 1. nvidia-smi and what torch sees; 2. trainer_throughput.py on cuda (bare / textbook / trainer,
# plus eager NCHW vs channels_last + bf16 vs torch.compile); 3. a 2-run sweep on digits over all GPUs,
# 2 jobs per GPU, against a throw-away MLflow store; 4. sweep_throughput.py on cuda (one run per GPU vs
# K processes vs packs of N, fp32/bf16: the numbers that should set --pack auto and --jobs-per-gpu);
# --pack auto's calibration for resnet14/32 and a 2-run sweep with --pack auto.
# Results go to $OUT (default: a new temp dir).
# Uses .venv (created by `make install` if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/adareg ] || make install
BIN=.venv/bin
OUT=${OUT:-$(mktemp -d -t adareg-gpu-check-XXXX)}
mkdir -p "$OUT"
echo "== results in $OUT"

echo "== nvidia-smi"
nvidia-smi
$BIN/python -c "import torch; assert torch.cuda.is_available(), 'torch sees no GPU'; \
print('torch', torch.__version__, 'cuda', torch.version.cuda, [torch.cuda.get_device_name(i) \
for i in range(torch.cuda.device_count())])"

echo "== throughput on cuda"
timeout 210 $BIN/python benchmarks/trainer_throughput.py --device cuda --images 10000 --repeats 3 \
    --workers 0,2,8 --out "$OUT/throughput_cuda.json"

echo "== 2-run sweep on digits (--gpus all --jobs-per-gpu 2)"
export MLFLOW_TRACKING_URI="sqlite:///$OUT/mlflow.db" ADAREG_RUNS_DIR="$OUT/runs"
SELECT=(sweeps/demo.yaml --only scheme=wd-1e-4 --epochs-scale 0.02)  # 2 seeds x 15 epochs
timeout 120 $BIN/adareg sweep run "${SELECT[@]}" --gpus all --jobs-per-gpu 2
$BIN/adareg sweep status "${SELECT[@]}"

echo "== 2-run sweep packed (--pack 2)"
timeout 120 $BIN/adareg sweep run "${SELECT[@]}" --set name=demo-packed --set experiment=adareg-demo-packed \
    --gpus all --pack 2

echo "== --pack auto's calibration on cuda:0 (images/s and memory by pack size)"
for arch in resnet14 resnet32; do
  timeout 120 $BIN/python -P -m orchestrator.dispatch.autopack "{\"arch\": \"$arch\", \"num_classes\": 100, \
\"batch_size\": 50, \"precision\": \"fp32\", \"sizes\": [1, 2, 5, 10, 25, 50], \"device\": \"cuda\", \
\"steps\": 10, \"warmup\": 3}" | tee "$OUT/calibration_$arch.json" || echo "calibration $arch failed"
done
timeout 300 $BIN/adareg sweep run "${SELECT[@]}" --set name=demo-auto --set experiment=adareg-demo-auto \
    --gpus all --pack auto

echo "== sweep throughput on cuda (packs vs processes)"
timeout 300 $BIN/python benchmarks/sweep_throughput.py --device cuda --epochs 1 --runs 50 \
    --out "$OUT/sweep_throughput_cuda.json" || echo "sweep_throughput: timed out or failed (see above)"
echo "== done"
