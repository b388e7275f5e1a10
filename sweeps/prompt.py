#!/usr/bin/env python
"""Rules + prompt baseline sweep: prompt strategy (basic, context, rules, chain of thought,
InsertPrompt, ReplaceAPI), the updates the comments describe, and the temperature; nothing is
trained.

    python sweeps/prompt.py --num-samples 8
    python sweeps/prompt.py --resume --name NAME
    python sweeps/prompt.py --config best.yaml
"""
import pathlib
import sys

sys.path[0] = str(pathlib.Path(__file__).resolve().parent.parent)  # the project root, not sweeps/

from trainables.sweep.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("prompt"))
