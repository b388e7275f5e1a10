"""End of a sweep: pick the best trial, write plots and the best config to the parent run, print."""
from __future__ import annotations

from pathlib import Path

from trainables.common import trial_status
from trainables.objective import rank
from trainables.sweep.methods import Method

# The editing papers' metrics come first where a method reports them (ROME / MEMIT): their code
# efficacy is ~0 by design (a fact edit does not rewrite code lines), and a summary led by it
# would hide what the sweep optimised.
SHOW = ["objective", "edit_efficacy", "edit_generalization", "edit_neighborhood", "efficacy", "generalization",
        "generalization_lax", "locality", "specificity", "over_application", "deprecated_use_rate",
        "replacement_hit_rate", "locality_exact", "specificity_exact", "old_api_rate", "locality_accuracy",
        "trainable_params", "standard_lora_params", "trial_seconds"]
# The chosen trial's figures on the test split (trainables.evaluation.EvalData): reported beside
# the validation figures above, never read by the search or the choice.
TEST_SHOW = ["test_generalization", "test_generalization_lax", "test_old_api_rate", "test_locality", "test_specificity",
             "test_locality_exact", "test_over_application", "test_deprecated_use_rate", "test_replacement_hit_rate",
             "test_objective"]


def _row(r) -> dict:
    m = r.metrics or {}
    return {"trial_id": m.get("trial_id"), "status": trial_status(m, r.error is not None),
            "config": {k: v for k, v in (r.config or {}).items() if not k.startswith("_")},
            **{k: m.get(k) for k in SHOW + TEST_SHOW}}


def pareto(rows: list[dict], keys=("efficacy", "locality")) -> list[dict]:
    def dominated(a, b):  # b dominates a
        return all(b[k] >= a[k] for k in keys) and any(b[k] > a[k] for k in keys)

    done = [r for r in rows if r["status"] == "completed"]
    return [a for a in done if not any(dominated(a, b) for b in done if b is not a)]


def summarise(method: Method, results, metric, multi_objective: bool) -> dict:
    rows = [_row(r) for r in results]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    completed = [r for r in rows if r["status"] == "completed" and r["objective"] is not None]
    best = max(completed, key=lambda r: rank(r, r["trial_id"]), default=None)
    return {"rows": rows, "counts": counts, "best": best,
            "pareto": pareto(rows) if multi_objective else []}


def plots(experiment_dir: Path, out: Path) -> list[Path]:
    """Optuna history / importances / parallel coordinates from the searcher's saved study."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as ovm
    from ray.tune.search.optuna import OptunaSearch

    searcher = OptunaSearch()
    try:
        searcher.restore_from_dir(str(experiment_dir))
        study = searcher._ot_study
    except Exception as e:  # noqa: BLE001 - plots are a bonus, never fail the sweep for them
        print(f"no Optuna plots: {e}")
        return []
    paths = []
    for name, fn in (("optuna_history", ovm.plot_optimization_history),
                     ("optuna_importances", ovm.plot_param_importances),
                     ("optuna_parallel_coordinates", ovm.plot_parallel_coordinate)):
        try:
            if study._is_multi_objective():
                ax = fn(study, target=lambda t: t.values[0], target_name="efficacy")
            else:
                ax = fn(study)
            fig = (ax[0] if hasattr(ax, "__len__") else ax).figure
            fig.set_size_inches(10, 6)
            fig.tight_layout()
            p = out / f"{name}.png"
            fig.savefig(p, dpi=90)
            plt.close(fig)
            paths.append(p)
        except Exception as e:  # noqa: BLE001
            print(f"plot {name} skipped: {type(e).__name__}: {e}")
    return paths


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def print_summary(method: Method, name: str, summary: dict, seconds: float) -> None:
    counts = ", ".join(f"{v} {k}" for k, v in sorted(summary["counts"].items()))
    print(f"\n== sweep {name} finished in {seconds:.0f}s: {counts}")
    best = summary["best"]
    if summary["pareto"]:
        print("Pareto front (efficacy, locality):")
        for r in sorted(summary["pareto"], key=lambda r: -r["efficacy"]):
            print(f"  {r['trial_id']}: efficacy {_fmt(r['efficacy'])} locality {_fmt(r['locality'])} "
                  f"generalization {_fmt(r['generalization'])}")
    if not best:
        print("no trial completed")
        return
    print(f"best trial {best['trial_id']} (validation): "
          + "  ".join(f"{k} {_fmt(best[k])}" for k in SHOW if best.get(k) is not None))
    test = [k for k in TEST_SHOW if best.get(k) is not None]
    if test:
        print("  its test split: " + "  ".join(f"{k[5:]} {_fmt(best[k])}" for k in test))
    print("best config:")
    for k, v in best["config"].items():
        print(f"  {k}: {v}")
    print(f"export it:  python sweeps/export_best.py {method.name} --name {name} --out best.yaml")
