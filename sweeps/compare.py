#!/usr/bin/env python
"""One comparison: the best trial of every method that has run, from MLflow.

    python sweeps/compare.py --model smollm2      # table on stdout + compare.md / compare.png / compare.json
    python sweeps/compare.py --json               # the rows as one JSON line
    python sweeps/compare.py --history results.md # every sweep in the store, per model and method

Best = among the completed trials (tag trial_status = completed; pruned, diverged and failed
trials are left out) of all sweeps of the method in the store, the first by
``trainables.objective.rank``: locality and specificity at the floor, then the objective, then
fewer trainable parameters (the sweep summary and export_best.py choose the same way), all read on
the validation split; the chosen trial's test split figures (``test_*``) stand beside them. Files
go to <mlruns>/artifacts/compare/ (or --out).
"""
import argparse
import json
import math
import pathlib
import sys

sys.path[0] = str(pathlib.Path(__file__).resolve().parent.parent)  # the project root, not sweeps/

ROOT = pathlib.Path(__file__).resolve().parent.parent
COLUMNS = ("efficacy", "generalization", "locality", "specificity", "locality_exact", "specificity_exact", "api_correct",
           "objective", "trainable_params", "standard_lora_params", "trial_seconds", "test_generalization", "test_locality",
           "test_specificity")
INT_COLUMNS = ("trainable_params", "standard_lora_params")


def build_parser() -> argparse.ArgumentParser:
    from trainables.helpformat import HelpFormatter
    p = argparse.ArgumentParser(prog="sweeps/compare.py", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--mlruns", default=str(ROOT / "mlruns"), help="MLflow home: mlflow.db + artifacts/")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///<mlruns>/mlflow.db)")
    p.add_argument("--methods", nargs="+", help="only these methods (default: every method in sweeps/methods.py)")
    p.add_argument("--sweep", help="only trials of sweeps whose name starts with this")
    p.add_argument("--model", help="only trials of this --model (testbed, smollm2, a path or hub id as given)")
    p.add_argument("--history", metavar="FILE",
                   help="also write FILE: the best trial of every sweep in the store, per model and method")
    p.add_argument("--out", help="folder for compare.md / compare.png / compare.json "
                                 "(default <mlruns>/artifacts/compare)")
    p.add_argument("--json", action="store_true", help="print the rows as one JSON line")
    p.add_argument("--no-ids", action="store_true", help="leave out the sweep / trial column (for documents)")
    return p


def completed_runs(client, name: str, sweep_prefix=None, model=None) -> list:
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return []
    runs = client.search_runs([exp.experiment_id], "tags.kind = 'trial' and tags.trial_status = 'completed'",
                              order_by=["metrics.objective DESC"], max_results=5000)
    return [r for r in runs if "objective" in r.data.metrics and math.isfinite(r.data.metrics["objective"])
            and (not sweep_prefix or r.data.tags.get("sweep", "").startswith(sweep_prefix))
            and (model is None or r.data.params.get("model") == model)]


def best_rows(client, methods, sweep_prefix=None, model=None) -> list[dict]:
    from trainables.objective import rank

    rows = []
    for name in methods:
        runs = completed_runs(client, name, sweep_prefix, model)
        if not runs:
            continue
        # the store's order_by is not trusted with NaN; ties are settled as the sweep summary does
        best = max(runs, key=lambda r: rank(r.data.metrics, r.data.tags.get("trial_id")))
        m = best.data.metrics
        row = {"method": name, "sweep": best.data.tags.get("sweep", ""), "trial_id": best.data.tags.get("trial_id", ""),
               "run_id": best.info.run_id, "trials": len(runs)}
        for c in COLUMNS:
            v = m.get(c)
            row[c] = None if v is None else (int(v) if c in INT_COLUMNS else round(v, 4))
        row["config"] = {k: v for k, v in sorted(best.data.params.items())
                         if k not in ("model", "threads", "workers", "use_gpu", "seed", "dataset")}
        row["dataset"] = best.data.params.get("dataset", "data/")
        row["model"] = best.data.params.get("model", "")
        rows.append(row)
    return rows


