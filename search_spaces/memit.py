"""MEMIT search space: the edited layer range, the value optimisation and the covariance weight
(Meng et al. 2023; GPT-J used layers 3-8 of 28, v_lr 0.5, 25 steps, clamp 0.75,
mom2_update_weight 15000), and whether the edits go in as one batch or one at a time.

The layer range is sampled as a start and a span of at most half the model
(search_spaces/derived.py).
"""
from __future__ import annotations

from search_spaces.derived import layer_range


def space(trial, n_layers: int, max_epochs: int = 4) -> dict:
    layers = layer_range(trial, n_layers, n_layers // 2)
    trial.suggest_float("v_lr", 0.05, 2.0, log=True)
    trial.suggest_int("v_num_grad_steps", 10, 50)  # see search_spaces/rome.py
    trial.suggest_float("clamp_norm_factor", 0.25, 4.0, log=True)
    trial.suggest_float("kl_factor", 0.01, 1.0, log=True)
    trial.suggest_float("v_weight_decay", 0.001, 1.0, log=True)  # see search_spaces/rome.py
    # lambda weighs the covariance (a per-token mean here) against the phase's own keys, and
    # GPT-J's 15000 (set for 10k edits) swamps the few edits of a phase, so the range reaches 1
    trial.suggest_float("mom2_update_weight", 1.0, 1.0e4, log=True)
    trial.suggest_categorical("mode", ["batch", "sequential"])
    return {"algorithm": "memit", **layers, "phases": max_epochs}
