#!/usr/bin/env python
"""One comparison: the best trial of every method that has run, from MLflow.

    python sweeps/compare.py --model smollm2      # table on stdout + compare.md / compare.png / compare.json
    python sweeps/compare.py --json               # the rows as one JSON line
    python sweeps/compare.py --history results.md # every sweep in the store, per model and method
    python sweeps/compare.py --write docs/results.md --mlruns mlruns --mlruns DIR   # regenerate the document

Best = among the completed trials (tag trial_status = completed; pruned, diverged and failed
trials are left out) of all sweeps of the method in the store, the first by
``trainables.objective.rank``: locality and specificity at the floor, then the objective, then
fewer trainable parameters (the sweep summary and export_best.py choose the same way), all read on
the validation split; the chosen trial's test split figures (``test_*``) stand beside them. Files
go to <mlruns>/artifacts/compare/ (or --out).

``--write FILE`` regenerates a results document from one or more stores (``--mlruns`` repeats,
because benchmark runs write to stores of their own): for every model in every store, the
best-per-method table and the sweep history, each inside a block
``<!-- generated: COMMAND -->`` ... ``<!-- end generated -->`` headed by the COMMAND that prints
that table. Blocks are rewritten in place and everything outside them is kept byte for byte,
so prose about the tables survives a regeneration; a block for a model new to the file is
appended under a heading, and a new file gets a short header.
"""
import argparse
import json
import math
import os
import pathlib
import re
import shlex
import sys

sys.path[0] = str(pathlib.Path(__file__).resolve().parent.parent)  # the project root, not sweeps/

ROOT = pathlib.Path(__file__).resolve().parent.parent
COLUMNS = ("efficacy", "generalization", "generalization_lax", "locality", "specificity", "over_application",
           "locality_exact", "specificity_exact", "api_correct",
           "objective", "trainable_params", "standard_lora_params", "trial_seconds", "test_generalization", "test_locality",
           "test_specificity", "test_over_application")
INT_COLUMNS = ("trainable_params", "standard_lora_params")


def build_parser() -> argparse.ArgumentParser:
    from trainables.helpformat import HelpFormatter
    p = argparse.ArgumentParser(prog="sweeps/compare.py", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--mlruns", action="append", metavar="DIR",
                   help="MLflow home: mlflow.db + artifacts/ (default mlruns/); repeat with --write for several")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///<mlruns>/mlflow.db)")
    p.add_argument("--methods", nargs="+",
                   help="only these methods (default: every method in trainables/sweep/methods.py)")
    p.add_argument("--sweep", help="only trials of sweeps whose name starts with this")
    p.add_argument("--model", help="only trials of this --model (testbed, smollm2, a path or hub id as given)")
    p.add_argument("--history", metavar="FILE",
                   help="also write FILE: the best trial of every sweep in the store, per model and method "
                        "('-': print it instead of the comparison)")
    p.add_argument("--write", metavar="FILE",
                   help="regenerate the results document FILE from the store(s): every model's best-per-method "
                        "table and sweep history in generated blocks; text outside them is kept")
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


HISTORY_HEAD = ("| method | sweep | completed | efficacy | generalization | locality | specificity | over-app. | "
                "test gen. | test loc. | test spec. | params | vs LoRA | trial s |")


def history_tables(client, methods, sweep_prefix=None, model=None) -> dict[str, str]:
    """Per model, one Markdown table: for every method and sweep, the sweep's best completed trial
    (trainables.objective.rank) and how many trials completed (the sweeps' own record)."""
    from trainables.objective import rank

    by: dict[str, list[str]] = {}
    for name in methods:
        sweeps: dict[tuple[str, str], list] = {}
        for r in completed_runs(client, name, sweep_prefix, model):
            sweeps.setdefault((r.data.params.get("model", "?"), r.data.tags.get("sweep", "?")), []).append(r)
        for (m, sweep), runs in sorted(sweeps.items()):
            best = max(runs, key=lambda r: rank(r.data.metrics, r.data.tags.get("trial_id"))).data.metrics
            cells = [_fmt(best.get(k)) for k in ("efficacy", "generalization", "locality", "specificity",
                                                  "over_application", "test_generalization", "test_locality", "test_specificity")]
            by.setdefault(m, []).append(
                f"| {name} | {sweep} | {len(runs)} | " + " | ".join(cells) + f" | {int(best.get('trainable_params', 0)):,} | "
                f"{vs_lora(best.get('trainable_params'), best.get('standard_lora_params'))} | "
                f"{best.get('trial_seconds', 0):.0f} |")
    head = HISTORY_HEAD + "\n|" + "---|" * HISTORY_HEAD.count(" | ") + "---|"
    return {m: "\n".join([head, *lines]) + "\n" for m, lines in sorted(by.items())}


