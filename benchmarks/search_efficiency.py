"""Search efficiency: TPE + ASHA vs. random search on the hierarchical-LoRA space.

For each seed, two searches over ``search_spaces.hier_lora.space`` (the sweep's own
define-by-run space) train real trials through the trial lifecycle (``run_one``):

- **random**: Optuna's RandomSampler, no early stopping, ``--budget`` trials (40);
- **tpe+asha**: the engine's sampler (TPE, 8 start-up trials, same seed) with asynchronous
  successive halving (Optuna's SuccessiveHalvingPruner with the engine's ASHA settings: grace 1
  epoch, reduction factor 3) deciding on the per-epoch `progress` (the objective plus the
  continuous soft-generalization tie-breaker, as in the engine), until its best objective
  reaches the best that random search found in all of its trials (or ``--budget`` trials).

Printed per seed and as the mean over seeds: ``trials_to_match`` (TPE + ASHA trials until it
matched) and ``compute_share`` (epochs TPE + ASHA trained until then / epochs random search
trained in all its trials; the target is <= 15 trials-worth, i.e. <= 15/40 = 0.375). A seed
where TPE + ASHA never matches counts as the whole budget (``matched`` false).

Runs in a Ray-free loop (the engine's orchestration cost is ``overhead.py``'s business) and,
by default, in the tests' small world (4-layer testbed, 4 fixture migrations: ~1-2 s a trial)
so that 3 seeds x 2 searches fit in 10 minutes on 2 cores; ``--world full`` uses the real
testbed and data/ (about 15 s a trial). Seeds run two at a time, one per core (TPE + ASHA
needs its seed's random-search result first). Run from the repo root:

    python benchmarks/search_efficiency.py --json
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402

MAX_EPOCHS = 4  # the engine's default --max-epochs (ASHA's max_t)


def _small_world() -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import FIXTURES, SMALL_TESTBED

    os.environ["APIUPDATE_DATA_DIR"] = str(FIXTURES)
    os.environ["APIUPDATE_TESTBED"] = json.dumps(SMALL_TESTBED)


def search(kind: str, seed: int, budget: int, target: float | None, world: str) -> dict:
    """One search; returns the objective and epochs of each trial in order."""
    if world == "small":
        _small_world()
    import optuna

    from search_spaces.hier_lora import space
    from trainables.common import Reporter, config_from_dict, set_threads
    from trainables.lora.loop import LoraTrainConfig
    from trainables.sweep.methods import run_one
    from trainables.models import load_model, num_layers

    set_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    n_layers = num_layers(load_model("testbed")[0])
    if kind == "random":
        study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=seed))
    else:
        study = optuna.create_study(direction="maximize",
                                    sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=8),
                                    pruner=optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3))
    objectives, epochs = [], []

    def objective(trial) -> float:
        fixed = space(trial, n_layers, MAX_EPOCHS)
        config = {**trial.params, **fixed, "seed": seed, "threads": 1}
        cfg = config_from_dict(LoraTrainConfig, config)
        seen: list[dict] = []

        def report(metrics: dict, ckpt) -> None:
            seen.append(metrics)
            if kind != "random" and not metrics.get("final"):
                trial.report(metrics.get("progress", metrics["objective"]), len(seen))  # as the engine's ASHA
                if trial.should_prune():
                    raise optuna.TrialPruned

        try:
            out = run_one(cfg, Reporter(report, lambda: None))
            value = float(out["objective"])
        except optuna.TrialPruned:
            epochs.append(len(seen))
            objectives.append(None)  # a pruned trial never counts as the best
            raise
        epochs.append(len(seen) if seen else 0)
        objectives.append(value)
        return value

    def stop_when_matched(study, trial) -> None:
        best = max((o for o in objectives if o is not None), default=None)
        if target is not None and best is not None and best >= target:
            study.stop()

    study.optimize(objective, n_trials=budget, callbacks=[stop_when_matched])
    return {"objectives": objectives, "epochs": epochs}


def run_seed(seed: int, budget: int, world: str) -> dict:
    random_run = search("random", seed, budget, None, world)
    best_random = max(o for o in random_run["objectives"] if o is not None)
    tpe_run = search("tpe", seed, budget, best_random, world)
    best_tpe = max((o for o in tpe_run["objectives"] if o is not None), default=float("-inf"))
    matched = best_tpe >= best_random
    n = len(tpe_run["objectives"])
    return {"seed": seed, "best_random": best_random, "best_tpe_asha": best_tpe, "matched": matched,
            "trials_to_match": n if matched else budget,
            "compute_share": (sum(tpe_run["epochs"]) if matched else sum(random_run["epochs"]))
            / max(1, sum(random_run["epochs"])),
            "random_epochs": sum(random_run["epochs"]), "tpe_asha_epochs": sum(tpe_run["epochs"])}


def main(argv: list[str] | None = None) -> int:
    from trainables.helpformat import HelpFormatter
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--budget", type=int, default=40, help="random search trials (and TPE + ASHA's cap)")
    p.add_argument("--world", choices=["small", "full"], default="small",
                   help="small: the tests' 4-layer testbed and 4 migrations; full: the real testbed and data/")
    p.add_argument("--json", action="store_true", help="print one JSON line last")
    args = p.parse_args(argv)
    if args.world == "small":
        _small_world()
        from trainables.testbed import ensure_testbed

        ensure_testbed()  # build once here, not in both workers
    with ProcessPoolExecutor(max_workers=2) as pool:
        rows = list(pool.map(run_seed, range(args.seeds), [args.budget] * args.seeds, [args.world] * args.seeds))
    for r in rows:
        print(f"seed {r['seed']}: random best {r['best_random']:.3f} in {args.budget} trials "
              f"({r['random_epochs']} epochs); TPE+ASHA {'matched' if r['matched'] else 'did NOT match'} "
              f"after {r['trials_to_match']} trials, {r['tpe_asha_epochs']} epochs "
              f"(compute share {r['compute_share']:.2f})", flush=True)
    out = {"trials_to_match": round(statistics.mean(r["trials_to_match"] for r in rows), 1),
           "compute_share": round(statistics.mean(r["compute_share"] for r in rows), 3),
           "trials_worth": round(statistics.mean(r["compute_share"] for r in rows) * args.budget, 1),
           "matched": sum(r["matched"] for r in rows), "seeds": args.seeds, "budget": args.budget,
           "world": args.world, "per_seed": rows}
    # A seed where no random trial beat the untrained model's objective (0: nothing learnt,
    # nothing forgotten) is matched by any first trial that does not forget: it says nothing
    # about the search. Its share stays in the figure above (the definition); this one leaves
    # such seeds out.
    informative = [r for r in rows if r["best_random"] > 0]
    out["informative_seeds"] = len(informative)
    out["compute_share_informative"] = (round(statistics.mean(r["compute_share"] for r in informative), 3)
                                        if informative else None)
    print(f"trials_to_match {out['trials_to_match']}, compute_share {out['compute_share']} "
          f"(= {out['trials_worth']} trials-worth of random search's compute; target <= 15)")
    if len(informative) < len(rows):
        print(f"  {len(rows) - len(informative)} seed(s) where random search never beat the untrained model "
              f"(objective 0); over the other {len(informative)}: compute_share "
              f"{out['compute_share_informative']}")
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
