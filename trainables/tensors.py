"""Leaf helpers shared by the training loops, the frozen-state cache and the evaluation:
padded batches, part of a decoder stack, and PEFT adapters switched per layer. Nothing here
imports another module of the project."""
from __future__ import annotations

from contextlib import contextmanager


def pad_batch(examples: list[tuple[list[int], int]], pad_id: int):
    """(ids, attention mask, labels) of ``(ids, n_prompt)`` examples, right-padded to the longest;
    labels are -100 on the prompt and the padding (the loss reads the completion only)."""
    import torch

    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (ex, n_prompt) in enumerate(examples):
        ids[i, : len(ex)] = torch.tensor(ex)
        labels[i, n_prompt : len(ex)] = torch.tensor(ex[n_prompt:])
        mask[i, : len(ex)] = 1
    return ids, mask, labels


def pad_states(rows: list, width: int):
    """``[len_i, H]`` state tensors as one ``[n, width, H]`` batch, zero-padded on the right
    (right padding is never attended to or scored)."""
    import torch

    out = torch.zeros((len(rows), width, rows[0].shape[-1]), dtype=rows[0].dtype, device=rows[0].device)
    for r, t in enumerate(rows):
        out[r, : t.shape[0]] = t
    return out


@contextmanager
def stack(decoder, layers, norm=None):
    """Run ``decoder`` with only ``layers`` (a slice of its own) and, if given, ``norm``."""
    import torch

    old_layers, old_norm = decoder.layers, decoder.norm
    decoder.layers = torch.nn.ModuleList(layers)
    if norm is not None:
        decoder.norm = norm
    try:
        yield
    finally:
        decoder.layers, decoder.norm = old_layers, old_norm


def adapter_layers(peft_model) -> list:
    """The PEFT tuner layers of ``peft_model`` (what :func:`adapters_off` switches)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in peft_model.modules() if isinstance(m, BaseTunerLayer)]


@contextmanager
def adapters_off(layers):
    """Adapters off on these tuner layers only (PEFT's ``disable_adapter`` walks the whole
    model: ~7 ms a call on the testbed)."""
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
