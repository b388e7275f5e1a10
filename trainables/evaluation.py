"""The one evaluation every method is scored with, so numbers compare across rows.

Greedy, batched, one line per prompt. Metrics (all in [0, 1]):

- ``efficacy``: train contexts whose completion is API-correct (parses, uses the replacement,
  no longer uses the deprecated call);
- ``generalization``: the same on the held-out probe contexts;
- ``old_api_rate``: probe contexts whose completion still uses the deprecated call;
- ``locality``: locality prompts completed exactly as the *base* model completes them;
- ``locality_accuracy``: locality prompts completed exactly as the reference;
- ``api_correct``, ``syntax_ok``, ``exact_match`` (equals the reference new line) and
  ``edit_similarity`` (difflib ratio to it): over all migration contexts;
- ``soft_generalization``: the continuous relaxation of ``generalization``: mean over the probe
  contexts of sigmoid(log p(new line) - log p(old line)), teacher-forced;
- ``progress``: what early stopping ranks intermediate reports by (see ``progress``).
"""
from __future__ import annotations

import difflib
import hashlib
import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from trainables.apicheck import check_completion

if TYPE_CHECKING:  # torch is imported lazily so that `--help` stays fast
    import torch

# Completions are one line of <= 90 characters: ~30 BPE tokens on code; 48 leaves headroom.
MAX_NEW_TOKENS = 48
LOCALITY_FLOOR = 0.95  # the objective penalises locality below this (no-forgetting constraint)
LOCALITY_PENALTY = 4.0  # 1 point of locality below the floor costs 4 points of generalization
# Weight of soft_generalization in `progress`: 0.1 * its range is ~4 probe contexts of 136.
PROGRESS_WEIGHT = 0.1


@dataclass(frozen=True)
class Prediction:
    kind: str  # "train" | "probe" | "locality"
    ref_id: str
    prompt: str
    completion: str
    reference: str


def first_line(text: str) -> str:
    return text.split("\n", 1)[0]


def _newline_ids(tokenizer) -> torch.Tensor:
    """Ids of tokens whose text contains a newline: a completion ends at the first one."""
    import torch

    cache = getattr(tokenizer, "_apiupdate_newline_ids", None)
    if cache is None:
        vocab = tokenizer.get_vocab()
        cache = torch.tensor(sorted(i for t, i in vocab.items()
                                    if "\n" in tokenizer.convert_tokens_to_string([t])), dtype=torch.long)
        tokenizer._apiupdate_newline_ids = cache
    return cache


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = MAX_NEW_TOKENS,
             batch_size: int = 96) -> list[str]:
    """Greedy one-line completions, batched by similar length (left padding), KV-cached.

    A hand-rolled loop rather than ``model.generate``: on the testbed its per-step overhead
    dominated (5.5 s for the 570 prompts vs ~1.5 s here), and rows stop at the first newline
    token, not only at EOS. Finished rows leave the batch and the KV cache at once: a batch runs
    as long as its longest completion, and completions are 17 tokens on average, so computing
    the finished rows to the end cost ~30% of an evaluation (570 prompts on the testbed, 1 thread:
    5.6-6.3 s -> 4.1-4.4 s, the same completions)."""
    import torch

    device = next(model.parameters()).device
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    encoded = [bos + tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    out: list[str] = [""] * len(prompts)
    pad = tokenizer.pad_token_id
    stop = torch.cat([_newline_ids(tokenizer), torch.tensor([tokenizer.eos_token_id])]).to(device)
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
            steps = []  # (rows, next tokens) per step
            cache = None  # transformers 5 names the KV cache `cache` (was past_key_values)
            step_ids, step_pos = ids, pos
            for _ in range(max_new_tokens):
                o = model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos,
                          cache=cache, use_cache=True, logits_to_keep=1)
                cache = o.cache
                nxt = o.logits[:, -1, :].argmax(-1)
                steps.append((rows, nxt))
                live = ~torch.isin(nxt, stop)
                if not bool(live.any()):
                    break
                if not bool(live.all()):  # drop finished rows from the batch and its cache
                    keep = live.nonzero()[:, 0]
                    cache.batch_select_indices(keep)
                    rows, nxt, mask, step_pos = rows[keep], nxt[keep], mask[keep], step_pos[keep]
                step_ids = nxt[:, None]
                step_pos = step_pos[:, -1:] + 1
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            gen: list[list[int]] = [[] for _ in idx]
            for r, t in steps:
                for row, tok in zip(r.tolist(), t.tolist()):
                    gen[row].append(tok)
            for row, i in enumerate(idx):
                out[i] = first_line(tokenizer.decode(gen[row], skip_special_tokens=True))
    if was_training:
        model.train()
    return out


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0


