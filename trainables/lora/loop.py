"""LoRA and hierarchical LoRA (adapters on layers [layer_start, layer_end) only): one loop.

The loop is AdamW with a linear or cosine schedule after ``warmup_ratio`` of the steps, optional
``max_grad_norm`` clipping, gradient accumulation, and the divergence guard: a non-finite or
exploding loss (or gradient norm) ends the trial at once with ``trial_status = diverged``. It reports once per epoch
with a checkpoint (adapter + optimizer + scheduler + step + RNG) so a resumed trial continues
where it stopped, and finishes with the shared evaluation.

Single-worker trials run in-process in the Tune function; ``workers > 1`` starts a Ray Train
``TorchTrainer`` (DDP) per trial that runs the very same loop (measured: ~27 s of start-up per
trial, so only when asked).
"""
from __future__ import annotations

import json
import math
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

from trainables.common import (
    RunSettings, STATUS_COMPLETED, STATUS_DIVERGED, DivergenceGuard, Diverged, Reporter,
    config_from_dict, length_grouped_batches, local_reporter,
    set_threads, tune_reporter,
)
from trainables.hooks import fire
from trainables.objective import DIVERGED_OBJECTIVE
from trainables.tensors import pad_batch

TARGETS = ("qv", "attn", "mlp", "all")


@dataclass
class LoraTrainConfig(RunSettings):
    """One LoRA / hierarchical-LoRA run. Defaults: LoRA paper (Hu et al. 2022) where it gives
    one, otherwise values that trained the testbed stably."""

    # Sampled by the search space only to derive a field: clip -> max_grad_norm None,
    # layer_span -> layer_end (Optuna's multivariate TPE needs fixed ranges).
    SEARCH_ONLY: ClassVar[tuple[str, ...]] = ("clip", "layer_span")

    model: str = "testbed"
    dataset: str | None = None  # training migrations (our JSONL or ReCode); None = data/
    hierarchical: bool = False
    layer_start: int = 0  # hierarchical only: adapters on layers [layer_start, layer_end)
    layer_end: int | None = None  # None = the model's last layer + 1
    r: int = 8  # LoRA rank; the paper found r=4..8 enough for GPT-3 adaptation
    alpha: float = 16.0  # scale alpha/r; alpha = 2r is the common default
    dropout: float = 0.05
    target: str = "qv"  # qv (the paper's choice), attn, mlp or all projections
    lr: float = 1.0e-3
    max_grad_norm: float | None = 1.0  # None = no clipping (the seed's failure mode)
    warmup_ratio: float = 0.06
    schedule: str = "linear"  # linear | cosine
    weight_decay: float = 0.0
    epochs: int = 4
    # Per epoch, each training pair is also seen this many times with its local variables
    # renamed at random (fresh names every epoch). 3 train contexts per migration are easy to
    # memorise as strings; renamed copies make the update a pattern, which is what transfers
    # to the held-out probe contexts (generalization).
    augment: int = 0
    # Weight of a KL term that keeps the adapted model's next-token distributions on the
    # *prompt* tokens of the training pairs (ordinary, unchanged code) equal to the base
    # model's (adapters disabled): a no-forgetting regulariser that needs no extra data.
    kl_weight: float = 0.0
    # Rows of unrelated code (trainables/lora/anchors.py: CPython standard-library windows) added to
    # every batch, with no LM loss: only the KL term sees them, so the update must leave plain
    # code alone (the prompts of the training pairs are all library code around a migration).
    # On the testbed, 4 rows moved a hand-picked hier-LoRA config from locality 0.94 to 0.97-0.99.
    # Needs kl_weight > 0; each row costs ~1/8 of a batch-8 step.
    anchors: int = 0
    batch_size: int = 16
    grad_accum: int = 1  # optimizer step every grad_accum micro-batches

    def __post_init__(self) -> None:
        check_adapter_fields(self)
        if self.augment < 0:
            raise ValueError(f"augment must be >= 0, got {self.augment}")
        if self.anchors < 0:
            raise ValueError(f"anchors must be >= 0, got {self.anchors}")
        if not self.kl_weight >= 0:
            raise ValueError(f"kl_weight must be >= 0, got {self.kl_weight}")
        if self.r < 1 or self.epochs < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("r, epochs, batch_size and grad_accum must be >= 1")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def layer_range(self, n_layers: int) -> tuple[int, int]:
        return adapter_layer_range(self, n_layers)


