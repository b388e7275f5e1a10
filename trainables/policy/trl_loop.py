"""What the TRL fit steps (``dpo``, ``grpo``) share: TrainingArguments in the trial's precision,
and a callback that hands a ``transformers.Trainer``'s epochs to the trial's session.

The bridge: the divergence guard on every logged step (loss and grad_norm; under fp16 a
non-finite grad_norm with a finite loss is a step the Trainer's loss scaler skipped, not a
divergence: :func:`guard_logged_step`), and at each epoch
checkpoint the session's end of epoch (a quick evaluation at ASHA's rungs, the full one at the
end, nothing elsewhere) with that checkpoint folder (adapter + optimizer + scheduler + RNG +
``trainer_state.json`` + the guard's state), so a resumed trial calls
``trainer.train(resume_from_checkpoint=...)`` and continues after its last report.
"""
from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from trainables.common import DivergenceGuard, scaler_skipped

# Clipping "off" still has the Trainer compute the gradient norm (the guard reads it): a bound
# no gradient of these adapters reaches (their norms here are < 100) clips nothing.
NO_CLIP = 1.0e9


def bos_text(tokenizer) -> str:
    """TRL tokenizes prompts with add_special_tokens=False, but the shared evaluation starts
    every sequence with ``models.start_ids`` (the testbed's BOS, a Llama tokenizer's BOS; nothing
    for Qwen2 or SmolLM2): put it in the prompt text so training sees what the evaluation sees."""
    from trainables.tokens import start_text

    return start_text(tokenizer)


def training_args(cls, cfg, out_dir: str, batch_size: int, **extra):
    """``DPOConfig`` / ``GRPOConfig`` with the trial's precision (``cfg.dtype``: TRL's bf16
    defaults on, ~5x slower on the CPU) and gradient checkpointing (it defaults on), report_to
    none, one log per step (the divergence guard and the reward logs), one checkpoint per epoch."""
    import torch

    from trainables.models import resolve_dtype

    on_gpu = bool(cfg.use_gpu and torch.cuda.is_available())
    precision = resolve_dtype(cfg.dtype, "cuda" if on_gpu else "cpu")
    return cls(
        output_dir=out_dir,
        per_device_train_batch_size=batch_size,
        num_train_epochs=cfg.epochs,
        learning_rate=cfg.lr,
        lr_scheduler_type=cfg.schedule,
        warmup_steps=float(cfg.warmup_ratio),  # a float in [0, 1) is a ratio (transformers 5)
        max_grad_norm=NO_CLIP if cfg.max_grad_norm is None else cfg.max_grad_norm,
        weight_decay=0.0,
        logging_steps=1,
        save_strategy="epoch",
        save_total_limit=1,
        report_to="none",
        use_cpu=not on_gpu,
        # the model is loaded in this precision; TRL's flags follow the same choice (left to
        # themselves, bf16 defaults on, ~5x slower on the CPU, and gradient checkpointing too)
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        # transformers 5.2x renamed it (the old name warns on every trial); older 5.x has only the old
        **{_checkpointing_arg(cls): cfg.gradient_checkpointing},
        seed=cfg.seed,
        data_seed=cfg.seed,
        disable_tqdm=True,
        dataloader_num_workers=0,
        **extra,
    )


def _checkpointing_arg(cls) -> str:
    import dataclasses

    names = {f.name for f in dataclasses.fields(cls)}
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if isinstance(x, (int, float)) and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def guard_logged_step(guard: DivergenceGuard, step: int, logs: dict, fp16: bool) -> bool:
    """The guard on one logged Trainer step; returns whether the step was one the fp16 loss
    scaler skipped. With ``fp16`` the Trainer's ``GradScaler`` overflows the gradients on purpose
    at first and now and then after (it skips that update and halves its scale), and logs that
    step's grad_norm as inf or NaN: with a finite loss that is not a divergence. (logging_steps
    is 1, so the logged loss is that step's.)"""
    loss = float(logs["loss"])
    grad_norm = logs.get("grad_norm")
    grad_norm = 0.0 if grad_norm is None else float(grad_norm)
    skipped = scaler_skipped(fp16, loss, grad_norm)
    guard.check(step, loss, grad_norm, skipped=skipped)
    return skipped


