"""The one dict at the edge: method name -> its Method (config class, fit step, search space,
fixed values).

One name per method everywhere: ``sweeps/<name>.py``, ``search_spaces/<name>.py``, the MLflow
experiment. ``tests/test_methods.py`` checks this dict against the files in ``sweeps/``. Every
method module imports torch only inside its functions, so ``--help`` stays fast.
"""
from __future__ import annotations

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
from trainables.trial import Method

METHODS: dict[str, Method] = {
    "lora": Method(
        "lora", lora.LoraTrainConfig, lora.fit, lora_space.space, {"hierarchical": False},
        "LoRA adapters on every layer.", stall_rule=True, ddp=True,
    ),
    "hier_lora": Method(
        "hier_lora", lora.LoraTrainConfig, lora.fit, hier_lora_space.space,
        {"hierarchical": True}, "Hierarchical LoRA: adapters on a searched range of layers only.", stall_rule=True,
        ddp=True,
    ),
    "dpo": Method(
        "dpo", dpo.DpoTrainConfig, dpo.fit, dpo_space.space, {"hierarchical": True},
        "DPO (TRL) on LoRA / hierarchical-LoRA adapters: chosen = new API, rejected = old API.",
    ),
    "grpo": Method(
        "grpo", grpo.GrpoTrainConfig, grpo.fit, grpo_space.space, {"hierarchical": True},
        "GRPO (TRL) on LoRA / hierarchical-LoRA adapters; rewards: execution, tests, API, format.",
        sandboxed=True,
    ),
    "prompt": Method(
        "prompt", prompt.PromptConfig, prompt.fit, prompt_space.space, {},
        "Rules + prompt baseline: update knowledge as comment lines before the code prompt (basic, "
        "context, rules, chain of thought, InsertPrompt) or ReplaceAPI's rewrites; nothing is trained.",
    ),
    "rome": Method(
        "rome", editing.RomeConfig, editing.fit, rome_space.space, {"algorithm": "rome"},
        "ROME: one rank-one edit of an MLP down-projection per migration (easyeditor, trainables/editing/loop.py).",
        prepare=editing.model_path,
    ),
    "memit": Method(
        "memit", editing.MemitConfig, editing.fit, memit_space.space, {"algorithm": "memit"},
        "MEMIT: all migrations edited into a range of MLP down-projections (easyeditor, trainables/editing/loop.py).",
        prepare=editing.model_path,
    ),
}


def method_for(cfg) -> Method:
    """The method whose config ``cfg`` is (lora and hier_lora share theirs, and their fit step)."""
    for m in METHODS.values():
        if type(cfg) is m.config_cls:
            return m
    raise ValueError(f"no method takes a {type(cfg).__name__}")


def run_one(cfg, reporter=None, *, weights_out: str | None = None, **context) -> dict:
    """A Ray-free run of a built config (tests, benchmarks, ``--config`` outside a sweep): the
    lifecycle of its method in the context its settings imply, plus ``context`` fields
    (``eval_epochs``, ``frozen_cache``, ``state_cache_gb``, ...)."""
    from trainables.trial import run_config, settings_context

    return run_config(method_for(cfg), cfg, settings_context(cfg, **context), reporter, weights_out)
