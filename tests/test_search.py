"""The search's reproducibility and selection rules, without Ray running: the lockstep limiter and
scheduler, warm starts, and the floor on locality and specificity."""
from __future__ import annotations

import itertools
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
    # plain ASHA: c is stopped when it reports after b, and not when it reports before d
    plain_early, plain_late = run(StallASHA, early), run(StallASHA, late)
    assert plain_early[2] == S
    # with lag 1 (one trial at a time) c sees a and b: 0.6 is below the cutoff of {0.5, 0.9}
    assert run(LockstepASHA, early, lag=1)[2] == S


def test_warm_start_trials_count_as_history_from_the_first_suggestion(tmp_path):
    import optuna

    from trainables.sweep.methods import METHODS
    from trainables.sweep.searcher import space_distributions

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
    from trainables.sweep.methods import METHODS
    from trainables.sweep.searcher import start_params

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
