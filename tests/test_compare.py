"""sweeps/compare.py on a small MLflow store written directly: the best completed trial per
method, pruned / diverged trials left out, markdown + PNG + JSON written."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _store(home: Path) -> None:
    from mlflow.tracking import MlflowClient

    home.mkdir(parents=True)
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    trials = {
        "lora": [("completed", 0.30, 0.9, 32768), ("completed", 0.55, 0.8, 16384), ("pruned", 0.90, 0.9, 8192),
                 ("diverged", -10.0, 0.0, 8192)],
        "hier_lora": [("completed", 0.10, 0.2, 9216)],
        "prompt": [("completed", 0.04, 0.6, 0)],
    }
    for method, rows in trials.items():
        exp = client.create_experiment(method, artifact_location=(home / "artifacts" / method).as_uri())
        for i, (status, objective, efficacy, params) in enumerate(rows):
            run = client.create_run(exp, run_name=f"s/{i}", tags={"kind": "trial", "trial_status": status,
                                                                   "sweep": "s", "trial_id": f"t{i}"})
            for k, v in {"objective": objective, "efficacy": efficacy, "generalization": objective,
                         "locality": 0.95, "api_correct": efficacy * 0.8, "trainable_params": params,
                         "trial_seconds": 12.5}.items():
                client.log_metric(run.info.run_id, k, v)
            if method == "lora":  # the over-application figure and the test split, beside validation
                for k, v in {"specificity": 0.97, "test_generalization": objective - 0.1, "test_locality": 0.96,
                             "test_specificity": 0.98, "locality_exact": 0.81, "specificity_exact": 0.77}.items():
                    client.log_metric(run.info.run_id, k, v)
            if method == "hier_lora":  # adapters on a quarter of the layers: a quarter of standard LoRA's
                client.log_metric(run.info.run_id, "standard_lora_params", 4 * params)
            client.log_param(run.info.run_id, "lr", str(0.001 * (i + 1)))
            client.set_terminated(run.info.run_id)


def test_best_completed_trial_per_method(tmp_path):
    home = tmp_path / "mlruns"
    _store(home)
    out = subprocess.run([sys.executable, "sweeps/compare.py", "--mlruns", str(home), "--json"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {r["method"]: r for r in json.loads(out.stdout.strip().splitlines()[-1])}
    assert set(rows) == {"lora", "hier_lora", "prompt"}
    lora = rows["lora"]
    # the pruned trial has the higher objective but did not finish: not the best
    assert (lora["trial_id"], lora["objective"], lora["efficacy"], lora["trainable_params"]) == ("t1", 0.55, 0.8, 16384)
    assert lora["trials"] == 2 and lora["config"] == {"lr": "0.002"}
    assert rows["prompt"]["trainable_params"] == 0
    md = (home / "artifacts" / "compare" / "compare.md").read_text()
    assert ("| lora | 0.800 | 0.550 | 0.950 | 0.970 | 0.810 / 0.770 | 0.450 | 0.960 | 0.980 | 16,384 | - | 12 | 0.550 "
            "| s / t1 |") in md
    assert "| hier_lora | 0.200 | 0.100 | 0.950 | - | - / - | - | - | - | 9,216 | 0.25 | 12 | 0.100 | s / t0 |" in md
    assert "| prompt | 0.600 | 0.040 | 0.950 | - | - / - | - | - | - | 0 | - | 12 | 0.040 | s / t0 |" in md
    assert rows["hier_lora"]["standard_lora_params"] == 4 * 9216
    assert (home / "artifacts" / "compare" / "compare.png").read_bytes()[:4] == b"\x89PNG"


def test_missing_store_is_one_line(tmp_path):
    out = subprocess.run([sys.executable, "sweeps/compare.py", "--mlruns", str(tmp_path / "none")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and "run a sweep first" in out.stderr
    assert not (tmp_path / "none").exists()
