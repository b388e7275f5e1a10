"""ROME search space: the edited layer and the value-vector optimisation (Meng et al. 2022).

Ranges bracket the paper's GPT-2 XL values (v_lr 0.5, 20 steps, clamp 4, KL 0.0625); the layer
covers the whole model because where a small code model stores a fact is what the sweep finds
out (ROME's causal tracing put it at early-middle MLPs in GPT-2 XL).
"""
from __future__ import annotations


def space(trial, n_layers: int, max_epochs: int = 4) -> dict:
    trial.suggest_int("layer", 0, n_layers - 1)
    trial.suggest_float("v_lr", 0.05, 2.0, log=True)
    # up to 50 steps (each one forward/backward per edit), because the papers' 20-25 can leave
    # v* short of the new object
    trial.suggest_int("v_num_grad_steps", 10, 50)
    trial.suggest_float("clamp_norm_factor", 0.5, 8.0, log=True)
    trial.suggest_float("kl_factor", 0.01, 1.0, log=True)
    # well below the papers' 0.5, which holds |delta| far below the clamp on a small model's
    # activations
    trial.suggest_float("v_weight_decay", 0.001, 1.0, log=True)
    # Each report is one phase (a quarter of the edits): the engine's epochs become phases.
    return {"algorithm": "rome", "phases": max_epochs}
