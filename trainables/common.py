"""Leaf utilities every trainable shares: reporting, checkpoints, the divergence guard.

A trainable's loop talks to a :class:`Reporter`, never to Ray directly, so the same loop runs
inside a Tune function (in-process, one worker), inside a Ray Train worker (DDP, several
workers) and in a plain Python loop (``--config`` re-runs, benchmarks, tests).
"""
from __future__ import annotations

import math
import os
import random
import shutil
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

from trainables.hooks import fire

STATUS_COMPLETED = "completed"
STATUS_PRUNED = "pruned"
STATUS_DIVERGED = "diverged"
STATUS_FAILED = "failed"


class Diverged(Exception):
    """Non-finite loss or gradient norm: the trial stops at once."""


class DivergenceGuard:
    """Stops a trial the moment training has blown up.

    The seed's collapse went loss -> NaN -> 0.0 -> `!!!!` in fp16; in fp32 on the CPU the same
    settings (lr 10, no clipping) keep the loss finite but wreck the model (loss ~6 = uniform
    over the vocabulary, from ~0.5 at the start). So a trial diverges when the loss or the
    gradient norm is non-finite, or when the smoothed loss (EMA, alpha 0.3) exceeds ``ratio`` x
    the first step's loss and that loss + ``margin`` (the margin keeps a tiny starting loss from
    tripping it).

    fp16 loss scaling (``torch.amp.GradScaler``, the Trainer's scaler) overflows the gradients
    on purpose now and then: the scaler skips that step's update and lowers its scale. Such a
    step (``skipped=True``: a non-finite gradient norm, a finite loss) is not a divergence; its
    loss still counts. Only ``max_skipped`` skipped steps in a row (the scale halved that often
    and the gradients still overflow) are."""

    def __init__(self, ratio: float = 3.0, margin: float = 1.0, max_skipped: int = 32):
        self.ratio, self.margin, self.max_skipped = ratio, margin, max_skipped
        self.first: float | None = None
        self.ema: float | None = None
        self.skipped = 0  # steps the loss scaler skipped, in all
        self.skipped_run = 0  # ... in a row, up to the last step

    def check(self, step: int, loss: float, grad_norm: float, skipped: bool = False) -> None:
        """``skipped``: the fp16 loss scaler skips this step's update (its gradients overflowed
        at the current scale), so a non-finite ``grad_norm`` is expected; a non-finite loss
        still diverges."""
        if skipped and math.isfinite(loss):
            self.skipped += 1
            self.skipped_run += 1
            if self.skipped_run > self.max_skipped:
                raise Diverged(f"non-finite gradients at step {step}: the fp16 loss scaler skipped "
                               f"{self.skipped_run} steps in a row (loss={loss}, grad_norm={grad_norm})")
        else:
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                raise Diverged(f"non-finite at step {step}: loss={loss}, grad_norm={grad_norm}")
            self.skipped_run = 0
        if self.first is None:
            self.first = loss
        self.ema = loss if self.ema is None else 0.7 * self.ema + 0.3 * loss
        limit = max(self.ratio * self.first, self.first + self.margin)
        if step >= 2 and self.ema > limit:
            raise Diverged(f"loss exploded at step {step}: smoothed {self.ema:.3g} > {limit:.3g} "
                           f"(first step {self.first:.3g})")


def scaler_skipped(fp16: bool, loss: float, grad_norm: float | None) -> bool:
    """Whether a step under fp16 loss scaling was one the scaler skips: its gradient norm is
    non-finite (the scaler's own test: a non-finite gradient) while its loss is finite."""
    return bool(fp16 and grad_norm is not None and math.isfinite(loss) and not math.isfinite(grad_norm))


