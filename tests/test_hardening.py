"""Hardening (issue 7): bad input, faults during a sweep, a real 2-node Ray cluster, and two
sweeps sharing one MLflow store.

Bad input is checked in-process through ``trainables.sweep.cli.main`` (fast, default run) plus a few
subprocesses that prove no traceback reaches the user. Everything that runs a sweep is slow.
Faults are injected through APIUPDATE_FAULT (tests/faults.py, through trainables.hooks).
"""
from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_sweep import children_of, mlflow_runs, sweep

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"


# --------------------------------------------------------------------------- bad input
def _fixture_record() -> dict:
    return json.loads((FIXTURES / "migrations.jsonl").read_text().splitlines()[0])


def _bad_inputs(tmp: Path) -> list[tuple[str, list[str], str]]:
    """(case id, sweep arguments, expected part of the one error line)."""
    good = json.dumps(_fixture_record())
    (tmp / "malformed.jsonl").write_text(good + "\n{\"id\": \"x\", \n")
    rec = _fixture_record()
    del rec["note"]
    (tmp / "missing_field.jsonl").write_text(json.dumps(rec) + "\n")
    (tmp / "latin1.jsonl").write_bytes(good.replace("pandas-dataframe-append", "caf\xe9").encode("latin-1") + b"\n")
    (tmp / "outside.yaml").write_text(
        "method: hier_lora\nconfig:\n  hierarchical: true\n  layer_start: 2\n  layer_end: 9\n  lr: 1.0e-3\n")
    (tmp / "corrupt.yaml").write_text("method: hier_lora\nconfig: {lr: [1.0e-3\n")
    (tmp / "a_folder.yaml").mkdir()
    (tmp / "a_file").write_text("not a folder")
    return [
        ("missing-dataset", ["--dataset", str(tmp / "missing.jsonl")], "no such file"),
        ("malformed-jsonl", ["--dataset", str(tmp / "malformed.jsonl")], "malformed JSON"),
        ("missing-field", ["--dataset", str(tmp / "missing_field.jsonl")], "field 'note': missing"),
        ("non-utf8", ["--dataset", str(tmp / "latin1.jsonl")], "not valid UTF-8"),
        ("zero-samples", ["--num-samples", "0"], "must be >= 1"),
        ("negative-samples", ["--num-samples", "-3"], "must be >= 1"),
        ("missing-model", ["--model", str(tmp / "no" / "model")], "no such file"),
        ("layers-outside-model", ["--config", str(tmp / "outside.yaml")], "outside the model's 4 layers"),
        ("resume-unknown", ["--resume", "--name", "nope"], "no sweep named 'nope'"),
        ("too-many-gpus", ["--gpus-per-trial", "64"], "--gpus-per-trial 64"),
        ("corrupt-config", ["--config", str(tmp / "corrupt.yaml")], "cannot read it as YAML"),
        ("unreadable-config", ["--config", str(tmp / "a_folder.yaml")], "cannot read it as YAML"),
        ("missing-config", ["--config", str(tmp / "missing.yaml")], "no such file"),
        # Root ignores permission bits, so "unwritable" is a path through a regular file.
        ("unwritable-mlruns", ["--mlruns", str(tmp / "a_file" / "mlruns")], "not a writable folder"),
    ]


def _snapshot(folder: Path) -> dict[str, float]:
    return {str(p.relative_to(folder)): p.stat().st_mtime for p in folder.rglob("*")}


def test_bad_input_one_line_no_traceback_nothing_written(tmp_path, small_testbed, capsys):
    from trainables.sweep.cli import main

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    cases = _bad_inputs(inputs)
    before = _snapshot(inputs)
    for case, args, message in cases:
        home = tmp_path / case / "mlruns"
        if "--mlruns" not in args:
            args = [*args, "--mlruns", str(home)]
        code = main("hier_lora", args)
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2, (case, err)
        assert len(errors) == 1 and message in errors[0], (case, err)
        assert "Traceback" not in err, (case, err)
        assert not (tmp_path / case).exists(), f"{case}: wrote {list((tmp_path / case).rglob('*'))}"
    assert _snapshot(inputs) == before  # the inputs themselves are untouched
    assert not (ROOT / "mlruns" / "ray_results" / "nope").exists()


