"""What a sequence starts with and what follows a statement, for every model: one rule shared
by training, evaluation, TRL prompts and the editing backend, so that each sees what the others
see. The testbed differs from real models in both: it was pretrained on one line per document,
``<|bos|> prompt line <|eos|>``."""
from __future__ import annotations

from pathlib import Path

TESTBED_MARK = "_apiupdate_testbed"  # set on a testbed tokenizer trained in memory


def is_testbed(path: str | Path) -> bool:
    """A folder built by ``trainables.testbed`` (it writes ``testbed.json`` beside the weights)."""
    return bool(path) and (Path(path) / "testbed.json").is_file()


def is_testbed_tokenizer(tokenizer) -> bool:
    """A testbed's tokenizer: trained by ``testbed.train_tokenizer`` or loaded from a testbed folder."""
    return bool(tokenizer.__dict__.get(TESTBED_MARK)) or is_testbed(getattr(tokenizer, "name_or_path", ""))


def start_ids(tokenizer) -> list[int]:
    """The ids every sequence starts with: what the tokenizer's own template puts first (a Llama
    or CodeLlama BOS), or the testbed's BOS (it was pretrained after one). Empty for tokenizers
    that add none (Qwen2 has no BOS token at all; SmolLM2's BOS is the chat marker
    ``<|im_start|>`` and GPT-2's is its end-of-text token, neither of which starts plain code).
    Memoised on the tokenizer."""
    memo = tokenizer.__dict__.get("_apiupdate_start")
    if memo is not None:
        return memo
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x", add_special_tokens=True)["input_ids"]
    ids = next((list(full[:i]) for i in range(len(full)) if full[i : i + len(plain)] == plain), [])
    if not ids and tokenizer.bos_token_id is not None and is_testbed_tokenizer(tokenizer):
        ids = [tokenizer.bos_token_id]
    tokenizer.__dict__["_apiupdate_start"] = ids
    return ids


def start_text(tokenizer) -> str:
    """:func:`start_ids` as text, for APIs that take strings (TRL's prompts)."""
    ids = start_ids(tokenizer)
    return tokenizer.decode(ids) if ids else ""


def statement_end(tokenizer) -> str:
    """What follows a statement in the model's pretraining, so what an update's targets end
    with: ``"eos"`` for the testbed, ``"newline"`` for a real model (the code goes on)."""
    return "eos" if is_testbed_tokenizer(tokenizer) else "newline"


def cut_at_line_start(tokenizer, prompt: str) -> tuple[str, str]:
    """``(prompt, lead)``: where a prompt that ends at a line break is tokenized apart from what
    follows it. A real model's BPE merges a newline with the indentation after it (SmolLM2 and
    GPT-2-style byte-level vocabularies: ``"():\\n    return"`` is ``"():" "\\n   " " return"``),
    so a prompt tokenized up to its final newline ends on a lone ``"\\n"`` token that pretraining
    never put before indented code. Scored that way, SmolLM2 answered 61 of 115 locality prompts
    with a blank line and began most others with ``"#   "`` or a tab, and every update that
    taught it to write a line there flipped those completions. So the trailing newlines move to
    what follows (``lead``): the prompt ends where pretraining's tokens do, and the model writes
    the line break with the indentation, as it learnt to.

    The testbed keeps its cut (``lead`` empty): it was pretrained on prompt and line tokenized
    apart exactly there. A prompt of newlines only is not cut (nothing would be left of it)."""
    if is_testbed_tokenizer(tokenizer):
        return prompt, ""
    body = prompt.rstrip("\n")
    if not body:
        return prompt, ""
    return body, prompt[len(body):]


def skip_line_start(text: str) -> str:
    """``text`` from the first line that holds more than whitespace (its indentation kept): what a
    completion that began with :func:`cut_at_line_start`'s ``lead`` holds once the line breaks
    (and blank lines) before its statement are dropped. All whitespace: ``""``."""
    body = text.lstrip()
    if not body:
        return ""
    nl = text.rfind("\n", 0, len(text) - len(body))
    return text[nl + 1:] if nl >= 0 else text
