"""The one evaluation every method is scored with, so numbers compare across rows.

Greedy, batched, one statement per prompt. A migration context is prompted with the lines
before it plus the start of the statement that the old and new lines share (``Context.head``:
``df =``, ``names = vec.``), so the completion is where the model chooses an API; the statement
it writes is judged whole, over several lines while a bracket is open (``statement_end``).
Metrics (all in [0, 1]):

- ``efficacy``: train contexts whose completion is API-correct (parses, uses the replacement,
  no longer uses the deprecated call);
- ``generalization``: the same on the held-out probe contexts;
- ``old_api_rate``: probe contexts whose completion still uses the deprecated call;
- ``locality``: token-level, teacher-forced on the *base* model's completion of each locality
  prompt: the share of its positions where the model's argmax is the base model's (EasyEdit's
  neighbourhood score), averaged over the prompts. Not whole-completion equality: on SmolLM2 a
  third of the base completions pass a near-tie (top-2 log-probabilities < 0.1 apart), where
  any update flips a greedy decode and everything after it; a hierarchical-LoRA update whose
  argmax agreed with the base on 98.5% of those positions kept only 84% of the completions
  whole, most of them rewritten in style (``x ** 2`` -> ``x**2``, a comment reworded);
- ``locality_exact``: locality prompts completed exactly as the base model completes them;
- ``locality_accuracy``: locality prompts completed exactly as the reference;
- ``api_correct``, ``syntax_ok``, ``exact_match`` (equals the reference new line) and
  ``edit_similarity`` (difflib ratio to it): over all migration contexts;
- ``soft_generalization``: the continuous relaxation of ``generalization``: mean over the probe
  contexts of sigmoid(log p(new line) - log p(old line)), teacher-forced;
- ``progress``: what early stopping ranks intermediate reports by (see ``progress``);
- ``decoded``: the share of prompts that had to be decoded (the others were proven by one
  teacher-forced pass to complete with their expected line; see ``evaluate``): cost, not quality.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from trainables.apicheck import check_completion
from trainables.objective import objective, progress
from trainables.tokens import start_ids

if TYPE_CHECKING:  # torch is imported lazily so that `--help` stays fast
    import torch

# Completions are the rest of one statement: the data's lines are <= 90 characters (~30 BPE
# tokens on code); 64 leaves room for a call a real model continues over a second line.
MAX_NEW_TOKENS = 64
# In the key of every cached base-model reference: how prompts are tokenized and completions
# begin (tokens.cut_at_line_start); references made before real-model prompts were cut there
# are stale.
PROMPT_FORMAT = "cut at the line start"
@dataclass(frozen=True)
class Prediction:
    kind: str  # "train" | "probe" | "locality"
    ref_id: str
    prompt: str
    completion: str
    reference: str


def first_line(text: str) -> str:
    return text.split("\n", 1)[0]


_OPEN, _CLOSE = "([{", ")]}"


def bracket_depth(text: str, depth: int = 0) -> int:
    """Open brackets after ``text`` (strings and comments skipped), starting from ``depth``."""
    return statement_end(text, depth, want_depth=True)


def statement_end(text: str, depth: int = 0, want_depth: bool = False) -> int:
    """Index of the newline that ends the statement ``text`` continues (``depth`` brackets
    already open), or ``len(text)`` when none does: a newline inside brackets continues the
    statement, as Python reads it. Quotes and ``#`` comments are skipped (a string or comment
    ends at the newline; triple quotes are not tracked: completions are statements, not
    docstrings). ``want_depth``: return the depth at the end of ``text`` instead."""
    quote = None
    i = 0
    while i < len(text):
        ch = text[i]
        if quote:
            if ch == "\\":
                i += 1
            elif ch == quote or ch == "\n":
                quote = None
                if ch == "\n" and depth <= 0 and not want_depth:
                    return i
        elif ch == "#":
            nl = text.find("\n", i)
            if nl < 0:
                break
            i = nl
            continue
        elif ch in "'\"":
            quote = ch
        elif ch in _OPEN:
            depth += 1
        elif ch in _CLOSE:
            depth -= 1
        elif ch == "\n" and depth <= 0 and not want_depth:
            return i
        i += 1
    return depth if want_depth else len(text)


def _per_token(tokenizer, attr: str, value, dtype) -> torch.Tensor:
    """A table of ``value(id, text)`` over the vocabulary (sized for every id the tokenizer
    knows), memoised on the tokenizer as ``attr``: the decoding loop's per-token lookups."""
    import torch

    cache = getattr(tokenizer, attr, None)
    if cache is None:
        vocab = tokenizer.get_vocab()
        cache = torch.zeros(max(max(vocab.values()) + 1, len(tokenizer)), dtype=dtype)
        for t, i in vocab.items():
            cache[i] = value(i, tokenizer.convert_tokens_to_string([t]))
        setattr(tokenizer, attr, cache)
    return cache


def _token_brackets(tokenizer):
    """Per vocabulary id: the bracket balance of its text (opens - closes), for the decoding
    loop's cheap estimate of when a newline ends the statement (``statement_end`` decides)."""
    import torch

    return _per_token(tokenizer, "_apiupdate_brackets",
                      lambda i, s: sum(s.count(c) for c in _OPEN) - sum(s.count(c) for c in _CLOSE), torch.long)


def newline_ids(tokenizer) -> torch.Tensor:
    """Ids of tokens whose text contains a newline: a completion ends at the first one."""
    import torch

    return _per_token(tokenizer, "_apiupdate_has_newline", lambda i, s: "\n" in s, torch.bool).nonzero()[:, 0]


def blank_mask(tokenizer) -> torch.Tensor:
    """Per vocabulary id: whether its text is whitespace only (special tokens are not)."""
    import torch

    special = set(tokenizer.all_special_ids)
    return _per_token(tokenizer, "_apiupdate_blank", lambda i, s: i not in special and bool(s) and not s.strip(),
                      torch.bool)


def line_start_mask(tokenizer) -> torch.Tensor:
    """Per vocabulary id: whether its text is a line break and nothing but whitespace (``"\n"``,
    ``"\n   "``, ``"\n\n"``): what a completion cut at the line start (``tokens.cut_at_line_start``)
    must begin with, so that the model writes a new line rather than going on with the last."""
    import torch

    blank = blank_mask(tokenizer)
    return _per_token(tokenizer, "_apiupdate_line_start", lambda i, s: bool(blank[i]) and s.startswith("\n"),
                      torch.bool)


def _fit(mask: torch.Tensor, size: int) -> torch.Tensor:
    """A per-id mask cut or padded (with True) to a model's vocabulary size, which can exceed
    the tokenizer's (Qwen2 pads its embedding to a multiple of 128)."""
    import torch

    if len(mask) >= size:
        return mask[:size]
    return torch.cat([mask, torch.ones(size - len(mask), dtype=torch.bool, device=mask.device)])


def prompt_pieces(tokenizer, prompt: str, head: str = "") -> tuple[list[int], str, bool]:
    """``(ids, lead, at_line_start)`` of one prompt as :func:`generate` and :func:`score_lines`
    feed it: start ids + the prompt cut before its final line break on a real model
    (``tokens.cut_at_line_start``) + ``lead + head`` when there is a head. Without a head the
    completion must write the line break itself (``at_line_start``); its text then begins with
    ``lead``, which :func:`tokens.skip_line_start` drops."""
    from trainables.tokens import cut_at_line_start

    body, lead = cut_at_line_start(tokenizer, prompt)
    ids = start_ids(tokenizer) + encode(tokenizer, body)
    if head:
        return ids + encode(tokenizer, lead + head), "", False
    return ids, lead, bool(lead)


def encode(tokenizer, text: str) -> list[int]:
    """``text``'s token ids (no special tokens), memoised on the tokenizer: a trial evaluates
    the same ~700 prompts and lines at every rung, in both :func:`score_lines` and
    :func:`generate`. Callers must not modify the list."""
    memo = tokenizer.__dict__.setdefault("_apiupdate_encoded", {})
    ids = memo.get(text)
    if ids is None:
        if len(memo) > 200_000:
            memo.clear()
        ids = memo[text] = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = MAX_NEW_TOKENS,
             batch_size: int = 96, heads: list[str] | None = None) -> list[str]:
    """Greedy completions of one statement, batched by similar length (left padding), KV-cached.

    ``heads``: per prompt, the start of the statement (``Context.head``), tokenized apart from
    the prompt as the whole line would be; the result is what follows it. A row stops at a
    newline token once its brackets (counted from the head on) are balanced, or at EOS; the text
    is then cut at :func:`statement_end`.

    A hand-rolled loop rather than ``model.generate``: on the testbed its per-step overhead
    dominated (5.5 s for the 570 prompts vs ~1.5 s here), and rows stop at the first newline
    token, not only at EOS. Finished rows leave the batch and the KV cache at once: a batch runs
    as long as its longest completion, and completions are 17 tokens on average, so computing
    the finished rows to the end cost ~30% of an evaluation (570 prompts on the testbed, 1 thread:
    5.6-6.3 s -> 4.1-4.4 s, the same completions)."""
    import torch

    from trainables.tokens import skip_line_start

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
    brackets = _token_brackets(tokenizer).to(device)
    blank = blank_mask(tokenizer).to(device)
    not_line_start = ~line_start_mask(tokenizer).to(device)
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
            cache = None  # transformers 5 names the KV cache `cache` (was past_key_values)
            step_ids, step_pos = ids, pos
            for step in range(max_new_tokens):
                o = model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos,
                          cache=cache, use_cache=True, logits_to_keep=1)
                cache = o.cache
                logits = o.logits[:, -1, :]
                if step == 0 and bool(pending.any()):
                    logits = logits.masked_fill(pending[:, None] & _fit(not_line_start, logits.shape[-1])[None],
                                                float("-inf"))
                nxt = logits.argmax(-1)
                steps.append((rows, nxt))
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
                if at_start[i]:
                    text = skip_line_start(text)
                out[i] = text[: statement_end(text, depth0[i])]
    if was_training:
        model.train()
    return out


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0


def _trunk(model):
    """(decoder, head) when ``model``'s logits are ``head(decoder(...).last_hidden_state)`` (a
    plain model of a ``SHARED_TRUNK_TYPES`` architecture, or a PEFT LoRA model of one: LoRA's
    layers sit inside the base model, whose forward is then the adapted one): only the scored
    positions go through the head. None for anything else (a sampler, other architectures).

    Without it every position goes through the head: on SmolLM2 (49,152 x 576) that is more
    than the 30 layers cost, and a LoRA model too large for ``merged_copy`` took minutes."""
    from transformers import PreTrainedModel

    from trainables.models import SHARED_TRUNK_TYPES

    peft = getattr(model, "peft_config", None)
    if peft is not None and hasattr(model, "get_base_model") and all(c.peft_type == "LORA" for c in peft.values()):
        model = model.get_base_model()
    if not isinstance(model, PreTrainedModel) or model.config.model_type not in SHARED_TRUNK_TYPES:
        return None
    return model.get_decoder(), model.get_output_embeddings()


def _clean_stop_ids(tokenizer) -> set[int]:
    """Stop tokens that end a completion with nothing before their newline (or EOS). Not those
    that open a bracket after it (``"\n("``): :func:`generate` counts a token's brackets before
    it decides, so such a token continues the statement."""
    brackets = _token_brackets(tokenizer)
    stops = {int(i) for i in newline_ids(tokenizer)
             if tokenizer.convert_tokens_to_string([tokenizer.convert_ids_to_tokens(int(i))]).startswith("\n")
             and int(brackets[int(i)]) <= 0}
    return stops | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


def score_lines(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 96,
                max_new_tokens: int = MAX_NEW_TOKENS, start_states=None,
                heads: list[str] | None = None, argmax: bool = False) -> list[tuple]:
    """For each (prompt, line), teacher forced in one batched pass: the summed log-probability
    of the line's tokens after the prompt (prompt and line tokenized apart, as in pretraining
    and generation), and whether :func:`generate` provably completes the prompt with exactly
    this line. ``heads``: as in :func:`generate` (the line is then what follows the head).

    The proof: greedy decoding emits the line's tokens iff each is the argmax after the ones
    before it, and then stops with nothing more on the line iff the next argmax is a stop token
    that starts with a newline (or EOS), unless the line already fills ``max_new_tokens``.
    Lines that do not survive a decode/encode round trip, or are longer than that, are never
    verified. Only plain models of ``SHARED_TRUNK_TYPES`` architectures are verified (a
    sampler's argmax is not greedy decoding); the verdict agrees with decoding up to float
    rounding between a full pass and incremental KV-cached steps (a near-tie can fall either
    way in both).

    ``argmax``: also return, per pair, the model's argmax at each position read (before each
    line token, then after the line; the first one restricted as decoding restricts it) and
    whether each is the line's token (the last: a stop token), as a third and fourth element.

    ``start_states``: for a model whose layers below some k are the base model's (hierarchical
    LoRA, merged), a function from the token sequences (prompt + line) to (k, the base model's
    input to layer k for each; ``FrozenStates.sequence_states``) or None: the pass then starts
    at layer k."""
    import torch

    from trainables.tensors import pad_states, stack

    device = next(model.parameters()).device
    trunk = _trunk(model)
    stops = torch.tensor(sorted(_clean_stop_ids(tokenizer)), dtype=torch.long, device=device)
    heads = heads or [""] * len(pairs)
    enc, checkable, at_start = [], [], []
    for (prompt, line), head in zip(pairs, heads):
        ids, lead, start = prompt_pieces(tokenizer, prompt, head)
        c = encode(tokenizer, lead + line)
        enc.append((ids, c))
        at_start.append(start)
        # decoding stops after the line only where its brackets close (statement_end); a blank
        # line after a line break is not where decoding stops (it waits for the statement)
        checkable.append(trunk is not None and "\n" not in line and len(c) <= max_new_tokens
                         and (bracket_depth(line, bracket_depth(head)) <= 0 or len(c) == max_new_tokens)
                         and not (start and not line.strip())
                         and tokenizer.decode(c, skip_special_tokens=True) == lead + line)
    not_line_start = ~line_start_mask(tokenizer).to(device) if any(at_start) else None
    start = start_states([p + c for p, c in enc]) if trunk is not None and start_states is not None else None
    order = sorted(range(len(enc)), key=lambda i: len(enc[i][0]) + len(enc[i][1]))
    out: list[tuple] = [(0.0, False)] * len(enc)
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            width = max(len(enc[i][0]) + len(enc[i][1]) for i in idx)
            ids = torch.full((len(idx), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            # the positions whose next-token distribution is read: the one before each line
            # token, and the one after the line (does it stop there?)
            rows, cols, targets, firsts = [], [], [], []
            for row, i in enumerate(idx):
                p, c = enc[i]
                ids[row, : len(p) + len(c)] = torch.tensor(p + c)
                mask[row, : len(p) + len(c)] = 1
                rows += [row] * (len(c) + 1)
                cols += range(len(p) - 1, len(p) + len(c))
                targets += c + [-1]
                firsts += [at_start[i]] + [False] * len(c)
            ids, mask = ids.to(device), mask.to(device)
            rows_t = torch.tensor(rows, device=device)
            cols_t = torch.tensor(cols, device=device)
            if trunk is not None:
                decoder, head = trunk
                if start is not None:
                    k, states = start
                    hk = pad_states([states[i] for i in idx], width)
                    with stack(decoder, list(decoder.layers)[k:]):
                        hidden = decoder(inputs_embeds=hk, attention_mask=mask).last_hidden_state
                else:
                    hidden = decoder(input_ids=ids, attention_mask=mask).last_hidden_state
                logits = head(hidden[rows_t, cols_t]).float()
            else:
                logits = model(input_ids=ids, attention_mask=mask).logits[rows_t, cols_t].float()
            if not_line_start is not None:  # decoding's first step there picks a line break only
                first = torch.tensor(firsts, device=device)
                logits = logits.masked_fill(first[:, None] & _fit(not_line_start, logits.shape[-1])[None], float("-inf"))
            targets_t = torch.tensor(targets, device=device)
            is_line = targets_t >= 0
            logp = torch.log_softmax(logits, -1).gather(-1, targets_t.clamp(min=0)[:, None])[:, 0] * is_line
            best = logits.argmax(-1)
            hit = torch.where(is_line, best == targets_t, torch.isin(best, stops))
            k = 0
            logp, hit, best = logp.tolist(), hit.tolist(), best.tolist()
            for row, i in enumerate(idx):
                n = len(enc[i][1])
                line_hits = hit[k : k + n]
                stop_ok = hit[k + n] or n == max_new_tokens
                out[i] = (sum(logp[k : k + n]), checkable[i] and all(line_hits) and stop_ok)
                if argmax:
                    out[i] += (best[k : k + n + 1], hit[k : k + n + 1])
                k += n + 1
    if was_training:
        model.train()
    return out


def line_logprobs(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 96) -> list[float]:
    """Sum of the token log-probabilities of each ``line`` after its ``prompt`` (teacher
    forced; prompt and line tokenized apart, as in pretraining and generation)."""
    return [lp for lp, _ in score_lines(model, tokenizer, pairs, batch_size)]


def _soft(new_lp: list[float], old_lp: list[float]) -> float:
    """Mean sigmoid(log p(new) - log p(old))."""
    return _mean(1.0 / (1.0 + math.exp(max(-60.0, min(60.0, o - n)))) for n, o in zip(new_lp, old_lp))


def soft_generalization(model, tokenizer, migrations) -> float:
    """Mean over probe contexts of P(new line beats old line) = sigmoid(log-prob difference)."""
    ctxs = [c for m in migrations for c in m.probe_contexts]
    if not ctxs:
        return 0.0
    pairs = [(c.prompt, c.new[len(c.head):]) for c in ctxs] + [(c.prompt, c.old[len(c.head):]) for c in ctxs]
    lp = [x for x, _ in score_lines(model, tokenizer, pairs, heads=[c.head for c in ctxs] * 2)]
    return _soft(lp[: len(ctxs)], lp[len(ctxs) :])


def evaluate(model, tokenizer, migrations, locality, base_locality: list[str] | None,
             batch_size: int = 96, max_new_tokens: int = MAX_NEW_TOKENS,
             quick: bool = False, start_states=None, specificity=(), base_specificity: list[str] | None = None,
             train: bool = True, base_locality_argmax=None, base_specificity_argmax=None) -> tuple[dict, list[Prediction]]:
    """All metrics plus the predictions. ``base_locality`` / ``base_specificity``: the base
    model's completions of the locality and over-application prompts (``None`` when scoring the
    base model itself: locality and specificity are then 1 by definition).
    ``base_*_argmax``: the base model's argmax along those completions (:func:`base_argmax`),
    what ``locality`` and ``specificity`` compare with; without them, the completions' own tokens.

    ``quick``: for intermediate reports (ASHA and the multi-objective searcher decide on them):
    the first train context of each migration instead of all three. Every locality prompt is
    kept: with every 4th only (58), the locality penalty at a rung carried +-0.16 of noise (one
    standard deviation, x4 below the floor); the proofs below make the other 172 cheap.
    ``train=False`` leaves the train contexts out (a test split reports no efficacy).

    One teacher-forced pass (:func:`score_lines`) scores every prompt against the line it
    should produce (the reference new line; for locality and specificity, the base model's
    completion), and every migration context against its old line too: where it proves that
    greedy decoding gives exactly one of them, that line is the completion, and only the other
    prompts are decoded. The metrics are those of decoding every prompt; a trained adapter
    reproduces most of its lines, so ~3/4 of the decoding goes.

    ``start_states``: see :func:`score_lines` (the training loop passes its ``FrozenStates``)."""
    model = merged_copy(model)
    specificity = list(specificity)
    items: list[tuple[str, object, object]] = []
    for m in migrations:
        if train:
            items += [("train", m, c) for c in (m.train_contexts[:1] if quick else m.train_contexts)]
        items += [("probe", m, c) for c in m.probe_contexts]
    items += [("locality", s, None) for s in locality]
    items += [("specificity", s, None) for s in specificity]
    prompts = [(c.prompt if c is not None else s.prompt) for _, s, c in items]
    # the start of the statement the prompt already holds; the completion is what follows it
    heads = [(c.head if c is not None else "") for _, _, c in items]
    expected: list[str | None] = [c.new[len(c.head):] if c is not None else None for _, _, c in items]
    refs = {}  # snippet index -> the base model's argmax along its completion
    for kind, base, tops in (("locality", base_locality, base_locality_argmax),
                             ("specificity", base_specificity, base_specificity_argmax)):
        where = [i for i, (k, _, _) in enumerate(items) if k == kind]
        if base is not None:
            if len(base) != len(where):
                raise ValueError(f"{len(base)} base {kind} completions for {len(where)} prompts")
            for i, b in zip(where, base):
                expected[i] = b
        if tops is not None:
            if len(tops) != len(where):
                raise ValueError(f"{len(tops)} base {kind} argmax rows for {len(where)} prompts")
            refs.update(zip(where, tops))
    checks = [i for i, e in enumerate(expected) if e is not None]
    # every migration context is also scored against its old line: the probes' scores give
    # soft_generalization, and a context proven to be completed with the old line (an untrained
    # or stalled model: most of them) need not be decoded either
    olds = [i for i, (kind, _, _) in enumerate(items) if kind in ("train", "probe")]
    scored = checks + olds
    scores = score_lines(model, tokenizer, [(prompts[i], expected[i]) for i in checks]
                         + [(prompts[i], items[i][2].old[len(heads[i]):]) for i in olds], batch_size, max_new_tokens,
                         start_states, heads=[heads[i] for i in scored], argmax=True)
    completions: list[str | None] = [None] * len(items)
    new_lp, old_lp = {}, {}
    agreement: dict[int, float] = {}  # per snippet: token-level agreement with the base model
    for i, (lp, verified, best, hits) in zip(checks, scores):
        new_lp[i] = lp
        if verified:
            completions[i] = expected[i]
        if items[i][0] in ("locality", "specificity"):
            agreement[i] = token_agreement(best, hits, refs.get(i))
    for i, (lp, verified, _, _) in zip(olds, scores[len(checks):]):
        old_lp[i] = lp
        if verified and completions[i] is None:
            completions[i] = items[i][2].old[len(heads[i]):]
    todo = [i for i, c in enumerate(completions) if c is None]
    for i, comp in zip(todo, generate(model, tokenizer, [prompts[i] for i in todo], max_new_tokens, batch_size,
                                      heads=[heads[i] for i in todo])):
        completions[i] = comp
    # judged: the whole statement, the shared head included
    completions = [h + c for h, c in zip(heads, completions)]

    by_id = {m.id: m for m in migrations}
    preds: list[Prediction] = []
    rows: dict[str, list] = {"train": [], "probe": []}
    snippet_pred: dict[str, list[str]] = {"locality": [], "specificity": []}
    over: list[bool] = []
    for (kind, rec, ctx), comp in zip(items, completions):
        if kind in snippet_pred:
            snippet_pred[kind].append(comp)
            preds.append(Prediction(kind, rec.id, rec.prompt, comp, rec.completion))
            m = by_id.get(getattr(rec, "migration", None))
            if kind == "specificity" and m is not None:  # the lookalike rewritten to the new API
                over.append(check_completion(rec.prompt, comp, m.deprecated, m.replacement).uses_new)
            continue
        chk = check_completion(ctx.prompt, comp, rec.deprecated, rec.replacement)
        sim = difflib.SequenceMatcher(None, comp, ctx.new).ratio()
        rows[kind].append((chk, comp == ctx.new, sim))
        preds.append(Prediction(kind, rec.id, ctx.prompt, comp, ctx.new))

    both = rows["train"] + rows["probe"]
    loc_pred, spec_pred = snippet_pred["locality"], snippet_pred["specificity"]
    base_locality = loc_pred if base_locality is None else base_locality
    base_specificity = spec_pred if base_specificity is None else base_specificity
    metrics = {
        "generalization": _mean(c.correct for c, _, _ in rows["probe"]),
        "old_api_rate": _mean(c.uses_old for c, _, _ in rows["probe"]),
        "locality": _snippet_mean(items, "locality", agreement),
        "locality_exact": _mean(p == b for p, b in zip(loc_pred, base_locality)),
        "locality_accuracy": _mean(p == s.completion for p, s in zip(loc_pred, locality)),
        "api_correct": _mean(c.correct for c, _, _ in both),
        "syntax_ok": _mean(c.syntax_ok for c, _, _ in both),
        "exact_match": _mean(e for _, e, _ in both),
        "edit_similarity": _mean(s for _, _, s in both),
        "n_migrations": len(migrations),
        "n_libraries": len({m.library for m in migrations}),
        "n_locality": len(locality),
        "decoded": len(todo) / max(1, len(items)),
    }
    if train:
        metrics["efficacy"] = _mean(c.correct for c, _, _ in rows["train"])
    if specificity:
        metrics.update(specificity=_snippet_mean(items, "specificity", agreement),
                       specificity_exact=_mean(p == b for p, b in zip(spec_pred, base_specificity)),
                       specificity_accuracy=_mean(p == s.completion for p, s in zip(spec_pred, specificity)),
                       over_application=_mean(over), n_specificity=len(specificity))
    probe_idx = [i for i, (kind, _, _) in enumerate(items) if kind == "probe"]
    metrics["soft_generalization"] = _soft([new_lp[i] for i in probe_idx], [old_lp[i] for i in probe_idx])
    metrics["objective"] = objective(metrics)
    metrics["progress"] = progress(metrics)
    return metrics, preds


def token_agreement(best: list[int], hits: list[bool], ref: list[int] | None) -> float:
    """One snippet's token-level locality, teacher-forced on the base model's completion: the
    share of the positions read (each token's, then the one after the line) where the model's
    argmax is the base model's (``ref``, :func:`base_argmax`); without ``ref``, where it is the
    completion's own token (a stop token after it)."""
    if ref is None:
        return _mean(hits)
    if len(ref) != len(best):
        raise ValueError(f"base argmax row of {len(ref)} positions for {len(best)}: made with another tokenizer?")
    return _mean(a == b for a, b in zip(best, ref))


def _snippet_mean(items, kind: str, agreement: dict[int, float]) -> float:
    """Mean token agreement over the ``kind`` snippets; 1 for a snippet without a base
    completion to compare with (scoring the base model itself)."""
    return _mean(agreement.get(i, 1.0) for i, (k, _, _) in enumerate(items) if k == kind)


# What a split's report holds besides the validation figures, each as ``test_<key>``: the
# test split has no train contexts (efficacy is a property of the training data, not a split).
TEST_KEYS = ("generalization", "old_api_rate", "soft_generalization", "locality", "locality_exact", "locality_accuracy",
             "specificity", "specificity_exact", "specificity_accuracy", "over_application", "syntax_ok", "objective")


@dataclass(frozen=True)
class EvalSet:
    """One split of the evaluation data and the base model's completions of its snippets.

    ``migrations`` hold the split's held-out contexts as ``probe_contexts`` (the validation
    split: the probe contexts; the test split: data/test_contexts.jsonl), so that
    ``generalization`` means the same on both; ``specificity`` holds the over-application
    lookalikes."""

    migrations: tuple
    locality: tuple
    base_locality: tuple | None
    specificity: tuple = ()
    base_specificity: tuple | None = None
    # the base model's argmax along its completions (base_argmax): what locality compares with
    base_locality_argmax: tuple | None = None
    base_specificity_argmax: tuple | None = None

    def evaluate(self, model, tokenizer, quick: bool = False, start_states=None, train: bool = True,
                 batch_size: int = 96) -> tuple[dict, list[Prediction]]:
        return evaluate(model, tokenizer, self.migrations, self.locality, self.base_locality, batch_size,
                        quick=quick, start_states=start_states, specificity=self.specificity,
                        base_specificity=self.base_specificity, train=train,
                        base_locality_argmax=self.base_locality_argmax,
                        base_specificity_argmax=self.base_specificity_argmax)

    def with_prompts(self, context_prompt, snippet_prompt) -> "EvalSet":
        """The same split with every prompt rewritten (the prompt baseline's headers):
        ``context_prompt(prompt, migration_id)``, ``snippet_prompt(prompt)``."""
        from dataclasses import replace

        def ctxs(cs, mid):
            return tuple(replace(c, prompt=context_prompt(c.prompt, mid)) for c in cs)

        return replace(self, migrations=tuple(
            replace(m, train_contexts=ctxs(m.train_contexts, m.id), probe_contexts=ctxs(m.probe_contexts, m.id))
            for m in self.migrations),
            locality=tuple(replace(s, prompt=snippet_prompt(s.prompt)) for s in self.locality),
            specificity=tuple(replace(s, prompt=snippet_prompt(s.prompt)) for s in self.specificity))


@dataclass(frozen=True)
class EvalData:
    """What every trial is scored on: the search reads ``validation`` only (Optuna, ASHA, the
    stall rule and the best-trial choice); ``test`` is scored once, at a trial's final report,
    and reported beside it as ``test_*`` (``None`` when the data dir has no test split)."""

    validation: EvalSet
    test: EvalSet | None

    def test_metrics(self, model, tokenizer, start_states=None, batch_size: int = 96) -> dict:
        """``test_<key>`` for the :data:`TEST_KEYS` (empty without a test split)."""
        if self.test is None:
            return {}
        m, _ = self.test.evaluate(model, tokenizer, start_states=start_states, train=False, batch_size=batch_size)
        return {f"test_{k}": m[k] for k in TEST_KEYS if k in m}

    def with_prompts(self, context_prompt, snippet_prompt) -> "EvalData":
        return EvalData(self.validation.with_prompts(context_prompt, snippet_prompt),
                        self.test.with_prompts(context_prompt, snippet_prompt) if self.test else None)


def by_library(model, tokenizer, migrations, preds: list[Prediction]) -> dict[str, dict]:
    """Per library (sorted by name, then ``all``), over the probe contexts: the share of greedy
    completions that use the old API, the new one, or neither, and ``prefers_new``: the share
    where the new line is the likelier one teacher-forced (what the model knows, whatever it
    writes first)."""
    by_id = {m.id: m for m in migrations}
    probes = [p for p in preds if p.kind == "probe"]
    ctx = {(m.id, c.prompt): c for m in migrations for c in m.probe_contexts}
    cs = [ctx[p.ref_id, p.prompt] for p in probes]
    lp = [x for x, _ in score_lines(model, tokenizer, [(c.prompt, c.new[len(c.head):]) for c in cs]
                                    + [(c.prompt, c.old[len(c.head):]) for c in cs], heads=[c.head for c in cs] * 2)]
    rows: dict[str, list] = {}
    for k, p in enumerate(probes):
        m = by_id[p.ref_id]
        chk = check_completion(p.prompt, p.completion, m.deprecated, m.replacement)
        row = (chk.uses_old, chk.correct, not chk.uses_old and not chk.uses_new, lp[k] > lp[len(cs) + k])
        rows.setdefault(m.library, []).append(row)
        rows.setdefault("all", []).append(row)
    order = sorted(k for k in rows if k != "all") + ["all"]
    return {lib: {"probes": len(rows[lib]), "old": _mean(r[0] for r in rows[lib]), "new": _mean(r[1] for r in rows[lib]),
                  "neither": _mean(r[2] for r in rows[lib]), "prefers_new": _mean(r[3] for r in rows[lib])}
            for lib in order if lib in rows}


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


def default_eval_data(model_name: str, device: str = "cpu", dtype: str = "fp32", with_base: bool = True) -> EvalData:
    """The validation and test splits of data/ (``trainables.data.split``) with the base
    model's completions of their snippets: what every training method is scored on, whatever it
    trained on. Validation: the probe contexts, half the locality snippets, half the
    over-application lookalikes; test: data/test_contexts.jsonl and the other halves. Without
    a test_contexts.jsonl there is no test split and validation takes every snippet.

    ``device`` / ``dtype``: where and how the trial runs, so that its completions are compared
    with the base model's made the same way (a bf16 GPU model and an fp32 CPU model can part on
    near-ties). ``with_base=False``: no base completions (scoring the base model itself)."""
    from dataclasses import replace

    from trainables.data import load_locality, load_migrations, load_specificity, load_test_contexts, split

    migrations, locality = load_migrations(), load_locality()
    spec = load_specificity(migrations=migrations, locality=locality)
    tests = load_test_contexts(migrations=migrations)
    base, tops = {}, {}
    if with_base:
        load = _loader(device, dtype)
        for snippets in (locality, spec):
            if snippets:
                comps = base_locality(model_name, snippets, load, device=device, dtype=dtype)
                base.update(zip((s.id for s in snippets), comps))
                tops.update(zip((s.id for s in snippets),
                                base_argmax(model_name, snippets, comps, load, device=device, dtype=dtype)))

    def part(ms, loc, sp) -> EvalSet:
        if not with_base:
            return EvalSet(tuple(ms), tuple(loc), None, tuple(sp), None)
        return EvalSet(tuple(ms), tuple(loc), tuple(base[s.id] for s in loc), tuple(sp),
                       tuple(base[s.id] for s in sp), tuple(tops[s.id] for s in loc), tuple(tops[s.id] for s in sp))

    if not tests:
        return EvalData(part(migrations, locality, spec), None)
    (loc_val, loc_test), (spec_val, spec_test) = split(locality), split(spec, group=lambda s: s.migration)
    return EvalData(part(migrations, loc_val, spec_val),
                    part([replace(m, probe_contexts=tests[m.id]) for m in migrations], loc_test, spec_test))


def _precision_key(device: str, dtype: str) -> list:
    """The part of a reference's cache key that says how it was computed: fp32 on the CPU keeps
    the key it always had, so existing caches stay valid."""
    from trainables.models import resolve_dtype

    kind = "cuda" if str(device).startswith("cuda") else "cpu"
    precision = resolve_dtype(dtype, device)
    return [] if (kind, precision) == ("cpu", "fp32") else [kind, precision]


def _cached(kind: str, key_parts, compute):
    """``compute()``'s JSON result, cached on disk under ``kind`` by a hash of ``key_parts``."""
    from trainables.testbed import cache_root

    key = hashlib.sha256(json.dumps(key_parts).encode()).hexdigest()[:16]
    path = cache_root() / kind / f"{key}.json"
    if path.is_file():
        return json.loads(path.read_text())
    # minutes on a real model on a CPU (SmolLM2's locality completions: ~2 minutes on 2 cores),
    # once per model, data and precision; say so rather than sit silent before the first trial
    print(f"making the base model's {kind.replace('_', ' ')} reference (cached for later sweeps)",
          file=sys.stderr, flush=True)
    t0 = time.time()
    out = compute()
    print(f"  {kind.replace('_', ' ')}: {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(out))
    tmp.replace(path)
    return out


def base_locality(model_name: str, snippets, load=None, device: str = "cpu", dtype: str = "fp32") -> list[str]:
    """The base model's completions of ``snippets`` (locality or over-application: anything with
    a ``prompt`` and a ``completion``), cached on disk per model, snippets, device kind and
    precision."""
    from trainables.models import load_model, resolve

    resolved = resolve(model_name)

    def compute():
        model, tokenizer = load(resolved) if load else load_model(resolved, device=device, dtype=dtype)
        return generate(model, tokenizer, [s.prompt for s in snippets])

    return _cached("base_locality", [resolved, [(s.prompt, s.completion) for s in snippets], MAX_NEW_TOKENS,
                                     PROMPT_FORMAT, *_precision_key(device, dtype)], compute)


def _loader(device: str, dtype: str):
    """A ``load`` for :func:`base_locality` / :func:`base_argmax` that loads the base model at
    most once, and only for a reference that is not on disk yet."""
    from functools import lru_cache

    from trainables.models import load_model

    return lru_cache(maxsize=1)(lambda resolved: load_model(resolved, device=device, dtype=dtype))


def base_argmax(model_name: str, snippets, completions: list[str], load=None, device: str = "cpu",
                dtype: str = "fp32") -> list[list[int]]:
    """The base model's argmax at each position of its own completions (``base_locality``),
    teacher-forced (:func:`score_lines`), cached on disk like them: what the token-level
    ``locality`` and ``specificity`` compare a trial's argmax with. ``load``: as in
    :func:`base_locality`."""
    from trainables.models import load_model, resolve

    resolved = resolve(model_name)

    def compute():
        model, tokenizer = load(resolved) if load else load_model(resolved, device=device, dtype=dtype)
        return [r[2] for r in score_lines(model, tokenizer, [(s.prompt, c) for s, c in zip(snippets, completions)],
                                          argmax=True)]

    return _cached("base_argmax", [resolved, [s.prompt for s in snippets], list(completions), MAX_NEW_TOKENS,
                                   PROMPT_FORMAT, *_precision_key(device, dtype)], compute)


def _set_key(es: EvalSet) -> list:
    return [[(m.id, m.deprecated, m.replacement, [(c.prompt, c.old, c.new) for c in m.train_contexts + m.probe_contexts])
             for m in es.migrations], [(s.prompt, s.completion) for s in es.locality + es.specificity]]


def base_progress(model_name: str, device: str = "cpu", dtype: str = "fp32", validation: EvalSet | None = None) -> float:
    """``progress`` of the untrained model on a quick evaluation of the validation split (the
    reference a trial must beat at the first rung: ``trainables.sweep.scheduler.StallASHA``),
    cached on disk per model + data. ``validation``: that split, when the caller has it."""
    from trainables.models import load_model, resolve

    resolved = resolve(model_name)
    if validation is None:
        validation = default_eval_data(model_name, device=device, dtype=dtype).validation

    def compute():
        model, tokenizer = load_model(resolved, device=device, dtype=dtype)
        return validation.evaluate(model, tokenizer, quick=True)[0]["progress"]

    key = [resolved, _set_key(validation), MAX_NEW_TOKENS, "quick: all locality prompts", "validation split",
           PROMPT_FORMAT, *_precision_key(device, dtype)]
    return float(_cached("base_progress", key, compute))


def references(model_name: str, device: str, dtype: str, progress_too: bool) -> float | None:
    """The base model's references a sweep's trials compare with (locality completions, and the
    stall rule's ``base_progress``), made once and cached; the driver runs this where the
    trials run (a GPU task when they have GPUs)."""
    if str(device).startswith("cuda"):
        import torch

        if not torch.cuda.is_available():  # a GPU Ray counts but torch cannot use: as the trials do
            device = "cpu"
    data = default_eval_data(model_name, device=device, dtype=dtype)  # the snippets' base completions
    return base_progress(model_name, device=device, dtype=dtype, validation=data.validation) if progress_too else None
