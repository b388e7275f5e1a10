"""MLflow tracking, written from the driver only.

SQLite allows one writer at a time, so no trial process writes to MLflow: everything here runs
in the driver. :func:`open_parent` makes one parent run per sweep (run name = sweep name), the
Tune callback one child run per trial (tags ``mlflow.parentRunId``, ``trial_id``, ``trial_status``), logs params,
per-epoch metrics, final metrics and artifacts. Child runs are found again by their
``trial_id`` tag, so a resumed sweep keeps writing to the same runs and never duplicates one;
:meth:`MlflowTracker.reconcile` removes runs of trials that the resumed sweep no longer has.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from ray.tune import Callback

from trainables.common import STATUS_FAILED, trial_status

TERMINAL = {"FINISHED", "FAILED", "KILLED"}


def mlflow_home_uri(home: Path) -> tuple[str, str]:
    """(tracking URI, artifact root URI) for an MLflow home folder."""
    home = home.resolve()
    return f"sqlite:///{home / 'mlflow.db'}", (home / "artifacts").as_uri()


def _transient(e: Exception) -> bool:
    """SQLite errors that go away when retried: another process holds the write lock, or creates
    the schema of a fresh mlflow.db at the same moment (two sweeps started together)."""
    text = f"{type(e).__name__}: {e}".lower()
    return any(s in text for s in ("database is locked", "database table is locked", "already exists",
                                   "alembic_version", "out-of-date database schema", "no such table"))


def retry_locked(fn, *args, attempts: int = 10, **kwargs):
    """Call ``fn`` again (0.2 s, 0.4 s, ... capped at 5 s; ~30 s in all) while SQLite says it is
    busy. SQLite has one writer at a time, and two sweeps sharing one mlruns/ write at once;
    its own busy timeout (5 s in SQLAlchemy's pysqlite default) is not always enough."""
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - only transient store errors are retried
            if not _transient(e) or attempt == attempts - 1:
                raise
            time.sleep(min(5.0, 0.2 * 2**attempt))


def client_for(tracking_uri: str):
    """An MlflowClient whose store is ready. A fresh SQLite store is created under a file lock
    beside it: two sweeps started together on one new mlruns/ both ran MLflow's schema
    migrations and one died ("UPDATE statement on table 'alembic_version' expected to match one
    row ... 0 found", tests/test_hardening.py); retries alone cannot undo a half-run migration."""
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(tracking_uri)
    if not tracking_uri.startswith("sqlite:///"):
        return MlflowClient(tracking_uri)
    from filelock import FileLock

    with FileLock(tracking_uri[len("sqlite:///"):] + ".lock", timeout=300):
        client = MlflowClient(tracking_uri)
        retry_locked(client.search_experiments, max_results=1)  # creates / migrates the schema
    return client


# The experiment's kind, for MLflow servers and clients that read it. MLflow 3.18's UI does not:
# it opens every experiment in its GenAI view (traces, judges) unless the address asks for the
# training view (``browse_url``), and remembers the choice in the browser afterwards.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def browse_url(tracking_uri: str, exp_id: str) -> str:
    """How to open experiment ``exp_id``'s runs in MLflow's training view: ``mlflow ui`` on the
    store where it is a file, then the address with ``workflowType=machine_learning``."""
    view = f"#/experiments/{exp_id}?workflowType=machine_learning"
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')}/{view}"
    return f"mlflow ui --backend-store-uri {tracking_uri}  then  http://127.0.0.1:5000/{view}"


def experiment_id(client, name: str, artifact_root: str | None) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        for key, value in EXPERIMENT_KIND.items():
            if exp.tags.get(key) is None:  # a kind the user chose stays
                client.set_experiment_tag(exp.experiment_id, key, value)
        return exp.experiment_id
    kwargs = {"artifact_location": f"{artifact_root}/{name}"} if artifact_root else {}
    return client.create_experiment(name, tags=EXPERIMENT_KIND, **kwargs)


def find_parent(client, exp_id: str, sweep: str):
    runs = client.search_runs([exp_id], filter_string=f"tags.sweep = '{sweep}' and tags.kind = 'sweep'",
                              max_results=1)
    return runs[0] if runs else None


def open_parent(client, exp_id: str, sweep: str, method: str, params: dict) -> str:
    """The sweep's parent run (run name = sweep name): created with its params, or, for a
    resumed sweep, found again and set RUNNING."""
    parent = retry_locked(find_parent, client, exp_id, sweep)
    if parent is not None:
        retry_locked(client.update_run, parent.info.run_id, status="RUNNING")
        return parent.info.run_id
    from mlflow.entities import Param

    run_id = retry_locked(client.create_run, exp_id, run_name=sweep,
                          tags={"sweep": sweep, "kind": "sweep", "method": method}).info.run_id
    retry_locked(client.log_batch, run_id, params=[Param(k, str(v)) for k, v in params.items()])
    return run_id


def close_parent(client, parent_id: str, failed: bool) -> None:
    retry_locked(client.set_terminated, parent_id, "FAILED" if failed else "FINISHED")


def children(client, exp_id: str, parent_id: str) -> list:
    return client.search_runs([exp_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'",
                              max_results=50000)


def _numeric(d: dict) -> dict[str, float]:
    out = {}
    for k, v in d.items():
        if isinstance(v, bool):
            v = float(v)
        if isinstance(v, (int, float)) and math.isfinite(v):
            out[k] = float(v)
    return out


def _params(config: dict) -> dict[str, str]:
    return {k: str(v)[:500] for k, v in config.items() if not k.startswith("_")}


class MlflowTracker(Callback):
    def __init__(self, tracking_uri: str, artifact_root: str, method: str, sweep: str,
                 parent_run_id: str | None, extra_tags: dict | None = None, context: dict | None = None):
        self.tracking_uri, self.artifact_root = tracking_uri, artifact_root
        self.method, self.sweep, self.parent_run_id = method, sweep, parent_run_id
        self.extra_tags = extra_tags or {}
        # the trials' shared settings (model, dataset, seed, ...): params of every trial's run
        self.context = context or {}
        self._client = None
        self._exp_id: str | None = None
        self._runs: dict[str, str] = {}  # trial_id -> run_id

    # The callback is pickled with the Tuner's state; the client is made lazily in each process.
    def __getstate__(self):
        d = dict(self.__dict__)
        d["_client"], d["_runs"] = None, {}
        return d

    @property
    def client(self):
        if self._client is None:
            self._client = retry_locked(client_for, self.tracking_uri)
            self._exp_id = retry_locked(experiment_id, self._client, self.method, self.artifact_root)
        return self._client

    def _retry(self, fn, *args, **kwargs):
        """SQLite says 'database is locked' when another sweep writes at the same moment."""
        return retry_locked(fn, *args, **kwargs)

    def run_id(self, trial) -> str:
        tid = trial.trial_id
        if tid in self._runs:
            return self._runs[tid]
        client = self.client
        filt = f"tags.trial_id = '{tid}' and tags.sweep = '{self.sweep}'"
        found = self._retry(client.search_runs, [self._exp_id], filter_string=filt, max_results=10)
        if found:
            run_id = found[0].info.run_id
            for dup in found[1:]:  # never keep duplicates of one trial
                self._retry(client.delete_run, dup.info.run_id)
            if found[0].info.status != "RUNNING":
                self._retry(client.update_run, run_id, status="RUNNING")
        else:
            tags = {"trial_id": tid, "sweep": self.sweep, "kind": "trial", "method": self.method,
                    "trial_status": "running", **self.extra_tags}
            if self.parent_run_id:
                tags["mlflow.parentRunId"] = self.parent_run_id
            run = self._retry(client.create_run, self._exp_id, run_name=f"{self.sweep}/{tid}", tags=tags)
            run_id = run.info.run_id
            from mlflow.entities import Param

            self._retry(client.log_batch, run_id,
                        params=[Param(k, v) for k, v in _params({**self.context, **trial.config}).items()])
        self._runs[tid] = run_id
        return run_id

    def on_trial_start(self, iteration, trials, trial, **info):
        self.run_id(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        from mlflow.entities import Metric

        run_id = self.run_id(trial)
        # Per-epoch series are indexed by epoch: trials report only at ASHA's rungs and their
        # last epoch, so the report count is not the epoch (a diverged report's epoch is a
        # fraction; it keeps the report count).
        epoch = result.get("epoch")
        step = epoch if isinstance(epoch, int) else int(result.get("training_iteration", 0))
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in _numeric(result).items()
                   if k not in ("time_this_iter_s", "timestamp", "pid", "done", "time_since_restore",
                                "iterations_since_restore", "time_total_s")]
        # Per-optimizer-step rows (TRL trainables: loss, grad norm, each reward component), at
        # their global step under "step/" so they do not mix with the per-epoch series.
        for row in result.get("step_log") or ():
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                metrics += [Metric(f"step/{k}", v, now, row["step"]) for k, v in _numeric(row).items() if k != "step"]
        for i in range(0, len(metrics), 900):  # MLflow takes at most 1000 metrics per batch
            self._retry(self.client.log_batch, run_id, metrics=metrics[i : i + 900])

    def _finish(self, trial, errored: bool) -> None:
        run_id = self.run_id(trial)
        result = trial.last_result or {}
        status = trial_status(result, errored)
        client = self.client
        self._retry(client.set_tag, run_id, "trial_status", status)
        self._retry(client.set_tag, run_id, "config_json",
                    json.dumps({k: v for k, v in trial.config.items() if not k.startswith("_")}, default=str))
        for key in ("gpu_ids", "node_id", "node_ip"):  # where it ran (trainables.common.tune_reporter)
            if result.get(key) is not None:
                self._retry(client.set_tag, run_id, key, str(result[key]))
        if result.get("failure_reason") and not errored:  # out of memory: a result, not an error
            self._retry(client.set_tag, run_id, "failure_reason", str(result["failure_reason"])[:500])
        if result.get("diverged_reason"):
            self._retry(client.set_tag, run_id, "diverged_reason", str(result["diverged_reason"])[:4000])
        if errored and getattr(trial, "error_file", None):
            try:
                err = Path(trial.error_file).read_text()[-4000:]
            except OSError:
                err = "see the trial's error.txt"
            self._retry(client.set_tag, run_id, "error", err)
            self._retry(client.set_tag, run_id, "failure_reason", err.strip().splitlines()[-1][:500] if err.strip() else "")
        ckpt = getattr(trial, "checkpoint", None)
        if ckpt is not None and getattr(ckpt, "path", None):
            self._retry(client.set_tag, run_id, "checkpoint_path", ckpt.path)
            for name in ("predictions.json", "config.json", "trial_config.json"):
                p = Path(ckpt.path, name)
                if p.is_file():
                    try:
                        self._retry(client.log_artifact, run_id, str(p))
                    except Exception as e:  # noqa: BLE001 - artifacts are secondary to the record
                        print(f"mlflow: could not log {p}: {e}")
        self._retry(client.set_terminated, run_id, "FAILED" if status == STATUS_FAILED else "FINISHED")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._finish(trial, errored=False)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._finish(trial, errored=True)

    def reconcile(self, trials) -> int:
        """Delete child runs of trials the sweep no longer has (lost in a crash before Ray
        recorded them) and close any still marked RUNNING. Returns how many were removed."""
        if not self.parent_run_id:
            return 0
        known = {t.trial_id: t for t in trials}
        removed = 0
        for run in children(self.client, self._exp_id, self.parent_run_id):
            tid = run.data.tags.get("trial_id")
            if tid not in known:
                # Close it before deleting: a deleted run still sits in the store, and one left
                # RUNNING there is exactly the stale state a resume must not leave behind.
                if run.info.status == "RUNNING":
                    self._retry(self.client.set_terminated, run.info.run_id, "KILLED")
                self._retry(self.client.delete_run, run.info.run_id)
                removed += 1
            elif run.info.status == "RUNNING":
                t = known[tid]
                if t.status in ("TERMINATED", "ERROR"):
                    self._finish(t, errored=t.status == "ERROR")
        return removed


def finish_parent(client, parent_id: str, experiment_dir: Path, summary: dict, method: str) -> None:
    """The sweep's results on its parent run: trial counts, the best trial, plots, every trial's row."""
    import tempfile

    import yaml

    from trainables.sweep.report import SHOW, TEST_SHOW, plots

    best = summary["best"]
    for k, v in summary["counts"].items():
        client.log_metric(parent_id, f"trials_{k}", v)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for p in plots(experiment_dir, tmp):
            client.log_artifact(parent_id, str(p), "plots")
        if best:
            for k in ("objective", "efficacy", "generalization", "generalization_lax", "locality", "specificity",
                      "over_application", "locality_exact", "specificity_exact", "trainable_params", *TEST_SHOW):
                if best.get(k) is not None:
                    client.log_metric(parent_id, f"best_{k}", float(best[k]))
            client.set_tag(parent_id, "best_trial_id", best["trial_id"])
            (tmp / "best_config.yaml").write_text(yaml.safe_dump(
                {"method": method, "config": best["config"],
                 "metrics": {k: best[k] for k in SHOW + TEST_SHOW if best.get(k) is not None and k != "trial_seconds"}},
                sort_keys=False))
            client.log_artifact(parent_id, str(tmp / "best_config.yaml"))
        (tmp / "trials.json").write_text(json.dumps(summary["rows"], default=str, indent=1))
        client.log_artifact(parent_id, str(tmp / "trials.json"))
        if summary["pareto"]:
            (tmp / "pareto.json").write_text(json.dumps(summary["pareto"], default=str, indent=1))
            client.log_artifact(parent_id, str(tmp / "pareto.json"))
