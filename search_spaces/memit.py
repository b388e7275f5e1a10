"""MEMIT search space: the edited layer range, the value optimisation and the covariance weight
(Meng et al. 2023; GPT-J used layers 3-8 of 28, v_lr 0.5, 25 steps, clamp 0.75,
mom2_update_weight 15000), and whether the edits go in as one batch or one at a time.

Start and span are sampled on fixed ranges and the end derived (Optuna 5's multivariate TPE
cannot sample dependent ranges).
"""
from __future__ import annotations


def space(trial, n_layers: int, max_epochs: int = 4) -> dict:
    start = trial.suggest_int("layer_start", 0, n_layers - 1)
    span = trial.suggest_int("layer_span", 1, max(1, n_layers // 2))
    trial.suggest_float("v_lr", 0.05, 2.0, log=True)
    trial.suggest_int("v_num_grad_steps", 10, 50)  # see search_spaces/rome.py
    trial.suggest_float("clamp_norm_factor", 0.25, 4.0, log=True)
    trial.suggest_float("kl_factor", 0.01, 1.0, log=True)
    trial.suggest_float("v_weight_decay", 0.001, 1.0, log=True)  # see search_spaces/rome.py
    # lambda weighs the covariance (a per-token mean here) against the phase's own keys: on the
    # small testbed 15000 (GPT-J's, for 10k edits) moved no margin, 1-10 flipped 3 of 4 requests.
    trial.suggest_float("mom2_update_weight", 1.0, 1.0e4, log=True)
    trial.suggest_categorical("mode", ["batch", "sequential"])
    return {"algorithm": "memit", "layer_end": min(start + span, n_layers), "phases": max_epochs}
