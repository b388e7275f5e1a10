"""The search's reproducibility and selection rules, without Ray running: the searcher and its
limiters (together and one at a time), the lockstep scheduler, warm starts, --start-from, the
search spaces' derived parameters, and the floor on locality and specificity."""
from __future__ import annotations

import itertools
from functools import partial
from types import SimpleNamespace

import pytest


def _searcher(total: int, workers: int = 2, warm=()):
    from trainables.sweep.methods import METHODS
    from trainables.sweep.searcher import make_searcher

    return make_searcher(METHODS["hier_lora"], 8, 4, "objective", "max", seed=3, max_concurrent=workers,
                         lockstep_total=total, warm_start=warm)


def _drive(finish_seed: int, lockstep: bool, total: int = 20, workers: int = 2) -> list[dict]:
    """A fake sweep as Tune runs one: ask whenever a slot is free (retrying a refused ask after
    the next result), and finish one of the running trials, picked at random with
    ``finish_seed`` (which trial a machine happens to finish first). The objective is a
    function of the config, as a deterministic trial's is."""
    import random

    from trainables.sweep.methods import METHODS
    from trainables.sweep.searcher import make_searcher

    rng = random.Random(finish_seed)
    lim = make_searcher(METHODS["hier_lora"], 8, 4, "objective", "max", seed=3, max_concurrent=workers,
                        lockstep_total=total if lockstep else None)
    configs, running, n = [], [], 0
    while len(configs) < total or running:
        while len(running) < workers and len(configs) < total:
            got = lim.suggest(f"t{n}")
            if got is None:
                break
            configs.append(got)
            running.append((f"t{n}", got))
            n += 1
        tid, cfg = rng.choice(running)
        running.remove((tid, cfg))
        lim.on_trial_complete(tid, {"objective": -abs(float(cfg["lr"]) - 3e-3) * 100, "locality": 1.0, "final": True})
    assert len(lim.searcher._ot_study.trials) == total  # every trial told by the end
    return configs


def test_lockstep_suggestions_do_not_depend_on_which_trial_finishes_first():
    runs = [_drive(seed, lockstep=True) for seed in (0, 1, 2, 3)]
    assert all(r == runs[0] for r in runs)
    assert len({c["lr"] for c in runs[0]}) == len(runs[0])  # real suggestions, not one repeated point


def test_plain_tpe_with_free_slots_does_depend_on_the_order():
    """The control for the test above: Ray's ConcurrencyLimiter tells each trial as it
    finishes, and TPE proposes other trials once the finishing order changes."""
    runs = [_drive(seed, lockstep=False) for seed in (0, 1, 2, 3)]
    assert any(r != runs[0] for r in runs[1:])


def test_lockstep_holds_a_suggestion_until_trial_k_minus_w_has_finished():
    lim = _searcher(total=6)
    assert lim.suggest("a") and lim.suggest("b")
    assert lim.suggest("c") is None  # a still running
    lim.on_trial_complete("b", {"objective": 0.1, "locality": 1.0, "final": True})
    assert lim.suggest("c") is None  # b finished, but c must wait for a (k - W = 0)
    lim.on_trial_complete("a", {"objective": 0.2, "locality": 1.0, "final": True})
    assert lim.suggest("c")
    study = lim.searcher._ot_study
    assert [t.state.name for t in study.trials[:2]] == ["COMPLETE", "RUNNING"]  # b is told only when d needs it


def test_lockstep_asha_compares_a_trial_only_with_trials_finished_before_it_started():
    from ray.tune.schedulers import TrialScheduler

    from trainables.sweep.scheduler import LockstepASHA, StallASHA

    C, S = TrialScheduler.CONTINUE, TrialScheduler.STOP

    def run(cls, reports, **kw):
        sched = cls(floor=None, time_attr="epoch", metric="progress", mode="max", max_t=4, grace_period=1,
                    reduction_factor=3, **kw)
        trials = {t: SimpleNamespace(trial_id=t) for t in "abcd"}
        for t in "abcd":
            sched.on_trial_add(None, trials[t])
        return [sched.on_trial_result(None, trials[t], {"epoch": 1, "progress": p}) for t, p in reports]

    # a, b, c, d suggested in that order, 2 at once: c may see a; d may see a and b
    early = [("a", 0.5), ("b", 0.9), ("c", 0.6), ("d", 0.8)]
    late = [("b", 0.9), ("a", 0.5), ("d", 0.8), ("c", 0.6)]  # the same results, other timing
    assert run(LockstepASHA, early, lag=2) == [C, C, C, C]
    assert dict(zip("badc", run(LockstepASHA, late, lag=2))) == dict(zip("abcd", [C, C, C, C]))
    # plain ASHA: c is stopped when it reports after b, and the same results in the other order
    # stop other trials (a and c): its decisions depend on timing
    plain_early, plain_late = run(StallASHA, early), run(StallASHA, late)
    assert plain_early[2] == S
    assert dict(zip("abcd", plain_early)) != dict(zip("badc", plain_late))
    # with lag 1 (one trial at a time) c sees a and b: 0.6 is below the cutoff of {0.5, 0.9}
    assert run(LockstepASHA, early, lag=1)[2] == S


