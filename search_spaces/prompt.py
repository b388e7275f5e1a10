"""Rules + prompt baseline search space: strategy (the project's comment headers and the
literature's zero-training baselines, InsertPrompt and ReplaceAPI), rules per prompt, and the
decoding temperature. Nothing is trained, so every trial is one evaluation. The comments hold what a
deployment knows (``knowledge: library``); the oracle is a protocol, not a hyperparameter, and
runs through ``--config`` (trainables/prompt.py).

``max_rules`` only matters where rules are listed (strategy ``rules``, ``cot`` or ``insert``), so
it is sampled only there (define-by-run); ``replace`` watches every rule of the imported
libraries, since a rewrite costs no prompt positions.
Temperatures are a small fixed grid: 0 is how every trained method is scored (greedy); 0.2 and
0.8 bracket the usual code-sampling settings (Codex / CodeUpdateArena sample at 0.2 for pass@1
and 0.8 for pass@k).
"""
from __future__ import annotations

from trainables.prompt import STRATEGIES


def space(trial, n_layers: int, max_epochs: int = 4) -> dict:
    strategy = trial.suggest_categorical("strategy", list(STRATEGIES))
    if strategy in ("rules", "cot", "insert"):
        trial.suggest_int("max_rules", 1, 5)
    trial.suggest_categorical("temperature", [0.0, 0.2, 0.8])
    return {}
