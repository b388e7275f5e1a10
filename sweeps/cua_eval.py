#!/usr/bin/env python
"""Score solutions on CodeUpdateArena (arXiv 2407.06249): pass_new, pass_old, UPass, UPass@k.

    python sweeps/cua_eval.py --oracle ../shared/data/codeupdatearena_dev/dev_sample.jsonl --json
    python sweeps/cua_eval.py --model testbed ../shared/data/codeupdatearena_dev/dev_sample.jsonl --k 5

Every candidate runs in the sandbox (trainables/sandbox.py) twice: with the record's synthetic
update patched in and without it. UPass = passes with the update and fails without.
"""
import argparse
import json
import pathlib
import sys
import time

sys.path[0] = str(pathlib.Path(__file__).resolve().parent.parent)  # the project root, not sweeps/


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def build_parser() -> argparse.ArgumentParser:
    from trainables.helpformat import HelpFormatter
    p = argparse.ArgumentParser(
        prog="sweeps/cua_eval.py", description=__doc__.split("\n\n")[0],
        formatter_class=HelpFormatter)
    p.add_argument("file", help="CodeUpdateArena JSONL (one record per line: update, problem, unit_tests, ...)")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--oracle", action="store_true", help="score each record's ref_solution (harness check)")
    who.add_argument("--model", help="generate candidates with this model: 'testbed', a hub id or a local path")
    p.add_argument("--adapter", help="a PEFT adapter folder to load on top of --model")
    p.add_argument("--k", type=_positive_int, default=1, help="report pass@k and UPass@k")
    p.add_argument("--samples", type=_positive_int, help="samples per problem, n >= k (default: k)")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="sampling temperature (0 = greedy, only with one sample); the paper samples at 0.8")
    p.add_argument("--max-new-tokens", type=_positive_int, default=256, help="tokens per candidate")
    p.add_argument("--limit", type=_positive_int, help="only the first N records")
    p.add_argument("--threads", type=_positive_int, default=2, help="sandboxed runs at once")
    p.add_argument("--timeout", type=float, default=60.0, help="wall-clock seconds per sandboxed run")
    p.add_argument("--allow-weak-sandbox", action="store_true",
                   help="run the candidates even where the sandbox cannot bound their number of processes "
                        "(python -m trainables.sandbox --check says what this machine has)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write every candidate's scores (and source) to this JSON file")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    n = args.samples or args.k
    if n < args.k:
        print(f"error: --samples {n} is below --k {args.k}: pass@k needs n >= k", file=sys.stderr)
        return 2
    if args.model and args.temperature <= 0 and n > 1:
        print("error: greedy decoding (--temperature 0) gives one candidate: use --samples 1 --k 1 "
              "or a temperature > 0", file=sys.stderr)
        return 2
    if args.oracle and (n > 1 or args.adapter):
        print("error: --oracle scores the one reference solution per record: drop --k/--samples/--adapter",
              file=sys.stderr)
        return 2
    from trainables import sandbox

    try:  # before any model is loaded: a machine that cannot contain candidates says so at once
        refusal = sandbox.containment().refusal
    except (sandbox.SandboxUnavailable, ValueError) as e:
        refusal = str(e)
    if refusal and not args.allow_weak_sandbox:
        print(f"error: {refusal}", file=sys.stderr)
        return 2
    sandbox.allow_weak_containment(args.allow_weak_sandbox)  # every candidate's run, all threads
    from trainables.cua import load_cua, score_all, scores_as_dicts, summarize
    from trainables.data import DataError

    try:
        records = load_cua(args.file)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    records = records[: args.limit] if args.limit else records
    t0 = time.time()
    if args.oracle:
        solutions = [[r.ref_solution] for r in records]
    else:
        from trainables.common import set_threads
        from trainables.cua import sample_solutions
        from trainables.models import check_model_name, load_model

        try:
            check_model_name(args.model)
            model, tokenizer = load_model(args.model)
        except (ValueError, OSError) as e:
            print(f"error: --model {args.model!r}: {str(e).splitlines()[0]}", file=sys.stderr)
            return 2
        if args.adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, args.adapter)
        set_threads(args.threads)
        solutions = sample_solutions(model, tokenizer, records, n, temperature=args.temperature,
                                     max_new_tokens=args.max_new_tokens, seed=args.seed)
    t_gen = time.time() - t0
    scores = score_all(records, solutions, threads=args.threads, timeout=args.timeout)
    summary = summarize(scores, args.k if (args.model or args.k > 1) else None)
    summary.update(who="oracle" if args.oracle else args.model, generate_seconds=round(t_gen, 1),
                   seconds=round(time.time() - t0, 1))
    if args.out:
        rows = scores_as_dicts(scores)
        for row, sol in zip(rows, (s for sols in solutions for s in sols)):
            row["solution"] = sol
        pathlib.Path(args.out).write_text(json.dumps({"summary": summary, "candidates": rows}, indent=1))
    if args.json:
        print(json.dumps(summary))
        return 0
    for r, row in zip(records, scores):
        s = row[0]
        flag = "UPASS" if s.upass else "fail "
        why = "" if s.upass else f"  ({'new: ' + (s.error_new or 'ok') if not s.pass_new else 'passes without the update'})"
        print(f"{flag} {r.prog_syn_id}{why}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
