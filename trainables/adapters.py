"""Adapters, declared once: the settings every method that trains (hierarchical) LoRA adapters
shares (LoRA, DPO, GRPO), attaching them to a layer range, the prompt KL that keeps unrelated
tokens where the base model had them, and the supervised warm start.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from trainables.common import DivergenceGuard, MixedPrecision, RunSettings
from trainables.tensors import pad_batch

TARGETS = ("qv", "attn", "mlp", "all")


def doc(default, help: str):
    """A config field with its meaning (``--help``-style metadata, as TRL's configs carry)."""
    return field(default=default, metadata={"help": help})


@dataclass
class AdapterConfig(RunSettings):
    """What every adapter method's config holds. Defaults: the LoRA paper (Hu et al. 2022)
    where it gives one."""

    model: str = doc("testbed", "the model trained (from the trial's context)")
    dataset: str | None = doc(None, "training migrations: our JSONL or a ReCode file; None = data/")
    hierarchical: bool = doc(False, "adapters on layers [layer_start, layer_end) only")
    layer_start: int = doc(0, "first adapted layer (hierarchical only)")
    layer_end: int | None = doc(None, "one past the last adapted layer; None = the model's last + 1")
    r: int = doc(8, "LoRA rank; the paper found 4-8 enough for GPT-3")
    alpha: float = doc(16.0, "LoRA scale alpha / r; alpha = 2r is the common default")
    dropout: float = doc(0.05, "LoRA dropout")
    target: str = doc("qv", "projections adapted: qv (the paper's choice), attn, mlp or all")
    lr: float = doc(1.0e-3, "AdamW learning rate")
    max_grad_norm: float | None = doc(1.0, "gradient-norm clipping; None = off (the seed's failure mode)")
    warmup_ratio: float = doc(0.06, "share of the steps with a linear warm-up")
    schedule: str = doc("linear", "learning-rate schedule after warm-up: linear or cosine")
    epochs: int = doc(4, "passes over the training data")

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None (off), got {self.max_grad_norm}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        if self.schedule not in ("linear", "cosine"):
            raise ValueError(f"schedule must be linear or cosine, got {self.schedule!r}")
        if self.r < 1 or self.epochs < 1:
            raise ValueError("r and epochs must be >= 1")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        from trainables.models import check_dtype

        check_dtype(self.dtype)

    def layer_range(self, n_layers: int) -> tuple[int, int]:
        """[start, end) of the adapted layers, checked against the model; a config that is not
        hierarchical covers every layer."""
        if not self.hierarchical:
            return 0, n_layers
        end = n_layers if self.layer_end is None else self.layer_end
        if not 0 <= self.layer_start < end <= n_layers:
            raise ValueError(
                f"layer range [{self.layer_start}, {end}) is outside the model's {n_layers} layers: "
                f"use 0 <= layer_start < layer_end <= {n_layers}"
            )
        return self.layer_start, end


def adapted_model(cfg: AdapterConfig, session, checkpointing: bool = True):
    """The trial's model with ``cfg``'s adapters attached, its tokenizer and the adapted layer
    range; every report of the trial carries the trainable parameters against standard LoRA's.
    ``checkpointing``: switch activation checkpointing on here when the config asks (TRL
    switches it on itself)."""
    from trainables.models import load_model, num_layers

    model, tokenizer = load_model(cfg.model, device=session.device, dtype=cfg.dtype,
                                  gradient_checkpointing=cfg.gradient_checkpointing and checkpointing)
    span = cfg.layer_range(num_layers(model))  # fail fast on a bad range
    model = attach_lora(model, cfg)
    session.common.update(trainable_params=trainable_parameters(model),
                          standard_lora_params=standard_lora_parameters(model, cfg))
    return model, tokenizer, span


def attach_lora(model, cfg: AdapterConfig):
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


def supervised_warmup(model, tokenizer, dataset: str | None, epochs: int, lr: float, *, batch_size: int = 8,
                      max_grad_norm: float = 1.0, seed: int = 0, precision: str = "fp32") -> list[float]:
    """Supervised epochs on the training pairs (prompt -> new code) for the adapters already
    attached to ``model``: the warm start of an RL run (SFT, then RL), so that the policy's
    samples hold the new API often enough for a group-relative advantage to exist. Returns the
    mean loss of each epoch; raises ``Diverged`` like every training loop here. ``precision``:
    the model's (``common.MixedPrecision``: fp16 scales its loss like the LoRA loop)."""
    import torch

    if epochs <= 0:
        return []
    examples = training_examples(tokenizer, dataset)
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    amp = MixedPrecision(params, device, precision)
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
            with amp.autocast():
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            amp.backward(loss)
            grad_norm = amp.clip(opt, params, max_grad_norm)
            guard.check(step, loss.item(), grad_norm, skipped=amp.skipped(loss.item(), grad_norm))
            amp.step(opt)
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