def objective(metrics: dict) -> float:
    """Generalization subject to locality: one scalar for the search to maximise."""
    shortfall = max(0.0, LOCALITY_FLOOR - metrics["locality"])
    return metrics["generalization"] - LOCALITY_PENALTY * shortfall


def progress(metrics: dict) -> float:
    """The objective plus a continuous tie-breaker, for ASHA's rungs.

    After one epoch most trials have generalization exactly 0 (no probe flipped yet) and
    locality 1, so the objective ties and ASHA (which stops a trial only when it is strictly
    below the cutoff) stopped almost nothing: 6-7 of 40 in the headline sweep, and it stopped
    some trials that had started to learn (locality dipping) in favour of ones that had not
    moved. ``soft_generalization`` moves as soon as the adapter starts to prefer the new API
    on held-out code, long before a greedy completion flips. The final objective, the one
    Optuna and the best-trial choice see, is unchanged."""
    return metrics["objective"] + PROGRESS_WEIGHT * metrics.get("soft_generalization", 0.0)


def line_logprobs(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 96) -> list[float]:
    """Sum of the token log-probabilities of each ``line`` after its ``prompt`` (teacher
    forced; prompt and line tokenized apart, as in pretraining and generation)."""
    import torch

    device = next(model.parameters()).device
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    enc = []
    for prompt, line in pairs:
        p = bos + tokenizer(prompt, add_special_tokens=False)["input_ids"]
        enc.append((p, tokenizer(line, add_special_tokens=False)["input_ids"]))
    order = sorted(range(len(enc)), key=lambda i: len(enc[i][0]) + len(enc[i][1]))
    out = [0.0] * len(enc)
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            width = max(len(enc[i][0]) + len(enc[i][1]) for i in idx)
            ids = torch.full((len(idx), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            target = torch.zeros((len(idx), width), dtype=torch.bool)  # positions whose token is scored
            for row, i in enumerate(idx):
                p, c = enc[i]
                ids[row, : len(p) + len(c)] = torch.tensor(p + c)
                mask[row, : len(p) + len(c)] = 1
                target[row, len(p) : len(p) + len(c)] = True
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None].to(device))[..., 0]
            sums = (logp * target[:, 1:].to(device)).sum(-1).tolist()
            for row, i in enumerate(idx):
                out[i] = sums[row]
    if was_training:
        model.train()
    return out


def soft_generalization(model, tokenizer, migrations) -> float:
    """Mean over probe contexts of P(new line beats old line) = sigmoid(log-prob difference)."""
    ctxs = [c for m in migrations for c in m.probe_contexts]
    if not ctxs:
        return 0.0
    lp = line_logprobs(model, tokenizer, [(c.prompt, c.new) for c in ctxs] + [(c.prompt, c.old) for c in ctxs])
    n = len(ctxs)
    return _mean(1.0 / (1.0 + math.exp(max(-60.0, min(60.0, lp[n + i] - lp[i])))) for i in range(n))


