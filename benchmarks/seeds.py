"""How much a sweep's answer depends on its seed: one method's sweep run with several seeds, one
after the other (never two timed runs at once on 2 cores), and the chosen trial's figures
over the seeds: median, minimum and maximum.

The chosen trial is the sweep's own best (``trainables.objective.rank`` on the validation
split); what is printed beside its validation figures are its test-split figures
(``test_*``), which no sweep reads. Each sweep is an ordinary ``sweeps/<method>.py`` run into
its own MLflow home (default: a fresh folder under /tmp; ``--mlruns`` keeps them), so the
runs can be opened in ``mlflow ui`` afterwards.

    python benchmarks/seeds.py hier_lora --seeds 3
    python benchmarks/seeds.py dpo --seeds 3 --num-samples 12
    python benchmarks/seeds.py hier_lora --seeds 3 -- --max-epochs 3   # after --: passed to the sweep
    python benchmarks/seeds.py hier_lora --seeds 2 --repeat           # each seed twice: same chosen trial?

``--repeat`` runs every seed twice and says whether both runs chose the same trial (same
config, same figures): the lockstep search's promise on one machine.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FIGURES = ("generalization", "locality", "specificity", "locality_exact", "test_generalization", "test_locality",
           "test_specificity", "test_locality_exact", "test_over_application")


def chosen(home: Path, method: str, name: str) -> dict:
    """The chosen trial of sweep ``name``: its figures (from the parent run's best_* metrics) and
    its config (the params of the child run the parent names)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    exp = client.get_experiment_by_name(method)
    parents = client.search_runs([exp.experiment_id], f"tags.kind = 'sweep' and attributes.run_name = '{name}'")
    if not parents:
        raise LookupError(f"no parent run for sweep {name}")
    parent = parents[0]
    m = parent.data.metrics
    out = {k: m.get(f"best_{k}") for k in FIGURES}
    out["trainable_params"] = m.get("best_trainable_params")
    out["completed"] = int(m.get("trials_completed", 0))
    trial = parent.data.tags.get("best_trial_id")
    out["trial_id"] = trial
    kids = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}' "
                                                   f"and tags.trial_id = '{trial}'") if trial else []
    out["config"] = dict(sorted(kids[0].data.params.items())) if kids else {}
    return out


def run_sweep(method: str, seed: int, args, extra: list[str], home: Path, label: str) -> dict:
    name = f"seeds-{method}-s{seed}{label}"
    cmd = [sys.executable, str(ROOT / "sweeps" / f"{method}.py"), "--seed", str(seed), "--name", name,
           "--mlruns", str(home), "--num-samples", str(args.num_samples), "--model", args.model, *extra]
    print(f"$ {' '.join(cmd[1:])}", flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.time() - t0
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise SystemExit(f"error: sweep {name} failed (exit {proc.returncode}):\n{tail}")
    row = chosen(home, method, name)
    row.update(seed=seed, seconds=round(seconds, 1), name=name)
    shown = "  ".join(f"{k} {row[k]:.3f}" for k in FIGURES if isinstance(row.get(k), float))
    print(f"  seed {seed}: {seconds:.0f}s, {row['completed']} completed, chosen {row['trial_id']}: {shown}", flush=True)
    return row


def spread(rows: list[dict]) -> dict:
    out = {}
    for k in FIGURES + ("seconds",):
        vals = [r[k] for r in rows if isinstance(r.get(k), (int, float))]
        if vals:
            out[k] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
    return out


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    from trainables.helpformat import HelpFormatter
    p = argparse.ArgumentParser(prog="benchmarks/seeds.py", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("method", help="a sweep script's name: lora, hier_lora, dpo, grpo, prompt, rome, memit")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1")
    p.add_argument("--num-samples", type=int, default=40, help="trials per sweep")
    p.add_argument("--model", default="testbed")
    p.add_argument("--mlruns", help="MLflow home for the sweeps (default: a new folder under /tmp)")
    p.add_argument("--repeat", action="store_true", help="run each seed twice and compare the chosen trials")
    p.add_argument("--json", action="store_true", help="print the rows and the spread as one JSON line at the end")
    args = p.parse_args(argv)
    if not (ROOT / "sweeps" / f"{args.method}.py").is_file() or args.method in ("evaluate", "compare"):
        print(f"error: no sweep script sweeps/{args.method}.py", file=sys.stderr)
        return 2
    if args.seeds < 1:
        print("error: --seeds must be >= 1", file=sys.stderr)
        return 2
    home = Path(args.mlruns).expanduser().resolve() if args.mlruns else Path(tempfile.mkdtemp(prefix="seeds-"))
    t0 = time.time()
    rows, same = [], []
    for seed in range(args.seeds):
        row = run_sweep(args.method, seed, args, extra, home, "")
        rows.append(row)
        if args.repeat:
            again = run_sweep(args.method, seed, args, extra, home, "-again")
            same.append(again["config"] == row["config"] and all(again[k] == row[k] for k in FIGURES))
            print(f"  seed {seed} again: {'the same' if same[-1] else 'ANOTHER'} chosen trial", flush=True)
    total = time.time() - t0
    stats = spread(rows)
    print(f"\n{args.method}: {args.seeds} seed(s), {args.num_samples} trials each, {total:.0f}s in all; "
          f"MLflow home {home}")
    print(f"{'figure (chosen trial)':<26}{'median':>8}{'min':>8}{'max':>8}")
    for k, v in stats.items():
        print(f"{k:<26}{v['median']:>8.3f}{v['min']:>8.3f}{v['max']:>8.3f}")
    if same:
        print(f"same chosen trial on a second run: {sum(same)}/{len(same)} seeds")
    if args.json:
        print(json.dumps({"method": args.method, "seconds": round(total, 1), "rows": rows, "spread": stats,
                          "repeat_same": same}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
