#!/usr/bin/env python
"""Mine contexts where a model itself writes each migration's deprecated API.

    python sweeps/mine_triggers.py --model testbed
    python sweeps/mine_triggers.py --model smollm2 --samples-per-prompt 8 --temperature 0.8
    python sweeps/mine_triggers.py --model smollm2 --only pandas-iteritems --only numpy-product
    python sweeps/hier_lora.py --dataset FILE            # train on the mined train contexts
    python sweeps/evaluate.py --model smollm2 --dataset FILE --json      # score on them

Per migration: intent prompts (the library's imports and a comment saying what the code does,
never a probe or test context), sampled continuations (exact temperature sampling through the
shared decoder), and a context wherever a sampled line uses the deprecated API and migrates
mechanically (trainables/mining.py). Writes a migrations JSONL (data/README.md) with the mined
contexts split into train and held-out probe contexts; migrations with fewer than 5 are left out.
"""
import argparse
import pathlib
import sys
import time

sys.path[0] = str(pathlib.Path(__file__).resolve().parent.parent)  # the project root, not sweeps/


def parse_args(argv):
    from trainables.helpformat import HelpFormatter

    class Formatter(argparse.RawDescriptionHelpFormatter, HelpFormatter):
        """The shared layout, with the examples' lines kept as written."""

    p = argparse.ArgumentParser(prog="sweeps/mine_triggers.py", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=Formatter)
    p.add_argument("--model", required=True,
                   help="'testbed', 'smollm2', 'gemma3', a .gguf file, a local model folder or a hub id")
    p.add_argument("--out", help="output JSONL (default: <cache>/mined/triggers-<model>.jsonl; data/ is curated)")
    p.add_argument("--dataset", "--migrations", dest="dataset", metavar="FILE",
                   help="source migrations JSONL (default: the data dir's migrations.jsonl)")
    p.add_argument("--only", action="append", default=[], metavar="ID",
                   help="mine only this migration id (repeatable, or comma-separated)")
    p.add_argument("--samples-per-prompt", type=int, default=8, help="samples drawn from each intent prompt")
    p.add_argument("--variants", type=int, default=6, help="intent prompts per migration (at most)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (> 0)")
    p.add_argument("--max-new-tokens", type=int, default=80, help="tokens sampled per continuation")
    p.add_argument("--max-per-migration", type=int, default=8,
                   help="contexts kept per migration (distinct lines first); at least 5 are needed")
    p.add_argument("--seed", type=int, default=0, help="sampling and split seed (default: %(default)s)")
    # one thread: with another process on the cores, two made the testbed's sampling ~30x slower here
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    args = p.parse_args(argv)
    args.only = [x.strip() for item in args.only for x in item.split(",") if x.strip()]
    return args


def check_args(args, migrations):
    from trainables.mining import MIN_CONTEXTS

    if args.samples_per_prompt < 1 or args.variants < 1:
        raise ValueError("--samples-per-prompt and --variants must be at least 1")
    if not 0 < args.temperature <= 2:
        raise ValueError(f"--temperature must be in (0, 2], got {args.temperature}")
    if not 8 <= args.max_new_tokens <= 256:
        raise ValueError(f"--max-new-tokens must be in [8, 256], got {args.max_new_tokens}")
    if args.max_per_migration < MIN_CONTEXTS:
        raise ValueError(f"--max-per-migration must be at least {MIN_CONTEXTS} (3 train + 2 probe contexts)")
    known = {m.id for m in migrations}
    unknown = [x for x in args.only if x not in known]
    if unknown:
        raise ValueError(f"--only: unknown migration id(s): {', '.join(unknown)}")