def evaluate(model, tokenizer, migrations, locality, base_locality: list[str] | None,
             batch_size: int = 96, max_new_tokens: int = MAX_NEW_TOKENS,
             quick: bool = False) -> tuple[dict, list[Prediction]]:
    """All metrics plus the predictions. ``base_locality``: the base model's locality
    completions (``None`` when scoring the base model itself: locality is then 1 by definition).

    ``quick``: for intermediate reports (ASHA and the multi-objective searcher decide on them):
    the probes, the first train context of each migration and every 4th locality prompt
    (~45% of the full cost)."""
    model = merged_copy(model)
    if quick:
        keep = range(0, len(locality), 4)
        locality = [locality[i] for i in keep]
        if base_locality is not None:
            base_locality = [base_locality[i] for i in keep]
    items: list[tuple[str, object, object]] = []
    for m in migrations:
        items += [("train", m, c) for c in (m.train_contexts[:1] if quick else m.train_contexts)]
        items += [("probe", m, c) for c in m.probe_contexts]
    items += [("locality", s, None) for s in locality]
    prompts = [(c.prompt if c is not None else s.prompt) for _, s, c in items]
    completions = generate(model, tokenizer, prompts, max_new_tokens, batch_size)

    preds: list[Prediction] = []
    rows: dict[str, list] = {"train": [], "probe": []}
    loc_pred: list[str] = []
    for (kind, rec, ctx), comp in zip(items, completions):
        if kind == "locality":
            loc_pred.append(comp)
            preds.append(Prediction(kind, rec.id, rec.prompt, comp, rec.completion))
            continue
        chk = check_completion(ctx.prompt, comp, rec.deprecated, rec.replacement)
        sim = difflib.SequenceMatcher(None, comp, ctx.new).ratio()
        rows[kind].append((chk, comp == ctx.new, sim))
        preds.append(Prediction(kind, rec.id, ctx.prompt, comp, ctx.new))

    both = rows["train"] + rows["probe"]
    if base_locality is None:
        base_locality = loc_pred
    metrics = {
        "efficacy": _mean(c.correct for c, _, _ in rows["train"]),
        "generalization": _mean(c.correct for c, _, _ in rows["probe"]),
        "old_api_rate": _mean(c.uses_old for c, _, _ in rows["probe"]),
        "locality": _mean(p == b for p, b in zip(loc_pred, base_locality)),
        "locality_accuracy": _mean(p == s.completion for p, s in zip(loc_pred, locality)),
        "api_correct": _mean(c.correct for c, _, _ in both),
        "syntax_ok": _mean(c.syntax_ok for c, _, _ in both),
        "exact_match": _mean(e for _, e, _ in both),
        "edit_similarity": _mean(s for _, _, s in both),
        "n_migrations": len(migrations),
        "n_libraries": len({m.library for m in migrations}),
        "n_locality": len(locality),
    }
    metrics["soft_generalization"] = soft_generalization(model, tokenizer, migrations)
    metrics["objective"] = objective(metrics)
    metrics["progress"] = progress(metrics)
    return metrics, preds


# Evaluate a LoRA model through a merged copy when the copy is this small (parameters): cheap
# in memory, and it runs without PEFT's per-module adapter calls.
MERGED_COPY_MAX_PARAMS = 100_000_000


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


def default_eval_data(model_name: str) -> tuple:
    """(migrations, locality snippets, the base model's locality completions) from data/: what
    every training method is scored on, whatever it trained on."""
    from trainables.data import load_locality, load_migrations

    locality = load_locality()
    return load_migrations(), locality, base_locality(model_name, locality)


def base_locality(model_name: str, locality, load=None) -> list[str]:
    """The base model's locality completions, cached on disk per model + locality data."""
    from trainables.models import load_model, resolve
    from trainables.testbed import cache_root

    resolved = resolve(model_name)
    key = hashlib.sha256(json.dumps(
        [resolved, [(s.prompt, s.completion) for s in locality], MAX_NEW_TOKENS]).encode()).hexdigest()[:16]
    path = cache_root() / "base_locality" / f"{key}.json"
    if path.is_file():
        return json.loads(path.read_text())
    model, tokenizer = (load or load_model)(resolved)
    out = generate(model, tokenizer, [s.prompt for s in locality])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out))
    tmp.replace(path)
    return out