def test_warm_start_trials_count_as_history_from_the_first_suggestion(tmp_path):
    import optuna

    from search_spaces.derived import space_distributions
    from trainables.sweep.methods import METHODS

    dists = space_distributions(METHODS["hier_lora"], 8, 4)
    assert {"lr", "layer_start", "layer_span", "max_grad_norm"} <= set(dists)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=1))
    warm = []
    for i in range(10):
        t = study.ask()
        METHODS["hier_lora"].space(t, n_layers=8, max_epochs=4)
        warm.append(optuna.trial.create_trial(params=t.params, distributions=t.distributions, value=i / 10))
    lim = _searcher(total=4, warm=warm)
    study2 = lim.searcher._ot_study
    assert len(study2.trials) == 10 and study2.best_value == pytest.approx(0.9)
    # TPE's 8 startup trials are the warm ones: the first suggestion is already modelled, and
    # differs from a cold start's random draw
    cold = _searcher(total=4).suggest("x")
    assert _searcher(total=4, warm=warm).suggest("x") != cold
    # another layer count samples layer_start on another range: those trials do not carry over
    assert space_distributions(METHODS["hier_lora"], 30, 4)["layer_start"] != dists["layer_start"]


def test_feasible_needs_both_locality_and_specificity_at_the_floor():
    from trainables.objective import LOCALITY_FLOOR, feasible, objective, rank

    ok = {"generalization": 0.8, "locality": 0.97, "specificity": 0.96}
    over = {"generalization": 0.9, "locality": 0.99, "specificity": 0.90}  # rewrote lookalikes
    assert feasible(ok) and not feasible(over)
    assert objective(over) == pytest.approx(0.9 - 4 * (LOCALITY_FLOOR - 0.90))
    assert objective({"generalization": 0.5, "locality": 1.0}) == 0.5  # no lookalikes measured: no penalty
    for m in (ok, over):
        m["objective"] = objective(m)
    picks = {max(order, key=lambda t: rank(t[1], t[0]))[0] for order in itertools.permutations([("a", ok), ("b", over)])}
    assert picks == {"a"}
    assert feasible({"test_locality": 0.96, "test_specificity": 0.99}, prefix="test_")


def test_start_from_fixes_the_first_suggestion_and_the_sampler_draws_the_rest():
    from search_spaces.derived import start_params
    from trainables.sweep.methods import METHODS

    hand = {"model": "smollm2", "hierarchical": True, "layer_start": 18, "layer_end": 30, "target": "mlp",
            "r": 8, "lr": 0.002, "epochs": 1, "kl_weight": 32.0, "anchors": 16, "alpha": 16,
            "max_grad_norm": None}
    params, left = start_params(hand, METHODS["hier_lora"], 30, 4)
    # derived values map back to what the space samples: the span, and clipping off
    assert params["layer_span"] == 12 and params["clip"] is False and "max_grad_norm" not in params
    assert params["alpha"] == 16.0 and isinstance(params["alpha"], float)
    assert "max_grad_norm" not in left and {"warmup_ratio", "dropout", "augment"} <= set(left)
    # layer_span is capped at half of 30 layers: 16 is outside this space, and the error says so
    with pytest.raises(ValueError, match="layer_span=16"):
        start_params({**hand, "layer_start": 14}, METHODS["hier_lora"], 30, 4)
    with pytest.raises(ValueError, match="lr=0.5"):
        start_params({**hand, "lr": 0.5}, METHODS["hier_lora"], 30, 4)

    from trainables.sweep.searcher import make_searcher

    def first_two(start):
        lim = make_searcher(METHODS["hier_lora"], 30, 4, "objective", "max", seed=3, max_concurrent=2,
                            lockstep_total=4, start=start)
        return lim.suggest("a"), lim.suggest("b")

    (a, b), (cold_a, _) = first_two([params]), first_two([])
    assert {k: a[k] for k in params} == params and a["layer_end"] == 30 and a["max_grad_norm"] is None
    assert a != cold_a and {k: b[k] for k in params} != params  # the second is the sampler's own
    assert first_two([params]) == (a, b)  # and the same seed draws the same ones


