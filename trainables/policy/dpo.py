"""DPO (TRL ``DPOTrainer``) on LoRA / hierarchical-LoRA adapters.

Pairs: prompt -> chosen = the new-API line, rejected = the deprecated one, from
``trainables.data.load_training_pairs(cfg.dataset)``: our migrations' train contexts by default,
or a ReCode file (``--dataset ../shared/data/recode_train/api_update.jsonl``). With a PEFT model
TRL needs no separate reference model: the reference is the base with the adapters disabled.
Reports once per epoch with TRL's checkpoint (trainables/policy/trl_loop.py) and the shared evaluation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from trainables.common import RunSettings, config_from_dict, local_reporter, tune_reporter
from trainables.lora.loop import adapter_layer_range, check_adapter_fields

# TRL 1.16 DPO losses worth searching here (DPOConfig.loss_type): sigmoid (the DPO paper), ipo
# (Azar et al. 2023; bounded, less overfitting to deterministic preferences such as ours),
# hinge (SLiC), robust (noise-tolerant). "+sft" adds TRL's "sft" term on the chosen line
# (RPO, Pang et al. 2024): DPO alone can lower the likelihood of both lines.
LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


@dataclass
class DpoTrainConfig(RunSettings):
    """One DPO run. Defaults: the DPO paper (beta 0.1), TRL's DPOConfig where it fits a tiny
    CPU model, and the LoRA trainable's adapter defaults."""

    SEARCH_ONLY: ClassVar[tuple[str, ...]] = ("clip", "layer_span")

    model: str = "testbed"
    dataset: str | None = None  # our JSONL (train contexts) or a ReCode file; None = data/
    hierarchical: bool = False
    layer_start: int = 0
    layer_end: int | None = None
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0  # TRL's DPOConfig.disable_dropout=True drops it anyway
    target: str = "all"
    lr: float = 2.0e-3  # TRL's 1e-6 is for full fine-tuning of large models; LoRA on ~1 M params needs far more
    beta: float = 0.1  # DPO paper (Rafailov et al. 2023); TRL's default too
    loss_type: str = "sigmoid"
    # > 0: add TRL's "sft" loss on the chosen line with this weight (RPO, Pang et al. 2024: 1.0).
    # Measured on the testbed (layers 4-7, lr 2e-3..3e-3): without it DPO lowered both lines'
    # likelihood and locality fell to 0.19; with 1.0, generalization 0.35 at locality 0.88.
    sft_weight: float = 1.0
    # KL to the base on the prompt tokens (trainables.lora.loop.prompt_kl), added to TRL's loss: the
    # same no-forgetting regulariser as LoRA's. DPO's own KL (beta) acts on the completions only.
    kl_weight: float = 0.0
    max_grad_norm: float | None = 1.0  # TRL / transformers default
    warmup_ratio: float = 0.1  # TRL's DPO examples use 0.1
    schedule: str = "linear"
    epochs: int = 4
    batch_size: int = 8
    max_length: int = 256  # prompt + completion tokens; our contexts are < 100, ReCode tails longer

    def __post_init__(self) -> None:
        check_adapter_fields(self)
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0 (the DPO temperature; 0.1 in the paper), got {self.beta}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")
        if self.sft_weight < 0:
            raise ValueError(f"sft_weight must be >= 0 (0 = plain DPO), got {self.sft_weight}")
        if not self.kl_weight >= 0:
            raise ValueError(f"kl_weight must be >= 0, got {self.kl_weight}")
        if self.r < 1 or self.epochs < 1 or self.batch_size < 1:
            raise ValueError("r, epochs and batch_size must be >= 1")
        if self.workers > 1:
            raise ValueError("dpo runs one worker per trial (no DDP through TRL here): use --workers-per-trial 1")

    def layer_range(self, n_layers: int) -> tuple[int, int]:
        return adapter_layer_range(self, n_layers)


def preference_dataset(tokenizer, dataset: str | None, max_length: int):
    """prompt_ids / chosen_ids / rejected_ids, tokenized in pieces exactly as the testbed was
    pretrained and as the evaluation prompts it (``trainables.testbed.encode_pair``: start + prompt,
    then the completion and what follows a statement: ``tokens.statement_end``). TRL would tokenize prompt + completion as one string, where the
    prompt's final newline merges with the completion's first token on the testbed's BPE (TRL
    warns "The tokenized prompt is not a prefix ..." and trains on a context the evaluation
    never shows)."""
    from datasets import Dataset

    from trainables.data import load_training_pairs
    from trainables.testbed import encode_pair

    rows = []
    for p in load_training_pairs(dataset):
        chosen, n = encode_pair(tokenizer, p.prompt, p.new, max_length, end="statement")
        rejected, m = encode_pair(tokenizer, p.prompt, p.old, max_length, end="statement")
        if n >= len(chosen) or m >= len(rejected):
            continue  # the prompt alone fills max_length: no completion token left to learn from
        rows.append({"prompt_ids": chosen[:n], "chosen_ids": chosen[n:], "rejected_ids": rejected[m:]})
    if not rows:
        raise ValueError(f"no preference pair fits max_length={max_length}: raise max_length")
    return Dataset.from_list(rows)


def _pretokenized_trainer(kl_weight: float = 0.0):
    from trl import DPOTrainer

    class PretokenizedDPOTrainer(DPOTrainer):
        """DPOTrainer fed ids from :func:`preference_dataset` (its own tokenization skipped),
        plus ``kl_weight`` x the prompt-token KL to the base model."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if not kl_weight:
                return out
            from trainables.lora.loop import prompt_kl

            # the collator stacks [chosen; rejected], which share their prompts: the chosen half
            half = inputs["input_ids"].shape[0] // 2
            ids, mask = inputs["input_ids"][:half], inputs["attention_mask"][:half]
            labels = ids.masked_fill(inputs["completion_mask"][:half] == 0, -100)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            kl = kl_weight * prompt_kl(self.accelerator.unwrap_model(model), ids, mask, labels, logits)
            if return_outputs:
                return out[0] + kl, out[1]
            return out + kl

    return PretokenizedDPOTrainer


def train_loop(cfg: DpoTrainConfig, reporter, *, eval_data=None, adapter_out: str | None = None) -> dict:
    from trl import DPOConfig

    from trainables.policy.trl_loop import run_trainer, training_args

    def build(model, tokenizer, out_dir):
        losses = [cfg.loss_type] + (["sft"] if cfg.sft_weight > 0 else [])
        weights = [1.0] + ([cfg.sft_weight] if cfg.sft_weight > 0 else [])
        args = training_args(DPOConfig, cfg, out_dir, cfg.batch_size, beta=cfg.beta, loss_type=losses,
                             loss_weights=weights, max_length=cfg.max_length)
        data = preference_dataset(tokenizer, cfg.dataset, cfg.max_length)
        return _pretokenized_trainer(cfg.kl_weight)(model=model, args=args, train_dataset=data, processing_class=tokenizer)

    return run_trainer(cfg, reporter, build,
                       ("rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected", "grad_norm"),
                       eval_data=eval_data, adapter_out=adapter_out)


def trainable(config: dict) -> None:
    """Ray Tune function trainable for `dpo`."""
    train_loop(config_from_dict(DpoTrainConfig, config), tune_reporter())


def run_once(config: dict, adapter_out: str | None = None) -> dict:
    """Plain, Ray-free run; returns the final metrics."""
    return train_loop(config_from_dict(DpoTrainConfig, config), local_reporter([]), adapter_out=adapter_out)
