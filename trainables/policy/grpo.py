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

from trainables.adapters import AdapterConfig, doc
from trainables.policy.rewards import COMPONENTS, DEFAULT_WEIGHTS, EXEC_TIMEOUT_S

# TRL 1.16 GRPOConfig.loss_type values searched: dapo (TRL's default: token-level
# normalisation, DAPO paper), grpo (per-sequence, DeepSeekMath), dr_grpo (no length bias,
# Liu et al. 2025), bnpo.
LOSS_TYPES = ("dapo", "grpo", "dr_grpo", "bnpo")


@dataclass
class GrpoTrainConfig(AdapterConfig):
    """One GRPO run. Defaults: TRL's GRPOConfig (loss dapo, clip epsilon 0.2, beta 0.0,
    temperature 1.0) except where a tiny CPU model needs otherwise (lr, lengths, batch)."""

    dropout: float = doc(0.0, "LoRA dropout")
    target: str = doc("all", "projections adapted: qv, attn, mlp or all")
    lr: float = doc(1.0e-3, "AdamW learning rate; TRL's 1e-6 is for full fine-tuning of large models")
    warmup_ratio: float = doc(0.0, "share of the steps with a linear warm-up")
    epochs: int = doc(2, "passes over the train prompts")
    beta: float = doc(0.0, "KL to the reference; TRL's default 0 (DAPO), DeepSeekMath used 0.04")
    loss_type: str = doc("dapo", f"TRL's GRPO loss: one of {', '.join(LOSS_TYPES)}")
    epsilon: float = doc(0.2, "PPO-style ratio clipping (TRL's default)")
    sft_epochs: int = doc(0, "supervised epochs over the training pairs before RL: from a base model the policy "
                             "rarely samples the new API, so few groups hold a reward difference; 0 = none")
    sft_lr: float = doc(3.0e-3, "learning rate of the supervised warm start")
    contexts_per_migration: int = doc(1, "train contexts per migration used as prompts (0 = all); each costs "
                                         "generation and a sandbox call per step")
    num_generations: int = doc(8, "completions per prompt (the group; TRL's default)")
    prompts_per_step: int = doc(8, "prompts per optimizer step: a batch is prompts_per_step x num_generations")
    temperature: float = doc(1.0, "sampling temperature of the completions")
    max_completion_length: int = doc(32, "tokens per completion: one line of code")
    w_execution: float = doc(DEFAULT_WEIGHTS["execution"], "reward weight: prompt + completion runs in the sandbox")
    w_tests: float = doc(DEFAULT_WEIGHTS["tests"], "reward weight: tests derived from the reference line pass")
    w_api: float = doc(DEFAULT_WEIGHTS["api"], "reward weight: the replacement API is used and the deprecated one no longer")
    w_format: float = doc(DEFAULT_WEIGHTS["format"], "reward weight: a finished line that parses")
    exec_timeout: float = doc(EXEC_TIMEOUT_S, "seconds a rewarded program may run in the sandbox")

    def __post_init__(self) -> None:
        from trainables.policy.rewards import check_weights

        super().__post_init__()
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0 (0 = no KL term, TRL's default), got {self.beta}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")
        if self.num_generations < 2:
            raise ValueError(f"num_generations must be >= 2 (GRPO compares completions within a group), "
                             f"got {self.num_generations}")
        if self.prompts_per_step < 1 or self.max_completion_length < 1:
            raise ValueError("prompts_per_step and max_completion_length must be >= 1")
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


def fit(cfg: GrpoTrainConfig, session) -> dict:
    """An optional supervised warm start, then TRL's GRPOTrainer on ``cfg``'s adapters; the
    session evaluates and reports."""
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
        from trainables.adapters import supervised_warmup

        losses = supervised_warmup(model, tokenizer, cfg.dataset, cfg.sft_epochs, cfg.sft_lr, seed=cfg.seed,
                                   max_grad_norm=cfg.max_grad_norm or 1.0, precision=session.precision)
        m, _ = session.evaluate(model, tokenizer, final=False)
        print(f"SFT warm start: {cfg.sft_epochs} epoch(s), loss {losses[0]:.3f} -> {losses[-1]:.3f}; "
              f"efficacy {m['efficacy']:.3f} generalization {m['generalization']:.3f} locality {m['locality']:.3f}",
              flush=True)
        return {"warmup_loss": losses[-1], **{f"warmup_{k}": m[k] for k in
                                              ("efficacy", "generalization", "soft_generalization", "locality")}}

    keys = tuple(f"rewards/{n}/mean" for n in (*COMPONENTS, "reward")) + ("grad_norm", "kl", "completions/mean_length")
    metrics = run_trainer(cfg, session, build, keys, warm_start=warm_start)
    metrics.setdefault("sandbox_calls", scorer.sandbox_calls)
    metrics.setdefault("programs_run", scorer.programs_run)
    return metrics