class MixedPrecision:
    """What one optimizer step needs for its precision, shared by every supervised loop: in fp16
    the forward under ``torch.autocast`` (fp16 matmuls, fp32 reductions) and a
    ``torch.amp.GradScaler`` (the loss scaled up before the backward, the gradients unscaled
    before clipping, an update with non-finite gradients skipped and the scale lowered); in fp32
    and bf16 (fp32's range) nothing. ``params``: the trained ones, kept in fp32 under fp16 (the
    scaler unscales fp32 gradients only; PEFT's adapters already are)."""

    def __init__(self, params, device, precision: str):
        import torch

        self.fp16 = precision == "fp16"
        self.device_type = torch.device(device).type
        self.autocast_on = self.fp16 and torch.amp.is_autocast_available(self.device_type)
        self.scaler = torch.amp.GradScaler(self.device_type) if self.fp16 else None
        if self.fp16:
            for p in params:
                if p.dtype != torch.float32:
                    p.data = p.data.float()

    def autocast(self):
        import torch

        return torch.autocast(self.device_type, dtype=torch.float16, enabled=self.autocast_on)

    def backward(self, loss) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def clip(self, opt, params, max_norm: float | None) -> float:
        """The true gradients' norm, clipped to ``max_norm`` (None or 0: not clipped)."""
        import torch

        if self.scaler is not None:
            self.scaler.unscale_(opt)  # clip (and judge) the true gradients, not the scaled ones
        return torch.nn.utils.clip_grad_norm_(params, max_norm or float("inf")).item()

    def skipped(self, loss: float, grad_norm: float) -> bool:
        """This step is one the scaler skips (not a divergence: :func:`scaler_skipped`)."""
        return scaler_skipped(self.fp16, loss, grad_norm)

    def step(self, opt) -> None:
        if self.scaler is None:
            opt.step()
        else:
            self.scaler.step(opt)  # skips the update when a gradient is non-finite
            self.scaler.update()


@dataclass
class RunSettings:
    """Where and how a trial runs, the same fields for every method's config; the engine sets
    them from the command line (``--seed``, ``--cpus-per-trial``, ``--workers-per-trial``,
    ``--gpus-per-trial``, ``--dtype``, ``--gradient-checkpointing``)."""

    seed: int = 0
    threads: int = 1  # torch intra-op threads (= the trial's CPUs)
    workers: int = 1  # > 1: DDP through a Ray Train TorchTrainer (the methods that support it)
    use_gpu: bool = False
    # auto: bf16 on a GPU that has it, fp32 on the CPU (trainables.models.resolve_dtype)
    dtype: str = "auto"
    # recompute activations in the backward: less memory, more compute (methods that backprop)
    gradient_checkpointing: bool = False


def trial_status(result: dict | None, errored: bool) -> str:
    """A trial's outcome from its last result: failed, pruned (stopped early), diverged, completed."""
    if errored:
        return STATUS_FAILED
    if not result:
        return STATUS_PRUNED
    if result.get("trial_status") in (STATUS_DIVERGED, STATUS_FAILED):  # failed: out of memory (trial.out_of_memory)
        return result["trial_status"]
    return STATUS_COMPLETED if result.get("final") else STATUS_PRUNED


def config_from_dict(cls, config: dict[str, Any]):
    """Build a method's dataclass from a trial config, ignoring the search spaces' helper
    parameters (``search_spaces.derived.SEARCH_ONLY``: ``clip``, ``layer_span``, whose effect is
    already in a derived field)."""
    from search_spaces.derived import SEARCH_ONLY

    names = {f.name for f in fields(cls)}
    skip = set(SEARCH_ONLY)
    unknown = sorted(k for k in config if k not in names and k not in skip)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown hyperparameter(s) {', '.join(unknown)}")
    return cls(**{k: v for k, v in config.items() if k in names})


def set_threads(n: int) -> None:
    """One intra-op thread per trial CPU: torch's default (all cores) made 2 concurrent trials
    6x slower on 2 cores (a 1.8 M-parameter Llama: ~2,000 tokens/s with 1 thread, ~330 with 2 while
    another process holds a core)."""
    import torch

    torch.set_num_threads(max(1, int(n)))
    os.environ["OMP_NUM_THREADS"] = str(max(1, int(n)))


