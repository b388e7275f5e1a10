"""DPO (TRL ``DPOTrainer``) on LoRA / hierarchical-LoRA adapters.

Pairs: prompt -> chosen = the new-API line, rejected = the deprecated one, from
``trainables.data.load_training_pairs(cfg.dataset)``: our migrations' train contexts by default,
or a ReCode file (``--dataset ../shared/data/recode_train/api_update.jsonl``). With a PEFT model
TRL needs no separate reference model: the reference is the base with the adapters disabled.
Reports at ASHA's rungs and at the end with TRL's checkpoint (trainables/policy/trl_loop.py).
"""
from __future__ import annotations

from dataclasses import dataclass

from trainables.adapters import AdapterConfig, doc

# TRL 1.16 DPO losses worth searching here (DPOConfig.loss_type): sigmoid (the DPO paper), ipo
# (Azar et al. 2023; bounded, less overfitting to deterministic preferences such as ours),
# hinge (SLiC), robust (noise-tolerant). "+sft" adds TRL's "sft" term on the chosen line
# (RPO, Pang et al. 2024): DPO alone can lower the likelihood of both lines.
LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


@dataclass
class DpoTrainConfig(AdapterConfig):
    """One DPO run. Defaults: the DPO paper (beta 0.1), TRL's DPOConfig where it fits a tiny
    CPU model, and the adapter defaults."""

    dropout: float = doc(0.0, "LoRA dropout; TRL's DPOConfig.disable_dropout drops it anyway")
    target: str = doc("all", "projections adapted: qv, attn, mlp or all")
    lr: float = doc(2.0e-3, "AdamW learning rate; TRL's 1e-6 is for full fine-tuning of large models")
    warmup_ratio: float = doc(0.1, "share of the steps with a linear warm-up, as TRL's DPO examples")
    beta: float = doc(0.1, "DPO temperature (Rafailov et al. 2023; TRL's default)")
    loss_type: str = doc("sigmoid", f"TRL's DPO loss: one of {', '.join(LOSS_TYPES)}")
    sft_weight: float = doc(1.0, "weight of TRL's sft loss on the chosen line (RPO, Pang et al. 2024); DPO alone "
                                 "can lower the likelihood of both lines; 0 = plain DPO")
    kl_weight: float = doc(0.0, "KL to the base on the prompt tokens (adapters.prompt_kl), added to TRL's loss; "
                                "DPO's own KL (beta) acts on the completions only")
    batch_size: int = doc(8, "preference pairs per step")
    max_length: int = doc(256, "prompt + completion tokens; our contexts are < 100, ReCode tails longer")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0 (the DPO temperature; 0.1 in the paper), got {self.beta}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")
        if self.sft_weight < 0:
            raise ValueError(f"sft_weight must be >= 0 (0 = plain DPO), got {self.sft_weight}")
        if not self.kl_weight >= 0:
            raise ValueError(f"kl_weight must be >= 0, got {self.kl_weight}")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if self.workers > 1:
            raise ValueError("dpo runs one worker per trial (no DDP through TRL here): use --workers-per-trial 1")


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
            from trainables.adapters import prompt_kl

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


def fit(cfg: DpoTrainConfig, session) -> dict:
    """Train ``cfg``'s adapters with TRL's DPOTrainer; the session evaluates and reports."""
    from trl import DPOConfig

    from trainables.policy.trl_loop import run_trainer, training_args

    def build(model, tokenizer, out_dir):
        losses = [cfg.loss_type] + (["sft"] if cfg.sft_weight > 0 else [])
        weights = [1.0] + ([cfg.sft_weight] if cfg.sft_weight > 0 else [])
        args = training_args(DPOConfig, cfg, out_dir, cfg.batch_size, beta=cfg.beta, loss_type=losses,
                             loss_weights=weights, max_length=cfg.max_length)
        data = preference_dataset(tokenizer, cfg.dataset, cfg.max_length)
        return _pretokenized_trainer(cfg.kl_weight)(model=model, args=args, train_dataset=data, processing_class=tokenizer)

    return run_trainer(cfg, session, build,
                       ("rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected", "grad_norm"))
