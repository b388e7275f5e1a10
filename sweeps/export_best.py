#!/usr/bin/env python
"""Export the best completed trial of a sweep as a re-runnable YAML.

    python sweeps/export_best.py hier_lora --name NAME --out best.yaml
    python sweeps/hier_lora.py --config best.yaml      # re-trains exactly that config once

The YAML holds ``method``, ``config`` (the trial's full config, typed), ``metrics`` and
``provenance`` (sweep, trial id, MLflow run id, git commit, export time).
"""
import argparse
import json
import pathlib
import subprocess
import sys
from datetime import datetime, timezone

sys.path[0] = str(pathlib.Path(__file__).resolve().parent.parent)  # the project root, not sweeps/

from trainables.sweep.checks import DEFAULT_HOME, ROOT  # noqa: E402
from trainables.sweep.methods import METHODS  # noqa: E402


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def export(method: str, name: str, out: pathlib.Path, tracking_uri: str) -> dict:
    import yaml

    from trainables.objective import rank
    from trainables.sweep.report import SHOW, TEST_SHOW
    from trainables.sweep.tracking import children, client_for, find_parent

    client = client_for(tracking_uri)
    exp = client.get_experiment_by_name(method)
    parent = find_parent(client, exp.experiment_id, name) if exp else None
    if parent is None:
        raise LookupError(f"no sweep named {name!r} in MLflow experiment {method!r} ({tracking_uri})")
    done = [r for r in children(client, exp.experiment_id, parent.info.run_id)
            if r.data.tags.get("trial_status") == "completed" and "objective" in r.data.metrics]
    if not done:
        raise LookupError(f"sweep {name!r} has no completed trial yet")
    best = max(done, key=lambda r: rank(r.data.metrics, r.data.tags.get("trial_id")))
    config = json.loads(best.data.tags["config_json"])
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    # what the trial trained on, from its context: a re-run trains the same model and data
    run_params = best.data.params
    for key, cast in (("model", str), ("dataset", str), ("seed", int)):
        if run_params.get(key) not in (None, "None"):
            config[key] = cast(run_params[key])
    doc = {
        "method": method,
        "config": config,
        # the metrics the sweep summary shows, plus api_correct
        "metrics": {k: best.data.metrics[k] for k in [*SHOW, "api_correct", *TEST_SHOW] if k in best.data.metrics},
        "provenance": {
            "sweep": name,
            "trial_id": best.data.tags.get("trial_id"),
            "mlflow_run_id": best.info.run_id,
            "git_commit": _git_commit(),
            "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
    }
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    return doc


def main(argv=None) -> int:
    from trainables.helpformat import HelpFormatter
    p = argparse.ArgumentParser(prog="sweeps/export_best.py", description=__doc__.splitlines()[0],
                                formatter_class=HelpFormatter)
    p.add_argument("method", help=f"one of: {', '.join(METHODS)}")
    p.add_argument("--name", required=True, help="the sweep's name")
    p.add_argument("--out", required=True, help="YAML file to write")
    p.add_argument("--mlruns", default=str(DEFAULT_HOME), help="MLflow home")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///<mlruns>/mlflow.db)")
    args = p.parse_args(argv)
    if args.method not in METHODS:
        print(f"error: unknown method {args.method!r}; choose one of {', '.join(METHODS)}", file=sys.stderr)
        return 2
    home = pathlib.Path(args.mlruns).expanduser().resolve()
    if not args.tracking_uri and not (home / "mlflow.db").is_file():
        print(f"error: no MLflow store at {home / 'mlflow.db'} (run a sweep first or pass --mlruns)",
              file=sys.stderr)
        return 2
    from trainables.sweep.tracking import mlflow_home_uri

    uri = args.tracking_uri or mlflow_home_uri(home)[0]
    try:
        doc = export(args.method, args.name, pathlib.Path(args.out), uri)
    except LookupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    m = doc["metrics"]
    # not at module level: it imports MLflow, and --help should stay fast
    from trainables.sweep.report import SHOW, TEST_SHOW

    print(f"wrote {args.out}: trial {doc['provenance']['trial_id']} of {args.name}, "
          + ", ".join(f"{k} {m[k]:.3f}" for k in SHOW if k in m and k not in ("trainable_params", "trial_seconds")))
    if any(k in m for k in TEST_SHOW):
        print("  its test split: " + ", ".join(f"{k[5:]} {m[k]:.3f}" for k in TEST_SHOW if k in m))
    return 0


if __name__ == "__main__":
    sys.exit(main())
