"""One hierarchical-LoRA trial on an accelerator: training tokens/s, model FLOP utilisation and
peak memory, as one JSON line (``benchmarks/gpu_check.sh`` runs it on SmolLM2 and the testbed).

    python benchmarks/gpu_trial.py --model smollm2 --dtype bf16 --json

Model FLOP utilisation = 6 x parameters x training tokens/s / the device's peak (``--peak-tflops``,
default 989: an H100 / H200's dense bf16 tensor-core rate). 6N per token is the usual training
cost of a dense model (forward 2N, backward 4N); a LoRA trial whose lower layers are frozen does
less than that, so the figure is comparable with other reports rather than exact. The tokens
counted are the trial's own (``train_tokens_per_s``: its training steps only, not evaluation).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    from trainables.helpformat import HelpFormatter
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp16", "fp32"))
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="the device's dense peak in this dtype")
    p.add_argument("--cpu", action="store_true", help="run on the CPU (a dry run of this script)")
    p.add_argument("--json", action="store_true", help="print one JSON line last")
    args = p.parse_args(argv)

    import torch

    from trainables.common import local_reporter
    from trainables.lora.loop import LoraTrainConfig
    from trainables.sweep.methods import run_one
    from trainables.models import load_model, num_layers, resolve_dtype

    use_gpu = torch.cuda.is_available() and not args.cpu
    if not use_gpu and not args.cpu:
        print("error: no CUDA device (pass --cpu for a dry run)", file=sys.stderr)
        return 2
    model, _ = load_model(args.model)
    n_params, n_layers = sum(p.numel() for p in model.parameters()), num_layers(model)
    del model
    # the upper half of the layers, MLP and attention: the region the testbed's sweeps favour
    cfg = LoraTrainConfig(model=args.model, hierarchical=True, layer_start=n_layers // 2, layer_end=n_layers,
                          target="all", r=8, lr=3e-3, batch_size=args.batch_size, epochs=args.epochs,
                          kl_weight=0.3, use_gpu=use_gpu, dtype=args.dtype)
    if use_gpu:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    out = run_one(cfg, local_reporter([]))
    seconds = time.time() - t0
    tokens_per_s = float(out.get("train_tokens_per_s", 0.0))
    row = {"model": args.model, "dtype": resolve_dtype(args.dtype, "cuda" if use_gpu else "cpu"),
           "parameters": n_params, "layers": f"{cfg.layer_start}-{n_layers - 1}", "trial_status": out["trial_status"],
           "train_tokens_per_s": round(tokens_per_s, 1),
           "mfu": round(6 * n_params * tokens_per_s / (args.peak_tflops * 1e12), 4),
           "peak_memory_mb": round(torch.cuda.max_memory_allocated() / 2**20) if use_gpu else None,
           "trial_seconds": round(seconds, 1), "efficacy": out.get("efficacy"),
           "generalization": out.get("generalization"), "locality": out.get("locality")}
    print(json.dumps(row) if args.json else row)
    return 0 if out["trial_status"] == "completed" else 1


if __name__ == "__main__":
    sys.exit(main())
