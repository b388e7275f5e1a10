#!/usr/bin/env python
"""GRPO sweep (TRL) on LoRA / hierarchical-LoRA adapters.

    python sweeps/grpo.py --num-samples 40
    python sweeps/grpo.py --resume --name NAME
    python sweeps/grpo.py --config best.yaml
"""
import pathlib
import sys

sys.path[0] = str(pathlib.Path(__file__).resolve().parent.parent)  # the project root, not sweeps/

from trainables.sweep.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("grpo"))
