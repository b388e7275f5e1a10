#!/usr/bin/env python
"""Score a model (and optionally a LoRA adapter) with the shared evaluation.

    python sweeps/evaluate.py --model testbed --json
    python sweeps/evaluate.py --model smollm2 --by-library
    python sweeps/evaluate.py --model testbed --adapter PATH

Prints the validation split's figures (what the sweeps select on) and the test split's as
test_* (data/test_contexts.jsonl and the other halves of the locality and over-application
sets: no sweep reads them).
"""
import argparse
import json
import pathlib
import sys

sys.path[0] = str(pathlib.Path(__file__).resolve().parent.parent)  # the project root, not sweeps/

ORDER = ["efficacy", "generalization", "soft_generalization", "old_api_rate", "locality", "locality_exact",
         "locality_accuracy", "specificity", "specificity_exact", "specificity_accuracy", "over_application", "api_correct", "syntax_ok", "exact_match",
         "edit_similarity", "objective", "n_migrations", "n_libraries", "n_locality", "n_specificity"]


def main(argv=None) -> int:
    from trainables.helpformat import HelpFormatter
    p = argparse.ArgumentParser(prog="sweeps/evaluate.py", description=__doc__.splitlines()[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--model", default="testbed",
                   help="'testbed', 'smollm2', 'gemma3', a .gguf file, a local model folder or a hub id")
    p.add_argument("--adapter", help="a PEFT adapter folder to apply on top of --model")
    p.add_argument("--migrations", help="migrations JSONL (default: data/'s validation and test splits)")
    p.add_argument("--locality", help="locality JSONL (default: data/'s validation and test splits)")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object on the last line")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--by-library", action="store_true",
                   help="also print, per library, how often the probe completions use the old API, the new one "
                        "or neither, and how often the model prefers the new line teacher-forced")
    args = p.parse_args(argv)

    from trainables import data
    from trainables.models import check_model_name

    try:
        check_model_name(args.model)
        if args.adapter and not pathlib.Path(args.adapter, "adapter_config.json").is_file():
            raise ValueError(f"--adapter {args.adapter!r}: no adapter_config.json there")
        migrations = data.load_migrations(args.migrations)
        locality = data.load_locality(args.locality)
    except (ValueError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import time

    from trainables.common import set_threads
    from trainables.evaluation import EvalData, EvalSet, base_argmax, base_locality, default_eval_data
    from trainables.models import load_model

    set_threads(args.threads)
    t0 = time.time()
    # scoring the base model itself: its own completions are the locality / specificity reference
    with_base = bool(args.adapter)
    if args.migrations or args.locality:  # the files given, as one set, no over-application lookalikes
        base = tuple(base_locality(args.model, locality)) if with_base else None
        tops = tuple(base_argmax(args.model, locality, base)) if with_base else None
        sets = EvalData(EvalSet(tuple(migrations), tuple(locality), base, base_locality_argmax=tops), None)
    else:
        sets = default_eval_data(args.model, with_base=with_base)
    model, tokenizer = load_model(args.model)
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter)
    metrics, preds = sets.validation.evaluate(model, tokenizer)
    test = sets.test_metrics(model, tokenizer)
    metrics.update(test)
    migrations = list(sets.validation.migrations)
    metrics["seconds"] = round(time.time() - t0, 1)
    if args.by_library:
        from trainables.evaluation import by_library

        rows = by_library(model, tokenizer, migrations, preds)
        print(f"{'library':<14}{'probes':>7}{'old':>7}{'new':>7}{'neither':>9}{'prefers new':>13}")
        for lib, r in rows.items():
            print(f"{lib:<14}{r['probes']:>7}{r['old']:>7.2f}{r['new']:>7.2f}{r['neither']:>9.2f}{r['prefers_new']:>13.2f}")
    keys = [k for k in ORDER if k in metrics] + sorted(test) + ["seconds"]
    if args.json:
        print(json.dumps({k: metrics[k] for k in keys}))
    else:
        if test:
            print("validation split (what a sweep selects on), then test_*: the held-out split")
        for k in keys:
            v = metrics[k]
            print(f"{k:>24}  {v:.3f}" if isinstance(v, float) else f"{k:>24}  {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