# --------------------------------------------------------------------------- each class alone
def _recorder():
    """A stand-in searcher for the limiters: suggests {"trial": its id} and records the
    completions it is told, in order."""
    from ray.tune.search import Searcher

    class Recorder(Searcher):
        def __init__(self):
            super().__init__(metric="objective", mode="max")
            self.told: list[tuple[str, bool]] = []

        def suggest(self, trial_id):
            return {"trial": trial_id}

        def on_trial_complete(self, trial_id, result=None, error=False):
            self.told.append((trial_id, error))

    return Recorder()


def _optuna_search(constrained: bool, metric="objective", mode="max"):
    import optuna

    from trainables.sweep.methods import METHODS
    from trainables.sweep.searcher import PrunedAwareOptunaSearch

    space = partial(METHODS["lora"].space, n_layers=4, max_epochs=2)
    return PrunedAwareOptunaSearch(space=space, metric=metric, mode=mode,
                                   sampler=optuna.samplers.RandomSampler(seed=0), constrained=constrained)


def test_pruned_aware_search_tells_a_stopped_trial_pruned_and_the_floor_as_a_constraint():
    from optuna.trial import TrialState

    from trainables.objective import LOCALITY_FLOOR

    search = _optuna_search(constrained=True)
    assert search.suggest("stopped") and search.suggest("done")
    search.on_trial_result("stopped", {"objective": 0.3, "training_iteration": 1})
    # ASHA stopped it after one epoch: not final, so its 0.3 is no outcome TPE may rank
    search.on_trial_complete("stopped", {"objective": 0.3, "locality": 0.9, "final": False, "training_iteration": 1})
    search.on_trial_complete("done", {"objective": 0.5, "locality": 0.99, "final": True, "training_iteration": 2})
    stopped, done = search._ot_study.trials
    assert stopped.state == TrialState.PRUNED and stopped.intermediate_values == {1: 0.3}
    assert done.state == TrialState.COMPLETE and done.value == 0.5
    assert stopped.constraints == {"locality": pytest.approx(LOCALITY_FLOOR - 0.9)}
    assert done.constraints == {"locality": pytest.approx(LOCALITY_FLOOR - 0.99)}
    # a Pareto search is not constrained
    pareto = _optuna_search(constrained=False, metric=["efficacy", "locality"], mode=["max", "max"])
    assert pareto.suggest("m")
    pareto.on_trial_complete("m", {"efficacy": 0.5, "locality": 0.5, "final": True})
    assert pareto._ot_study.trials[0].state == TrialState.COMPLETE and pareto._ot_study.trials[0].constraints == {}


def test_an_out_of_memory_beside_another_trial_teaches_tpe_nothing_and_alone_it_teaches_the_penalty():
    from optuna.trial import TrialState

    from trainables.trial import out_of_memory

    oom = RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    shared, alone = out_of_memory(oom, 1.0, shared=True), out_of_memory(oom, 1.0)
    assert shared["trial_status"] == alone["trial_status"] == "failed"
    assert "sharing its GPU" in shared["failure_reason"] and "sharing" not in alone["failure_reason"]
    search = _optuna_search(constrained=True)
    assert search.suggest("packed") and search.suggest("alone")
    search.on_trial_complete("packed", shared)
    search.on_trial_complete("alone", alone)
    packed, single = search._ot_study.trials
    assert packed.state == TrialState.FAIL
    assert single.state == TrialState.COMPLETE and single.value == alone["objective"] == -12.0


def test_pruned_aware_search_adopts_a_trial_it_never_suggested():
    from optuna.trial import TrialState

    search = _optuna_search(constrained=True)
    assert search.suggest("known")
    search.on_trial_result("stray", {"objective": 0.9, "training_iteration": 1})  # no KeyError
    search.on_trial_complete("stray", {"objective": 0.4, "locality": 0.97, "final": True,
                                       "config": {"lr": 1e-3, "r": 8, "not_searched": 1}})
    adopted = search._ot_study.trials[-1]
    assert adopted.state == TrialState.COMPLETE and adopted.value == 0.4
    assert adopted.params == {"lr": 1e-3, "r": 8}


