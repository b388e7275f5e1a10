#!/usr/bin/env python
"""Standard LoRA sweep: adapters on every layer.

    python sweeps/lora.py --num-samples 40
    python sweeps/lora.py --resume --name NAME
    python sweeps/lora.py --config best.yaml
"""
import pathlib
import sys

sys.path[0] = str(pathlib.Path(__file__).resolve().parent.parent)  # the project root, not sweeps/

from trainables.sweep.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("lora"))
