"""LoRA and hierarchical LoRA (adapters on layers [layer_start, layer_end) only): the fit step.

AdamW with a linear or cosine schedule after ``warmup_ratio`` of the steps, optional
``max_grad_norm`` clipping, gradient accumulation, the divergence guard on every step, and a
checkpoint (adapter + optimizer + scheduler + loss scaler + step + RNG) wherever the trial
reports, so a resumed trial continues where it stopped.

Precision: the base model is loaded in the trial's dtype and PEFT keeps the adapters in fp32.
fp16 adds what its narrow range needs: the forward under ``torch.autocast`` (fp16 matmuls, the
reductions autocast keeps in fp32) and a ``torch.amp.GradScaler`` (the loss scaled up before the
backward, the gradients unscaled before clipping). A step whose gradients overflow at the
current scale is skipped by the scaler, which lowers its scale: the guard counts it, it is not a
divergence, and the schedule does not advance. fp32 and bf16 (fp32's range) run neither.

Everything around it (evaluation at the rungs and at the end, reports, divergence) is the
lifecycle's (``trainables/trial.py``).

With ``--workers-per-trial > 1`` the same step runs in every worker of a Ray Train
``TorchTrainer`` (DDP), each rank taking every world-th example.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

from trainables.adapters import AdapterConfig, doc, prompt_kl, training_examples
from trainables.common import DivergenceGuard, MixedPrecision, length_grouped_batches
from trainables.tensors import pad_batch


@dataclass
class LoraTrainConfig(AdapterConfig):
    """One LoRA / hierarchical-LoRA run: the adapter settings plus what this loop adds."""

    weight_decay: float = doc(0.0, "AdamW weight decay")
    augment: int = doc(0, "copies of each training pair per epoch with its local variables renamed at random "
                          "(fresh names every epoch): the update becomes a pattern that carries to held-out code "
                          "rather than memorised strings")
    kl_weight: float = doc(0.0, "weight of KL(base || adapted) on the prompt tokens of the training pairs: a "
                                "no-forgetting regulariser that needs no extra data")
    anchors: int = doc(0, "rows of unrelated standard-library code per batch that only the KL sees "
                          "(trainables/lora/anchors.py), so the update must leave plain code alone; needs kl_weight")
    batch_size: int = doc(16, "training pairs per micro-batch")
    grad_accum: int = doc(1, "micro-batches per optimizer step")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.augment < 0:
            raise ValueError(f"augment must be >= 0, got {self.augment}")
        if self.anchors < 0:
            raise ValueError(f"anchors must be >= 0, got {self.anchors}")
        if not self.kl_weight >= 0:
            raise ValueError(f"kl_weight must be >= 0, got {self.kl_weight}")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("batch_size and grad_accum must be >= 1")


def anchor_indices(pool_size: int, n: int, batch_no: int) -> list[int]:
    """Which pool rows are the ``n`` anchor rows of micro-batch ``batch_no``: a function of the
    step, so a resumed run draws the same ones."""
    start = (batch_no * n) % pool_size
    return [(start + k) % pool_size for k in range(n)]


def anchor_rows(pool: list[list[int]], indices: list[int], width: int) -> list[tuple[list[int], int]]:
    """Pool rows ``indices`` (:func:`anchor_indices`) cut to ``width`` (the batch's longest
    example: no extra padding), all prompt (no LM loss; the KL covers them)."""
    return [(r, len(r)) for r in (pool[i][:width] for i in indices)]


def _save(path: Path, model, opt, sched, step: int, epoch: int, rng: random.Random, guard: DivergenceGuard,
          scaler=None) -> None:
    import torch

    path.mkdir(parents=True, exist_ok=True)
    adapter = {k: v.detach().cpu() for k, v in model.named_parameters() if v.requires_grad}
    torch.save(adapter, path / "adapter.pt")
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict(), "step": step, "epoch": epoch,
                "rng": rng.getstate(), "torch_rng": torch.get_rng_state(),
                "guard": (guard.first, guard.ema),
                "scaler": None if scaler is None else scaler.state_dict()}, path / "state.pt")


def _load(path: Path, model, opt, sched, rng: random.Random, guard: DivergenceGuard,
          scaler=None) -> tuple[int, int] | None:
    """Restore a checkpoint; None when it is missing, half-written or corrupt (start afresh).
    ``scaler``: the fp16 loss scaler, given its saved scale where the checkpoint has one."""
    import torch

    try:
        adapter = torch.load(path / "adapter.pt", weights_only=True)
        state = torch.load(path / "state.pt", weights_only=False)
        params = dict(model.named_parameters())
        if set(adapter) != {k for k, v in params.items() if v.requires_grad}:
            raise ValueError("adapter keys do not match the model")
        with torch.no_grad():
            for k, v in adapter.items():
                params[k].copy_(v)
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        rng.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        guard.first, guard.ema = state["guard"]
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        return int(state["step"]), int(state["epoch"])
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint means: start from scratch
        print(f"checkpoint in {path} is unusable ({type(e).__name__}: {e}); restarting the trial from scratch",
              flush=True)
        return None




class LoraRun:
    """One trial's training state: the adapted model, its data, optimizer, schedule, guard and
    the frozen base model's states, restored from the session's checkpoint where there is one."""

    def __init__(self, cfg: LoraTrainConfig, session):
        import torch
        from transformers import get_scheduler

        from trainables.adapters import BasePass, adapted_model
        from trainables.lora.frozen import FrozenStates
        from trainables.models import resolve

        self.cfg, self.session = cfg, session
        self.model, self.tokenizer, (self.layer_start, _) = adapted_model(cfg, session)
        self.distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.rank, self.world = ((torch.distributed.get_rank(), torch.distributed.get_world_size())
                                 if self.distributed else (0, 1))
        if self.distributed:
            index = torch.device(session.device).index
            self.train_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=None if index is None else [index])
        else:
            self.train_model = self.model
        self.examples = self.epoch_examples(0)
        self.steps_per_epoch = math.ceil(math.ceil(len(self.examples) / cfg.batch_size) / cfg.grad_accum)
        total = self.steps_per_epoch * cfg.epochs
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.amp = MixedPrecision(self.params, session.device, session.precision)
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sched = get_scheduler(cfg.schedule, self.opt, num_warmup_steps=int(cfg.warmup_ratio * total),
                                   num_training_steps=total)
        self.rng, self.guard = random.Random(cfg.seed), DivergenceGuard()
        self.step = self.epoch0 = 0
        restored = session.restore()
        got = (_load(Path(restored), self.model, self.opt, self.sched, self.rng, self.guard, self.amp.scaler)
               if restored else None)
        if got:
            self.step, self.epoch0 = got
            print(f"resumed from checkpoint at step {self.step}, epoch {self.epoch0}", flush=True)
        ctx = session.ctx
        self.frozen = FrozenStates.make(self.model, self.layer_start, bool(cfg.kl_weight), ctx.frozen_cache,
                                        resolve(cfg.model), self.examples, limit_gb=ctx.state_cache_gb)
        self.base_pass = BasePass(self.model, self.layer_start) if cfg.kl_weight and self.frozen is None else None
        self.anchor_pool = []
        if cfg.anchors and cfg.kl_weight:
            from trainables.lora.anchors import anchor_ids

            self.anchor_pool = anchor_ids(self.tokenizer, 128, cfg.seed)
        session.common["total_steps"] = total
        self.train_tokens, self.train_seconds = 0, 0.0  # benchmarks/throughput.py reads train_tokens_per_s

    def epoch_examples(self, epoch: int) -> list:
        """This epoch's examples (fresh renamings per epoch, the same on every DDP rank); each
        rank takes every world-th one."""
        aug_rng = random.Random(f"{self.cfg.seed}-{epoch}")
        examples = training_examples(self.tokenizer, self.cfg.dataset, augment=self.cfg.augment, rng=aug_rng)
        return examples[self.rank::self.world]

    def start_states(self):
        """How the evaluation reuses the frozen lower layers' states (None: it runs them)."""
        if self.frozen is None:
            return None
        return lambda seqs: self.frozen.sequence_states(seqs, self.tokenizer.pad_token_id)

    def train_epoch(self, epoch: int) -> float:
        """One epoch of optimizer steps; returns its mean loss."""
        cfg = self.cfg
        self.model.train()
        if cfg.augment and epoch:
            self.examples = self.epoch_examples(epoch)
        t_epoch = time.perf_counter()
        if self.frozen is not None:
            self.frozen.prepare(self.examples, self.tokenizer.pad_token_id)
        batches = length_grouped_batches([len(ids) for ids, _ in self.examples], cfg.batch_size, self.rng)
        losses = []
        for b0 in range(0, len(batches), cfg.grad_accum):
            losses.append(self.optimizer_step(batches[b0 : b0 + cfg.grad_accum]))
        self.train_seconds += time.perf_counter() - t_epoch
        mean = sum(losses) / max(1, len(losses))
        print(f"epoch {epoch + 1}/{cfg.epochs}: loss {mean:.4f}, {len(losses)} steps in "
              f"{time.perf_counter() - t_epoch:.1f}s", flush=True)
        return mean

    def optimizer_step(self, group: list[list[int]]) -> float:
        """Forward and backward over the micro-batches of ``group``, the guard, one step."""
        import torch

        cfg = self.cfg
        self.opt.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for micro, idx in enumerate(group):
            with self.amp.autocast():
                loss = self.micro_batch_loss(idx, (self.step * cfg.grad_accum + micro) * self.world + self.rank)
            loss = loss / len(group)
            self.amp.backward(loss)
            loss_sum += loss.item()
        grad_norm = self.amp.clip(self.opt, self.params, cfg.max_grad_norm)
        if self.distributed:
            # every rank must judge the same numbers: the gradients are already averaged (DDP),
            # the loss is each rank's own; a rank that stopped alone would leave the others
            # waiting in the next all-reduce
            mean = torch.tensor([loss_sum], dtype=torch.float64, device=self.session.device)
            torch.distributed.all_reduce(mean)
            loss_sum = float(mean.item()) / self.world
        self.session.note(step=self.step, train_loss=loss_sum, epoch=self.step / max(1, self.steps_per_epoch))
        # fp16: non-finite gradients with a finite loss are the scaler's to handle (it skips the
        # update and lowers its scale), not a divergence; a non-finite loss still is
        skipped = self.amp.skipped(loss_sum, grad_norm)
        self.guard.check(self.step, loss_sum, grad_norm, skipped=skipped)
        self.amp.step(self.opt)
        if not skipped:  # as the Trainer does: a skipped update does not advance the schedule
            self.sched.step()
        self.step += 1
        return loss_sum

    def micro_batch_loss(self, idx: list[int], batch_no: int):
        """The LM loss on the new code of examples ``idx`` plus the weighted prompt KL (over
        their prompts and this batch's anchor rows)."""
        cfg, pad = self.cfg, self.tokenizer.pad_token_id
        rows = [self.examples[i] for i in idx]
        width = max(len(ids) for ids, _ in rows)
        pool_rows = anchor_indices(len(self.anchor_pool), cfg.anchors, batch_no) if self.anchor_pool else []
        rows += anchor_rows(self.anchor_pool, pool_rows, width)
        ids, mask, labels = (t.to(self.session.device) for t in pad_batch(rows, pad))
        self.train_tokens += int(mask.sum())
        base_logits = None
        if self.frozen is not None:
            extra = self.frozen.anchor_batch(self.anchor_pool, pool_rows, width, pad) if pool_rows else None
            hk, final = self.frozen.batch(idx, width, extra)
            out = self.frozen.forward(self.train_model, ids, mask, labels, hk)
            if final is not None:
                base_logits = self.frozen.base_logits(final)
        else:
            out = self.train_model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
        if not cfg.kl_weight:
            return out.loss
        return out.loss + cfg.kl_weight * prompt_kl(self.model, ids, mask, labels, out.logits, self.base_pass,
                                                    base_logits)

    def save(self, epoch: int):
        """A checkpoint writer for the session (this state after ``epoch`` epochs)."""
        return lambda path: _save(path, self.model, self.opt, self.sched, self.step, epoch, self.rng, self.guard,
                                  self.amp.scaler)

    def precision_figures(self) -> dict:
        """What a report says about fp16 loss scaling (nothing in fp32 / bf16)."""
        if self.amp.scaler is None:
            return {}
        return {"scaler_skipped_steps": self.guard.skipped, "loss_scale": float(self.amp.scaler.get_scale())}


def fit(cfg: LoraTrainConfig, session) -> dict:
    """Train ``cfg``'s adapters epoch by epoch, handing each epoch's end to the session."""
    run = LoraRun(cfg, session)
    for epoch in range(run.epoch0, cfg.epochs):
        loss = run.train_epoch(epoch)
        session.end_epoch(epoch + 1, epoch == cfg.epochs - 1, run.model, run.tokenizer, save=run.save(epoch + 1),
                          start_states=run.start_states(),
                          extra={"train_loss": loss, "step": run.step, "lr_now": run.sched.get_last_lr()[0],
                                 "train_tokens_per_s": run.train_tokens / max(run.train_seconds, 1e-9),
                                 **run.precision_figures()})
    if session.weights_out and session.reporter.is_chief:
        run.model.save_pretrained(session.weights_out)
    return session.last
