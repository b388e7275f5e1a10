"""The searcher: seeded TPE in Ray's OptunaSearch, told about pruned, adopted and resumed trials.

:func:`make_searcher` builds it for a sweep: a :class:`PrunedAwareOptunaSearch`, wrapped in a
:class:`ForwardingLimiter` (at most ``max_concurrent`` trials at once) or a
:class:`LockstepLimiter` (the same, and reproducible). :func:`warm_start_points` turns an earlier
sweep's trials into history for the new study.

This module imports Ray and Optuna: the driver imports it once Ray is needed. What a search
space samples, and the search parameters a trial config fixes (``--start-from``), are in
search_spaces/derived.py, which imports neither.
"""
from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import optuna
from optuna.trial import TrialState
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from search_spaces.derived import space_distributions
from trainables.objective import LOCALITY_FLOOR
from trainables.sweep.checks import UsageError
from trainables.sweep.methods import Method
from trainables.trial import CONTEXT_FILE, TrialContext


class PrunedAwareOptunaSearch(OptunaSearch):
    """Tell ASHA-stopped trials to Optuna as PRUNED, not COMPLETE with a truncated metric,
    which would bias TPE towards configs that merely look good early (Ray's OptunaSearch
    creates its study with NopPruner and tells every finished trial COMPLETE).

    ``constrained``: tell the study the floor on locality and on specificity as Optuna
    constraints (c-TPE), for a single-objective search. Trials that this searcher never
    suggested (an experiment snapshot newer than the searcher's, after a SIGKILL) are adopted
    as finished trials from their config, and an errored trial that ``--resume`` finished is
    told again with its real outcome."""

    def __init__(self, *args, constrained: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self.constrained = constrained

    # After a SIGKILL the experiment snapshot can hold a trial that the (separately saved)
    # searcher snapshot never saw; its results then raised KeyError in OptunaSearch and
    # crashed the resumed sweep. Such a trial skips intermediate reports and is added to
    # the study as a finished trial from its config, so the history keeps it.
    def on_trial_result(self, trial_id, result):
        if trial_id in self._ot_trials:
            super().on_trial_result(trial_id, result)

    def _adopt(self, trial_id, result) -> bool:
        if trial_id in self._ot_trials or trial_id in self._completed_trials:
            return False
        config = result.get("config") or {}
        dists = {n: d for t in self._ot_study.trials for n, d in t.distributions.items()}
        params = {n: config[n] for n in dists if n in config}
        value = None if isinstance(self.metric, list) else result.get(self.metric)
        values = [result.get(m) for m in self.metric] if isinstance(self.metric, list) else None
        state = TrialState.COMPLETE if result.get("final") else TrialState.PRUNED
        if any(v is None for v in (values or [value])) and state == TrialState.COMPLETE:
            state = TrialState.FAIL
        done = state == TrialState.COMPLETE
        self._ot_study.add_trial(self._constrain(optuna.trial.create_trial(
            params=params, distributions={n: dists[n] for n in params}, state=state,
            value=value if done and values is None else None, values=values if done else None), result))
        self._completed_trials.add(trial_id)
        return True

    def _constrain(self, trial, result):
        """The floor on locality and on specificity as Optuna constraints on ``trial`` (a
        live or a frozen trial; feasible when <= 0), when the search is constrained, for
        each figure the result has (validation split: the test split is never told)."""
        for key in ("locality", "specificity"):
            if self.constrained and result and result.get(key) is not None:
                trial.set_constraint(key, LOCALITY_FLOOR - float(result[key]))
        return trial

    def _retell(self, trial_id, result) -> None:
        """An errored trial was told FAIL; resumed (--resume) it has now finished. A finished
        Optuna trial cannot be told again, so its params join the study once more with the
        real outcome: otherwise TPE, which ignores FAIL, never learns from it."""
        frozen = self._ot_study._storage.get_trial(self._ot_trials[trial_id]._trial_id)
        if frozen.state != TrialState.FAIL or any(
                t.user_attrs.get("ray_trial_id") == trial_id for t in self._ot_study.trials):
            return
        multi = isinstance(self.metric, list)
        values = [result.get(m) for m in self.metric] if multi else [result.get(self.metric)]
        state = TrialState.COMPLETE if result.get("final") or multi else TrialState.PRUNED
        if any(v is None for v in values):
            return
        done = state == TrialState.COMPLETE
        self._ot_study.add_trial(self._constrain(optuna.trial.create_trial(
            params=frozen.params, distributions=frozen.distributions, state=state,
            values=values if done else None,
            user_attrs={"ray_trial_id": trial_id, "resumed_after_failure": True}), result))

    def on_trial_complete(self, trial_id, result=None, error=False):
        if trial_id in self._ot_trials and trial_id not in self._completed_trials:
            self._constrain(self._ot_trials[trial_id], result)
        if trial_id not in self._ot_trials:
            self._adopt(trial_id, result or {})
            return
        if trial_id in self._completed_trials:
            if result and not error:
                self._retell(trial_id, result)
            return
        if result and result.get("packing_failure"):
            # out of memory beside another trial on its GPU: the packing failed, not the config,
            # so TPE (which ignores FAIL) learns nothing from it
            self._ot_study.tell(self._ot_trials[trial_id], state=TrialState.FAIL)
            self._completed_trials.add(trial_id)
            return
        if (not error and result and not isinstance(self.metric, list) and not result.get("final")
                and trial_id not in self._completed_trials):
            self._ot_study.tell(self._ot_trials[trial_id], state=TrialState.PRUNED)
            self._completed_trials.add(trial_id)
            return
        super().on_trial_complete(trial_id, result, error)


class ForwardingLimiter(ConcurrencyLimiter):
    """Ray's ConcurrencyLimiter (what max_concurrent_trials adds) drops the completion of any
    trial it no longer counts as live, such as an errored trial finished by --resume, so the
    study kept it as FAIL (seen in tests/test_hardening.py). Those now reach the searcher."""

    def on_trial_complete(self, trial_id, result=None, error=False):
        if trial_id in self.live_trials or self.batch or not self._limit_concurrency:
            return super().on_trial_complete(trial_id, result=result, error=error)
        self.searcher.on_trial_complete(trial_id, result=result, error=error)


class LockstepLimiter(ForwardingLimiter):
    """Suggestions that do not depend on timing: the k-th suggestion waits until trials
    0 .. k-W (W = ``max_concurrent``, in suggestion order) have finished, and the study is
    told exactly those, in that order, before it is asked. TPE (seeded) then sees the same
    history at every ask whichever trial happened to finish first, and the same seed gives
    the same trials in the same order. :class:`trainables.sweep.scheduler.LockstepASHA`
    makes the early-stopping decisions the same way.

    A finished trial is held until the next suggestion needs it told (and all are told
    once the sweep's ``total`` trials have been suggested). A slot idles while trial k-W
    runs on (``--asynchronous`` gives that time back, for timing-dependent trials). It waits
    for k-W rather than k-2W because the shorter wait saved little time and cost TPE two
    trials of history at every ask (docs/results.md). After a ``--resume`` the limiter starts
    afresh (Tune restores the searcher, not this bookkeeping): trials from before the crash
    are told as they finish, never waited for, and the resumed sweep is not bit-reproducible."""

    def __init__(self, searcher, max_concurrent: int, total: int):
        super().__init__(searcher, max_concurrent=max_concurrent)
        self.order: list[str] = []  # trial ids in suggestion order
        self.held: dict = {}  # finished, not yet told: trial id -> (result, error)
        self.told = 0  # order[:told] have been told
        self.total = total

    def _tell(self, upto: int) -> None:
        while self.told < min(upto, len(self.order)) and self.order[self.told] in self.held:
            tid = self.order[self.told]
            result, error = self.held.pop(tid)
            super().on_trial_complete(tid, result=result, error=error)
            self.told += 1

    def _needed(self) -> int:
        """How many trials the next suggestion needs told: 0 .. k-W."""
        if len(self.order) >= self.total:
            return len(self.order)
        return len(self.order) - self.max_concurrent + 1

    def suggest(self, trial_id):
        self._tell(self._needed())
        if self.told < self._needed():
            return None  # Tune asks again after the next result
        suggestion = super().suggest(trial_id)
        if isinstance(suggestion, dict):
            self.order.append(trial_id)
        return suggestion

    def on_trial_complete(self, trial_id, result=None, error=False):
        if trial_id not in self.order[self.told:]:  # adopted, resumed or already told
            return super().on_trial_complete(trial_id, result=result, error=error)
        self.held[trial_id] = (result, error)
        self._tell(self._needed())


def make_searcher(method: Method, n_layers: int, max_epochs: int, metric, mode, seed: int,
                  max_concurrent: int | None = None, lockstep_total: int | None = None, warm_start=(),
                  start=()):
    """Seeded TPE in Ray's OptunaSearch, told about pruned, adopted and resumed trials; wrapped
    in a concurrency limiter when ``max_concurrent`` is given (pass it here, not to TuneConfig).

    ``lockstep_total``: the sweep's number of trials, for a reproducible search
    (:class:`LockstepLimiter`; needs ``max_concurrent``). ``warm_start``: finished Optuna trials
    of an earlier sweep (:func:`warm_start_points`), added to the study before the first
    suggestion. ``start``: parameter dicts (:func:`search_spaces.derived.start_params`) that the
    first suggestions take, in order, the sampler drawing any parameter a dict leaves out."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Generalization *subject to* locality: TPE is told the objective (the penalised scalar) and,
    # in a single-objective search, the floor as a constraint (c-TPE; a trial that reports no
    # locality counts as feasible): a trial below the floor joins TPE's "bad" group whatever its
    # objective; with the penalty alone TPE kept sampling at the constraint's edge
    # (docs/results.md).
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=8)
    space = partial(method.space, n_layers=n_layers, max_epochs=max_epochs)
    searcher = PrunedAwareOptunaSearch(space=space, metric=metric, mode=mode, sampler=sampler, seed=seed,
                                       constrained=not isinstance(metric, list))
    # As finished trials of this study (never run again): TPE counts them among its startup
    # trials and models them from the first suggestion. Ray's evaluated_rewards would do the
    # same for a dict space only, not for this define-by-run one.
    searcher._ot_study.add_trials(list(warm_start))
    # Optuna's queue: study.ask() (what Ray's define-by-run search calls) pops an enqueued trial
    # first, and its suggest_* calls return the fixed values
    for params in start:
        searcher._ot_study.enqueue_trial(dict(params))
    if max_concurrent and lockstep_total:
        return LockstepLimiter(searcher, max_concurrent, lockstep_total)
    return ForwardingLimiter(searcher, max_concurrent=max_concurrent) if max_concurrent else searcher


def _sweep_models(experiment: Path, label: str) -> set:
    """The model the sweep in ``experiment`` ran on: its TrialContext's (written by the driver at
    sweep start), or, in a sweep from before that file, the ``model`` of its first trial
    configs. Empty when neither names one."""
    path = experiment / CONTEXT_FILE
    if path.is_file():
        context = TrialContext.load(path)
        if context is None:
            raise UsageError(f"{label}: {path} is not a JSON object")
        models = {context.model}
    else:
        models = {json.loads(p.read_text()).get("model") for p in sorted(experiment.glob("trial_*/params.json"))[:5]}
    return models - {None}


def warm_start_points(experiment: Path, method: Method, model: str, n_layers: int, max_epochs: int,
                      multi_objective: bool) -> tuple[list, int]:
    """The finished (complete or pruned) trials of the earlier sweep in ``experiment``, as new
    frozen Optuna trials for this sweep's study, and how many were left out: those whose
    parameters this search space would not sample the same way (another method, layer count or
    --max-epochs). Values, pruned intermediate values and the locality / specificity
    constraints carry over, so TPE weighs them exactly as the earlier study did."""
    label = f"--warm-start {experiment.name}"  # that the folder exists, check_inputs checked
    models = _sweep_models(experiment, label)
    if models and model not in models:
        raise UsageError(f"{label}: that sweep ran on --model {', '.join(map(str, sorted(models, key=str)))}, "
                         f"this one on {model}")
    old = OptunaSearch()
    try:
        old.restore_from_dir(str(experiment))
    except Exception as e:  # noqa: BLE001 - any unreadable state is the same one-line error
        raise UsageError(f"{label}: no searcher state in {experiment} ({type(e).__name__})") from None
    study = old._ot_study
    if len(study.directions) != (2 if multi_objective else 1):
        raise UsageError(f"{label}: that sweep was {'single' if len(study.directions) == 1 else 'multi'}-objective")
    dists = space_distributions(method, n_layers, max_epochs)
    out, skipped = [], 0
    for t in study.trials:
        if t.state not in (TrialState.COMPLETE, TrialState.PRUNED):
            continue
        if any(dists.get(n) != d for n, d in t.distributions.items()):
            skipped += 1
            continue
        out.append(optuna.trial.create_trial(
            state=t.state, params=t.params, distributions=t.distributions,
            values=t.values if t.state == TrialState.COMPLETE else None,
            intermediate_values=t.intermediate_values, system_attrs=t.system_attrs,
            user_attrs={**t.user_attrs, "warm_start_from": experiment.name, "warm_start_number": t.number}))
    return out, skipped
