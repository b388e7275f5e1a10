"""The one dict at the edge: method name -> (config class, trainable, search space, fixed values).

One name per method everywhere: ``sweeps/<name>.py``, the search space module, the MLflow
experiment. ``tests/test_methods.py`` checks this dict against the files in ``sweeps/``.
Entries are import paths so that ``--help`` does not import torch.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Method:
    name: str
    config_cls: str  # "module:Class"
    trainable: str  # "module:function" (Ray Tune function trainable)
    run_once: str  # "module:function" (Ray-free single run)
    space: str  # "module:function" (Optuna define-by-run)
    fixed: dict = field(default_factory=dict)  # constants for every trial of this method
    summary: str = ""
    prepare: str = ""  # "module:function" called in the driver with --model before Ray starts (e.g. to build it)
    # ASHA also stops trials that have not improved on the untrained model's `progress` (a quick
    # evaluation of data/) by the first rung (sweeps/schedulers.py): for methods whose reports
    # are that evaluation's `progress`
    stall_rule: bool = False
    # Its trials run generated code in trainables/sandbox.py (GRPO's rewards): the sweep checks
    # the sandbox before Ray starts and takes --allow-weak-sandbox (sweeps/engine.py)
    sandboxed: bool = False

    def prepare_model(self, model: str) -> None:
        if self.prepare:
            self._load(self.prepare)(model)

    @staticmethod
    def _load(path: str):
        mod, _, attr = path.partition(":")
        return getattr(importlib.import_module(mod), attr)

    def load_config_cls(self):
        return self._load(self.config_cls)

    def load_trainable(self):
        return self._load(self.trainable)

    def load_run_once(self):
        return self._load(self.run_once)

    def load_space(self):
        return self._load(self.space)


METHODS: dict[str, Method] = {
    "lora": Method(
        "lora", "trainables.lora:LoraTrainConfig", "trainables.lora:trainable", "trainables.lora:run_once",
        "search_spaces.lora:space", {"hierarchical": False},
        "LoRA adapters on every layer.", stall_rule=True,
    ),
    "hier_lora": Method(
        "hier_lora", "trainables.lora:LoraTrainConfig", "trainables.lora:trainable", "trainables.lora:run_once",
        "search_spaces.hier_lora:space", {"hierarchical": True},
        "Hierarchical LoRA: adapters on a searched range of layers only.", stall_rule=True,
    ),
    "dpo": Method(
        "dpo", "trainables.dpo:DpoTrainConfig", "trainables.dpo:trainable", "trainables.dpo:run_once",
        "search_spaces.dpo:space", {"hierarchical": True},
        "DPO (TRL) on LoRA / hierarchical-LoRA adapters: chosen = new API, rejected = old API.",
    ),
    "grpo": Method(
        "grpo", "trainables.grpo:GrpoTrainConfig", "trainables.grpo:trainable", "trainables.grpo:run_once",
        "search_spaces.grpo:space", {"hierarchical": True},
        "GRPO (TRL) on LoRA / hierarchical-LoRA adapters; rewards: execution, tests, API, format.",
        sandboxed=True,
    ),
    "prompt": Method(
        "prompt", "trainables.prompt:PromptConfig", "trainables.prompt:trainable", "trainables.prompt:run_once",
        "search_spaces.prompt:space", {},
        "Rules + prompt baseline: update knowledge as comment lines before the code prompt (basic, "
        "context, rules, chain of thought); nothing is trained.",
    ),
    "rome": Method(
        "rome", "trainables.editing:RomeConfig", "trainables.editing:trainable", "trainables.editing:run_once",
        "search_spaces.rome:space", {"algorithm": "rome"},
        "ROME: one rank-one edit of an MLP down-projection per migration (easyeditor, trainables/editing.py).",
        prepare="trainables.editing:model_path",
    ),
    "memit": Method(
        "memit", "trainables.editing:MemitConfig", "trainables.editing:trainable", "trainables.editing:run_once",
        "search_spaces.memit:space", {"algorithm": "memit"},
        "MEMIT: all migrations edited into a range of MLP down-projections (easyeditor, trainables/editing.py).",
        prepare="trainables.editing:model_path",
    ),
}