def test_forwarding_limiter_forwards_a_completion_of_a_trial_it_no_longer_counts_live():
    from ray.tune.search import ConcurrencyLimiter

    from trainables.sweep.searcher import ForwardingLimiter

    def told(cls):
        inner = _recorder()
        lim = cls(inner, max_concurrent=1)
        assert lim.suggest("a") and lim.suggest("b") is None  # the limit holds
        lim.on_trial_complete("a", error=True)  # out of retries: no longer live
        assert lim.suggest("b")
        lim.on_trial_complete("a", result={"objective": 0.5, "final": True})  # finished by --resume
        return inner.told

    assert told(ForwardingLimiter) == [("a", True), ("a", False)]
    assert told(ConcurrencyLimiter) == [("a", True)]  # the control: Ray's limiter drops it


def test_lockstep_limiter_suggests_trial_k_only_once_trial_k_minus_w_is_told():
    from trainables.sweep.searcher import ForwardingLimiter, LockstepLimiter

    inner = _recorder()
    lim = LockstepLimiter(inner, max_concurrent=2, total=4)
    assert lim.suggest("a") and lim.suggest("b")
    lim.on_trial_complete("b", result={"objective": 0.1, "final": True})
    # b finished first, but c (k = 2) needs trial 0, a: b is held, not told, and holds its slot
    assert inner.told == [] and lim.suggest("c") is None
    free = ForwardingLimiter(_recorder(), max_concurrent=2)  # the control: a slot frees as b ends
    assert free.suggest("a") and free.suggest("b")
    free.on_trial_complete("b", result={"objective": 0.1, "final": True})
    assert free.suggest("c")
    lim.on_trial_complete("a", result={"objective": 0.2, "final": True})
    assert inner.told == [("a", False)]  # told at once: the next suggestion needs it
    assert lim.suggest("c") and inner.told == [("a", False)]
    assert lim.suggest("d") and inner.told == [("a", False), ("b", False)]  # d (k = 3) needed b
    # every trial suggested: each is told as soon as those before it are
    lim.on_trial_complete("d", result={"objective": 0.3, "final": True})
    assert [t for t, _ in inner.told] == ["a", "b"]
    lim.on_trial_complete("c", result={"objective": 0.4, "final": True})
    assert [t for t, _ in inner.told] == ["a", "b", "c", "d"]


# --------------------------------------------------------------------------- warm start's model check
def _finished_sweep(folder, context, trial_model: str | None):
    """An earlier sweep's folder: the searcher state Tune saves, one trial config, and the
    driver's trial_context.json holding ``context`` unless it is None."""
    import json

    from trainables.sweep.methods import METHODS
    from trainables.sweep.searcher import make_searcher

    folder.mkdir()
    search = make_searcher(METHODS["hier_lora"], 8, 4, "objective", "max", seed=0)
    for i in range(3):
        assert search.suggest(f"t{i}")
        search.on_trial_complete(f"t{i}", {"objective": i / 10, "locality": 1.0, "final": True})
    search.save_to_dir(str(folder))
    (folder / "trial_0000").mkdir()
    (folder / "trial_0000" / "params.json").write_text(json.dumps({"lr": 1e-3} | (
        {"model": trial_model} if trial_model else {})))
    if context is not None:
        (folder / "trial_context.json").write_text(json.dumps(context))
    return folder


