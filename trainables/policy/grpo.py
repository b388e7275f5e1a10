"""GRPO (TRL ``GRPOTrainer``) on LoRA / hierarchical-LoRA adapters with execution, tests, API
and format rewards (trainables/policy/rewards.py).

Prompts: the migrations' train contexts (or the prompts of a ReCode file via ``--dataset``; no
AST patterns there, so the API reward drops out). Each prompt gets ``num_generations`` sampled
one-line completions: generation stops at the first newline token (added to the model's
``eos_token_id`` list, which TRL also uses to mask the completion), exactly the line the
evaluation scores. Every reward component is a TRL reward function (weight 0: logged as
``rewards/<name>/mean`` each step) next to their weighted combination (weight 1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from trainables.common import RunSettings, config_from_dict, local_reporter, tune_reporter
from trainables.lora.loop import adapter_layer_range, check_adapter_fields
from trainables.policy.rewards import COMPONENTS, DEFAULT_WEIGHTS, EXEC_TIMEOUT_S

# TRL 1.16 GRPOConfig.loss_type values searched: dapo (TRL's default: token-level
# normalisation, DAPO paper), grpo (per-sequence, DeepSeekMath), dr_grpo (no length bias,
# Liu et al. 2025), bnpo.
LOSS_TYPES = ("dapo", "grpo", "dr_grpo", "bnpo")


@dataclass
class GrpoTrainConfig(RunSettings):
    """One GRPO run. Defaults: TRL's GRPOConfig (loss dapo, clip epsilon 0.2, beta 0.0,
    temperature 1.0) except where a tiny CPU model needs otherwise (lr, lengths, batch)."""

    SEARCH_ONLY: ClassVar[tuple[str, ...]] = ("clip", "layer_span")

    model: str = "testbed"
    dataset: str | None = None
    hierarchical: bool = False
    layer_start: int = 0
    layer_end: int | None = None
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target: str = "all"
    lr: float = 1.0e-3  # TRL's 1e-6 is for full fine-tuning of large models
    beta: float = 0.0  # KL to the reference; TRL's default 0 (DAPO), DeepSeekMath used 0.04
    loss_type: str = "dapo"
    epsilon: float = 0.2  # PPO-style ratio clipping (TRL default)
    max_grad_norm: float | None = 1.0
    warmup_ratio: float = 0.0
    schedule: str = "linear"
    epochs: int = 2  # passes over the train prompts
    # Supervised warm start before RL (SFT, then RL): epochs over the training pairs at sft_lr.
    # From the base testbed the policy samples the new API in 0.2-1.8% of completions, so
    # almost no group holds a reward difference to learn from; 0 = GRPO from the base model.
    sft_epochs: int = 0
    sft_lr: float = 3.0e-3
    # Train contexts per migration used as prompts (0 = all). One (68 prompts, 9 steps of 8
    # prompts) keeps an epoch near 2 minutes on 2 busy cores: a step costs ~14 s there
    # (generation + a sandbox call that imports the step's libraries).
    contexts_per_migration: int = 1
    num_generations: int = 8  # completions per prompt (the group); TRL default 8
    prompts_per_step: int = 8  # per optimizer step: batch = prompts_per_step x num_generations
    temperature: float = 1.0
    max_completion_length: int = 32  # one line of <= 90 characters is ~30 tokens (evaluation: 48)
    w_execution: float = DEFAULT_WEIGHTS["execution"]
    w_tests: float = DEFAULT_WEIGHTS["tests"]
    w_api: float = DEFAULT_WEIGHTS["api"]
    w_format: float = DEFAULT_WEIGHTS["format"]
    exec_timeout: float = EXEC_TIMEOUT_S

    def __post_init__(self) -> None:
        from trainables.policy.rewards import check_weights

        check_adapter_fields(self)
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0 (0 = no KL term, TRL's default), got {self.beta}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")
        if self.num_generations < 2:
            raise ValueError(f"num_generations must be >= 2 (GRPO compares completions within a group), "
                             f"got {self.num_generations}")
        if self.prompts_per_step < 1 or self.epochs < 1 or self.r < 1 or self.max_completion_length < 1:
            raise ValueError("prompts_per_step, epochs, r and max_completion_length must be >= 1")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.sft_epochs < 0 or not self.sft_lr > 0:
            raise ValueError(f"sft_epochs must be >= 0 and sft_lr > 0, got {self.sft_epochs}, {self.sft_lr}")
        if self.contexts_per_migration < 0:
            raise ValueError(f"contexts_per_migration must be >= 0 (0 = all), got {self.contexts_per_migration}")
        if not self.exec_timeout > 0:
            raise ValueError(f"exec_timeout must be > 0 seconds, got {self.exec_timeout}")
        check_weights(self.weights)
        if self.workers > 1:
            raise ValueError("grpo runs one worker per trial (no DDP through TRL here): use --workers-per-trial 1")

    @property
    def weights(self) -> dict[str, float]:
        return {c: getattr(self, f"w_{c}") for c in COMPONENTS}

    def layer_range(self, n_layers: int) -> tuple[int, int]:
        return adapter_layer_range(self, n_layers)


def prompt_dataset(tokenizer, dataset: str | None, per_migration: int = 0):
    """(dataset with prompt + record_id + head, records by id); ``per_migration`` > 0 keeps the first
    that many train contexts of each migration (our data only)."""
    from datasets import Dataset

    from trainables.data import detect_format, load_migrations, load_training_pairs, shared_head
    from trainables.policy.rewards import first_line, records_from_migrations, records_from_pairs
    from trainables.policy.trl_loop import bos_text
    from trainables.tokens import cut_at_line_start

    if dataset is None or detect_format(dataset) == "migrations":
        records = records_from_migrations(load_migrations(dataset))
        if per_migration > 0:
            records = {k: r for k, r in records.items() if int(k.rsplit("/", 1)[1]) < per_migration}
    else:
        records = records_from_pairs(load_training_pairs(dataset))
    bos = bos_text(tokenizer)
    rows = []
    for k, r in records.items():
        # TRL tokenizes the prompt string whole and stops a completion at its first newline
        # token. A real model's prompt would end on a lone "\n" there (tokens.cut_at_line_start),
        # so it carries the statement's head, as the evaluation prompts a migration context:
        # the completion is the rest of the line, and the rewards judge head + completion
        body, lead = cut_at_line_start(tokenizer, r.prompt)
        head = shared_head(first_line(r.old or ""), first_line(r.reference)) if lead else ""
        text = body + lead + head if head else r.prompt
        rows.append({"prompt": bos + text, "record_id": k, "head": head})
    return Dataset.from_list(rows), records


def train_loop(cfg: GrpoTrainConfig, reporter, *, eval_data=None, adapter_out: str | None = None) -> dict:
    from trl import GRPOConfig, GRPOTrainer

    from trainables.evaluation import newline_ids
    from trainables.policy.rewards import RewardScorer
    from trainables.policy.trl_loop import run_trainer, training_args

    scorer = RewardScorer(cfg.weights, cfg.exec_timeout)

    def build(model, tokenizer, out_dir):
        data, records = prompt_dataset(tokenizer, cfg.dataset, cfg.contexts_per_migration)
        from trainables.testbed import cache_root

        scorer.prepare(list(records.values()), cache_dir=cache_root() / "rewards")  # one sandbox call, cached
        funcs, weights = scorer.trl_reward_funcs(records)
        # Stop each completion at its first newline token, as the evaluation does; TRL reads the
        # stop ids from the model's generation config and masks everything after them.
        eos = [tokenizer.eos_token_id, *newline_ids(tokenizer).tolist()]
        model.generation_config.eos_token_id = eos
        # divisible by num_generations (TRL refuses otherwise); never more prompts per step than there are
        # (a 4-migration dataset with 8 prompts per step would give an epoch of 0 steps)
        batch = min(cfg.prompts_per_step, len(data)) * cfg.num_generations
        args = training_args(GRPOConfig, cfg, out_dir, batch, beta=cfg.beta, loss_type=cfg.loss_type,
                             epsilon=cfg.epsilon, num_generations=cfg.num_generations,
                             temperature=cfg.temperature, max_completion_length=cfg.max_completion_length,
                             reward_weights=weights, shuffle_dataset=True)
        return GRPOTrainer(model=model, reward_funcs=funcs, args=args, train_dataset=data,
                           processing_class=tokenizer)

    def warm_start(model, tokenizer) -> dict:
        """SFT epochs, then the quick evaluation: what the RL phase starts from (``warmup_*``)."""
        if cfg.sft_epochs <= 0:
            return {}
        from trainables.lora.loop import supervised_warmup

        losses = supervised_warmup(model, tokenizer, cfg.dataset, cfg.sft_epochs, cfg.sft_lr, seed=cfg.seed,
                                   max_grad_norm=cfg.max_grad_norm or 1.0)
        m, _ = eval_data.validation.evaluate(model, tokenizer, quick=True)
        print(f"SFT warm start: {cfg.sft_epochs} epoch(s), loss {losses[0]:.3f} -> {losses[-1]:.3f}; "
              f"efficacy {m['efficacy']:.3f} generalization {m['generalization']:.3f} locality {m['locality']:.3f}",
              flush=True)
        return {"warmup_loss": losses[-1], **{f"warmup_{k}": m[k] for k in
                                              ("efficacy", "generalization", "soft_generalization", "locality")}}

    if eval_data is None:
        import torch

        from trainables.evaluation import default_eval_data

        eval_data = default_eval_data(cfg.model, "cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu", cfg.dtype)
    keys = tuple(f"rewards/{n}/mean" for n in (*COMPONENTS, "reward")) + ("grad_norm", "kl", "completions/mean_length")
    metrics = run_trainer(cfg, reporter, build, keys, eval_data=eval_data, adapter_out=adapter_out,
                          warm_start=warm_start)
    metrics.setdefault("sandbox_calls", scorer.sandbox_calls)
    metrics.setdefault("programs_run", scorer.programs_run)
    return metrics


def trainable(config: dict) -> None:
    """Ray Tune function trainable for `grpo`."""
    train_loop(config_from_dict(GrpoTrainConfig, config), tune_reporter())


def run_once(config: dict, adapter_out: str | None = None) -> dict:
    """Plain, Ray-free run; returns the final metrics."""
    return train_loop(config_from_dict(GrpoTrainConfig, config), local_reporter([]), adapter_out=adapter_out)