def check_adapter_fields(cfg) -> None:
    """Checks shared by every config that trains (hierarchical) LoRA adapters with AdamW
    (LoRA here, DPO, GRPO): lr, clipping, warmup, target modules, schedule."""
    if not cfg.lr > 0:
        raise ValueError(f"lr must be > 0, got {cfg.lr}")
    if cfg.max_grad_norm is not None and not cfg.max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be > 0 or None (off), got {cfg.max_grad_norm}")
    if not 0 <= cfg.warmup_ratio < 1:
        raise ValueError(f"warmup_ratio must be in [0, 1), got {cfg.warmup_ratio}")
    if cfg.target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {cfg.target!r}")
    if cfg.schedule not in ("linear", "cosine"):
        raise ValueError(f"schedule must be linear or cosine, got {cfg.schedule!r}")
    from trainables.models import check_dtype

    check_dtype(cfg.dtype)


def adapter_layer_range(cfg, n_layers: int) -> tuple[int, int]:
    """[start, end) of the adapted layers, checked against the model; a config that is not
    hierarchical covers every layer."""
    if not cfg.hierarchical:
        return 0, n_layers
    end = n_layers if cfg.layer_end is None else cfg.layer_end
    if not 0 <= cfg.layer_start < end <= n_layers:
        raise ValueError(
            f"layer range [{cfg.layer_start}, {end}) is outside the model's {n_layers} layers: "
            f"use 0 <= layer_start < layer_end <= {n_layers}"
        )
    return cfg.layer_start, end


def attach_lora(model, cfg: LoraTrainConfig):
    """Wrap ``model`` with PEFT LoRA on the configured projections and layer range."""
    from peft import LoraConfig, get_peft_model

    from trainables.models import arch_facts, num_layers

    facts = arch_facts(model.config)
    start, end = cfg.layer_range(num_layers(model))
    modules = {
        "qv": list(facts.qv),
        "attn": list(facts.attn),
        "mlp": list(facts.mlp),
        "all": list(dict.fromkeys(facts.attn + facts.mlp)),
    }[cfg.target]
    # GPT-2 stores its projections as Conv1D (weight transposed): PEFT must be told
    conv1d = any(type(mod).__name__ == "Conv1D" for mod in model.modules())
    lcfg = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        fan_in_fan_out=conv1d,
        target_modules=modules,
        layers_to_transform=list(range(start, end)),
        layers_pattern=facts.layers.rsplit(".", 1)[-1],
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lcfg)


def training_examples(tokenizer, dataset: str | None, max_length: int = 128, augment: int = 0,
                      rng: random.Random | None = None) -> list[tuple[list[int], int]]:
    """(ids, n_prompt) for each training pair's prompt + new code (loss on the new code only),
    plus ``augment`` variable-renamed copies of each (drawn from ``rng``)."""
    from trainables.data import load_training_pairs
    from trainables.testbed import encode_pairs, rename_variables

    pairs = [(p.prompt, p.new) for p in load_training_pairs(dataset)]
    if augment:
        rng = rng or random.Random(0)
        pairs += [rename_variables(prompt, new, rng) for prompt, new in pairs for _ in range(augment)]
    return encode_pairs(tokenizer, pairs, max_length, end="statement")


def anchor_indices(pool_size: int, n: int, batch_no: int) -> list[int]:
    """Which pool rows are the ``n`` anchor rows of micro-batch ``batch_no``: a function of the
    step, so a resumed run draws the same ones."""
    start = (batch_no * n) % pool_size
    return [(start + k) % pool_size for k in range(n)]


def anchor_rows(pool: list[list[int]], indices: list[int], width: int) -> list[tuple[list[int], int]]:
    """Pool rows ``indices`` (:func:`anchor_indices`) cut to ``width`` (the batch's longest
    example: no extra padding), all prompt (no LM loss; the KL covers them)."""
    return [(r, len(r)) for r in (pool[i][:width] for i in indices)]