def main(argv=None) -> int:
    args = parse_args(argv)
    from trainables import data, mining
    from trainables.models import check_model_name
    from trainables.testbed import cache_root

    t0 = time.time()
    try:
        check_model_name(args.model)
        source = data.load_migrations(args.dataset)
        check_args(args, source)
        curated = data.load_migrations() if data.migrations_path().is_file() else []
        tests = mining.read_test_records(data.testset_path())
    except (ValueError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    chosen_ids = set(args.only) or {m.id for m in source}
    migrations = [m for m in source if m.id in chosen_ids]
    forbidden = mining.evaluation_lines([*source, *curated], tests)
    facts = pathlib.Path(args.dataset).with_name("edit_facts.json") if args.dataset else None
    tasks = {**mining.read_tasks(data.data_dir() / "edit_facts.json"), **(mining.read_tasks(facts) if facts else {})}
    default_out = cache_root() / "mined" / f"triggers-{mining.model_slug(args.model)}.jsonl"
    out = pathlib.Path(args.out) if args.out else default_out

    import torch

    from trainables.common import set_threads
    from trainables.evaluation.decoding import generate
    from trainables.models import load_model
    from trainables.prompt import gumbel_sampler
    from trainables.token_rules import encode

    set_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        model, tokenizer = load_model(args.model, device=device)
    except (OSError, ValueError) as e:
        print(f"error: --model {args.model!r}: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print(f"mining {len(migrations)} migration(s) with {args.model} on {device}: {args.variants} intent prompts x "
          f"{args.samples_per_prompt} samples, T={args.temperature}, {args.max_new_tokens} new tokens, "
          f"seed {args.seed}", flush=True)

    records, skipped, left_out, drawn, sample_s = [], 0, 0, 0, 0.0
    seen_prompts: set[str] = set()
    for m in migrations:
        why = mining.support(m)
        intents = [] if why else mining.intent_prompts(m, tasks.get(m.id), forbidden, args.variants)
        if why or not intents:
            print(f"{m.id}: skipped, {why or 'no intent prompt free of evaluation lines'}", flush=True)
            skipped += 1
            continue
        prompts = [p for p in intents for _ in range(args.samples_per_prompt)]
        sampler = gumbel_sampler(model, args.temperature, mining.migration_seed(args.seed, m.id))
        ts = time.time()
        texts = generate(sampler, tokenizer, prompts, max_new_tokens=args.max_new_tokens, stop=mining.STOP)
        sample_s += time.time() - ts
        tally, kept = mining.Tally(drawn=len(texts)), []
        for prompt, text in zip(prompts, texts):
            # a text as long as the token limit may end mid-statement: its last line is not used
            complete = len(encode(tokenizer, text)) < args.max_new_tokens - 3
            found = mining.context_from_sample(prompt, text, m, complete, forbidden)
            tally.used += found.used
            if found.context is None:
                if found.used:
                    tally.dropped[found.reason] += 1
                continue
            if found.context.prompt in seen_prompts:
                tally.dropped["prompt taken by another migration"] += 1
                continue
            tally.kept += 1
            kept.append(found.context)
        chosen = mining.select(kept, args.max_per_migration)
        drawn += tally.drawn
        print(tally.line(m.id, len(chosen)) + ("" if len(chosen) >= mining.MIN_CONTEXTS
                                               else f"; left out (< {mining.MIN_CONTEXTS})"), flush=True)
        if len(chosen) < mining.MIN_CONTEXTS:
            left_out += 1
            continue
        seen_prompts.update(c.prompt for c in chosen)
        train, probe = mining.split_contexts(chosen, args.seed, m.id)
        provenance = {"model": args.model, "seed": args.seed, "temperature": args.temperature,
                      "samples": tally.drawn, "max_new_tokens": args.max_new_tokens, "kept": tally.kept}
        records.append(mining.record(m, train, probe, provenance))

    seconds = time.time() - t0
    n_contexts = sum(len(r["train_contexts"]) + len(r["probe_contexts"]) for r in records)
    per_sample = sample_s / drawn if drawn else 0.0
    print(f"mined {n_contexts} contexts for {len(records)} of {len(migrations)} migrations ({left_out} left out "
          f"with fewer than {mining.MIN_CONTEXTS}, {skipped} skipped) from {drawn} samples in {seconds:.0f}s "
          f"(sampling {per_sample:.3f} s/sample)", flush=True)
    if not records:
        print(f"error: no migration has {mining.MIN_CONTEXTS} mined contexts; nothing written", file=sys.stderr)
        return 1
    try:
        mining.write_jsonl(out, records, check=data.load_migrations)
    except data.DataError as e:
        print(f"error: the mined file does not load, nothing written: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: cannot write {out}: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
