"""Hierarchical LoRA search space: the LoRA space plus the layer range (search_spaces/derived.py).

The span is capped at half the model: hierarchical LoRA is the method that updates a deep slice
only, with at most half the adapters of standard LoRA at the same rank.
"""
from __future__ import annotations

from search_spaces import lora
from search_spaces.derived import layer_range


def space(trial, n_layers: int, max_epochs: int = 4) -> dict:
    fixed = lora.space(trial, n_layers, max_epochs)
    fixed.update(hierarchical=True, **layer_range(trial, n_layers, n_layers // 2))
    return fixed