def supervised_warmup(model, tokenizer, dataset: str | None, epochs: int, lr: float, *, batch_size: int = 8,
                      max_grad_norm: float = 1.0, seed: int = 0) -> list[float]:
    """Supervised epochs on the training pairs (prompt -> new code) for the adapters already
    attached to ``model``: the warm start of an RL run (SFT, then RL), so that the policy's
    samples hold the new API often enough for a group-relative advantage to exist. Returns the
    mean loss of each epoch; raises ``Diverged`` like every training loop here."""
    import torch

    if epochs <= 0:
        return []
    examples = training_examples(tokenizer, dataset)
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    rng, guard, step, means = random.Random(seed), DivergenceGuard(), 0, []
    model.train()
    for _ in range(epochs):
        order = list(range(len(examples)))
        rng.shuffle(order)
        losses = []
        for b in range(0, len(order), batch_size):
            ids, mask, labels = (t.to(device) for t in pad_batch([examples[i] for i in order[b : b + batch_size]],
                                                              tokenizer.pad_token_id))
            opt.zero_grad(set_to_none=True)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm).item()
            guard.check(step, loss.item(), grad_norm)
            opt.step()
            step += 1
            losses.append(loss.item())
        means.append(sum(losses) / len(losses))
    return means


def prompt_kl(model, ids, mask, labels, logits, base: "BasePass | None" = None, base_logits=None):
    """Mean KL(base || adapted) of the next-token distributions at the positions that predict a
    prompt token (labels -100, not padding); the base is the same PEFT model with its adapters
    disabled, so no second copy of the weights is held. ``base``: a :class:`BasePass` on
    ``model`` that reuses the adapted forward's frozen lower layers (and skips PEFT's
    whole-model adapter toggle); without one, one full forward under ``disable_adapter``.
    ``base_logits``: the base model's logits, already computed (``trainables.lora.frozen``)."""
    import torch

    if base_logits is None:
        with torch.no_grad():
            if base is not None:
                base_logits = base.logits(ids, mask)
            else:
                with model.disable_adapter():
                    base_logits = model(input_ids=ids, attention_mask=mask).logits
    base_logits = base_logits[:, :-1].float()
    where = ((labels[:, 1:] == -100) & (mask[:, 1:] == 1)).float()
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    logq = torch.log_softmax(base_logits, -1)
    kl = (logq.exp() * (logq - logp)).sum(-1)
    return (kl * where).sum() / where.sum().clamp(min=1.0)


class BasePass:
    """The base model's logits (adapters off) for the batch the adapted model has just run.

    Hierarchical LoRA leaves the layers below ``layer_start`` untouched, so the adapted forward
    has already computed the base model's input to that layer. A forward pre-hook keeps that
    hidden state and the layer's keyword arguments (causal mask, rotary embeddings); the base
    pass runs only layers ``[layer_start, L)``, the final norm and the head on it: half the
    KL's forward on the default hier-LoRA range. The adapters are switched off per LoRA layer
    (PEFT's ``disable_adapter`` walks the whole model: ~7 ms a call on the testbed).

    Falls back to one full forward (adapters off) for architectures outside
    ``models.SHARED_TRUNK_TYPES``, for ``layer_start`` 0, and whenever the kept state does not belong
    to the batch asked for (a different shape)."""

    def __init__(self, model, layer_start: int):
        from trainables.tensors import adapter_layers
        from trainables.models import SHARED_TRUNK_TYPES, arch_facts

        self.model = model
        self.tuner_layers = adapter_layers(model)
        inner = model.get_base_model()
        self.layers = self.decoder = self.head = None
        self._kept: tuple | None = None
        self._hook = None
        if layer_start > 0 and inner.config.model_type in SHARED_TRUNK_TYPES:
            self.layers = inner.get_submodule(arch_facts(inner.config).layers)
            self.decoder = inner.get_submodule(arch_facts(inner.config).layers.rsplit(".", 1)[0])
            self.head = inner.get_output_embeddings()
            self.start = layer_start
            self._hook = self.layers[layer_start].register_forward_pre_hook(self._keeper(), with_kwargs=True)

    def _keeper(self):
        # A closure, not a bound method: deepcopy (evaluation's merged copy) shares functions
        # instead of copying this object. Only training forwards (grad on) are kept.
        import torch

        def keep(module, args, kwargs):
            if not torch.is_grad_enabled():
                return
            hidden = args[0] if args else kwargs["hidden_states"]
            # the KV cache (when the forward built one) must not be written twice
            drop = ("hidden_states", "cache", "past_key_values", "past_key_value", "use_cache")
            self._kept = (hidden.detach(), {k: v for k, v in kwargs.items() if k not in drop})

        return keep

    def logits(self, ids, mask):
        import torch

        from trainables.tensors import adapters_off

        kept, self._kept = self._kept, None
        with torch.no_grad(), adapters_off(self.tuner_layers):
            if self._hook is None or kept is None or tuple(kept[0].shape[:2]) != tuple(ids.shape):
                return self.model(input_ids=ids, attention_mask=mask).logits
            hidden, kwargs = kept
            for layer in self.layers[self.start:]:
                out = layer(hidden, **kwargs)
                hidden = out[0] if isinstance(out, tuple) else out
            return self.head(self.decoder.norm(hidden))


