"""Standard LoRA search space (adapters on every layer).

The ranges cover the seed's failure mode on purpose (lr up to 1e-2, clipping off, no warmup):
the sweep must show those trials diverge or score low instead of guessing them away.
"""
from __future__ import annotations

from search_spaces.derived import clipping, suggest_clip


def space(trial, n_layers: int, max_epochs: int = 4) -> dict:
    """Optuna define-by-run space; returns constants that are not searched."""
    # from 2e-4: lower rates left the model where it was in one to four epochs, and a small
    # sweep cannot spend half its trials there
    trial.suggest_float("lr", 2e-4, 1e-2, log=True)
    clip = suggest_clip(trial)
    trial.suggest_float("warmup_ratio", 0.0, 0.2)
    trial.suggest_categorical("r", [4, 8, 16])
    trial.suggest_categorical("alpha", [8.0, 16.0, 32.0])
    trial.suggest_float("dropout", 0.0, 0.1)
    trial.suggest_categorical("target", ["qv", "attn", "mlp", "all"])
    trial.suggest_categorical("schedule", ["linear", "cosine"])
    trial.suggest_int("epochs", 1, max_epochs)
    trial.suggest_categorical("batch_size", [8, 16])
    # variable-renamed copies of each training pair per epoch (trainables/lora/loop.py), so the
    # update is learnt apart from the training examples' own variable names
    trial.suggest_int("augment", 0, 2)
    # KL to the base model on the prompt tokens (no-forgetting regulariser, trainables/lora/loop.py),
    # on a log range because the weight a model needs spans two orders of magnitude
    trial.suggest_float("kl_weight", 0.1, 50.0, log=True)
    # rows of standard-library code per batch that only the KL sees (trainables/lora/anchors.py),
    # so the KL also holds the model still on code the training data never shows
    trial.suggest_categorical("anchors", [0, 4, 16])
    return {"hierarchical": False, **clipping(trial, clip)}
