"""What the evaluation reads off text and tokens: where a statement ends (brackets, strings and
comments, as Python reads them), per-vocabulary tables of which tokens end a line, begin one or
are blank, and how one prompt is tokenized for decoding and teacher forcing alike
(:func:`prompt_pieces`). The tables and encodings are memoised on the tokenizer: the decoding
loop looks them up per token."""
from __future__ import annotations

from typing import TYPE_CHECKING

from trainables.tokens import cut_at_line_start, start_ids

if TYPE_CHECKING:  # torch is imported lazily so that `--help` stays fast
    import torch


def bracket_depth(text: str, depth: int = 0) -> int:
    """Open brackets after ``text`` (strings and comments skipped), starting from ``depth``."""
    return statement_end(text, depth, want_depth=True)


_OPEN, _CLOSE = "([{", ")]}"


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


def token_brackets(tokenizer):
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


def clean_stop_ids(tokenizer) -> set[int]:
    """Stop tokens that end a completion with nothing before their newline (or EOS). Not those
    that open a bracket after it (``"\n("``): ``evaluation.generate`` counts a token's brackets
    before it decides, so such a token continues the statement."""
    brackets = token_brackets(tokenizer)
    stops = {int(i) for i in newline_ids(tokenizer)
             if tokenizer.convert_tokens_to_string([tokenizer.convert_ids_to_tokens(int(i))]).startswith("\n")
             and int(brackets[int(i)]) <= 0}
    return stops | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


def fit_to_vocab(mask: torch.Tensor, size: int) -> torch.Tensor:
    """A per-id mask cut or padded (with True) to a model's vocabulary size, which can exceed
    the tokenizer's (Qwen2 pads its embedding to a multiple of 128)."""
    import torch

    if len(mask) >= size:
        return mask[:size]
    return torch.cat([mask, torch.ones(size - len(mask), dtype=torch.bool, device=mask.device)])


def prompt_pieces(tokenizer, prompt: str, head: str = "") -> tuple[list[int], str, bool]:
    """``(ids, lead, at_line_start)`` of one prompt as ``evaluation.generate`` and
    ``evaluation.score_lines`` feed it: start ids + the prompt cut before its final line break
    on a real model (``tokens.cut_at_line_start``) + ``lead + head`` when there is a head.
    Without a head the completion must write the line break itself (``at_line_start``); its
    text then begins with ``lead``, which :func:`tokens.skip_line_start` drops."""
    body, lead = cut_at_line_start(tokenizer, prompt)
    ids = start_ids(tokenizer) + encode(tokenizer, body)
    if head:
        return ids + encode(tokenizer, lead + head), "", False
    return ids, lead, bool(lead)


def encode(tokenizer, text: str) -> list[int]:
    """``text``'s token ids (no special tokens), memoised on the tokenizer: a trial evaluates
    the same ~700 prompts and lines at every rung, in both ``evaluation.score_lines`` and
    ``evaluation.generate``. Callers must not modify the list."""
    memo = tokenizer.__dict__.setdefault("_apiupdate_encoded", {})
    ids = memo.get(text)
    if ids is None:
        if len(memo) > 200_000:
            memo.clear()
        ids = memo[text] = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids
