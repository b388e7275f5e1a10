"""Hierarchical LoRA search space: the LoRA space plus the layer range.

Optuna 5's multivariate TPE falls back to independent sampling on dependent ranges such as
``suggest_int("end", start + 1, L)``, so both bounds are sampled on fixed ranges and
the end is derived. The span is capped at half the model: hierarchical LoRA is the method that
updates a deep slice only, with at most half the adapters of standard LoRA at the same rank.
"""
from __future__ import annotations

from search_spaces import lora


def space(trial, n_layers: int, max_epochs: int = 4) -> dict:
    fixed = lora.space(trial, n_layers, max_epochs)
    fixed.update(layer_range(trial, n_layers, n_layers // 2))
    return fixed


def layer_range(trial, n_layers: int, max_span: int) -> dict:
    """``layer_start`` and ``layer_span`` on fixed ranges, ``layer_end`` derived (see above)."""
    start = trial.suggest_int("layer_start", 0, n_layers - 1)
    span = trial.suggest_int("layer_span", 1, max(1, max_span))
    return {"hierarchical": True, "layer_end": min(start + span, n_layers)}