def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def standard_lora_parameters(model, cfg) -> int:
    """What standard LoRA (every layer, the same rank and projections) would train, for
    ``model`` already wrapped by :func:`attach_lora` with ``cfg``'s layer range: the adapters
    of the adapted layers, scaled to all of them. Exact for the supported families, whose
    decoder layers all hold the same projections with the same shapes."""
    from trainables.models import num_layers

    n_layers = num_layers(model)
    start, end = cfg.layer_range(n_layers)
    return trainable_parameters(model) * n_layers // (end - start)


def _save(path: Path, model, opt, sched, step: int, epoch: int, rng: random.Random, guard: DivergenceGuard) -> None:
    import torch

    path.mkdir(parents=True, exist_ok=True)
    adapter = {k: v.detach().cpu() for k, v in model.named_parameters() if v.requires_grad}
    torch.save(adapter, path / "adapter.pt")
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict(), "step": step, "epoch": epoch,
                "rng": rng.getstate(), "torch_rng": torch.get_rng_state(),
                "guard": (guard.first, guard.ema)}, path / "state.pt")


def _load(path: Path, model, opt, sched, rng: random.Random, guard: DivergenceGuard) -> tuple[int, int] | None:
    """Restore a checkpoint; None when it is missing, half-written or corrupt (start afresh)."""
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
        return int(state["step"]), int(state["epoch"])
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint means: start from scratch
        print(f"checkpoint in {path} is unusable ({type(e).__name__}: {e}); restarting the trial from scratch",
              flush=True)
        return None


