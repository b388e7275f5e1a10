"""The base model's references a trial is compared with, made once and cached on disk by what
they depend on (model, data, precision, prompt format): its completions of the locality and
over-application snippets (:func:`base_locality`), its argmax along them (:func:`base_argmax`),
the held-out contexts where it writes the deprecated API (:func:`base_triggers`), and the
untrained model's ``progress`` (:func:`base_progress`); and the evaluation data of
data/ with them (:func:`default_eval_data`)."""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import replace

from trainables.evaluation.decoding import MAX_NEW_TOKENS, generate
from trainables.evaluation.scoring import score_lines
from trainables.evaluation.splits import EvalData, EvalSet

# In the key of every cached base-model reference: how prompts are tokenized and completions
# begin (tokens.cut_at_line_start); references made before real-model prompts were cut there
# are stale.
PROMPT_FORMAT = "cut at the line start"


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
    # minutes on a real model on a CPU, once per model, data and precision: say so rather than
    # sit silent before the first trial
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


def base_triggers(model_name: str, migrations, load=None, device: str = "cpu", dtype: str = "fp32") -> list[list]:
    """EDAPIBench's filter: the held-out contexts (``probe_contexts``) where the base model's
    greedy completion uses the deprecated API, as ``[migration id, context index]`` pairs,
    cached like the other references. A figure on them says what an update changes where the
    model needed one; on the rest it mostly measures what the model wrote anyway."""
    from trainables.apicheck import check_completion
    from trainables.models import load_model, resolve

    resolved = resolve(model_name)
    where = [(m, i, c) for m in migrations for i, c in enumerate(m.probe_contexts)]

    def compute():
        model, tokenizer = load(resolved) if load else load_model(resolved, device=device, dtype=dtype)
        done = generate(model, tokenizer, [c.prompt for _, _, c in where], heads=[c.head for _, _, c in where])
        return [[m.id, i] for (m, i, c), comp in zip(where, done)
                if check_completion(c.prompt, c.head + comp, m.deprecated, m.replacement).uses_old]

    return _cached("base_triggers", [resolved, [(m.id, m.deprecated, m.replacement, i, c.prompt, c.old, c.new)
                                                for m, i, c in where], MAX_NEW_TOKENS, PROMPT_FORMAT,
                                     *_precision_key(device, dtype)], compute)


def default_eval_data(model_name: str, device: str = "cpu", dtype: str = "fp32", with_base: bool = True) -> EvalData:
    """The validation and test splits of data/ (``trainables.data.split``) with the base
    model's completions of their snippets: what every training method is scored on, whatever it
    trained on. Validation: the probe contexts, half the locality snippets, half the
    over-application lookalikes; test: data/test_contexts.jsonl and the other halves. Without
    a test_contexts.jsonl there is no test split and validation takes every snippet.

    ``device`` / ``dtype``: where and how the trial runs, so that its completions are compared
    with the base model's made the same way (a bf16 GPU model and an fp32 CPU model can part on
    near-ties). ``with_base=False``: no base completions (scoring the base model itself)."""
    from trainables.data import load_locality, load_migrations, load_specificity, load_test_contexts, split

    migrations, locality = load_migrations(), load_locality()
    spec = load_specificity(migrations=migrations, locality=locality)
    tests = load_test_contexts(migrations=migrations)
    base = {}
    load = _loader(device, dtype)
    if with_base:
        for snippets in (locality, spec):
            if snippets:
                base.update(zip((s.id for s in snippets), base_locality(model_name, snippets, load, device=device,
                                                                       dtype=dtype)))

    def tops(snippets) -> tuple:
        # per split, in the split's order: the evaluation batches a split's snippets exactly as
        # this call does, so an unchanged model meets the same padding widths, and in bf16 the
        # same rounding, as its reference
        if not snippets:
            return ()
        return tuple(base_argmax(model_name, snippets, [base[s.id] for s in snippets], load, device=device,
                                 dtype=dtype))

    def part(ms, loc, sp) -> EvalSet:
        triggered = frozenset(map(tuple, base_triggers(model_name, ms, load, device=device, dtype=dtype)))
        if not with_base:
            return EvalSet(tuple(ms), tuple(loc), None, tuple(sp), None, triggered=triggered)
        return EvalSet(tuple(ms), tuple(loc), tuple(base[s.id] for s in loc), tuple(sp),
                       tuple(base[s.id] for s in sp), tops(loc), tops(sp), triggered=triggered)

    if not tests:
        return EvalData(part(migrations, locality, spec), None)
    (loc_val, loc_test), (spec_val, spec_test) = split(locality), split(spec, group=lambda s: s.migration)
    return EvalData(part(migrations, loc_val, spec_val),
                    part([replace(m, probe_contexts=tests[m.id]) for m in migrations], loc_test, spec_test))


def _set_key(es: EvalSet) -> list:
    """What :func:`base_progress`'s cache key holds of the split it scores."""
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
