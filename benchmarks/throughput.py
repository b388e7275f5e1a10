"""Training tokens per second inside a LoRA trial vs. a bare PyTorch + PEFT loop.

Both sides train the same model (the testbed by default) with the same LoRA config, batch size,
examples (so the same sequence lengths) and thread count, in this one process, alternating
``--rounds`` times so that machine noise hits both alike:

- **trial**: the LoRA fit step in the trial lifecycle, exactly as a sweep runs it (divergence
  guard, clipping, scheduler, checkpoint per epoch), reading the ``train_tokens_per_s`` it reports
  (time spent in its training steps; the per-epoch evaluation is not training and is left out);
- **bare**: the loop a researcher would write by hand: batches -> forward -> backward -> AdamW
  step, nothing else.

``throughput_ratio`` = median trial tokens/s / median bare tokens/s (target >= 0.90). Run from
the repo root:

    python benchmarks/throughput.py --json

With ``--json`` the last line is one JSON object.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402


def bare_tokens_per_s(cfg, epochs: int) -> float:
    """Plain PEFT loop over the same examples and batches as the trial (length-grouped, the
    same seed: what transformers' ``group_by_length`` gives a hand-written loop too)."""
    import torch

    from trainables.common import length_grouped_batches
    from trainables.adapters import attach_lora, training_examples
    from trainables.tensors import pad_batch
    from trainables.models import load_model

    torch.manual_seed(cfg.seed)
    model, tok = load_model(cfg.model)
    model = attach_lora(model, cfg)
    model.train()
    examples = training_examples(tok, cfg.dataset)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    rng = random.Random(cfg.seed)
    tokens, seconds = 0, 0.0
    for _ in range(epochs):
        batches = length_grouped_batches([len(ids) for ids, _ in examples], cfg.batch_size, rng)
        t0 = time.perf_counter()
        for batch in batches:
            ids, mask, labels = pad_batch([examples[j] for j in batch], tok.pad_token_id)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            tokens += int(mask.sum())
        seconds += time.perf_counter() - t0
    return tokens / seconds


def trial_tokens_per_s(cfg) -> float:
    from trainables.common import local_reporter
    from trainables.sweep.methods import run_one

    history: list[dict] = []
    out = run_one(cfg, local_reporter(history))
    if out.get("trial_status") != "completed":
        raise SystemExit(f"the trial did not complete: {out.get('trial_status')}")
    return float(out["train_tokens_per_s"])


def main(argv: list[str] | None = None) -> int:
    from trainables.helpformat import HelpFormatter
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--model", default="testbed")
    p.add_argument("--epochs", type=int, default=2, help="epochs per measurement")
    p.add_argument("--rounds", type=int, default=3, help="alternating trial / bare measurements")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print one JSON line last")
    args = p.parse_args(argv)

    from trainables.common import set_threads
    from trainables.lora.loop import LoraTrainConfig

    set_threads(args.threads)
    # The headline sweep's best region: hierarchical LoRA on the upper half, all projections.
    cfg = LoraTrainConfig(model=args.model, hierarchical=True, layer_start=4, layer_end=8, target="all", r=8,
                          lr=3e-3, batch_size=args.batch_size, epochs=args.epochs, threads=args.threads)
    trial, bare = [], []
    for r in range(args.rounds):
        bare.append(bare_tokens_per_s(cfg, args.epochs))
        trial.append(trial_tokens_per_s(cfg))
        print(f"round {r + 1}/{args.rounds}: trial {trial[-1]:,.0f} tokens/s, bare {bare[-1]:,.0f} tokens/s",
              flush=True)
    out = {"throughput_ratio": round(statistics.median(trial) / statistics.median(bare), 3),
           "trial_tokens_per_s": round(statistics.median(trial)), "bare_tokens_per_s": round(statistics.median(bare)),
           "rounds": args.rounds, "epochs": args.epochs, "batch_size": args.batch_size, "threads": args.threads,
           "model": args.model}
    print(f"throughput_ratio {out['throughput_ratio']} (trial / bare, target >= 0.90)")
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
