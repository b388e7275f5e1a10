"""The sweep engine end to end on the small fixture testbed: MLflow layout, export round trip,
resume after SIGKILL, resume of an errored trial, logical GPUs."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def sweep(method: str, *args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, f"sweeps/{method}.py", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def mlflow_runs(home: Path, experiment: str) -> list[dict]:
    """Every live run of an experiment with its tags and final metrics, straight from SQLite."""
    con = sqlite3.connect(home / "mlflow.db")
    try:
        rows = con.execute(
            "select r.run_uuid, r.name, r.status from runs r join experiments e on r.experiment_id = e.experiment_id "
            "where e.name = ? and r.lifecycle_stage = 'active'", (experiment,)).fetchall()
        out = []
        for run_id, name, status in rows:
            tags = dict(con.execute("select key, value from tags where run_uuid = ?", (run_id,)).fetchall())
            metrics = dict(con.execute("select key, value from latest_metrics where run_uuid = ?", (run_id,)).fetchall())
            out.append({"id": run_id, "name": name, "status": status, "tags": tags, "metrics": metrics})
        return out
    finally:
        con.close()


def run_params(home: Path, run_id: str) -> dict:
    con = sqlite3.connect(home / "mlflow.db")
    try:
        return dict(con.execute("select key, value from params where run_uuid = ?", (run_id,)).fetchall())
    finally:
        con.close()


def children_of(runs: list[dict], sweep_name: str) -> tuple[dict, list[dict]]:
    parents = [r for r in runs if r["tags"].get("kind") == "sweep" and r["name"] == sweep_name]
    assert len(parents) == 1, parents
    kids = [r for r in runs if r["tags"].get("mlflow.parentRunId") == parents[0]["id"]]
    return parents[0], kids


def test_smoke_sweep_mlflow_layout_and_export_round_trip(tmp_path, small_testbed):
    home = tmp_path / "mlruns"
    out = sweep("hier_lora", "--smoke-test", "--name", "smoke", "--mlruns", str(home))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "best trial" in out.stdout and "best config:" in out.stdout
    parent, kids = children_of(mlflow_runs(home, "hier_lora"), "smoke")
    assert parent["status"] == "FINISHED"
    assert len(kids) == 2 and len({k["tags"]["trial_id"] for k in kids}) == 2
    for k in kids:
        assert k["status"] == "FINISHED"
        assert k["tags"]["trial_status"] in {"completed", "pruned", "diverged"}
        for m in ("efficacy", "generalization", "locality", "objective", "trainable_params", "trial_seconds"):
            assert m in k["metrics"], (m, k["metrics"])
    con = sqlite3.connect(home / "mlflow.db")
    kind = con.execute("select t.value from experiment_tags t join experiments e on t.experiment_id = e.experiment_id "
                       "where e.name = 'hier_lora' and t.key = 'mlflow.experimentKind'").fetchall()
    (exp_id,), = con.execute("select experiment_id from experiments where name = 'hier_lora'").fetchall()
    con.close()
    assert kind == [("custom_model_development",)], kind
    # MLflow 3.18's UI reads the view from the address, not from the kind: the sweep prints that address
    assert f"http://127.0.0.1:5000/#/experiments/{exp_id}?workflowType=machine_learning" in out.stdout
    pngs = [p.name for p in (home / "artifacts").rglob("*.png") if parent["id"] in p.parts]
    assert "optuna_history.png" in pngs, pngs

    best = tmp_path / "best.yaml"
    exp = subprocess.run([sys.executable, "sweeps/export_best.py", "hier_lora", "--name", "smoke", "--out", str(best),
                          "--mlruns", str(home)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert exp.returncode == 0, exp.stderr
    doc = yaml.safe_load(best.read_text())
    assert doc["method"] == "hier_lora" and doc["provenance"]["sweep"] == "smoke"
    assert doc["provenance"]["git_commit"] and doc["provenance"]["trial_id"]
    assert isinstance(doc["config"]["lr"], float) and doc["config"]["hierarchical"] is True
    # a trial's config is what the search chose (and the method's constants), nothing else; the
    # model it trained comes from the sweep's context, into every run's params and the export
    from trainables.trial import SETTINGS

    for p in (home / "ray_results" / "smoke").glob("trial_*/params.json"):
        keys = set(json.loads(p.read_text()))
        assert keys and not any(k.startswith("_") or k in SETTINGS for k in keys), keys
    assert json.loads((home / "ray_results" / "smoke" / "trial_context.json").read_text())["model"] == "testbed"
    assert all(run_params(home, k["id"])["model"] == "testbed" for k in kids)
    assert doc["config"]["model"] == "testbed"
    clash = sweep("hier_lora", "--config", str(best), "--model", "smollm2", "--mlruns", str(home), "--name", "clash")
    assert clash.returncode == 2 and len(clash.stderr.strip().splitlines()) == 1, clash.stderr
    assert "--model smollm2 but --config" in clash.stderr and "trains testbed" in clash.stderr

    rerun = sweep("hier_lora", "--config", str(best), "--mlruns", str(home), "--name", "rerun")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    again = json.loads(rerun.stdout.strip().splitlines()[-1])
    for m in ("efficacy", "generalization", "locality", "trainable_params"):
        assert again[m] == pytest.approx(doc["metrics"][m], abs=0.02), m
    runs = mlflow_runs(home, "hier_lora")
    assert any(r["name"].startswith("rerun/") and r["tags"].get("rerun_of_sweep") == "smoke" for r in runs)
    # the test split stands beside the validation figures, on the trials and the parent
    assert all("test_generalization" in k["metrics"] and "specificity" in k["metrics"]
               for k in kids if k["tags"]["trial_status"] == "completed")
    assert "best_test_generalization" in parent["metrics"]

    # --warm-start: the earlier sweep's finished trials join the new study before it asks
    warm = sweep("hier_lora", "--smoke-test", "--name", "warm", "--warm-start", "smoke", "--mlruns", str(home))
    assert warm.returncode == 0, warm.stderr[-3000:]
    assert "warm start: 2 finished trials of sweep 'smoke'" in warm.stdout
    from ray.tune.search.optuna import OptunaSearch

    restored = OptunaSearch()
    restored.restore_from_dir(str(home / "ray_results" / "warm"))
    study = restored._ot_study
    assert len(study.trials) == 4
    assert [t.user_attrs.get("warm_start_from") for t in study.trials[:2]] == ["smoke", "smoke"]

    # --start-from: the exported best config is the next sweep's first trial, the second is drawn
    start = sweep("hier_lora", "--smoke-test", "--name", "start", "--start-from", str(best), "--mlruns", str(home))
    assert start.returncode == 0, start.stderr[-3000:]
    assert f"start from {best}: a first trial with" in start.stdout
    first = sorted((home / "ray_results" / "start").glob("trial_*/params.json"))
    configs = [json.loads(p.read_text()) for p in first]
    searched = ("lr", "r", "target", "layer_start", "layer_end", "kl_weight", "anchors", "augment")
    assert any(all(c[k] == doc["config"][k] for k in searched) for c in configs), configs
    assert not all(all(c[k] == doc["config"][k] for k in searched) for c in configs)


@pytest.mark.slow
def test_resume_after_sigkill_gives_exactly_n_trials(tmp_path, small_testbed):
    home, n = tmp_path / "mlruns", 8
    args = [sys.executable, "sweeps/hier_lora.py", "--num-samples", str(n), "--max-epochs", "3", "--name", "killed",
            "--mlruns", str(home)]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    try:
        while time.time() < deadline:  # kill once a trial has finished and others have not
            time.sleep(0.3)
            if (home / "mlflow.db").exists():
                try:
                    kids = [r for r in mlflow_runs(home, "hier_lora") if r["tags"].get("kind") == "trial"]
                except sqlite3.OperationalError:
                    continue
                if 1 <= sum(r["status"] == "FINISHED" for r in kids) < n - 2:
                    break
        else:
            pytest.fail("the sweep never got going")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    out = sweep("hier_lora", "--resume", "--name", "killed", "--mlruns", str(home))
    assert out.returncode == 0, out.stderr[-3000:]
    parent, kids = children_of(mlflow_runs(home, "hier_lora"), "killed")
    assert len(kids) == n, [(k["tags"]["trial_id"], k["status"]) for k in kids]
    assert len({k["tags"]["trial_id"] for k in kids}) == n
    assert all(k["status"] == "FINISHED" for k in kids)
    assert parent["status"] == "FINISHED"


@pytest.mark.slow
def test_a_trial_that_raises_is_resumed_from_its_checkpoint(tmp_path, small_testbed):
    home = tmp_path / "mlruns"
    env = {"APIUPDATE_FAULT": f"raise_once:{tmp_path / 'fault-marker'}"}
    # --no-stop-stalled: the fault fires after a trial's first epoch, and a trial the stall rule
    # stops at that rung (its report comes first) never gets there
    first = sweep("lora", "--num-samples", "2", "--max-epochs", "2", "--max-failures", "0",
                  "--no-stop-stalled", "--name", "flaky",
                  "--mlruns", str(home), "--seed", "3", env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (tmp_path / "fault-marker").exists()
    _, kids = children_of(mlflow_runs(home, "lora"), "flaky")
    failed = [k for k in kids if k["tags"]["trial_status"] == "failed"]
    assert len(failed) == 1 and "injected fault" in failed[0]["tags"].get("error", "")
    # the frozen-state cache goes when the sweep ends, a failed trial or not (--resume recomputes)
    assert not (home / "ray_results" / "flaky" / "frozen-states").exists()
    second = sweep("lora", "--resume", "--name", "flaky", "--mlruns", str(home), env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from checkpoint" in second.stdout + second.stderr
    _, kids = children_of(mlflow_runs(home, "lora"), "flaky")
    assert len(kids) == 2 and all(k["tags"]["trial_status"] != "failed" for k in kids)
    assert all(k["status"] == "FINISHED" for k in kids)


def test_bad_input_is_one_line_and_writes_nothing(tmp_path):
    home = tmp_path / "mlruns"
    bad_start = tmp_path / "start.yaml"
    bad_start.write_text("method: hier_lora\nconfig: {lr: 0.5, r: 8}\n")
    cases = [
        (["--num-samples", "0"], "must be >= 1"),
        (["--max-over-application", "1.5"], "a share in [0, 1]"),
        (["--resume", "--name", "nope"], "no sweep named 'nope'"),
        (["--model", "./no/such/model"], "no such file"),
        (["--dataset", str(tmp_path / "missing.jsonl")], "no such file"),
        (["--config", str(tmp_path / "missing.yaml")], "no such file"),
        (["--warm-start", "nope"], "--warm-start nope: no sweep of that name"),
        (["--start-from", str(tmp_path / "missing.yaml")], "no such file"),
        (["--start-from", str(bad_start)], "lr=0.5 is not one this search samples"),
    ]
    for args, message in cases:
        out = sweep("hier_lora", *args, "--mlruns", str(home), timeout=120)
        assert out.returncode == 2, (args, out.stderr)
        lines = [line for line in out.stderr.strip().splitlines() if line.strip()]
        assert message in lines[-1], (args, out.stderr)
        assert "Traceback" not in out.stderr
    assert not (home / "mlflow.db").exists()


@pytest.mark.slow
def test_logical_gpus_run_trials_side_by_side(tmp_path, small_testbed):
    """ray.init(num_gpus=2): --gpus-per-trial 1 runs 2 trials at once on different GPU ids,
    0.5 packs 4, two per GPU id (Ray only assigns logical ids; the trials compute on the CPU)."""
    import ray

    from trainables.sweep.cli import main

    for gpus, n in (("1", 2), ("0.5", 4)):
        home = tmp_path / f"mlruns-{gpus}"
        # each trial waits (<= 30 s) until n trials have started: start-up staggering cannot hide
        # concurrency, and too little of it shows as a smaller peak. Set before ray.init so the
        # worker processes inherit it.
        os.environ["APIUPDATE_BARRIER"] = f"{tmp_path / ('barrier' + gpus)}:{n}"
        ray.init(num_cpus=4, num_gpus=2, include_dashboard=False, configure_logging=False)
        try:
            assert main("lora", ["--num-samples", "4", "--max-epochs", "1", "--gpus-per-trial", gpus,
                                 "--name", f"gpu{gpus}", "--mlruns", str(home)]) == 0
        finally:
            os.environ.pop("APIUPDATE_BARRIER", None)
            ray.shutdown()
        _, kids = children_of(mlflow_runs(home, "lora"), f"gpu{gpus}")
        spans = [(k["metrics"]["started_at"], k["metrics"]["started_at"] + k["metrics"]["trial_seconds"],
                  k["tags"].get("gpu_ids")) for k in kids]
        assert len(spans) == 4
        peak = max(sum(1 for s, e, _ in spans if s <= t < e) for t, _, _ in spans)
        overlapping = [(a, b) for a in spans for b in spans if a is not b and a[0] <= b[0] < a[1]]
        if gpus == "1":  # two at once, never on the same GPU
            assert peak == 2 and overlapping and all(a[2] != b[2] for a, b in overlapping), spans
        else:  # four at once, two per GPU
            assert peak == 4 and sorted(s[2] for s in spans) == ["0", "0", "1", "1"], spans


@pytest.mark.slow
def test_workers_per_trial_runs_ddp_through_ray_train(tmp_path, small_testbed):
    """--workers-per-trial 2: each trial is a TorchTrainer with two DDP workers (~30 s start-up)."""
    import re

    home = tmp_path / "mlruns"
    out = sweep("lora", "--smoke-test", "--workers-per-trial", "2", "--name", "ddp", "--mlruns", str(home))
    assert out.returncode == 0, out.stderr[-3000:]
    workers = set(re.findall(r"RayTrainWorker pid=(\d+)", out.stdout + out.stderr))
    assert len(workers) >= 2, "no DDP workers ran"
    _, kids = children_of(mlflow_runs(home, "lora"), "ddp")
    assert len(kids) == 2 and all(k["tags"]["trial_status"] == "completed" for k in kids)
    assert all("generalization" in k["metrics"] for k in kids)


def test_multi_objective_sweep_prints_a_pareto_front(tmp_path, small_testbed):
    home = tmp_path / "mlruns"
    out = sweep("lora", "--num-samples", "3", "--max-epochs", "2", "--multi-objective", "--name", "mo",
                "--mlruns", str(home))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Pareto front (efficacy, locality):" in out.stdout
    parent, kids = children_of(mlflow_runs(home, "lora"), "mo")
    assert len(kids) == 3 and all("efficacy" in k["metrics"] for k in kids)
    assert [p for p in (home / "artifacts").rglob("pareto.json") if parent["id"] in p.parts]
    # the searcher reads final results only: no trial evaluates before its last epoch
    results = [[json.loads(line) for line in p.read_text().splitlines() if line.strip()]
               for p in (home / "ray_results" / "mo").glob("trial_*/result.json")]
    assert len(results) == 3 and all(len(rs) == 1 and rs[0]["final"] for rs in results), results


def test_every_reader_picks_the_same_best_trial_on_a_tie():
    """The summary, export_best and compare all rank with report.rank: objective, then fewer
    parameters, then locality, then the trial id; a tie on all metrics never depends on the order
    the results arrive in (it did: the ROME summary and its export named different trials)."""
    import itertools

    from trainables.objective import rank

    trials = [("a", {"objective": 0.99, "trainable_params": 100, "locality": 0.96}),
              ("b", {"objective": 0.99, "trainable_params": 100, "locality": 0.98}),
              ("c", {"objective": 0.99, "trainable_params": 200, "locality": 1.00}),
              ("d", {"objective": 0.98, "trainable_params": 10, "locality": 1.00}),
              ("e", {"objective": 0.99, "trainable_params": 100, "locality": 0.98})]
    picks = {max(order, key=lambda t: rank(t[1], t[0]))[0] for order in itertools.permutations(trials)}
    assert picks == {"e"}
    # generalization subject to locality: a higher objective below the floor does not win
    below = ("f", {"objective": 0.995, "trainable_params": 10, "locality": 0.94})
    assert max(trials + [below], key=lambda t: rank(t[1], t[0]))[0] == "e"
    assert max([below, ("g", {"objective": -0.5, "trainable_params": 10, "locality": 0.5})],
               key=lambda t: rank(t[1], t[0]))[0] == "f"  # none at the floor: the objective decides


def test_asha_rungs_are_where_ray_asha_compares_trials():
    from ray.tune.schedulers.async_hyperband import _Bracket

    from trainables.sweep.scheduler import asha_rungs

    for max_t in (1, 2, 3, 4, 8, 9, 10, 27, 30):
        want = sorted(m for m, _ in _Bracket(1, max_t, 3, 0)._rungs if m < max_t)
        assert asha_rungs(max_t, 1, 3) == want, max_t


def test_stall_rule_stops_trials_that_did_not_beat_the_untrained_model_at_the_first_rung():
    """The first trials to reach a rung pass plain ASHA whatever they scored (nothing recorded
    yet); with the floor, one that has not improved on the base model stops there. Later
    rungs and final results are ASHA's alone."""
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from trainables.sweep.scheduler import StallASHA

    def run(floor, reports):
        sched = StallASHA(floor=floor, time_attr="epoch", metric="progress", mode="max", max_t=4,
                          grace_period=1, reduction_factor=3)
        actions = []
        for tid, epoch, progress, final in reports:
            trial = SimpleNamespace(trial_id=tid)
            if epoch == 1:
                sched.on_trial_add(None, trial)
            actions.append(sched.on_trial_result(None, trial, {"epoch": epoch, "progress": progress, "final": final}))
        return actions

    reports = [("a", 1, 0.0004, False), ("b", 1, 0.0006, False), ("c", 1, 0.3, False),
               ("c", 3, 0.0005, False), ("d", 1, 0.0, True)]
    C, S = TrialScheduler.CONTINUE, TrialScheduler.STOP
    plain, floored = run(None, reports), run(0.001, reports)
    assert plain[:3] == [C, C, C]  # plain ASHA: the first ones pass on noise
    assert floored[:3] == [S, S, C]  # a, b: no better than the base model
    assert floored[3:] == plain[3:]  # c at rung 3, d's final result: ASHA's decisions


