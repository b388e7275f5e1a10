#!/usr/bin/env python
"""Score a model (and optionally a LoRA adapter) with the shared evaluation.

    python sweeps/evaluate.py --model testbed --json
    python sweeps/evaluate.py --model smollm2 --by-library
    python sweeps/evaluate.py --model testbed --adapter PATH
    python sweeps/evaluate.py --model smollm2 --general-eval humaneval --general-eval-limit 20

Prints the validation split's figures (what the sweeps select on) and the test split's as
test_* (data/test_contexts.jsonl and the other halves of the locality and over-application
sets: no sweep reads them). ``--general-eval humaneval`` adds HumanEval's pass@1 and the
canonical solutions' log-likelihood (trainables/evaluation/general.py), with an adapter also
the log-likelihood's change from the base model.
"""
import argparse
import json
import pathlib
import sys

sys.path[0] = str(pathlib.Path(__file__).resolve().parent.parent)  # the project root, not sweeps/

ORDER = ["efficacy", "efficacy_lax", "generalization", "generalization_lax", "soft_generalization", "old_api_rate",
         "n_triggered", "deprecated_use_rate", "replacement_hit_rate", "locality", "locality_exact", "locality_accuracy",
         "specificity", "specificity_exact", "specificity_accuracy", "over_application", "api_correct", "syntax_ok",
         "exact_match", "edit_similarity", "objective", "n_migrations", "n_libraries", "n_locality", "n_specificity"]
GENERAL_ORDER = ["humaneval_pass_at_1", "humaneval_canonical_logprob", "humaneval_canonical_logprob_delta",
                 "humaneval_problems", "humaneval_seconds"]


def main(argv=None) -> int:
    from trainables.helpformat import HelpFormatter
    p = argparse.ArgumentParser(prog="sweeps/evaluate.py", description=__doc__.splitlines()[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--model", default="testbed",
                   help="'testbed', 'smollm2', 'gemma3', a .gguf file, a local model folder or a hub id")
    p.add_argument("--adapter", help="a PEFT adapter folder to apply on top of --model")
    p.add_argument("--dataset", "--migrations", dest="dataset", metavar="FILE",
                   help="migrations JSONL to score on, in data/README.md's format, e.g. mine_triggers.py's output "
                        "(the sweeps' --dataset; default: data/'s validation and test splits)")
    p.add_argument("--locality", help="locality JSONL (default: data/'s validation and test splits)")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object on the last line")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--by-library", action="store_true",
                   help="also print, per library, how often the probe completions use the old API, the new one "
                        "or neither, and how often the model prefers the new line teacher-forced")
    p.add_argument("--general-eval", choices=["humaneval"],
                   help="also score general coding ability, what an update may make the model forget: HumanEval's "
                        "pass@1 (one greedy completion per problem, run against its tests in the sandbox) and the "
                        "mean per-token log-likelihood of its canonical solutions, teacher-forced (with --adapter "
                        "also its change from the base model, whose figure is cached). Costs one decode of up to "
                        "300 tokens per problem on top of the usual evaluation: ~16 min for all 164 problems "
                        "(~6 s a problem) for SmolLM2-135M on one CPU thread of a busy 2-core machine")
    p.add_argument("--general-eval-limit", type=int, metavar="N",
                   help="score only the first N HumanEval problems (cost scales with N; for a quick look)")
    args = p.parse_args(argv)
    if args.general_eval_limit is not None and not args.general_eval:
        print("error: --general-eval-limit needs --general-eval humaneval", file=sys.stderr)
        return 2
    if args.general_eval_limit is not None and args.general_eval_limit < 1:
        print(f"error: --general-eval-limit must be >= 1, got {args.general_eval_limit}", file=sys.stderr)
        return 2
    if args.general_eval:
        from trainables import sandbox

        try:  # before any model is loaded: a machine that cannot contain the programs says so at once
            refusal = sandbox.containment().refusal
        except (sandbox.SandboxUnavailable, ValueError) as e:
            refusal = str(e)
        if refusal:
            print(f"error: --general-eval runs the model's programs in the sandbox: {refusal}", file=sys.stderr)
            return 2

    from trainables import data
    from trainables.models import check_model_name

    try:
        check_model_name(args.model)
        if args.adapter and not pathlib.Path(args.adapter, "adapter_config.json").is_file():
            raise ValueError(f"--adapter {args.adapter!r}: no adapter_config.json there")
        migrations = data.load_migrations(args.dataset)
        locality = data.load_locality(args.locality)
    except (ValueError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import time

    from trainables.common import set_threads
    from trainables.evaluation import (
        EvalData, EvalSet, base_argmax, base_locality, base_triggers, default_eval_data,
    )
    from trainables.models import load_model

    set_threads(args.threads)
    t0 = time.time()
    # scoring the base model itself: its own completions are the locality / specificity reference
    with_base = bool(args.adapter)
    if args.dataset or args.locality:  # the files given, as one set, no over-application lookalikes
        base = tuple(base_locality(args.model, locality)) if with_base else None
        tops = tuple(base_argmax(args.model, locality, base)) if with_base else None
        triggered = frozenset(map(tuple, base_triggers(args.model, migrations)))
        sets = EvalData(EvalSet(tuple(migrations), tuple(locality), base, base_locality_argmax=tops,
                                triggered=triggered), None)
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
    general = {}
    if args.general_eval:
        from trainables.evaluation.general import base_canonical_logprob, humaneval

        t1 = time.time()
        base = base_canonical_logprob(args.model, limit=args.general_eval_limit) if args.adapter else None
        general = humaneval(model, tokenizer, limit=args.general_eval_limit, base=base)
        general["humaneval_seconds"] = round(time.time() - t1, 1)
        metrics.update(general)
    metrics["seconds"] = round(time.time() - t0, 1)
    if args.by_library:
        from trainables.evaluation import by_library

        rows = by_library(model, tokenizer, migrations, preds)
        print(f"{'library':<14}{'probes':>7}{'old':>7}{'new':>7}{'neither':>9}{'prefers new':>13}")
        for lib, r in rows.items():
            print(f"{lib:<14}{r['probes']:>7}{r['old']:>7.2f}{r['new']:>7.2f}{r['neither']:>9.2f}{r['prefers_new']:>13.2f}")
    keys = [k for k in ORDER if k in metrics] + sorted(test) + [k for k in GENERAL_ORDER if k in general] + ["seconds"]
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
