"""The sandbox at the command lines that run generated code: the GRPO sweep and cua_eval.py
refuse to start where the sandbox cannot bound a program's processes, unless
``--allow-weak-sandbox`` is given, and then every trial's MLflow run says so; a sweep whose
every trial failed exits non-zero.

A machine without bubblewrap or a pids cgroup is emulated with the sandbox's own knobs
(APIUPDATE_SANDBOX_BACKENDS=rlimits, APIUPDATE_SANDBOX_CGROUP=0); as root with an interpreter
other uids cannot read (pyenv under /root), nothing then bounds the processes.
"""
from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from tests.test_sweep import children_of, mlflow_runs, sweep
from trainables import sandbox

ROOT = Path(__file__).resolve().parent.parent
NO_BOUND = {"APIUPDATE_SANDBOX_BACKENDS": "rlimits", "APIUPDATE_SANDBOX_CGROUP": "0"}


def _unbounded_here() -> bool:
    """Whether NO_BOUND leaves nothing to bound processes on this machine."""
    import os

    return os.geteuid() == 0 and not sandbox._interpreter().reachable


needs_unbounded = pytest.mark.skipif(
    not _unbounded_here(), reason="needs root and an interpreter other uids cannot read (e.g. pyenv under /root): "
                                  "elsewhere a dropped uid bounds the processes even without bubblewrap")


@pytest.fixture()
def no_bound(monkeypatch):
    """In this process: the rlimits backend, no cgroup, no uid to drop to."""
    real = sandbox._interpreter()
    monkeypatch.setattr(sandbox, "detect_backend", lambda: "rlimits")
    monkeypatch.setattr(sandbox, "_cgroup_root", lambda: None)
    monkeypatch.setattr(sandbox, "_interpreter", lambda: replace(real, readable=False, reachable=False))
    yield
    sandbox.allow_weak_containment(False)


def test_only_methods_that_run_generated_code_take_the_flag():
    from trainables.sweep.cli import build_parser
    from trainables.sweep.methods import METHODS

    assert [n for n, m in METHODS.items() if m.sandboxed] == ["grpo"]
    assert build_parser(METHODS["grpo"]).parse_args(["--allow-weak-sandbox"]).allow_weak_sandbox is True
    with pytest.raises(SystemExit):
        build_parser(METHODS["lora"]).parse_args(["--allow-weak-sandbox"])


def test_check_sandbox_refuses_or_tags_and_the_trial_policy_follows_the_config(no_bound):
    if sandbox.os.geteuid() != 0:
        pytest.skip("as non-root the caller's uid always bounds the count")
    from trainables.sweep.checks import UsageError, check_sandbox
    from trainables.sweep.methods import METHODS
    from trainables.trial import TrialContext, sandbox_policy

    assert check_sandbox(METHODS["lora"], False) == {}  # runs no generated code: nothing checked
    with pytest.raises(UsageError, match="--allow-weak-sandbox"):
        check_sandbox(METHODS["grpo"], False)
    tags = check_sandbox(METHODS["grpo"], True)
    assert tags["sandbox"].startswith("rlimits; processes bounded by: nothing")
    assert tags["sandbox_weak"].startswith("processes not bounded, allowed by --allow-weak-sandbox")

    def trial(ctx):  # what a GRPO trial's reward does: one sandbox call
        sandbox_policy(ctx)
        return sandbox.run_code("print(6 * 7)").stdout

    assert trial(TrialContext(allow_weak_sandbox=True)) == "42\n"
    with pytest.raises(sandbox.SandboxUnavailable):
        trial(TrialContext())  # a later trial of a sweep without the flag, same worker


@needs_unbounded
def test_grpo_sweep_and_cua_eval_refuse_without_the_flag(tmp_path, small_testbed):
    home = tmp_path / "mlruns"
    out = sweep("grpo", "--num-samples", "1", "--mlruns", str(home), env=NO_BOUND, timeout=300)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert lines[0].startswith("error: sandbox: nothing bounds") and "--allow-weak-sandbox" in lines[0]
    assert "bubblewrap" in lines[0] and not home.exists()  # before Ray, nothing written
    sample = ROOT.parent / "shared" / "data" / "codeupdatearena_dev" / "dev_sample.jsonl"
    if sample.is_file():
        cua = subprocess.run([sys.executable, "sweeps/cua_eval.py", "--oracle", str(sample), "--limit", "1", "--json"],
                             cwd=ROOT, capture_output=True, text=True, timeout=300,
                             env={**__import__("os").environ, **NO_BOUND})
        assert cua.returncode == 2 and cua.stderr.strip().startswith("error: sandbox: nothing bounds"), cua.stderr


@needs_unbounded
def test_weak_grpo_trials_are_tagged_and_a_sweep_whose_every_trial_failed_exits_non_zero(tmp_path, small_testbed):
    """One GRPO trial under weak containment, allowed, then failed by the OOM fault at its first
    report (after its first epoch of rewards): its run carries sandbox_weak, and the sweep,
    with no trial left, exits 1 with one error line (it used to print "no trial completed"
    and exit 0)."""
    home = tmp_path / "mlruns"
    env = {**NO_BOUND, "APIUPDATE_FAULT": f"oom:{tmp_path / 'oom'}"}
    out = sweep("grpo", "--num-samples", "1", "--max-epochs", "1", "--name", "weak", "--mlruns", str(home),
                "--allow-weak-sandbox", env=env)
    assert out.returncode == 1, out.stderr[-3000:]
    assert "no trial completed" in out.stdout
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: every trial of sweep weak failed (1)"), errors
    assert "OutOfMemoryError" in errors[0] and "SandboxUnavailable" not in out.stdout + out.stderr
    parent, kids = children_of(mlflow_runs(home, "grpo"), "weak")
    assert parent["status"] == "FAILED" and len(kids) == 1
    tags = kids[0]["tags"]
    assert tags["trial_status"] == "failed" and "OutOfMemoryError" in tags["failure_reason"]
    assert tags["sandbox_weak"].startswith("processes not bounded, allowed by --allow-weak-sandbox"), tags
    assert tags["sandbox"].startswith("rlimits; processes bounded by: nothing")