def history(client, methods) -> str:
    """Markdown: per model, per method, the best trial of each sweep (the sweeps' own record)."""
    from trainables.objective import rank

    by: dict[tuple[str, str], dict[str, list]] = {}
    for name in methods:
        for r in completed_runs(client, name):
            key = (r.data.params.get("model", "?"), name)
            by.setdefault(key, {}).setdefault(r.data.tags.get("sweep", "?"), []).append(r)
    out = ["# Results: every sweep in the store", "",
           "Made by `python sweeps/compare.py --history FILE` from MLflow; one row per sweep: its best",
           "completed trial (trainables.objective.rank) and how many trials completed.", ""]
    for model in sorted({m for m, _ in by}):
        out += [f"## --model {model}", ""]
        for (m, method), sweeps in sorted(by.items()):
            if m != model:
                continue
            out += [f"### {method}", "", "| sweep | completed | efficacy | generalization | locality | specificity | "
                    "test gen. | test loc. | test spec. | params | vs LoRA | trial s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
            for sweep, runs in sorted(sweeps.items()):
                best = max(runs, key=lambda r: rank(r.data.metrics, r.data.tags.get("trial_id"))).data.metrics
                cells = [_fmt(best.get(k)) for k in ("efficacy", "generalization", "locality", "specificity",
                                                      "test_generalization", "test_locality", "test_specificity")]
                out.append(f"| {sweep} | {len(runs)} | " + " | ".join(cells) + f" | {int(best.get('trainable_params', 0)):,} | "
                           f"{vs_lora(best.get('trainable_params'), best.get('standard_lora_params'))} | "
                           f"{best.get('trial_seconds', 0):.0f} |")
            out.append("")
    return "\n".join(out)


def _fmt(v, fmt="{:.3f}") -> str:
    return "-" if v is None else fmt.format(v)


def vs_lora(trainable, standard) -> str:
    """Trainable parameters as a share of standard LoRA's at the same rank and projections
    (``standard_lora_params``: methods that train adapters on a layer range); "-" elsewhere."""
    return "-" if not trainable or not standard else f"{trainable / standard:.2f}"


def markdown(rows: list[dict], ids: bool = True) -> str:
    """The rows as a Markdown table; ``ids``: with the column naming each row's sweep and trial
    (for finding it in MLflow; a document meant to outlive the store leaves it out)."""
    head = ["method", "efficacy", "generalization", "locality", "specificity", "loc. / spec. exact", "test gen.",
            "test loc.", "test spec.", "trainable params", "vs LoRA", "trial s", "objective"] + (["sweep / trial"] if ids else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    f = _fmt
    for r in rows:
        lines.append("| " + " | ".join([
            r["method"], f(r["efficacy"]), f(r["generalization"]), f(r["locality"]), f(r["specificity"]),
            f"{f(r.get('locality_exact'))} / {f(r.get('specificity_exact'))}",
            f(r["test_generalization"]), f(r["test_locality"]), f(r["test_specificity"]),
            f(r["trainable_params"], "{:,}"), vs_lora(r["trainable_params"], r.get("standard_lora_params")),
            f(r["trial_seconds"], "{:.0f}"), f(r["objective"])]
            + ([f"{r['sweep']} / {r['trial_id']}"] if ids else [])) + " |")
    return "\n".join(lines) + "\n"


def chart(rows: list[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ("efficacy", "generalization", "locality", "api_correct")
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(rows) + 2), 4))
    width = 0.8 / len(metrics)
    for i, m in enumerate(metrics):
        xs = [j + (i - (len(metrics) - 1) / 2) * width for j in range(len(rows))]
        ax.bar(xs, [r[m] or 0 for r in rows], width, label=m)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([f"{r['method']}\n{r['trainable_params'] or 0:,} params" for r in rows])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score (best trial by objective)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=len(metrics), frameon=False)
    ax.set_title("Best trial per method")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from trainables.sweep.methods import METHODS

    methods = args.methods or list(METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        print(f"error: --methods: unknown method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}",
              file=sys.stderr)
        return 2
    home = pathlib.Path(args.mlruns).expanduser().resolve()
    if args.tracking_uri is None and not (home / "mlflow.db").is_file():
        print(f"error: no MLflow store at {home / 'mlflow.db'}: run a sweep first, or pass --mlruns / --tracking-uri",
              file=sys.stderr)
        return 2
    from mlflow.tracking import MlflowClient

    client = MlflowClient(args.tracking_uri or f"sqlite:///{home / 'mlflow.db'}")
    if args.history:
        pathlib.Path(args.history).expanduser().write_text(history(client, methods))
        print(f"written: {args.history}")
    rows = best_rows(client, methods, args.sweep, args.model)
    if not rows:
        print(f"error: no completed trial of {', '.join(methods)} in the store", file=sys.stderr)
        return 1
    out = pathlib.Path(args.out).expanduser() if args.out else home / "artifacts" / "compare"
    out.mkdir(parents=True, exist_ok=True)
    md = markdown(rows)
    (out / "compare.md").write_text("# Best trial per method\n\n" + md)
    (out / "compare.json").write_text(json.dumps(rows, indent=1))
    chart(rows, out / "compare.png")
    if args.json:
        print(json.dumps(rows))
    else:
        print(markdown(rows, ids=not args.no_ids), end="")
        print(f"written: {out / 'compare.md'}, {out / 'compare.png'}, {out / 'compare.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