def train_loop(cfg: LoraTrainConfig, reporter: Reporter, *, eval_data=None, adapter_out: str | None = None,
               eval_epochs: list[int] | None = None, frozen_cache: str | None = None) -> dict:
    """Train, evaluate and report (with a checkpoint) each epoch; returns the final metrics.

    ``eval_data``: the ``evaluation.EvalData`` to score with; data/'s splits when None.
    ``eval_epochs``: the epochs (1-based) to evaluate and report after besides the last, None =
    every epoch. The sweep engine passes ASHA's rungs: a report elsewhere decides nothing and its
    evaluation cost as much as a third of a testbed epoch. A resumed trial restarts from the
    last report.
    ``frozen_cache``: a folder for the frozen base model's states on the example sets, shared
    by the trials of a sweep (``trainables.lora.frozen``); None keeps them in memory.
    """
    import torch
    from transformers import get_scheduler

    from trainables.evaluation import default_eval_data
    from trainables.models import load_model, num_layers

    set_threads(cfg.threads)
    fire("trial_start")
    torch.manual_seed(cfg.seed)
    t_start = time.time()  # also reported as `started_at`: tests check which trials overlapped
    device = "cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu"
    model, tokenizer = load_model(cfg.model, device=device, dtype=cfg.dtype,
                                  gradient_checkpointing=cfg.gradient_checkpointing)
    layer_start, _ = cfg.layer_range(num_layers(model))  # fail fast on a bad range
    model = attach_lora(model, cfg)
    n_trainable = trainable_parameters(model)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    train_model = torch.nn.parallel.DistributedDataParallel(model) if distributed else model

    rank, world = ((torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed else (0, 1))

    def epoch_examples(epoch: int) -> list:
        """This epoch's examples (fresh renamings per epoch, the same on every DDP rank);
        each rank takes every world-th one."""
        aug_rng = random.Random(f"{cfg.seed}-{epoch}")
        return training_examples(tokenizer, cfg.dataset, augment=cfg.augment, rng=aug_rng)[rank::world]

    examples = epoch_examples(0)
    steps_per_epoch = math.ceil(math.ceil(len(examples) / cfg.batch_size) / cfg.grad_accum)
    total_steps = steps_per_epoch * cfg.epochs
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    sched = get_scheduler(cfg.schedule, opt, num_warmup_steps=int(cfg.warmup_ratio * total_steps),
                          num_training_steps=total_steps)
    rng = random.Random(cfg.seed)
    guard = DivergenceGuard()
    step, epoch0 = 0, 0
    restored = reporter.restore()
    if restored:
        got = _load(Path(restored), model, opt, sched, rng, guard)
        if got:
            step, epoch0 = got
            print(f"resumed from checkpoint at step {step}, epoch {epoch0}", flush=True)

    if eval_data is None:
        eval_data = default_eval_data(cfg.model, device, cfg.dtype)

    from trainables.lora.frozen import FrozenStates
    from trainables.models import resolve

    frozen = FrozenStates.make(model, layer_start, bool(cfg.kl_weight), frozen_cache, resolve(cfg.model), examples)

    def run_eval(final: bool) -> tuple[dict, list]:
        """The validation split (what the search reads); at the final report the test split too."""
        start_states = None if frozen is None else (lambda seqs: frozen.sequence_states(seqs, tokenizer.pad_token_id))
        metrics, preds = eval_data.validation.evaluate(model, tokenizer, quick=not final, start_states=start_states)
        if final:
            metrics.update(eval_data.test_metrics(model, tokenizer, start_states))
        return metrics, preds

    base_pass = BasePass(model, layer_start) if cfg.kl_weight and frozen is None else None
    anchor_pool = []
    if cfg.anchors and cfg.kl_weight:
        from trainables.lora.anchors import anchor_ids

        anchor_pool = anchor_ids(tokenizer, 128, cfg.seed)
    common = {"trainable_params": n_trainable, "standard_lora_params": standard_lora_parameters(model, cfg),
              "total_steps": total_steps, "started_at": t_start}
    metrics: dict = {}
    last_loss = float("nan")
    train_tokens, train_seconds = 0, 0.0  # benchmarks/throughput.py reads train_tokens_per_s
    try:
        for epoch in range(epoch0, cfg.epochs):
            model.train()
            if cfg.augment and epoch:
                examples = epoch_examples(epoch)
            t_epoch = time.perf_counter()
            if frozen is not None:
                frozen.prepare(examples, tokenizer.pad_token_id)
            batches = length_grouped_batches([len(ids) for ids, _ in examples], cfg.batch_size, rng)
            losses = []
            for b0 in range(0, len(batches), cfg.grad_accum):
                group = batches[b0 : b0 + cfg.grad_accum]
                opt.zero_grad(set_to_none=True)
                loss_sum = 0.0
                for micro, idx in enumerate(group):
                    rows = [examples[i] for i in idx]
                    width = max(len(ids) for ids, _ in rows)
                    batch_no = (step * cfg.grad_accum + micro) * world + rank
                    pool_rows = anchor_indices(len(anchor_pool), cfg.anchors, batch_no) if anchor_pool else []
                    rows += anchor_rows(anchor_pool, pool_rows, width)
                    ids, mask, labels = (t.to(device) for t in pad_batch(rows, tokenizer.pad_token_id))
                    base_logits = None
                    if frozen is not None:
                        extra = frozen.anchor_batch(anchor_pool, pool_rows, width, tokenizer.pad_token_id) if pool_rows else None
                        hk, final = frozen.batch(idx, width, extra)
                        out = frozen.forward(train_model, ids, mask, labels, hk)
                        if final is not None:
                            base_logits = frozen.base_logits(final)
                    else:
                        out = train_model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
                    loss = out.loss
                    if cfg.kl_weight:
                        loss = loss + cfg.kl_weight * prompt_kl(model, ids, mask, labels, out.logits, base_pass,
                                                                base_logits)
                    loss = loss / len(group)
                    loss.backward()
                    loss_sum += loss.item()
                    train_tokens += int(mask.sum())
                params = [p for p in model.parameters() if p.requires_grad]
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf")).item()
                if distributed:
                    # every rank must judge the same numbers: the gradients are already averaged
                    # (DDP), the loss is each rank's own; a rank that stopped alone would leave the
                    # others waiting in the next all-reduce
                    mean = torch.tensor([loss_sum], dtype=torch.float64, device=device)
                    torch.distributed.all_reduce(mean)
                    loss_sum = float(mean.item()) / world
                guard.check(step, loss_sum, grad_norm)
                opt.step()
                sched.step()
                step += 1
                losses.append(loss_sum)
            train_seconds += time.perf_counter() - t_epoch
            last_loss = sum(losses) / max(1, len(losses))
            print(f"epoch {epoch + 1}/{cfg.epochs}: loss {last_loss:.4f}, {len(losses)} steps in "
                  f"{time.perf_counter() - t_epoch:.1f}s", flush=True)
            final = epoch == cfg.epochs - 1
            if not final and eval_epochs is not None and epoch + 1 not in eval_epochs:
                continue
            # DDP: rank 0 evaluates (Ray Train reports rank 0's metrics); the others wait at the report
            metrics, preds = run_eval(final) if reporter.is_chief else ({}, [])
            metrics.update(common, train_loss=last_loss, epoch=epoch + 1, step=step, lr_now=sched.get_last_lr()[0],
                           trial_seconds=time.time() - t_start, final=final,
                           train_tokens_per_s=train_tokens / max(train_seconds, 1e-9),
                           trial_status=STATUS_COMPLETED if final else "running")
            if device == "cuda":  # benchmarks/gpu_check.sh reads it
                metrics["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
            ckpt = tempfile.mkdtemp(prefix="ckpt-")
            try:
                _save(Path(ckpt), model, opt, sched, step, epoch + 1, rng, guard)
                if final:
                    Path(ckpt, "predictions.json").write_text(json.dumps([asdict(p) for p in preds[:200]]))
                    Path(ckpt, "config.json").write_text(json.dumps(asdict(cfg), default=str))
                    if adapter_out:
                        model.save_pretrained(adapter_out)
                reporter.report(metrics, ckpt)
            finally:
                shutil.rmtree(ckpt, ignore_errors=True)
            if not final:
                fire("epoch_end", epoch=epoch + 1)
    except Diverged as e:
        print(f"diverged: {e}", flush=True)
        metrics = {**common, "objective": DIVERGED_OBJECTIVE, "efficacy": 0.0, "generalization": 0.0,
                   "locality": 0.0, "train_loss": float("nan") if math.isnan(last_loss) else last_loss,
                   "step": step, "epoch": step / max(1, steps_per_epoch), "trial_seconds": time.time() - t_start, "final": True,
                   "trial_status": STATUS_DIVERGED, "diverged_reason": str(e)}
        reporter.report(metrics, None)
    return metrics


def _ddp_worker(config: dict) -> None:
    from trainables.common import train_reporter

    cfg = config_from_dict(LoraTrainConfig, config)
    train_loop(cfg, train_reporter(), eval_epochs=config.get("_eval_epochs"))


def trainable(config: dict) -> None:
    """Ray Tune function trainable for `lora` and `hier_lora`."""
    cfg = config_from_dict(LoraTrainConfig, config)
    if config.get("_state_cache_gb") is not None:
        import os

        from trainables.lora.frozen import CACHE_LIMIT_ENV

        os.environ[CACHE_LIMIT_ENV] = str(config["_state_cache_gb"])
    if cfg.workers <= 1:
        train_loop(cfg, tune_reporter(), eval_epochs=config.get("_eval_epochs"),
                   frozen_cache=config.get("_frozen_cache"))
        return
    from trainables.distributed import run_ddp_trial

    run_ddp_trial(_ddp_worker, config, cfg.workers, cfg.use_gpu, cfg.threads,
                  float(config.get("_gpus_per_worker", 1.0 if cfg.use_gpu else 0.0)))


def run_once(config: dict, adapter_out: str | None = None) -> dict:
    """Plain, Ray-free run (export -> --config, benchmarks); returns final metrics."""
    cfg = config_from_dict(LoraTrainConfig, config)
    history: list[dict] = []
    return train_loop(cfg, local_reporter(history), adapter_out=adapter_out)
