"""The general evaluation (HumanEval, ``trainables/evaluation/general.py``): programs judged in
the sandbox, the canonical solutions' log-likelihood and its delta to the base model, the
decoder's multi-line stop mode, and ``sweeps/evaluate.py --general-eval``'s flags, on a tiny
random Llama with a real model's (BOS-less, cut at the line start) tokenizer."""
from __future__ import annotations

import math
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def tiny_llama_path(small_testbed: Path, tmp_path_factory) -> Path:
    from tests.test_models import _tiny_model

    return _tiny_model("llama", small_testbed, tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def tiny_llama(tiny_llama_path: Path):
    import torch

    from trainables.models import load_model

    torch.set_num_threads(1)  # a 32-wide model: a second thread only syncs, and on a busy machine thrashes
    return load_model(str(tiny_llama_path))


def test_canonical_solutions_pass_and_wrong_bodies_fail_in_the_sandbox():
    from trainables.evaluation.general import check_completions, problems

    probs = problems(3)
    assert [p["task_id"] for p in probs] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    canonical = [p["canonical_solution"] for p in probs]
    wrong = ["    return None\n"] * 3
    # interleaved, from two threads: each verdict must land on its own program
    got = check_completions(probs + probs, canonical + wrong, workers=2)
    assert got == [True] * 3 + [False] * 3


def test_a_completion_that_loops_fails_at_its_timeout():
    from trainables.evaluation.general import check_completions, problems

    probs = problems(2)
    got = check_completions(probs, ["    while True:\n        pass\n", probs[1]["canonical_solution"]], timeout=0.5)
    assert got == [False, True]


def test_stop_sequences_cut_a_multi_line_completion(tiny_llama):
    from trainables.evaluation import generate
    from trainables.evaluation.general import problems

    model, tok = tiny_llama
    prompt = problems(1)[0]["prompt"]
    full = generate(model, tok, [prompt], max_new_tokens=24, stop=())[0]
    assert len(full.strip()) >= 6, full  # the model goes on over newlines and brackets to the limit
    stop = full.strip()[3:5]
    cut = generate(model, tok, [prompt], max_new_tokens=24, stop=("never written", stop))[0]
    assert cut == full[: full.find(stop)] and len(cut) < len(full)


def test_the_unchanged_models_canonical_logprob_delta_is_exactly_zero(tiny_llama):
    import torch

    from trainables.evaluation.general import canonical_logprob, canonical_logprobs, deltas, problems

    model, tok = tiny_llama
    probs = problems(3)
    base = canonical_logprob(model, tok, probs)
    assert base["humaneval_problems"] == 3
    assert deltas(canonical_logprob(model, tok, probs), base) == {"humaneval_canonical_logprob_delta": 0.0}
    per = canonical_logprobs(model, tok, probs)
    assert all(-math.log(len(tok)) * 3 < x < 0 for x in per), per  # a random model: near uniform
    with torch.no_grad():
        w = model.get_output_embeddings().weight
        saved = w.clone()
        w.mul_(4.0)  # sharper logits: another model
        try:
            moved = deltas(canonical_logprob(model, tok, probs), base)["humaneval_canonical_logprob_delta"]
        finally:
            w.copy_(saved)
    assert moved != 0.0 and math.isfinite(moved)
    with pytest.raises(ValueError, match="same limit"):
        deltas(canonical_logprob(model, tok, probs[:2]), base)


def test_humaneval_on_a_tiny_model_gives_its_figures_in_range(tiny_llama):
    from trainables.evaluation.general import STOP, canonical_logprob, humaneval, problems

    model, tok = tiny_llama
    base = canonical_logprob(model, tok, problems(3))
    out = humaneval(model, tok, limit=3, max_new_tokens=16, base=base, completions_too=True)
    assert out["humaneval_problems"] == 3 and len(out["humaneval_completions"]) == 3
    assert out["humaneval_pass_at_1"] == 0.0  # random weights write no working function
    assert out["humaneval_canonical_logprob"] == base["humaneval_canonical_logprob"] < 0
    assert out["humaneval_canonical_logprob_delta"] == 0.0
    assert not any(s in c for c in out["humaneval_completions"] for s in STOP)


def test_a_zero_adapter_against_the_cached_base_reference_has_a_zero_delta(tiny_llama, tiny_llama_path, tmp_path,
                                                                           monkeypatch):
    """What ``evaluate.py --adapter DIR --general-eval humaneval`` does: the base model's figure
    comes from its own load (cached on disk), the model's through the adapter's merged copy."""
    from peft import LoraConfig, get_peft_model

    from trainables.evaluation.general import base_canonical_logprob, humaneval

    monkeypatch.setenv("APIUPDATE_CACHE", str(tmp_path))  # the reference of a throwaway model
    model, tok = tiny_llama
    base = base_canonical_logprob(str(tiny_llama_path), limit=3)
    assert len(list(tmp_path.glob("base_humaneval/*.json"))) == 1
    assert base == base_canonical_logprob(str(tiny_llama_path), limit=3)  # read back from the cache
    zero = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))  # B starts at 0
    try:
        out = humaneval(zero, tok, limit=3, max_new_tokens=8, base=base)
    finally:
        zero.unload()
    assert out["humaneval_canonical_logprob_delta"] == 0.0 and "humaneval_pass_at_1_delta" not in out


def test_evaluate_cli_checks_its_general_eval_flags(capsys):
    from sweeps.evaluate import main

    assert main(["--general-eval-limit", "3"]) == 2
    assert "--general-eval" in capsys.readouterr().err
    assert main(["--general-eval", "humaneval", "--general-eval-limit", "0"]) == 2
    assert "must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--general-eval", "mbpp"])
