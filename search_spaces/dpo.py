"""DPO search space: optimiser, DPO loss and temperature, adapters and their layer range.

beta is sampled around the DPO paper's 0.1 (0.01-0.5 covers TRL's examples); lr is on a log scale
up to 1e-2 because rates near 1e-3 barely move a small model's adapters in a few epochs; clipping
is on or off so the seed's failure mode stays in the space; the layer range may span the whole
model, which is plain LoRA (search_spaces/derived.py).
"""
from __future__ import annotations

from search_spaces.derived import clipping, layer_range, suggest_clip
from trainables.policy.dpo import LOSS_TYPES


def space(trial, n_layers: int, max_epochs: int = 4) -> dict:
    trial.suggest_float("lr", 3e-4, 1e-2, log=True)
    trial.suggest_float("beta", 0.01, 0.5, log=True)
    trial.suggest_categorical("loss_type", list(LOSS_TYPES))
    trial.suggest_categorical("sft_weight", [0.0, 0.5, 1.0])
    trial.suggest_float("kl_weight", 0.0, 2.0)  # prompt-token KL to the base (no-forgetting)
    clip = suggest_clip(trial)
    trial.suggest_float("warmup_ratio", 0.0, 0.2)
    trial.suggest_categorical("r", [4, 8, 16])
    trial.suggest_categorical("target", ["attn", "mlp", "all"])
    trial.suggest_int("epochs", 1, max_epochs)
    fixed = {"hierarchical": True, **layer_range(trial, n_layers, n_layers)}
    fixed.update(clipping(trial, clip))
    return fixed
