"""The one dict at the edge: method name -> (config class, trainable, search space, fixed values).

One name per method everywhere: ``sweeps/<name>.py``, ``search_spaces/<name>.py``, the MLflow
experiment. ``tests/test_methods.py`` checks this dict against the files in ``sweeps/``. The
entries are the objects themselves: every trainable module imports torch only inside its
functions, so ``--help`` stays fast (~70 ms for all of them).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from search_spaces import dpo as dpo_space
from search_spaces import grpo as grpo_space
from search_spaces import hier_lora as hier_lora_space
from search_spaces import lora as lora_space
from search_spaces import memit as memit_space
from search_spaces import prompt as prompt_space
from search_spaces import rome as rome_space
from trainables import prompt
from trainables.editing import loop as editing
from trainables.lora import loop as lora
from trainables.policy import dpo, grpo


@dataclass(frozen=True)
class Method:
    name: str
    config_cls: type  # the trial's typed config (defaults, validation)
    trainable: Callable[[dict], None]  # Ray Tune function trainable
    run_once: Callable[..., dict]  # Ray-free single run (export round trips, benchmarks)
    space: Callable[..., dict]  # Optuna define-by-run space
    fixed: dict = field(default_factory=dict)  # constants for every trial of this method
    summary: str = ""
    # called in the driver with --model before Ray starts (the editing testbed is built there)
    prepare: Callable[[str], Any] | None = None
    # ASHA also stops trials that have not improved on the untrained model's `progress` (a quick
    # evaluation of data/) by the first rung (trainables/sweep/scheduler.py): for methods whose
    # reports are that evaluation's `progress`
    stall_rule: bool = False
    # Its trials run generated code in trainables/sandbox.py (GRPO's rewards): the sweep checks
    # the sandbox before Ray starts and takes --allow-weak-sandbox
    sandboxed: bool = False

    def prepare_model(self, model: str) -> None:
        if self.prepare is not None:
            self.prepare(model)


METHODS: dict[str, Method] = {
    "lora": Method(
        "lora", lora.LoraTrainConfig, lora.trainable, lora.run_once, lora_space.space, {"hierarchical": False},
        "LoRA adapters on every layer.", stall_rule=True,
    ),
    "hier_lora": Method(
        "hier_lora", lora.LoraTrainConfig, lora.trainable, lora.run_once, hier_lora_space.space,
        {"hierarchical": True}, "Hierarchical LoRA: adapters on a searched range of layers only.", stall_rule=True,
    ),
    "dpo": Method(
        "dpo", dpo.DpoTrainConfig, dpo.trainable, dpo.run_once, dpo_space.space, {"hierarchical": True},
        "DPO (TRL) on LoRA / hierarchical-LoRA adapters: chosen = new API, rejected = old API.",
    ),
    "grpo": Method(
        "grpo", grpo.GrpoTrainConfig, grpo.trainable, grpo.run_once, grpo_space.space, {"hierarchical": True},
        "GRPO (TRL) on LoRA / hierarchical-LoRA adapters; rewards: execution, tests, API, format.",
        sandboxed=True,
    ),
    "prompt": Method(
        "prompt", prompt.PromptConfig, prompt.trainable, prompt.run_once, prompt_space.space, {},
        "Rules + prompt baseline: update knowledge as comment lines before the code prompt (basic, "
        "context, rules, chain of thought); nothing is trained.",
    ),
    "rome": Method(
        "rome", editing.RomeConfig, editing.trainable, editing.run_once, rome_space.space, {"algorithm": "rome"},
        "ROME: one rank-one edit of an MLP down-projection per migration (easyeditor, trainables/editing/loop.py).",
        prepare=editing.model_path,
    ),
    "memit": Method(
        "memit", editing.MemitConfig, editing.trainable, editing.run_once, memit_space.space, {"algorithm": "memit"},
        "MEMIT: all migrations edited into a range of MLP down-projections (easyeditor, trainables/editing/loop.py).",
        prepare=editing.model_path,
    ),
}
