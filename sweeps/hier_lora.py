#!/usr/bin/env python
"""Hierarchical LoRA sweep: adapters on a searched range of layers only.

    python sweeps/hier_lora.py --num-samples 40
    python sweeps/hier_lora.py --resume --name NAME
    python sweeps/hier_lora.py --config best.yaml
"""
import pathlib
import sys

sys.path[0] = str(pathlib.Path(__file__).resolve().parent.parent)  # the project root, not sweeps/

from trainables.sweep.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("hier_lora"))
