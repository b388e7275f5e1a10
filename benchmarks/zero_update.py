#!/usr/bin/env python
"""Locality and specificity of an unchanged model against its references, in one precision.

    python benchmarks/zero_update.py --model smollm2 --dtype bf16

An adapter at initialisation (LoRA's B = 0) changes no weight, so every figure that compares a
trial with the base model's references must be exactly 1.0; anything below is rounding that
the references and the trials do not share. Prints one JSON line (the references are made and
cached first, as a sweep's driver makes them).
"""
import argparse
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="testbed")
    p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    import torch

    from trainables.adapters import attach_lora
    from trainables.evaluation import default_eval_data
    from trainables.lora.loop import LoraTrainConfig
    from trainables.models import load_model

    torch.set_num_threads(args.threads)
    data = default_eval_data(args.model, "cpu", args.dtype)
    t0 = time.time()
    model, tok = load_model(args.model, device="cpu", dtype=args.dtype)
    n = model.config.num_hidden_layers
    model = attach_lora(model, LoraTrainConfig(hierarchical=True, layer_start=n // 2, layer_end=n, target="mlp"))
    m, _ = data.validation.evaluate(model, tok)
    keys = ("locality", "specificity", "locality_exact", "specificity_exact")
    print(json.dumps({"model": args.model, "dtype": args.dtype, **{k: m.get(k) for k in keys},
                      "seconds": round(time.time() - t0, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
