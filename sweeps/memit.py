#!/usr/bin/env python
"""MEMIT sweep: all migrations edited into a range of MLP layers (easyeditor backend).

    python sweeps/memit.py --num-samples 12
    python sweeps/memit.py --resume --name NAME
    python sweeps/memit.py --config best.yaml
"""
import pathlib
import sys

sys.path[0] = str(pathlib.Path(__file__).resolve().parent.parent)  # the project root, not sweeps/

from trainables.sweep.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("memit"))
