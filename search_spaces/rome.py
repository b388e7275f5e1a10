"""ROME search space: the edited layer and the value-vector optimisation (Meng et al. 2022).

Ranges bracket the paper's GPT-2 XL values (v_lr 0.5, 20 steps, clamp 4, KL 0.0625); the layer
covers the whole model because where a small code model stores a fact is what the sweep finds
out (ROME's causal tracing put it at early-middle MLPs in GPT-2 XL).
"""
from __future__ import annotations


def space(trial, n_layers: int, max_epochs: int = 4) -> dict:
    trial.suggest_int("layer", 0, n_layers - 1)
    trial.suggest_float("v_lr", 0.05, 2.0, log=True)
    # Each step is one forward/backward per edit. On the statement testbed 20-25 steps left
    # v* short of the new object for many requests (its probability 0.2-0.6): up to 50.
    trial.suggest_int("v_num_grad_steps", 10, 50)
    trial.suggest_float("clamp_norm_factor", 0.5, 8.0, log=True)
    trial.suggest_float("kl_factor", 0.01, 1.0, log=True)
    # The papers' 0.5 held |delta| far below the clamp on the testbed's small activations
    # (tests/test_editing.py: margin -0.2 vs +3.8 at 0.01), so the range reaches well below it.
    trial.suggest_float("v_weight_decay", 0.001, 1.0, log=True)
    # Each report is one phase (a quarter of the edits): the engine's epochs become phases.
    return {"algorithm": "rome", "phases": max_epochs}
