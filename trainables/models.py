"""Model loading and per-architecture facts (module names, layer counts) kept as data."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

TESTBED = "testbed"


@dataclass(frozen=True)
class ArchFacts:
    """Where things live in one architecture family (ROME-style hparams as data)."""

    layers: str  # module path of the decoder-layer list
    attn: tuple[str, ...]  # attention projections inside a layer
    mlp: tuple[str, ...]  # MLP projections inside a layer
    mlp_down: str  # the MLP output projection that ROME / MEMIT edit, `{}` = layer index

    def module_regex(self, modules: list[str], start: int, end: int) -> str:
        """PEFT target_modules regex for `modules` in layers [start, end)."""
        layers = "|".join(str(i) for i in range(start, end))
        names = "|".join(modules)
        prefix = re.escape(self.layers)
        return rf".*{prefix}\.({layers})\.\w+\.({names})"


_LLAMA_LIKE = ArchFacts(
    layers="model.layers",
    attn=("q_proj", "k_proj", "v_proj", "o_proj"),
    mlp=("gate_proj", "up_proj", "down_proj"),
    mlp_down="model.layers.{}.mlp.down_proj",
)
ARCH_FACTS: dict[str, ArchFacts] = {
    "llama": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "phi3": ArchFacts("model.layers", ("qkv_proj", "o_proj"), ("gate_up_proj", "down_proj"),
                      "model.layers.{}.mlp.down_proj"),
    "gpt2": ArchFacts("transformer.h", ("c_attn", "c_proj"), ("c_fc", "c_proj"), "transformer.h.{}.mlp.c_proj"),
}


# Decoder stacks whose logits are exactly ``lm_head(norm(layers(embed(ids))))`` with the layers
# called alike and nothing after the head (no logit soft-capping): code may run part of the stack
# (lora.BasePass) or the head on chosen positions only (evaluation.score_lines).
SHARED_TRUNK_TYPES = ("llama", "qwen2", "qwen3", "mistral")


def arch_facts(config) -> ArchFacts:
    try:
        return ARCH_FACTS[config.model_type]
    except KeyError:
        raise ValueError(
            f"model type {config.model_type!r} has no module facts; add it to trainables.models.ARCH_FACTS "
            f"(known: {', '.join(sorted(ARCH_FACTS))})"
        ) from None


def resolve(name: str) -> str:
    """`testbed` -> the cached testbed folder (built on first use); anything else as given."""
    if name == TESTBED:
        from trainables.testbed import ensure_testbed

        return str(ensure_testbed())
    return name


def check_model_name(name: str) -> None:
    """Fail early, with one line, on a local-looking path that does not exist."""
    if name == TESTBED:
        return
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).suffix
    if looks_local and not Path(name).expanduser().exists():
        raise ValueError(f"--model {name!r}: no such file or directory")


def load_model(name: str, device: str = "cpu", dtype=None):
    """(model, tokenizer) for `testbed`, a local path or a hub id; tokenizer pads on the left."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one "Loading weights" bar per trial per epoch is noise
    path = resolve(name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    model.to(device)
    model.eval()
    return model, tokenizer


def num_layers(model) -> int:
    return int(model.config.num_hidden_layers if hasattr(model.config, "num_hidden_layers") else model.config.n_layer)
