"""Summary of one `gpu_check.sh` sweep: per-GPU busy fraction from `nvidia-smi` samples, and how
many trials ran at once on which GPU ids (from the trials' own reports).

    python benchmarks/gpu_summary.py SMI_CSV EXPERIMENT_DIR GPUS_PER_TRIAL T_START T_END

SMI_CSV: `nvidia-smi --query-gpu=timestamp,index,utilization.gpu,memory.used
--format=csv,noheader,nounits -lms 500` output; EXPERIMENT_DIR: the sweep's Ray folder
(`<mlruns>/ray_results/<name>`); T_START / T_END: the sweep's start and end (epoch seconds).
Prints one JSON line.
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path


def summarise(smi_csv: Path, experiment: Path, gpus_per_trial: float, wall_s: float) -> dict:
    util: dict[str, list[int]] = {}
    with open(smi_csv, newline="") as f:
        for row in csv.reader(f):
            if len(row) >= 3 and row[2].strip().isdigit():
                util.setdefault(row[1].strip(), []).append(int(row[2]))
    spans = []  # (start, end, gpu ids) of each trial, from its reports (trainables/common.py)
    peaks, rates = [], []
    for path in sorted(experiment.glob("trial_*/result.json")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if rows and "started_at" in rows[0]:
            spans.append((rows[0]["started_at"], rows[0]["started_at"] + rows[-1]["trial_seconds"],
                          rows[-1].get("gpu_ids") or ""))
        peaks += [r["peak_memory_mb"] for r in rows if r.get("peak_memory_mb") is not None]
        rates += [r["train_tokens_per_s"] for r in rows[-1:] if r.get("train_tokens_per_s")]
    live = peak = 0
    for _, step in sorted([(s, 1) for s, _, _ in spans] + [(e, -1) for _, e, _ in spans]):
        live += step  # at equal times an end (-1) sorts before a start: touching spans do not overlap
        peak = max(peak, live)
    return {"gpus_per_trial": gpus_per_trial, "wall_s": round(wall_s, 1), "trials": len(spans),
            "max_trials_at_once": peak, "gpu_ids_seen": sorted({g for _, _, g in spans if g}),
            "peak_memory_mb_max": round(max(peaks)) if peaks else None,
            "train_tokens_per_s_median": round(sorted(rates)[len(rates) // 2], 1) if rates else None,
            "busy_fraction": {k: round(sum(u > 0 for u in v) / len(v), 3) for k, v in sorted(util.items())},
            "mean_utilisation": {k: round(sum(v) / len(v), 1) for k, v in sorted(util.items())}}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 5:
        print(__doc__.strip().split("\n\n")[1], file=sys.stderr)
        return 2
    smi, exp, g, t0, t1 = args
    print(json.dumps(summarise(Path(smi), Path(exp), float(g), float(t1) - float(t0))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
