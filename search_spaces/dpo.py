"""DPO search space: optimiser, DPO loss and temperature, adapters and their layer range.

Ranges: beta around the DPO paper's 0.1 (0.01-0.5 covers TRL's examples), lr on a log scale
for LoRA on a ~1 M-parameter model (measured on the testbed: 1e-3 barely moved it in 2 epochs,
3e-3 with the sft term reached generalization 0.35 at locality 0.88), clipping on or off (the
seed's failure mode stays in the space). The layer range is sampled on fixed ranges and the end
derived (Optuna 5's multivariate TPE falls back to independent sampling on dependent ranges); a span of the whole model is plain LoRA.
"""
from __future__ import annotations

from search_spaces.hier_lora import layer_range
from search_spaces.lora import clipping
from trainables.policy.dpo import LOSS_TYPES


def space(trial, n_layers: int, max_epochs: int = 4) -> dict:
    trial.suggest_float("lr", 3e-4, 1e-2, log=True)
    trial.suggest_float("beta", 0.01, 0.5, log=True)
    trial.suggest_categorical("loss_type", list(LOSS_TYPES))
    trial.suggest_categorical("sft_weight", [0.0, 0.5, 1.0])
    trial.suggest_float("kl_weight", 0.0, 2.0)  # prompt-token KL to the base (no-forgetting)
    clip = trial.suggest_categorical("clip", [True, False])
    trial.suggest_float("warmup_ratio", 0.0, 0.2)
    trial.suggest_categorical("r", [4, 8, 16])
    trial.suggest_categorical("target", ["attn", "mlp", "all"])
    trial.suggest_int("epochs", 1, max_epochs)
    fixed = layer_range(trial, n_layers, n_layers)
    fixed.update(clipping(trial, clip))
    return fixed