@pytest.mark.slow
def test_a_diverging_ddp_trial_stops_on_every_rank_together(tmp_path, small_testbed):
    """lr 10 without clipping on two DDP workers: every rank judges the averaged loss, so both
    stop at the same step and the trial ends as diverged instead of one rank waiting forever in
    the next all-reduce."""
    import yaml

    home = tmp_path / "mlruns"
    cfg = tmp_path / "diverge.yaml"
    cfg.write_text(yaml.safe_dump({"method": "lora", "config": {
        "hierarchical": False, "lr": 10.0, "max_grad_norm": None, "epochs": 2, "batch_size": 4, "r": 4,
        "target": "all", "warmup_ratio": 0.0}}))
    out = sweep("lora", "--config", str(cfg), "--workers-per-trial", "2", "--name", "ddp-diverge",
                "--mlruns", str(home), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (out.stdout + out.stderr).count("diverged:") >= 2  # both ranks said so
    kids = [r for r in mlflow_runs(home, "lora") if r["tags"].get("sweep") == "ddp-diverge"]
    assert len(kids) == 1 and kids[0]["tags"]["trial_status"] == "diverged", kids


@pytest.mark.slow
def test_the_same_seed_twice_gives_the_same_trials_and_the_same_choice(tmp_path, small_testbed):
    """Lockstep search: two sweeps with one seed, 2 trials at a time, run the same configs in
    the same order with the same results and choose the same trial, whichever trial of a pair
    happened to finish first."""
    home = tmp_path / "mlruns"
    for name in ("first", "second"):
        out = sweep("hier_lora", "--num-samples", "8", "--max-epochs", "2", "--seed", "5", "--name", name,
                    "--mlruns", str(home))
        assert out.returncode == 0, out.stderr[-3000:]
    from ray.tune.search.optuna import OptunaSearch

    def history(name):
        s = OptunaSearch()
        s.restore_from_dir(str(home / "ray_results" / name))
        return [(t.params, t.state.name, t.values) for t in s._ot_study.trials]

    assert history("first") == history("second")
    runs = mlflow_runs(home, "hier_lora")
    parents = {r["name"]: r for r in runs if r["tags"].get("kind") == "sweep"}
    best = {n: [k for k in runs if k["tags"].get("mlflow.parentRunId") == parents[n]["id"]
                and k["tags"].get("trial_id") == parents[n]["tags"]["best_trial_id"]][0] for n in ("first", "second")}
    for key in ("objective", "generalization", "locality", "test_generalization"):
        assert best["first"]["metrics"][key] == best["second"]["metrics"][key], key