@dataclass
class Reporter:
    """Where a loop sends metrics and checkpoints, and where it finds one to resume from.

    ``report(metrics, checkpoint_dir)``: ``checkpoint_dir`` (or None) is a folder the callee may
    move or copy; ``restore()``: a folder to resume from, or None.
    """

    report: Callable[[dict, str | None], None]
    restore: Callable[[], str | None]
    is_chief: bool = True

    def __post_init__(self) -> None:
        inner = self.report
        self.report = lambda metrics, ckpt_dir: inner(with_progress(metrics), ckpt_dir)


def with_progress(metrics: dict) -> dict:
    """Every report that has an objective also has ``progress`` (what ASHA ranks by; Tune
    rejects a result without the scheduler's metric): reports that skip the evaluation
    (diverged, out of memory) rank by their objective alone."""
    if "objective" in metrics and "progress" not in metrics:
        return {**metrics, "progress": metrics["objective"]}
    return metrics


def tune_reporter() -> Reporter:
    """Report through ``ray.tune`` from inside a Tune function trainable."""
    from ray import tune

    import ray

    gpu_ids = ",".join(str(g) for g in ray.get_gpu_ids())  # logical ids Ray assigned to this trial
    ctx = ray.get_runtime_context()
    # Where the trial ran: on a cluster the tracker tags each MLflow run with it.
    where = {"gpu_ids": gpu_ids, "node_id": ctx.get_node_id(), "node_ip": ray.util.get_node_ip_address()}

    def report(metrics: dict, ckpt_dir: str | None) -> None:
        fire("report")
        metrics = {**metrics, **where}
        if ckpt_dir is None:
            tune.report(metrics)
        else:
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(ckpt_dir))

    def restore() -> str | None:
        ckpt = tune.get_checkpoint()
        if ckpt is None:
            return None
        return ckpt.to_directory(tempfile.mkdtemp(prefix="restore-"))

    return Reporter(report, restore)


def train_reporter() -> Reporter:
    """Report through ``ray.train`` from inside a Ray Train worker (DDP trials)."""
    import ray.train

    ctx = ray.train.get_context()

    def report(metrics: dict, ckpt_dir: str | None) -> None:
        ckpt = ray.train.Checkpoint.from_directory(ckpt_dir) if ckpt_dir and ctx.get_world_rank() == 0 else None
        ray.train.report(metrics, checkpoint=ckpt)

    def restore() -> str | None:
        ckpt = ray.train.get_checkpoint()
        return None if ckpt is None else ckpt.to_directory(tempfile.mkdtemp(prefix="restore-"))

    return Reporter(report, restore, is_chief=ctx.get_world_rank() == 0)


def local_reporter(history: list[dict] | None = None, keep_checkpoint: str | None = None) -> Reporter:
    """A reporter for plain loops: appends metrics to ``history``; keeps the last checkpoint
    in ``keep_checkpoint`` (a folder) when given."""
    history = history if history is not None else []

    def report(metrics: dict, ckpt_dir: str | None) -> None:
        history.append(dict(metrics))
        if ckpt_dir and keep_checkpoint and Path(ckpt_dir).resolve() != Path(keep_checkpoint).resolve():
            shutil.rmtree(keep_checkpoint, ignore_errors=True)
            shutil.copytree(ckpt_dir, keep_checkpoint)

    def restore() -> str | None:
        return keep_checkpoint if keep_checkpoint and Path(keep_checkpoint, "state.pt").is_file() else None

    return Reporter(report, restore)


def length_grouped_batches(lengths: list[int], batch_size: int, rng: random.Random,
                           group: int = 16) -> list[list[int]]:
    """One epoch's batches (lists of example indices): shuffled, then sorted by length within
    windows of ``group`` batches, cut into batches and the batches shuffled (transformers'
    ``group_by_length``). A batch is padded to its longest example: on the default LoRA training
    set (21-96 tokens, mean 50) random batches of 8 are 43% padding and grouped ones (16) 4%,
    which cut a hier-LoRA step from ~145 to ~105 ms. Same batch count as plain shuffling; the
    testbed's pretraining batches the same way (windows of 8)."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * group
    batches = []
    for s in range(0, len(order), window):
        chunk = sorted(order[s : s + window], key=lengths.__getitem__)
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches
