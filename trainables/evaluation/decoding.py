"""Greedy decoding, as every method's completions are made: one statement per prompt, batched,
KV-cached (:func:`generate`; whole function bodies up to stop sequences for the general
evaluation), through a merged copy of a LoRA model where one fits (:func:`merged_copy`)."""
from __future__ import annotations

from typing import Sequence

from trainables.token_rules import (
    blank_mask,
    bracket_depth,
    fit_to_vocab,
    line_start_mask,
    newline_ids,
    prompt_pieces,
    statement_end,
    token_brackets,
)
from trainables.tokens import skip_line_start

# Completions are the rest of one statement: the data's lines are <= 90 characters (~30 BPE
# tokens on code); 64 leaves room for a call a real model continues over a second line.
MAX_NEW_TOKENS = 64


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = MAX_NEW_TOKENS,
             batch_size: int = 96, heads: list[str] | None = None,
             stop: Sequence[str] | None = None) -> list[str]:
    """Greedy completions of one statement, batched by similar length (left padding), KV-cached.

    ``heads``: per prompt, the start of the statement (``Context.head``), tokenized apart from
    the prompt as the whole line would be; the result is what follows it. A row stops at a
    newline token once its brackets (counted from the head on) are balanced, or at EOS; the text
    is then cut at :func:`statement_end`.

    ``stop``: multi-line completions (HumanEval's function bodies) instead of one statement: a
    row stops at any special token (EOS included) or once its text holds one of these strings,
    and is cut before the first; newlines and brackets end nothing. The text is what follows the
    prompt as given (a real model's completion begins with the prompt's final line break, which
    is dropped: :func:`_after_prompt`).

    A hand-rolled loop rather than ``model.generate``: on the testbed its per-step overhead
    dominated (5.5 s for the 570 prompts vs ~1.5 s here), and rows stop at the first newline
    token, not only at EOS. Finished rows leave the batch and the KV cache at once: a batch runs
    as long as its longest completion, and completions are 17 tokens on average, so computing
    the finished rows to the end cost ~30% of an evaluation (570 prompts on the testbed, 1 thread:
    5.6-6.3 s -> 4.1-4.4 s, the same completions)."""
    import torch

    device = next(model.parameters()).device
    heads = heads or [""] * len(prompts)
    pieces = [prompt_pieces(tokenizer, p, h) for p, h in zip(prompts, heads)]
    encoded = [ids for ids, _, _ in pieces]
    at_start = [s for _, _, s in pieces]
    depth0 = [bracket_depth(h) for h in heads]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    out: list[str] = [""] * len(prompts)
    pad = tokenizer.pad_token_id
    newline = newline_ids(tokenizer).to(device)
    eos = torch.tensor([tokenizer.eos_token_id], device=device)
    brackets = token_brackets(tokenizer).to(device)
    blank = blank_mask(tokenizer).to(device)
    not_line_start = ~line_start_mask(tokenizer).to(device)
    if stop is not None:
        stop = [t for t in stop if t]
        ends = torch.tensor(sorted(set(tokenizer.all_special_ids) | {tokenizer.eos_token_id}), device=device)
        leads = [lead for _, lead, _ in pieces]
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            width = max(len(encoded[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                ids[row, width - len(encoded[i]) :] = torch.tensor(encoded[i])
                mask[row, width - len(encoded[i]) :] = 1
            ids, mask = ids.to(device), mask.to(device)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            rows = torch.arange(len(idx), device=device)  # which row of `idx` each batch row is
            depth = torch.tensor([depth0[i] for i in idx], device=device)
            # rows cut at the line start that have written only whitespace so far: their first
            # token must be a line break, and a newline ends them only once the statement began
            pending = torch.tensor([at_start[i] for i in idx], device=device)
            steps = []  # (rows, next tokens) per step
            if stop is not None:
                tokens: list[list[int]] = [[] for _ in idx]  # each row's tokens so far, for the stop check
            cache = None  # transformers 5 names the KV cache `cache` (was past_key_values)
            step_ids, step_pos = ids, pos
            for step in range(max_new_tokens):
                o = model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos,
                          cache=cache, use_cache=True, logits_to_keep=1)
                cache = o.cache
                logits = o.logits[:, -1, :]
                if step == 0 and bool(pending.any()):
                    logits = logits.masked_fill(pending[:, None] & fit_to_vocab(not_line_start, logits.shape[-1])[None],
                                                float("-inf"))
                nxt = logits.argmax(-1)
                steps.append((rows, nxt))
                if stop is not None:
                    stopped = []
                    for row, tok in zip(rows.tolist(), nxt.tolist()):
                        tokens[row].append(tok)
                        text = _after_prompt(tokenizer.decode(tokens[row], skip_special_tokens=True),
                                             leads[idx[row]], at_start[idx[row]])
                        stopped.append(_stop_at(text, stop) < len(text))
                    live = ~(torch.isin(nxt, ends) | torch.tensor(stopped, device=device))
                else:
                    depth = depth + brackets[nxt]
                    live = ~(torch.isin(nxt, eos) | (torch.isin(nxt, newline) & (depth <= 0) & ~pending))
                pending = pending & blank[nxt]
                if not bool(live.any()):
                    break
                if not bool(live.all()):  # drop finished rows from the batch and its cache
                    keep = live.nonzero()[:, 0]
                    cache.batch_select_indices(keep)
                    rows, nxt, mask, step_pos = rows[keep], nxt[keep], mask[keep], step_pos[keep]
                    depth, pending = depth[keep], pending[keep]
                step_ids = nxt[:, None]
                step_pos = step_pos[:, -1:] + 1
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            gen: list[list[int]] = [[] for _ in idx]
            for r, t in steps:
                for row, tok in zip(r.tolist(), t.tolist()):
                    gen[row].append(tok)
            for row, i in enumerate(idx):
                text = tokenizer.decode(gen[row], skip_special_tokens=True)
                if stop is not None:
                    text = _after_prompt(text, leads[i], at_start[i])
                    out[i] = text[: _stop_at(text, stop)]
                    continue
                if at_start[i]:
                    text = skip_line_start(text)
                out[i] = text[: statement_end(text, depth0[i])]
    if was_training:
        model.train()
    return out


def _after_prompt(text: str, lead: str, at_start: bool) -> str:
    """A multi-line completion as the continuation of the prompt as given: without the prompt's
    final line breaks (``prompt_pieces``' ``lead``) that a real model's completion writes first;
    where it wrote other breaks, from its first line of code (:func:`skip_line_start`)."""
    if not at_start:
        return text
    return text[len(lead):] if text.startswith(lead) else skip_line_start(text)


def _stop_at(text: str, stop: Sequence[str]) -> int:
    """Where the first of the ``stop`` strings begins in ``text``; ``len(text)`` when none does."""
    return min((i for i in (text.find(t) for t in stop) if i >= 0), default=len(text))


# Evaluate a LoRA model through a merged copy when the copy is this small (parameters): 2 GB in
# fp32 (SmolLM2-135M: 0.5 GB), and it decodes without PEFT's per-module adapter calls.
MERGED_COPY_MAX_PARAMS = 500_000_000


def merged_copy(model):
    """A copy of a PEFT LoRA model with its adapters merged into the weights (the model itself
    untouched), for models up to ``MERGED_COPY_MAX_PARAMS``; otherwise ``model``.

    Greedy decoding calls every adapted projection once per token: on the testbed (28 adapted
    projections) the merged copy evaluates in 4.4 s instead of 7.2 (quick) and 7.1 instead of
    9.7 (full); the copy and merge take ~0.1 s. Merging in place and unmerging after would
    leave the frozen weights a rounding error off after every evaluation."""
    import copy

    if not hasattr(model, "merge_and_unload") or not hasattr(model, "peft_config"):
        return model
    if any(c.peft_type != "LORA" for c in model.peft_config.values()):
        return model
    if sum(p.numel() for p in model.parameters()) > MERGED_COPY_MAX_PARAMS:
        return model
    merged = copy.deepcopy(model).merge_and_unload()
    merged.eval()
    return merged