def history(client, methods, sweep_prefix=None, model=None) -> str:
    """Markdown: per model, the best trial of each sweep of each method."""
    out = ["# Results: every sweep in the store", "",
           "Made by `python sweeps/compare.py --history FILE` from MLflow; one row per sweep: its best",
           "completed trial (trainables.objective.rank) and how many trials completed.", ""]
    for m, table in history_tables(client, methods, sweep_prefix, model).items():
        out += [f"## --model {m}", "", table]
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
    head = ["method", "efficacy", "generalization", "locality", "specificity", "over-app.", "loc. / spec. exact",
            "test gen.",
            "test loc.", "test spec.", "trainable params", "vs LoRA", "trial s", "objective"] + (["sweep / trial"] if ids else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    f = _fmt
    for r in rows:
        lines.append("| " + " | ".join([
            r["method"], f(r["efficacy"]), f(r["generalization"]), f(r["locality"]), f(r["specificity"]),
            f(r.get("over_application")), f"{f(r.get('locality_exact'))} / {f(r.get('specificity_exact'))}",
            f(r["test_generalization"]), f(r["test_locality"]), f(r["test_specificity"]),
            f(r["trainable_params"], "{:,}"), vs_lora(r["trainable_params"], r.get("standard_lora_params")),
            f(r["trial_seconds"], "{:.0f}"), f(r["objective"])]
            + ([f"{r['sweep']} / {r['trial_id']}"] if ids else [])) + " |")
    return "\n".join(lines) + "\n"


BLOCK = re.compile(r"^<!-- generated: (.+?) -->\n(.*?)^<!-- end generated -->$", re.MULTILINE | re.DOTALL)
DOC_HEAD = """# Results

Tables between `<!-- generated: COMMAND -->` and `<!-- end generated -->` are written from MLflow
by `python sweeps/compare.py --write FILE --mlruns DIR` (repeat `--mlruns` for several stores), which
rewrites them in place and keeps every other line of this file as written; the COMMAND shown
above each table prints that table.
"""


def store_args(mlruns: str | None, tracking_uri: str | None) -> list[str]:
    """The flags naming a store in a printed command: a path inside the project relative to it
    (commands run from the project root), others absolute."""
    if tracking_uri:
        return ["--tracking-uri", tracking_uri]
    home = pathlib.Path(mlruns).expanduser().resolve()
    return ["--mlruns", os.path.relpath(home, ROOT) if home.is_relative_to(ROOT) else str(home)]


def generated_blocks(client, store: list[str], methods, all_methods: bool, sweep_prefix=None,
                     model=None) -> list[tuple[str, str, str]]:
    """(heading, command, content) for every model with a completed trial in the store (or just
    ``model``): its best-per-method table and its sweep history, each content headed by the
    command that prints it."""
    filters = ([] if all_methods else ["--methods", *methods]) + (["--sweep", sweep_prefix] if sweep_prefix else [])
    out = []
    for found, hist in history_tables(client, methods, sweep_prefix, model).items():
        base = ["python", "sweeps/compare.py", *store, "--model", found, *filters]
        best = markdown(best_rows(client, methods, sweep_prefix, found), ids=False)
        for argv, table in ((base + ["--no-ids"], best), (base + ["--history", "-"], hist)):
            cmd = shlex.join(argv)
            out.append((f"`--model {found}`, store `{store[1]}`", cmd, f"    {cmd}\n\n{table}"))
    return out


def write_document(path: pathlib.Path, blocks: list[tuple[str, str, str]]) -> tuple[int, int]:
    """Rewrite the generated blocks of ``path`` whose command is in ``blocks``, append the others
    under their heading, and keep all other text byte for byte. Returns (rewritten, added)."""
    text = path.read_text() if path.exists() else DOC_HEAD
    fresh = {cmd: content for _, cmd, content in blocks}
    seen = set()

    def fill(m):
        if m.group(1) not in fresh:
            return m.group(0)  # a block of another store or filter: not this run's to rewrite
        seen.add(m.group(1))
        return f"<!-- generated: {m.group(1)} -->\n{fresh[m.group(1)]}<!-- end generated -->"

    text = BLOCK.sub(fill, text)
    added, headed = 0, set()
    for heading, cmd, content in blocks:
        if cmd in seen:
            continue
        if heading not in headed:
            text = text.rstrip("\n") + f"\n\n## {heading}\n"
            headed.add(heading)
        text += f"\n<!-- generated: {cmd} -->\n{content}<!-- end generated -->\n"
        added += 1
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)  # a reader never sees half a document
    return len(seen), added


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
    stores = args.mlruns or [str(ROOT / "mlruns")]
    if len(stores) > 1 and (not args.write or args.tracking_uri):
        print("error: --mlruns: several stores only with --write and without --tracking-uri", file=sys.stderr)
        return 2
    for s in stores if args.tracking_uri is None else []:
        db = pathlib.Path(s).expanduser().resolve() / "mlflow.db"
        if not db.is_file():
            print(f"error: no MLflow store at {db}: run a sweep first, or pass --mlruns / --tracking-uri",
                  file=sys.stderr)
            return 2
    from mlflow.tracking import MlflowClient

    def client_of(s):
        return MlflowClient(args.tracking_uri or f"sqlite:///{pathlib.Path(s).expanduser().resolve() / 'mlflow.db'}")

    if args.write:
        blocks = [b for s in stores for b in generated_blocks(client_of(s), store_args(s, args.tracking_uri), methods,
                                                               args.methods is None, args.sweep, args.model)]
        if not blocks:
            print(f"error: no completed trial of {', '.join(methods)} in {', '.join(stores)}", file=sys.stderr)
            return 1
        path = pathlib.Path(args.write).expanduser()
        rewritten, added = write_document(path, blocks)
        print(f"written: {path} ({rewritten} tables rewritten, {added} added)")
        return 0
    home = pathlib.Path(stores[0]).expanduser().resolve()
    client = client_of(stores[0])
    if args.history == "-":
        print(history(client, methods, args.sweep, args.model), end="")
        return 0
    if args.history:
        pathlib.Path(args.history).expanduser().write_text(history(client, methods, args.sweep, args.model))
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
