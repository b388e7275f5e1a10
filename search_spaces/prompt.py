"""Rules + prompt baseline search space: strategy, rules per prompt, and the decoding
temperature. Nothing is trained, so every trial is one evaluation. The comments hold what a
deployment knows (``knowledge: library``); the oracle is a protocol, not a hyperparameter, and
runs through ``--config`` (trainables/prompt.py).

``max_rules`` only matters where rules are listed (strategy ``rules`` or ``cot``), so it is
sampled only there (define-by-run).
Temperatures are a small fixed grid: 0 is how every trained method is scored (greedy); 0.2 and
0.8 bracket the usual code-sampling settings (Codex / CodeUpdateArena sample at 0.2 for pass@1
and 0.8 for pass@k).
"""
from __future__ import annotations

from trainables.prompt import STRATEGIES


def space(trial, n_layers: int, max_epochs: int = 4) -> dict:
    strategy = trial.suggest_categorical("strategy", list(STRATEGIES))
    if strategy in ("rules", "cot"):
        trial.suggest_int("max_rules", 1, 5)
    trial.suggest_categorical("temperature", [0.0, 0.2, 0.8])
    return {}
