"""GRPO search space: SFT warm start, optimiser, GRPO loss, KL and sampling, reward weights,
adapters and their layer range.

The group size and temperature decide how often a group holds both an old-API and a new-API
completion (the only groups with a learning signal: GRPO's advantage is relative within the
group). Reward weights are searched on [0, 1] each; ``api`` keeps a floor of 0.25 so every trial
rewards what the evaluation scores.
"""
from __future__ import annotations

from search_spaces.derived import clipping, layer_range, suggest_clip
from trainables.policy.grpo import LOSS_TYPES


def space(trial, n_layers: int, max_epochs: int = 4) -> dict:
    trial.suggest_float("lr", 3e-4, 1e-2, log=True)
    trial.suggest_float("beta", 0.0, 0.1)
    trial.suggest_categorical("loss_type", list(LOSS_TYPES))
    clip = suggest_clip(trial)
    trial.suggest_float("warmup_ratio", 0.0, 0.2)
    trial.suggest_categorical("num_generations", [4, 8])
    trial.suggest_float("temperature", 0.8, 1.5)
    trial.suggest_float("w_execution", 0.0, 1.0)
    trial.suggest_float("w_tests", 0.0, 1.0)
    trial.suggest_float("w_api", 0.25, 1.0)
    trial.suggest_float("w_format", 0.0, 1.0)
    trial.suggest_categorical("r", [4, 8, 16])
    trial.suggest_categorical("target", ["attn", "mlp", "all"])
    # at most 2 epochs: each one samples a whole group per prompt, and more would take a small
    # sweep far past its time budget
    trial.suggest_int("epochs", 1, min(2, max_epochs))
    # SFT warm start (trainables/policy/grpo.py): from the base model almost no sampled group
    # holds a new-API completion, which leaves GRPO nothing to learn from
    trial.suggest_int("sft_epochs", 1, 4)
    trial.suggest_float("sft_lr", 1e-3, 1e-2, log=True)
    fixed = {"hierarchical": True, **layer_range(trial, n_layers, n_layers)}
    fixed.update(clipping(trial, clip))
    return fixed
