"""Early stopping: ASHA's rungs, and ASHA with a minimum-improvement rule at its first rung.

Imports Ray: the run imports it once the checks have passed."""
from __future__ import annotations

from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.schedulers.async_hyperband import _Bracket

ASHA_GRACE, ASHA_RF = 1, 3  # rungs at epochs 1 and 3 of the default 4


def asha_rungs(max_t: int, grace: int = ASHA_GRACE, rf: int = ASHA_RF) -> list[int]:
    """The epochs where ASHA (one bracket) compares trials: grace * rf**k below max_t, as
    ray.tune.schedulers.async_hyperband._Bracket lays them out."""
    import math

    n = int(math.log(max_t / grace) / math.log(rf) + 1)
    return [grace * rf**k for k in range(n) if grace * rf**k < max_t]


def make_scheduler(floor: float | None, max_epochs: int, mode: str = "max", lag: int | None = None):
    """ASHA ranking intermediate reports by ``progress`` (``trainables.objective.progress``: on
    the objective alone most first-rung reports tie at 0 and ASHA stops almost nothing), on the
    reported ``epoch`` (trials evaluate and report only at the rungs and their last epoch), with
    the stall rule when ``floor`` is given; with ``lag`` (the trials run at once), the
    reproducible :class:`LockstepASHA`."""
    kwargs = dict(floor=floor, time_attr="epoch", metric="progress", mode=mode, max_t=max_epochs,
                  grace_period=ASHA_GRACE, reduction_factor=ASHA_RF)
    return LockstepASHA(lag=lag, **kwargs) if lag else StallASHA(**kwargs)


class StallASHA(ASHAScheduler):
    """ASHA that also stops, at its first rung, every trial whose metric there is below
    ``floor``: the untrained model's value plus a minimum improvement.

    ASHA stops a trial only when it is strictly below a quantile of the results its rung has
    recorded so far. Early in a sweep that quantile is taken over a handful of trials, most of
    them from TPE's random start; in the headline sweep (lr log-uniform over 1e-5..1e-2) those
    had moved nothing after one epoch, their ``progress`` differing only in the fourth decimal,
    so several passed the rung on noise and trained to the end for an objective of 0 (in one
    40-trial testbed sweep, 5 trials and ~170 of 717 trial-seconds). A trial that has not improved on the model it
    started from by the first rung is stopped whatever the others did: the ``min_delta`` of
    ordinary early stopping, measured against the base model (``objective.STALL_DELTA``).
    """

    def __init__(self, *, floor: float | None, **kwargs):
        super().__init__(**kwargs)
        self.floor = floor
        self._first_rung = kwargs.get("grace_period", 1)
        self._checked: set[str] = set()

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        t = result.get(self._time_attr)
        if (self.floor is None or trial.trial_id in self._checked or t is None or t < self._first_rung
                or result.get("final")):
            return action
        self._checked.add(trial.trial_id)
        value = result.get(self._metric)
        if action == TrialScheduler.CONTINUE and value is not None and value < self.floor:
            print(f"trial {trial.trial_id}: {self._metric} {value:.4f} at {self._time_attr} {t:g} is below the "
                  f"untrained model's + the minimum improvement ({self.floor:.4f}); stopping it", flush=True)
            return TrialScheduler.STOP
        return action


class LockstepASHA(StallASHA):
    """ASHA whose decisions do not depend on timing: the k-th trial (in suggestion order) is
    compared at a rung only with trials 0 .. k-``lag``, which had all finished before it started
    (``trainables.sweep.searcher.LockstepLimiter`` holds each suggestion back until they have).
    Ray's ASHA compares with whatever trials have reached the rung so far, which on 2 workers
    depends on which of two trials ran faster. The cutoff rule (the rung's top 1/rf continue)
    is ASHA's own."""

    def __init__(self, *, lag: int, **kwargs):
        super().__init__(**kwargs)
        self.lag = lag
        self.index: dict[str, int] = {}
        self.current: str | None = None
        self._brackets = [_LockstepBracket(b, self) for b in self._brackets]

    def on_trial_add(self, tune_controller, trial) -> None:
        super().on_trial_add(tune_controller, trial)
        self.index.setdefault(trial.trial_id, len(self.index))

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        self.current = trial.trial_id
        return super().on_trial_result(tune_controller, trial, result)


class _LockstepBracket(_Bracket):
    """An ASHA bracket whose cutoff reads only the results the current trial may see."""

    def __init__(self, bracket: _Bracket, scheduler: LockstepASHA):
        self.__dict__.update(bracket.__dict__)
        self.scheduler = scheduler

    def cutoff(self, recorded):
        sch = self.scheduler
        k = sch.index.get(sch.current)
        if k is not None:
            recorded = {t: v for t, v in recorded.items() if sch.index.get(t, k) <= k - sch.lag}
        return super().cutoff(recorded)