@pytest.mark.parametrize("case", ["malformed-jsonl", "zero-samples", "layers-outside-model"])
def test_bad_input_from_the_command_line_is_exactly_one_line(tmp_path, small_testbed, case):
    (tmp_path / "inputs").mkdir()
    _, args, message = next(c for c in _bad_inputs(tmp_path / "inputs") if c[0] == case)
    home = tmp_path / "mlruns"
    if "--mlruns" not in args:
        args = [*args, "--mlruns", str(home)]
    out = sweep("hier_lora", *args, timeout=180)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert lines[0].startswith("error: ") and message in lines[0], lines
    assert not home.exists()


def test_export_best_unknown_method_and_unknown_sweep(tmp_path):
    out = tmp_path / "best.yaml"
    for args, message in ((["nosuch", "--name", "x"], "unknown method 'nosuch'"),
                          (["lora", "--name", "x", "--mlruns", str(tmp_path / "none")], "no MLflow store")):
        res = subprocess.run([sys.executable, "sweeps/export_best.py", *args, "--out", str(out)], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
        lines = [line for line in res.stderr.splitlines() if line.strip()]
        assert res.returncode == 2 and len(lines) == 1 and message in lines[0], res.stderr
    assert not out.exists() and not (tmp_path / "none").exists()


# --------------------------------------------------------------------------- faults
def _study(experiment_dir: Path):
    """The Optuna study as the sweep's searcher last saved it."""
    from ray.tune.search.optuna import OptunaSearch

    searcher = OptunaSearch()
    searcher.restore_from_dir(str(experiment_dir))
    return searcher._ot_study


def test_searcher_learns_the_outcome_of_a_failed_trial_finished_by_resume(_small_world):
    """Ray's ConcurrencyLimiter forgets an errored trial; when --resume finishes it, the study
    must still hear the result (a FAIL alone teaches TPE nothing). Unit-level: no Ray started."""
    from optuna.trial import TrialState

    from trainables.sweep.searcher import make_searcher
    from trainables.sweep.methods import METHODS

    limited = make_searcher(METHODS["lora"], 4, 2, "objective", "max", seed=0, max_concurrent=2)
    assert limited.suggest("t1") and limited.suggest("t2")
    assert limited.suggest("t3") is None  # the limit holds
    limited.on_trial_complete("t1", error=True)  # out of retries: FAIL, no longer live
    limited.on_trial_complete("t2", result={"objective": 0.2, "final": True, "training_iteration": 2})
    limited.on_trial_complete("t1", result={"objective": 0.5, "final": True, "training_iteration": 2})  # resumed
    study = limited.searcher._ot_study
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    again = study.trials[2]
    assert again.user_attrs["ray_trial_id"] == "t1" and again.value == 0.5
    assert again.params == study.trials[0].params  # the same config, now with its real outcome
    limited.on_trial_complete("t1", result={"objective": 0.5, "final": True, "training_iteration": 2})
    assert len(study.trials) == 3  # told once


@pytest.mark.slow
def test_worker_sigkill_is_retried_then_failed_and_oom_is_penalised(tmp_path, small_testbed):
    """One sweep, two faulty trials: one SIGKILLs its worker at every attempt (2 > --max-failures 1),
    one raises torch.cuda.OutOfMemoryError; both end failed with a reason, the others complete."""
    from optuna.trial import TrialState

    home, kills, oom = tmp_path / "mlruns", tmp_path / "kills", tmp_path / "oom"
    env = {"APIUPDATE_FAULT": f"oom:{oom},sigkill:{kills}:2"}
    out = sweep("lora", "--num-samples", "4", "--max-epochs", "1", "--max-failures", "1", "--name", "faulty",
                "--mlruns", str(home), env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(p.name for p in kills.glob("kill-*")) == ["kill-1", "kill-2"]  # first try + 1 retry
    _, kids = children_of(mlflow_runs(home, "lora"), "faulty")
    assert len(kids) == 4, kids  # the search went on past both
    by_id = {k["tags"]["trial_id"]: k for k in kids}
    killed, oomed = by_id[(kills / "victim").read_text()], by_id[(oom / "victim").read_text()]
    assert killed["tags"]["trial_status"] == "failed" and killed["status"] == "FAILED"
    assert "ActorDiedError" in killed["tags"]["failure_reason"] or "died" in killed["tags"]["failure_reason"]
    assert oomed["tags"]["trial_status"] == "failed" and oomed["status"] == "FAILED"
    assert "OutOfMemoryError" in oomed["tags"]["failure_reason"]
    assert oomed["metrics"]["objective"] == -12.0
    others = [k for k in kids if k not in (killed, oomed)]
    assert all(k["tags"]["trial_status"] in ("completed", "pruned", "diverged") for k in others), others

    study = _study(home / "ray_results" / "faulty")
    states = sorted(t.state.name for t in study.trials)
    assert len(study.trials) == 4, states
    # The crash is not the config's fault: FAIL (TPE ignores it). The OOM is: a penalised value.
    assert states.count(TrialState.FAIL.name) == 1, states
    assert [t.value for t in study.trials if t.state == TrialState.COMPLETE].count(-12.0) >= 1


@pytest.mark.slow
def test_corrupt_checkpoint_restarts_the_trial_on_resume(tmp_path, small_testbed):
    home = tmp_path / "mlruns"
    env = {"APIUPDATE_FAULT": f"raise_once:{tmp_path / 'fault-marker'}"}
    # --no-stop-stalled: the fault fires after a trial's first epoch, and a trial the stall rule
    # stops at that rung (its report comes first) never gets there
    first = sweep("lora", "--num-samples", "2", "--max-epochs", "2", "--max-failures", "0",
                  "--no-stop-stalled", "--name", "torn",
                  "--mlruns", str(home), "--seed", "3", env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    _, kids = children_of(mlflow_runs(home, "lora"), "torn")
    failed = [k["tags"]["trial_id"] for k in kids if k["tags"]["trial_status"] == "failed"]
    assert len(failed) == 1
    ckpts = sorted((home / "ray_results" / "torn" / f"trial_{failed[0]}").glob("checkpoint_*"))
    assert ckpts, "the errored trial left no checkpoint"
    for f in ("adapter.pt", "state.pt"):  # a half-written checkpoint: each file cut in half
        p = ckpts[-1] / f
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    second = sweep("lora", "--resume", "--name", "torn", "--mlruns", str(home), env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    logs = second.stdout + second.stderr
    assert "is unusable" in logs and "restarting the trial from scratch" in logs
    assert "resumed from checkpoint" not in logs
    _, kids = children_of(mlflow_runs(home, "lora"), "torn")
    assert len(kids) == 2 and all(k["tags"]["trial_status"] != "failed" for k in kids)
    assert all(k["status"] == "FINISHED" for k in kids)
    # The study keeps the failed attempt (FAIL) and learns the resumed trial's real outcome.
    from optuna.trial import TrialState

    study = _study(home / "ray_results" / "torn")
    states = sorted(t.state.name for t in study.trials)
    assert states.count("FAIL") == 1 and len(states) == 3, states
    again = [t for t in study.trials if t.user_attrs.get("ray_trial_id") == failed[0]]
    assert len(again) == 1 and again[0].state in (TrialState.COMPLETE, TrialState.PRUNED), states


def _reports(experiment: Path) -> int:
    """Trial reports the driver has written so far (one line each in every result.json)."""
    n = 0
    for f in experiment.glob("trial_*/result.json"):
        try:
            n += sum(1 for line in f.read_text().splitlines() if line.strip())
        except OSError:
            pass
    return n


@pytest.mark.slow
def test_driver_sigkilled_three_times_then_resumed(tmp_path, small_testbed):
    """SIGKILL the driver's whole process group at random moments, three times, then --resume:
    exactly N trials, none duplicated or left RUNNING in MLflow, and the Optuna study knows them
    all. APIUPDATE_TEST_SEED replays a failure's kill times."""
    from optuna.trial import TrialState

    seed = int(os.environ.get("APIUPDATE_TEST_SEED", time.time_ns() % 100_000))
    rng = random.Random(seed)
    # 16 trials: with ASHA ranking by `progress` most small-world trials stop after one epoch,
    # and on an idle machine a small-world trial takes 0.4-2 s: 12 trials ran out before the
    # third kill (seed 21121: kills after 1 report + 0.96 / 0.53 / 0.27 s)
    home, n, name = tmp_path / "mlruns", 16, "killed3"
    base = [sys.executable, "sweeps/hier_lora.py", "--num-samples", str(n), "--max-epochs", "2", "--name", name,
            "--mlruns", str(home), "--seed", "1"]
    experiment = home / "ray_results" / name
    kills = []
    for k in range(3):
        # As a user would: --resume once the sweep's folder exists, even if the kill came before
        # Ray's first snapshot (trainables.sweep.run.has_snapshot: the sweep then starts again under its name).
        resume = ["--resume"] if experiment.is_dir() else []
        log = tmp_path / f"run{k}.log"
        with log.open("w") as f:
            proc = subprocess.Popen(base + resume, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        # A random moment of the run, counted in the sweep's own progress so that it falls
        # mid-run on a fast machine as on a loaded one (a fixed 0-20 s window let the sweep
        # finish before the third kill on an idle CI machine): after the banner the driver
        # prints just before Tuner.fit, wait for 0-1 more trial reports (0 = during start-up),
        # then 0-0.5 s more. 16 trials make >= 16 reports; 3 kills use <= 3 plus what the
        # jitter lets through (a few at most).
        reports = rng.randint(0, 1)
        jitter = rng.uniform(0.0, 0.5)
        delay = (reports, round(jitter, 2))
        try:
            deadline = time.time() + 240
            while f"sweep {name}:" not in log.read_text() and proc.poll() is None and time.time() < deadline:
                time.sleep(0.05)
            start = _reports(experiment)
            while _reports(experiment) < start + reports and proc.poll() is None and time.time() < deadline:
                time.sleep(0.05)
            finished = proc.wait(timeout=jitter) is not None
        except subprocess.TimeoutExpired:
            finished = False
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        kills.append(delay)
        assert not finished, f"the sweep ended before kill {k + 1} (seed {seed}, kills {kills}): {log.read_text()[-2000:]}"
    out = sweep("hier_lora", *base[2:], "--resume")
    assert out.returncode == 0, f"seed {seed}, kills {kills}: {out.stderr[-3000:]}"
    parent, kids = children_of(mlflow_runs(home, "hier_lora"), name)
    ids = [k["tags"]["trial_id"] for k in kids]
    assert len(kids) == n and len(set(ids)) == n, (seed, kills, ids)
    assert all(k["status"] == "FINISHED" for k in kids), [(k["tags"]["trial_id"], k["status"]) for k in kids]
    assert parent["status"] == "FINISHED"
    with sqlite3.connect(home / "mlflow.db") as con:  # deleted runs included: none left RUNNING
        running = con.execute("select count(*) from runs where status = 'RUNNING'").fetchone()[0]
    assert running == 0

    study = _study(experiment)
    done = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(study.trials) == n and len(done) == n, (seed, kills, [t.state.name for t in study.trials])
    lrs = sorted(round(float(json.loads(k["tags"]["config_json"])["lr"]), 12) for k in kids)
    assert sorted(round(t.params["lr"], 12) for t in study.trials) == lrs  # the very trials MLflow holds


# --------------------------------------------------------------------------- a real cluster
@pytest.mark.slow
def test_two_node_cluster_spreads_trials_and_shares_storage(tmp_path, small_testbed):
    """A local 2-node Ray cluster (1 CPU each): a sweep joined through --address runs its two
    trials at once, one per node, with results and checkpoints in the shared --storage."""
    import ray
    from ray.cluster_utils import Cluster

    from trainables.sweep.cli import main

    home, storage = tmp_path / "mlruns", tmp_path / "shared"
    # Both trials wait until the other has started (<= 30 s): two at once means two nodes.
    # Set before the nodes start, so their worker processes inherit it.
    os.environ["APIUPDATE_BARRIER"] = f"{tmp_path / 'barrier'}:2"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        # Asked of the cluster's nodes (no GPUs here), and nothing written.
        assert main("lora", ["--gpus-per-trial", "1", "--name", "nogpu", "--mlruns", str(tmp_path / "nogpu"),
                             "--address", cluster.address]) == 2
        assert not (tmp_path / "nogpu").exists()
        ray.shutdown()
        code = main("lora", ["--num-samples", "2", "--max-epochs", "1", "--name", "cluster", "--mlruns", str(home),
                             "--storage", str(storage), "--address", cluster.address])
        assert code == 0
        nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    finally:
        os.environ.pop("APIUPDATE_BARRIER", None)
        ray.shutdown()
        cluster.shutdown()
    _, kids = children_of(mlflow_runs(home, "lora"), "cluster")
    assert len(kids) == 2
    used = {k["tags"]["node_id"] for k in kids}
    assert used == nodes and len(used) == 2, (used, nodes)
    for k in kids:
        trial_dir = storage / "cluster" / f"trial_{k['tags']['trial_id']}"
        assert (trial_dir / "result.json").is_file()
        assert list(trial_dir.glob("checkpoint_*/adapter.pt")), f"no checkpoint in {trial_dir}"
        assert k["tags"]["checkpoint_path"].startswith(str(storage))


# --------------------------------------------------------------------------- shared tracking store
@pytest.mark.slow
def test_two_sweeps_share_one_mlflow_store(tmp_path, small_testbed):
    """lora and hier_lora sweeps started at the same moment on one fresh mlruns/ (both create the
    SQLite schema, then write trial runs concurrently): every trial of both is recorded."""
    home, n = tmp_path / "mlruns", 3
    procs = {m: subprocess.Popen([sys.executable, f"sweeps/{m}.py", "--num-samples", str(n), "--max-epochs", "1",
                                  "--max-concurrent", "1", "--name", f"both-{m}", "--mlruns", str(home)],
                                 cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 start_new_session=True)
             for m in ("lora", "hier_lora")}
    logs = {}
    try:
        for m, p in procs.items():
            logs[m] = p.communicate(timeout=420)[0]
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    for m, p in procs.items():
        assert p.returncode == 0, (m, logs[m][-3000:])
        assert "database is locked" not in logs[m], logs[m][-3000:]
        parent, kids = children_of(mlflow_runs(home, m), f"both-{m}")
        assert parent["status"] == "FINISHED"
        assert len(kids) == n and all(k["status"] == "FINISHED" and "objective" in k["metrics"] for k in kids)


def test_searcher_treats_the_locality_floor_as_a_constraint(_small_world):
    """Generalization subject to locality: a trial below the floor is infeasible for TPE (c-TPE),
    whatever its penalised objective, so a feasible trial with a lower objective is the one TPE
    samples around. Unit-level: no Ray started."""
    from optuna.samplers._tpe.sampler import _split_trials

    from trainables.sweep.searcher import make_searcher
    from trainables.sweep.methods import METHODS

    searcher = make_searcher(METHODS["hier_lora"], 4, 2, "objective", "max", seed=0)
    assert searcher.suggest("edge") and searcher.suggest("inside")  # "adopted": never suggested
    searcher.on_trial_complete("edge", result={"objective": 0.80, "locality": 0.948, "final": True})
    searcher.on_trial_complete("inside", result={"objective": 0.76, "locality": 0.97, "final": True})
    searcher.on_trial_complete("adopted", result={"objective": 0.9, "locality": 0.5, "final": True,
                                                  "config": {"lr": 1e-3}})
    study = searcher._ot_study
    assert [t.constraints for t in study.trials] == [{"locality": pytest.approx(0.002)},
                                                     {"locality": pytest.approx(-0.02)},
                                                     {"locality": pytest.approx(0.45)}]
    below, above = _split_trials(study, study.trials, 1)
    assert [t.value for t in below] == [0.76] and sorted(t.value for t in above) == [0.8, 0.9]
    mo = make_searcher(METHODS["hier_lora"], 4, 2, ["efficacy", "locality"], ["max", "max"], seed=0)
    assert mo.suggest("m")
    mo.on_trial_complete("m", result={"efficacy": 0.5, "locality": 0.5, "final": True})
    assert mo._ot_study.trials[0].constraints == {}  # a Pareto search is not constrained
