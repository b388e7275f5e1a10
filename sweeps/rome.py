#!/usr/bin/env python
"""ROME sweep: rank-one edits of one MLP layer, one per migration (easyeditor backend).

    python sweeps/rome.py --num-samples 16
    python sweeps/rome.py --resume --name NAME
    python sweeps/rome.py --config best.yaml
"""
import pathlib
import sys

sys.path[0] = str(pathlib.Path(__file__).resolve().parent.parent)  # the project root, not sweeps/

from trainables.sweep.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("rome"))
