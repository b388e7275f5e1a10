"""Fault injection and a concurrency barrier for the resilience tests, reached from the trial
code only through ``trainables.hooks`` (``APIUPDATE_TEST_HOOK=tests.faults:hook``, which
``tests/conftest.py`` sets for the test session and the sweeps it starts). Each fault is off
unless its own variable says otherwise: ``APIUPDATE_FAULT`` (faults) and ``APIUPDATE_BARRIER``
(the barrier)."""
from __future__ import annotations

import os
from pathlib import Path


def hook(point: str, **info) -> None:
    if point == "trial_start":
        wait_at_barrier()
    elif point == "epoch_end":
        inject_fault(info["epoch"])
    elif point == "report":
        inject_report_fault()


def inject_fault(epoch: int) -> None:
    """Fault injection for the resilience tests, off unless APIUPDATE_FAULT is set.

    ``raise_once:PATH``: the first trial to finish an epoch creates PATH and raises, once per
    PATH across all processes (O_EXCL), so the sweep has exactly one errored trial to resume.
    """
    spec = os.environ.get("APIUPDATE_FAULT", "")
    kind, _, path = spec.partition(":")
    if kind != "raise_once" or not path:
        return
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    raise RuntimeError(f"injected fault after epoch {epoch} (APIUPDATE_FAULT)")


def claim(folder: Path, trial_id: str, taken: tuple[Path, ...] = ()) -> bool:
    """True when ``trial_id`` is (or now becomes, first come first served across processes) the
    one victim recorded in ``folder/victim``; a trial already named in ``taken`` cannot be."""
    folder.mkdir(parents=True, exist_ok=True)
    victim = folder / "victim"
    if any(p.is_file() and p.read_text() == trial_id for p in taken):
        return False
    try:
        fd = os.open(victim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return victim.read_text() == trial_id
    with os.fdopen(fd, "w") as f:
        f.write(trial_id)
    return True


def inject_report_fault() -> None:
    """Fault injection at a Tune trial's report (any method), off unless APIUPDATE_FAULT says so.

    Specs, comma-separated (each DIR is the fault's own folder of marker files):

    - ``oom:DIR``: the first trial to report raises ``torch.cuda.OutOfMemoryError`` (as a real
      CUDA OOM would, mid-training); only that trial, once.
    - ``sigkill:DIR:K``: the first trial to report (not the ``oom`` victim) SIGKILLs its own
      worker process, as the kernel's OOM killer or a preempted node would; it does so again at
      each retry until it has been killed K times, so K > --max-failures marks it failed.
    """
    specs = [s for s in os.environ.get("APIUPDATE_FAULT", "").split(",") if s]
    faults = {s.partition(":")[0]: s.partition(":")[2] for s in specs}
    if "oom" not in faults and "sigkill" not in faults:
        return
    from ray import tune

    trial_id = tune.get_context().get_trial_id() or "?"
    oom_dir = Path(faults["oom"]) if faults.get("oom") else None
    if oom_dir is not None and claim(oom_dir, trial_id) and not (oom_dir / "raised").exists():
        (oom_dir / "raised").touch()
        import torch

        raise torch.cuda.OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 2.00 GiB (simulated by APIUPDATE_FAULT)")
    if faults.get("sigkill"):
        folder, _, times = faults["sigkill"].rpartition(":")
        folder_p = Path(folder)
        taken = (oom_dir / "victim",) if oom_dir is not None else ()
        if not claim(folder_p, trial_id, taken):
            return
        for k in range(1, int(times) + 1):
            try:
                fd = os.open(folder_p / f"kill-{k}", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                continue
            os.close(fd)
            import signal

            os.kill(os.getpid(), signal.SIGKILL)


def wait_at_barrier(timeout: float = 30.0) -> None:
    """Concurrency checks, off unless APIUPDATE_BARRIER=DIR:N is set: each trial announces itself
    in DIR and waits (at most ``timeout``) until N trials have, so a test can tell "N ran at
    once" from start-up staggering."""
    spec = os.environ.get("APIUPDATE_BARRIER", "")
    folder, _, n = spec.rpartition(":")
    if not folder or not n.isdigit():
        return
    import time
    import uuid

    Path(folder).mkdir(parents=True, exist_ok=True)
    Path(folder, uuid.uuid4().hex).touch()
    deadline = time.time() + timeout
    while time.time() < deadline:
        arrived = len(list(Path(folder).iterdir()))
        if arrived % int(n) == 0:
            return
        time.sleep(0.05)