def test_warm_start_reads_the_earlier_sweeps_model_from_its_trial_context(tmp_path):
    from trainables.sweep.checks import UsageError
    from trainables.sweep.methods import METHODS
    from trainables.sweep.searcher import warm_start_points

    def points(folder, model):
        return warm_start_points(folder, METHODS["hier_lora"], model, 8, 4, multi_objective=False)

    # trial configs no longer name the model: trial_context.json does
    new = _finished_sweep(tmp_path / "new", {"model": "testbed", "seed": 0}, trial_model=None)
    warm, skipped = points(new, "testbed")
    assert len(warm) == 3 and skipped == 0
    with pytest.raises(UsageError, match="ran on --model testbed, this one on smollm2"):
        points(new, "smollm2")
    # where both name one, trial_context.json decides
    both = _finished_sweep(tmp_path / "both", {"model": "smollm2"}, trial_model="testbed")
    assert len(points(both, "smollm2")[0]) == 3
    with pytest.raises(UsageError, match="ran on --model smollm2"):
        points(both, "testbed")
    # a sweep from before trial_context.json: its trial configs decide
    old = _finished_sweep(tmp_path / "old", None, trial_model="testbed")
    assert len(points(old, "testbed")[0]) == 3
    with pytest.raises(UsageError, match="ran on --model testbed"):
        points(old, "smollm2")
    broken = _finished_sweep(tmp_path / "broken", ["testbed"], trial_model="testbed")
    with pytest.raises(UsageError, match="trial_context.json is not a JSON object"):
        points(broken, "testbed")


# --------------------------------------------------------------------------- derived parameters
@pytest.mark.parametrize("name", ["lora", "hier_lora", "dpo", "grpo", "memit"])
def test_a_trial_config_maps_back_to_the_parameters_that_sampled_it(name):
    """search_spaces/derived.py both ways: a trial's config (its sampled parameters less the
    helpers, plus the derived constants) maps back to parameters that derive the same config."""
    import optuna

    from search_spaces.derived import SEARCH_ONLY, start_params
    from trainables.sweep.methods import METHODS

    space = METHODS[name].space
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen = set()
    for _ in range(40):
        trial = study.ask()
        fixed = space(trial, n_layers=12, max_epochs=3)
        config = {**{k: v for k, v in trial.params.items() if k not in SEARCH_ONLY}, **fixed}
        params, left = start_params(config, METHODS[name], 12, 3)
        again = space(optuna.trial.FixedTrial(params), n_layers=12, max_epochs=3)
        assert again == fixed
        # the same parameters, but for a span cut short by the model's last layer
        assert {k: v for k, v in params.items() if k != "layer_span"} == {
            k: v for k, v in trial.params.items() if k != "layer_span"}
        assert left == []  # a whole trial config leaves nothing to the sampler
        seen |= set(trial.params) & set(SEARCH_ONLY)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
    assert seen == {"lora": {"clip"}, "memit": {"layer_span"}}.get(name, set(SEARCH_ONLY))


@pytest.mark.parametrize("name", ["lora", "hier_lora", "dpo", "grpo", "rome", "memit", "prompt"])
def test_every_sampled_parameter_is_a_config_field_or_a_search_only_helper(name):
    from dataclasses import fields

    from search_spaces.derived import SEARCH_ONLY, space_distributions
    from trainables.sweep.methods import METHODS

    method = METHODS[name]
    names = {f.name for f in fields(method.config_cls)}
    assert set(space_distributions(method, 12, 3)) - names <= set(SEARCH_ONLY)
    assert not names & set(SEARCH_ONLY)  # a helper never reaches the method's config


def test_over_application_above_its_ceiling_costs_the_objective_and_feasibility(monkeypatch):
    from trainables.objective import LOCALITY_PENALTY, OVER_APPLICATION_CEILING, feasible, objective, rank

    monkeypatch.delenv("APIUPDATE_MAX_OVER_APPLICATION", raising=False)
    base = {"generalization": 0.6, "locality": 0.99, "specificity": 0.99}
    within = {**base, "over_application": OVER_APPLICATION_CEILING}
    over = {**base, "over_application": 0.15}
    assert objective(within) == 0.6 and feasible(within)
    assert objective(over) == pytest.approx(0.6 - LOCALITY_PENALTY * (0.15 - OVER_APPLICATION_CEILING))
    assert not feasible(over)
    assert feasible({**over, "max_over_application": 0.2})  # the ceiling a report was scored under
    monkeypatch.setenv("APIUPDATE_MAX_OVER_APPLICATION", "0.2")  # a sweep's --max-over-application
    assert objective(over) == 0.6 and feasible(over)
    assert not feasible({"test_locality": 1.0, "test_over_application": 0.3}, prefix="test_")
    # a feasible trial with less generalization is chosen over an infeasible one with more
    monkeypatch.delenv("APIUPDATE_MAX_OVER_APPLICATION")
    a, b = {**within, "objective": 0.6}, {**over, "generalization": 0.9, "objective": 0.8}
    assert max([("a", a), ("b", b)], key=lambda t: rank(t[1], t[0]))[0] == "a"
