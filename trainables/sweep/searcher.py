"""The searcher: seeded TPE in Ray's OptunaSearch, told about pruned, adopted and resumed trials."""
from __future__ import annotations

from functools import partial

from trainables.sweep.methods import Method


def make_searcher(method: Method, n_layers: int, max_epochs: int, metric, mode, seed: int,
                  max_concurrent: int | None = None):
    """Seeded TPE in Ray's OptunaSearch, told about pruned, adopted and resumed trials; wrapped
    in a concurrency limiter when ``max_concurrent`` is given (pass it here, not to TuneConfig)."""
    import optuna
    from optuna.trial import TrialState
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    from trainables.objective import LOCALITY_FLOOR

    class PrunedAwareOptunaSearch(OptunaSearch):
        """Tell ASHA-stopped trials to Optuna as PRUNED, not COMPLETE with a truncated metric,
        which would bias TPE towards configs that merely look good early (Ray's OptunaSearch
        creates its study with NopPruner and tells every finished trial COMPLETE)."""

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

        @staticmethod
        def _constrain(trial, result):
            """The locality floor as an Optuna constraint on ``trial`` (a live or a frozen trial;
            feasible when <= 0), when the search is constrained and the result has a locality."""
            if constrained and result and result.get("locality") is not None:
                trial.set_constraint("locality", LOCALITY_FLOOR - float(result["locality"]))
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
            if (not error and result and not isinstance(self.metric, list) and not result.get("final")
                    and trial_id not in self._completed_trials):
                self._ot_study.tell(self._ot_trials[trial_id], state=TrialState.PRUNED)
                self._completed_trials.add(trial_id)
                return
            super().on_trial_complete(trial_id, result, error)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Generalization *subject to* locality: TPE is told the objective (the penalised scalar) and,
    # in a single-objective search, the floor as a constraint (c-TPE; a trial that reports no
    # locality counts as feasible): a trial below the floor joins TPE's "bad" group whatever its
    # objective. With the penalty alone, a trial at 0.809 and locality 0.948 outranked every
    # feasible trial of two 40-trial testbed sweeps (best 0.765), and TPE kept sampling at the
    # constraint's edge.
    constrained = not isinstance(metric, list)
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=8)
    space = partial(method.space, n_layers=n_layers, max_epochs=max_epochs)
    searcher = PrunedAwareOptunaSearch(space=space, metric=metric, mode=mode, sampler=sampler, seed=seed)

    class ForwardingLimiter(ConcurrencyLimiter):
        """Ray's ConcurrencyLimiter (what max_concurrent_trials adds) drops the completion of any
        trial it no longer counts as live, such as an errored trial finished by --resume, so the
        study kept it as FAIL (seen in tests/test_hardening.py). Those now reach the searcher."""

        def on_trial_complete(self, trial_id, result=None, error=False):
            if trial_id in self.live_trials or self.batch or not self._limit_concurrency:
                return super().on_trial_complete(trial_id, result=result, error=error)
            self.searcher.on_trial_complete(trial_id, result=result, error=error)

    return ForwardingLimiter(searcher, max_concurrent=max_concurrent) if max_concurrent else searcher