def make_bridge(session, model, tokenizer, guard: DivergenceGuard, log_keys: tuple[str, ...]):
    """A TrainerCallback: guard each logged step, end the session's epoch at each checkpoint."""
    from transformers import TrainerCallback

    class Bridge(TrainerCallback):
        def __init__(self) -> None:
            self.epoch_logs: list[dict] = []  # logged steps since the last report
            self.steps: list[dict] = []  # every logged step, saved with each checkpoint

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "loss" in logs:
                row = {"step": state.global_step, **{k: v for k, v in logs.items() if isinstance(v, (int, float))}}
                self.steps.append(row)
                self.epoch_logs.append(row)
                session.note(step=state.global_step, train_loss=float(logs["loss"]), epoch=state.epoch or 0)
                if guard_logged_step(guard, state.global_step, logs, fp16=bool(getattr(args, "fp16", False))):
                    row["scaler_skipped"] = 1

        def on_save(self, args, state, control, **kwargs):
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            means = {k.replace("/", "_"): _mean([r.get(k) for r in self.epoch_logs]) for k in ("loss", *log_keys)}
            # every logged step since the last report (loss, grad norm, each reward component): the
            # driver's MLflow tracker logs them at their global step
            kept = ("loss", "grad_norm", "scaler_skipped", *log_keys)
            step_log = [{k: v for k, v in r.items() if k == "step" or k in kept} for r in self.epoch_logs]

            def save(path: Path) -> None:
                shutil.copytree(ckpt, path, dirs_exist_ok=True)
                (path / "guard.json").write_text(json.dumps([guard.first, guard.ema]))
                (path / "log_history.json").write_text(json.dumps(self.steps))

            reported = session.end_epoch(
                int(round(state.epoch or 0)), state.global_step >= state.max_steps, model, tokenizer, save=save,
                extra={**means, "step_log": step_log, "train_loss": means["loss"], "step": state.global_step,
                       "total_steps": state.max_steps,
                       **({"scaler_skipped_steps": guard.skipped} if getattr(args, "fp16", False) else {})})
            if reported is not None:
                self.epoch_logs = []

    return Bridge()


def run_trainer(cfg, session, build: Callable[[Any, Any, str], Any], log_keys: tuple[str, ...],
                warm_start: Callable[[Any, Any], dict] | None = None) -> dict:
    """Attach the adapters, ``build(model, tokenizer, out_dir)`` a TRL trainer, train with the
    bridge (resuming from the session's checkpoint), return the final metrics.

    ``warm_start(model, tokenizer)``: trains the fresh adapters before the trainer is built
    (not on resume: the checkpoint holds its effect) and returns figures that every report of
    the run carries."""
    from trainables.adapters import adapted_model

    model, tokenizer, _ = adapted_model(cfg, session, checkpointing=False)
    guard = DivergenceGuard()
    out_dir = tempfile.mkdtemp(prefix=f"{type(cfg).__name__.lower()}-")
    bridge = make_bridge(session, model, tokenizer, guard, log_keys)
    resume = session.restore()
    if resume and not Path(resume, "trainer_state.json").is_file():
        print(f"checkpoint in {resume} has no trainer_state.json; restarting the trial from scratch", flush=True)
        resume = None
    if resume:
        try:
            guard.first, guard.ema = json.loads(Path(resume, "guard.json").read_text())
            bridge.steps = json.loads(Path(resume, "log_history.json").read_text())
        except (OSError, ValueError):
            pass
        print(f"resuming from {resume}", flush=True)
    try:
        if warm_start is not None and not resume:
            session.common.update(warm_start(model, tokenizer))
        trainer = build(model, tokenizer, out_dir)
        trainer.add_callback(bridge)
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # disable_tqdm adds it: one dict per step on stdout
        trainer.train(resume_from_checkpoint=resume)
        if session.weights_out:
            model.save_pretrained(session.weights_out)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    return session.last
