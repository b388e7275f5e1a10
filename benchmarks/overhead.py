"""Orchestration overhead of the sweep engine vs. a plain Python loop over the same trials.

1. **engine**: ``python sweeps/<method>.py --num-samples K`` in a subprocess, into a scratch
   MLflow home and Ray storage (Ray start, Optuna, ASHA, checkpoints, MLflow, plots: all of
   it); its wall time from launch to exit.
2. **plain**: the very trials that sweep ran (each trial's config read back from its Ray
   folder), one after another in this process through the trial
   lifecycle (``run_one``), evaluating at the same epochs (ASHA's rungs) and stopped after as many
   reports as it made in the sweep (ASHA stopped some early), timed per trial.

``overhead_ratio`` = engine wall / (sum of plain trial seconds / parallel slots), with the
slots the sweep ran at once (2 on 2 cores). 1.0 would mean the engine costs nothing beyond
running the trials side by side; the target is <= 1.10 for the 40-trial headline sweep.
Run from the repo root (``--trials 40 --max-epochs 4`` is the headline figure; the defaults,
16 trials of at most 2 epochs, keep the script under 10 minutes on 2 cores):

    python benchmarks/overhead.py --json

With ``--json`` the last line is one JSON object.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402


class _Stop(Exception):
    """Raised by the plain loop's reporter where ASHA stopped the trial in the sweep."""


def sweep_trials(experiment: Path) -> list[tuple[dict, int, bool, float]]:
    """(config, reports made, finished, seconds inside the trial function) of each trial of a
    finished sweep, from Ray's files."""
    out = []
    for trial_dir in sorted(experiment.glob("trial_*")):
        params = json.loads((trial_dir / "params.json").read_text())
        results = [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines() if line.strip()]
        if not results:
            continue
        out.append((params, len(results), bool(results[-1].get("final")), float(results[-1]["time_total_s"])))
    return out


def plain_seconds(config: dict, reports: int, finished: bool, eval_epochs) -> float:
    from trainables.common import Reporter, config_from_dict
    from trainables.lora.loop import LoraTrainConfig
    from trainables.sweep.methods import run_one

    made: list[dict] = []

    def report(metrics: dict, ckpt: str | None) -> None:
        made.append(metrics)
        if not finished and len(made) >= reports:
            raise _Stop

    cfg = config_from_dict(LoraTrainConfig, config)
    t0 = time.perf_counter()
    try:
        run_one(cfg, Reporter(report, lambda: None), eval_epochs=eval_epochs)
    except _Stop:
        pass
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    from trainables.helpformat import HelpFormatter
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--method", default="hier_lora", choices=["lora", "hier_lora"])
    p.add_argument("--trials", type=int, default=16, help="trials in the sweep (the headline figure: 40)")
    p.add_argument("--slots", type=int, default=2, help="trials the sweep runs at once (CPUs / CPUs per trial)")
    p.add_argument("--max-epochs", type=int, default=2,
                   help="the sweep's --max-epochs; 2 keeps 16 trials (sweep + plain re-run) under 10 minutes "
                        "on 2 cores (the headline sweep uses 4)")
    p.add_argument("--json", action="store_true", help="print one JSON line last")
    args = p.parse_args(argv)

    scratch = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    name = f"overhead-{args.method}-{args.trials}"
    cmd = [sys.executable, str(ROOT / "sweeps" / f"{args.method}.py"), "--num-samples", str(args.trials),
           "--name", name, "--mlruns", str(scratch / "mlruns"), "--max-concurrent", str(args.slots),
           "--max-epochs", str(args.max_epochs)]
    print("engine:", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    engine_wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(proc.stdout[-3000:])
        raise SystemExit(f"the sweep failed with exit status {proc.returncode}")
    trials = sweep_trials(scratch / "mlruns" / "ray_results" / name)
    from trainables.trial import CONTEXT_FILE, TrialContext

    ctx = TrialContext.load(scratch / "mlruns" / "ray_results" / name / CONTEXT_FILE)
    print(f"engine: {len(trials)} trials in {engine_wall:.1f} s; re-running them in a plain loop", flush=True)

    from trainables.common import set_threads

    set_threads(1)
    seconds = []
    for i, (config, reports, finished, _) in enumerate(trials):
        seconds.append(plain_seconds(config, reports, finished, ctx.eval_epochs if ctx else None))
        print(f"plain {i + 1}/{len(trials)}: {reports} report(s){'' if finished else ' (stopped by ASHA)'} "
              f"{seconds[-1]:.1f} s", flush=True)
    ideal = sum(seconds) / args.slots
    in_engine = sum(t[3] for t in trials)  # the same trials' seconds inside the engine's workers
    out = {"overhead_ratio": round(engine_wall / ideal, 3), "engine_wall_s": round(engine_wall, 1),
           "plain_trial_seconds_sum": round(sum(seconds), 1), "slots": args.slots, "trials": len(trials),
           "method": args.method,
           # The ratio splits into two factors: (1) trials run slower side by side than alone
           # (2 trials share caches and memory bandwidth; the plain loop runs one at a time on
           # an otherwise idle machine), (2) everything outside the trials: Ray start, trial
           # scheduling gaps, MLflow, checkpoints to storage, the end-of-sweep report.
           "side_by_side_slowdown": round(in_engine / sum(seconds), 3),
           "orchestration_ratio": round(engine_wall / (in_engine / args.slots), 3),
           "engine_trial_seconds_sum": round(in_engine, 1)}
    print(f"overhead_ratio {out['overhead_ratio']} = engine {engine_wall:.1f} s / "
          f"(plain {sum(seconds):.1f} s / {args.slots} slots); target <= 1.10")
    print(f"  = side-by-side slowdown {out['side_by_side_slowdown']} (trials inside the engine: {in_engine:.1f} s) "
          f"x orchestration {out['orchestration_ratio']} (engine wall / engine trial seconds per slot)")
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
