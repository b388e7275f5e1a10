"""The one evaluation every method is scored with, so numbers compare across rows.

Greedy, batched, one statement per prompt. A migration context is prompted with the lines
before it plus the start of the statement that the old and new lines share (``Context.head``:
``df =``, ``names = vec.``), so the completion is where the model chooses an API; the statement
it writes is judged whole, over several lines while a bracket is open (``statement_end``).
Metrics (all in [0, 1]):

- ``efficacy``: train contexts whose completion is API-correct, strictly
  (``trainables.apicheck``): parses, calls the replacement as the reference line does, on the
  prompt variables the reference line reads, and no longer uses the deprecated call;
- ``generalization``: the same on the held-out probe contexts;
- ``efficacy_lax`` / ``generalization_lax``: the lax check (parses, names the replacement, not
  the deprecated call), under which a bare ``log = pd.concat`` counts;
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
- ``deprecated_use_rate`` / ``replacement_hit_rate``: on the triggered subset (the probe
  contexts where the base model writes the deprecated API; ``n_triggered`` of them), the share
  of completions that still use it, and the share that are strictly correct;
- ``soft_generalization``: the continuous relaxation of ``generalization``: mean over the probe
  contexts of sigmoid(log p(new line) - log p(old line)), teacher-forced;
- ``progress``: what early stopping ranks intermediate reports by (see ``progress``);
- ``decoded``: the share of prompts that had to be decoded (the others were proven by one
  teacher-forced pass to complete with their expected line; see ``evaluate``): cost, not quality.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass

from trainables.apicheck import check_completion
from trainables.evaluation.decoding import MAX_NEW_TOKENS, generate, merged_copy
from trainables.evaluation.scoring import score_lines
from trainables.objective import objective, progress


@dataclass(frozen=True)
class Prediction:
    kind: str  # "train" | "probe" | "locality" | "specificity"
    ref_id: str
    prompt: str
    completion: str
    reference: str


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0


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
             train: bool = True, base_locality_argmax=None, base_specificity_argmax=None,
             repair=None, triggered=None) -> tuple[dict, list[Prediction]]:
    """All metrics plus the predictions. ``base_locality`` / ``base_specificity``: the base
    model's completions of the locality and over-application prompts (``None`` when scoring the
    base model itself: locality and specificity are then 1 by definition).
    ``base_*_argmax``: the base model's argmax along those completions
    (:func:`references.base_argmax`), what ``locality`` and ``specificity`` compare with;
    without them, the completions' own tokens.

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

    ``start_states``: see :func:`score_lines` (the training loop passes its ``FrozenStates``).

    ``triggered``: ``(migration id, probe context index)`` pairs where the base model writes the
    deprecated API (``references.base_triggers``): ``deprecated_use_rate`` and
    ``replacement_hit_rate`` (strict) are figures over them, ``n_triggered`` their number.

    ``repair``: rewrites the final statements before they are judged (the prompt baseline's
    ReplaceAPI), ``repair(model, tokenizer, prompts, statements, migrations) -> statements``,
    where ``migrations`` holds the id of the migration each prompt belongs to or resembles
    (None for a locality snippet); proven and decoded statements alike, every prompt kind."""
    model = merged_copy(model)
    specificity = list(specificity)
    items = _items(migrations, locality, specificity, train, quick)
    prompts = [(c.prompt if c is not None else s.prompt) for _, s, c in items]
    # the start of the statement the prompt already holds; the completion is what follows it
    heads = [(c.head if c is not None else "") for _, _, c in items]
    expected, refs = _expected(items, base_locality, base_locality_argmax, base_specificity, base_specificity_argmax)
    proven, new_lp, old_lp, agreement = _prove(model, tokenizer, items, prompts, heads, expected, refs, batch_size,
                                               max_new_tokens, start_states)
    completions, decoded = _decode_rest(model, tokenizer, prompts, heads, proven, max_new_tokens, batch_size)
    if repair is not None:
        completions = repair(model, tokenizer, prompts, completions,
                             [None if k == "locality" else getattr(r, "migration", r.id) for k, r, _ in items])
    preds, rows, snippet_pred, over = _judge(items, completions, migrations)
    loc = _snippet_figures("locality", locality, snippet_pred["locality"], base_locality,
                           _snippet_mean(items, "locality", agreement))
    metrics = _figures(migrations, rows, loc, len(locality), decoded)
    if train:
        metrics["efficacy"] = _mean(c.correct for c, _, _ in rows["train"])
        metrics["efficacy_lax"] = _mean(c.lax for c, _, _ in rows["train"])
    if specificity:
        metrics.update(_snippet_figures("specificity", specificity, snippet_pred["specificity"], base_specificity,
                                        _snippet_mean(items, "specificity", agreement)),
                       over_application=_mean(over), n_specificity=len(specificity))
    if triggered is not None:
        metrics.update(_triggered_figures(items, rows["probe"], triggered))
    probe_idx = [i for i, (kind, _, _) in enumerate(items) if kind == "probe"]
    metrics["soft_generalization"] = _soft([new_lp[i] for i in probe_idx], [old_lp[i] for i in probe_idx])
    metrics["objective"] = objective(metrics)
    metrics["progress"] = progress(metrics)
    return metrics, preds


def _items(migrations, locality, specificity, train: bool, quick: bool) -> list[tuple[str, object, object]]:
    """``(kind, record, context)`` per prompt: each migration's train contexts (the first one
    when ``quick``, none unless ``train``) and probe contexts, then the locality and the
    specificity snippets (context ``None``)."""
    items: list[tuple[str, object, object]] = []
    for m in migrations:
        if train:
            items += [("train", m, c) for c in (m.train_contexts[:1] if quick else m.train_contexts)]
        items += [("probe", m, c) for c in m.probe_contexts]
    items += [("locality", s, None) for s in locality]
    items += [("specificity", s, None) for s in specificity]
    return items


def _expected(items, base_locality, base_locality_argmax, base_specificity,
              base_specificity_argmax) -> tuple[list[str | None], dict[int, list[int]]]:
    """Per item, the line it should produce after its head (a context's reference new line, a
    snippet's base completion; ``None`` for a snippet without one), and per snippet index the
    base model's argmax along its completion, where given."""
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
    return expected, refs


def _prove(model, tokenizer, items, prompts, heads, expected, refs, batch_size, max_new_tokens, start_states):
    """The teacher-forced pass of :func:`evaluate`: ``(completions, new_lp, old_lp, agreement)``,
    the completion of each prompt where the pass proves it (``None`` where it must be decoded),
    the log-probabilities of the expected and of the old lines by item index, and each
    snippet's token agreement with the base model (:func:`token_agreement`)."""
    checks = [i for i, e in enumerate(expected) if e is not None]
    # every migration context is also scored against its old line: the probes' scores give
    # soft_generalization, and a context proven to be completed with the old line (an untrained
    # or stalled model: most of them) need not be decoded either
    olds = [i for i, (kind, _, _) in enumerate(items) if kind in ("train", "probe")]
    scored = checks + olds
    # each snippet set is batched alone, as its reference (references.base_argmax) was
    group = {"locality": 1, "specificity": 2}
    scores = score_lines(model, tokenizer, [(prompts[i], expected[i]) for i in checks]
                         + [(prompts[i], items[i][2].old[len(heads[i]):]) for i in olds], batch_size, max_new_tokens,
                         start_states, heads=[heads[i] for i in scored], argmax=True,
                         groups=[group.get(items[i][0], 0) for i in scored])
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
    return completions, new_lp, old_lp, agreement


def _decode_rest(model, tokenizer, prompts, heads, proven, max_new_tokens, batch_size) -> tuple[list[str], float]:
    """Every completion, the proven ones as they are and the others decoded, each with its head
    before it (the whole statement is judged); and the share of prompts decoded."""
    completions = list(proven)
    todo = [i for i, c in enumerate(completions) if c is None]
    for i, comp in zip(todo, generate(model, tokenizer, [prompts[i] for i in todo], max_new_tokens, batch_size,
                                      heads=[heads[i] for i in todo])):
        completions[i] = comp
    return [h + c for h, c in zip(heads, completions)], len(todo) / max(1, len(completions))


def _judge(items, completions, migrations) -> tuple[list[Prediction], dict[str, list], dict[str, list[str]],
                                                   list[bool]]:
    """``(preds, rows, snippet_pred, over)``: the predictions; per migration context (``rows``
    by kind) its API check, whether it is the reference new line and its edit similarity to it;
    the snippets' completions by kind; and for each over-application lookalike of a known
    migration whether it was rewritten to the new API."""
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
        chk = check_completion(ctx.prompt, comp, rec.deprecated, rec.replacement, ctx.new)
        sim = difflib.SequenceMatcher(None, comp, ctx.new).ratio()
        rows[kind].append((chk, comp == ctx.new, sim))
        preds.append(Prediction(kind, rec.id, ctx.prompt, comp, ctx.new))
    return preds, rows, snippet_pred, over


def _figures(migrations, rows, locality_figures: dict, n_locality: int, decoded: float) -> dict:
    """The figures every evaluation reports, in their order: the probe contexts', the locality
    snippets' (:func:`_snippet_figures`), all migration contexts', the counts, and the share of
    prompts decoded."""
    both = rows["train"] + rows["probe"]
    return {
        "generalization": _mean(c.correct for c, _, _ in rows["probe"]),
        "generalization_lax": _mean(c.lax for c, _, _ in rows["probe"]),
        "old_api_rate": _mean(c.uses_old for c, _, _ in rows["probe"]),
        **locality_figures,
        "api_correct": _mean(c.correct for c, _, _ in both),
        "syntax_ok": _mean(c.syntax_ok for c, _, _ in both),
        "exact_match": _mean(e for _, e, _ in both),
        "edit_similarity": _mean(s for _, _, s in both),
        "n_migrations": len(migrations),
        "n_libraries": len({m.library for m in migrations}),
        "n_locality": n_locality,
        "decoded": decoded,
    }


def _triggered_figures(items, probe_rows, triggered) -> dict:
    """The probe figures on the triggered subset (EDAPIBench's: the contexts where the base model
    wrote the deprecated API); the rates are absent where the split has none of them."""
    probes = [(m.id, m.probe_contexts.index(c)) for kind, m, c in items if kind == "probe"]
    hit = [chk for key, (chk, _, _) in zip(probes, probe_rows) if key in triggered]
    out: dict = {"n_triggered": len(hit)}
    if hit:
        out.update(deprecated_use_rate=_mean(c.uses_old for c in hit), replacement_hit_rate=_mean(c.correct for c in hit))
    return out


def _snippet_figures(kind: str, snippets, completions: list[str], base: list[str] | None, agreed: float) -> dict:
    """``kind`` (``agreed``: the token agreement, :func:`_snippet_mean`), ``kind_exact`` (the
    share of snippets completed exactly as the base model completes them; scoring the base
    model itself, ``base`` is None and its own completions are the reference) and
    ``kind_accuracy`` (exactly as the snippet's reference completion)."""
    base = completions if base is None else base
    return {kind: agreed,
            f"{kind}_exact": _mean(p == b for p, b in zip(completions, base)),
            f"{kind}_accuracy": _mean(p == s.completion for p, s in zip(completions, snippets))}


def token_agreement(best: list[int], hits: list[bool], ref: list[int] | None) -> float:
    """One snippet's token-level locality, teacher-forced on the base model's completion: the
    share of the positions read (each token's, then the one after the line) where the model's
    argmax is the base model's (``ref``, :func:`references.base_argmax`); without ``ref``, where
    it is the completion's own token (a stop token after it)."""
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
TEST_KEYS = ("generalization", "generalization_lax", "old_api_rate", "soft_generalization", "locality", "locality_exact",
             "locality_accuracy", "specificity", "specificity_exact", "specificity_accuracy", "over_application",
             "n_triggered", "deprecated_use_rate", "replacement_hit_rate", "syntax_ok", "objective")


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
        chk = check_completion(p.prompt, p.completion, m.deprecated, m.replacement, p.reference)
        row = (chk.uses_old, chk.correct, not chk.uses_old and not chk.uses_new, lp[k] > lp[len(cs) + k])
        rows.setdefault(m.library, []).append(row)
        rows.setdefault("all", []).append(row)
    order = sorted(k for k in rows if k != "all") + ["all"]
    return {lib: {"probes": len(rows[lib]), "old": _mean(r[0] for r in rows[lib]), "new": _mean(r[1] for r in rows[lib]),
                  "neither": _mean(r[2] for r in rows[lib]), "prefers_new": _mean(r[3] for r in rows[lib])}
            for lib in order if lib in rows}
