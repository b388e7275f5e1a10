#!/usr/bin/env bash
# GPU check for a machine with NVIDIA GPUs, sized for a 10-minute slot (about 6 minutes of
# work on one H200 once the testbed is cached; the first run builds it, ~4.5 minutes on CPU).
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]
#
# 1. a short hier_lora sweep with --gpus-per-trial 1, then one with 0.5 (two trials per GPU),
#    each into a scratch MLflow home;
# 2. while each runs, `nvidia-smi` samples every GPU's utilisation every 0.5 s;
# 3. prints, per sweep and GPU, the busy fraction (samples with utilisation > 0) and the mean
#    utilisation, the sweep's wall time and how many trials ran at once (from the trials'
#    reported gpu_ids and start/end times), and writes all of it as JSON lines to OUT_DIR.
#
# The testbed is tiny (1 M parameters): GPU utilisation stays low by nature; what this checks is
# that trials land on the GPUs Ray assigned, that 0.5 packs two per GPU, and that nothing
# crashes on CUDA. Pass MODEL=Qwen/Qwen2.5-Coder-0.5B (a local path on an offline machine) to
# load a real model instead.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-/tmp/gpu_check}}
MODEL=${MODEL:-testbed}
SAMPLES=${SAMPLES:-6}
mkdir -p "$OUT"
command -v nvidia-smi >/dev/null || { echo "error: nvidia-smi not found: this script needs NVIDIA GPUs" >&2; exit 2; }
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader | tee "$OUT/gpus.csv"
python -c "import torch; assert torch.cuda.is_available(), 'torch has no CUDA'; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.device_count(), 'GPU(s)')"

run_one() {  # $1 = gpus per trial
  local g=$1 tag="g${1/./_}" home="$OUT/mlruns_${1/./_}"
  nvidia-smi --query-gpu=timestamp,index,utilization.gpu,memory.used --format=csv,noheader,nounits -lms 500 \
    > "$OUT/smi_$tag.csv" &
  local smi=$!
  local t0=$(date +%s.%N)
  python sweeps/hier_lora.py --model "$MODEL" --num-samples "$SAMPLES" --max-epochs 2 --gpus-per-trial "$g" \
    --name "gpu-check-$tag" --mlruns "$home" > "$OUT/sweep_$tag.log" 2>&1 || { kill $smi; tail -30 "$OUT/sweep_$tag.log"; exit 1; }
  local t1=$(date +%s.%N)
  kill $smi; wait $smi 2>/dev/null || true
  python benchmarks/gpu_summary.py "$OUT/smi_$tag.csv" "$home/ray_results/gpu-check-$tag" "$g" "$t0" "$t1" \
    | tee -a "$OUT/result.jsonl"
}

run_one 1
run_one 0.5
echo "results: $OUT/result.jsonl"
