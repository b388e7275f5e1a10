"""Rules + prompt baseline: rule extraction, the strategies' headers, exact temperature
sampling, and the sweep end to end into MLflow and the comparison table."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainables.prompt import PromptBuilder, PromptConfig, extract_rules, imported_libraries

ROOT = Path(__file__).resolve().parent.parent


def test_rules_come_from_old_and_new_code(fixture_data):
    migrations, _ = fixture_data
    rules = {r.migration: r for r in extract_rules(migrations)}
    append = rules["pandas-dataframe-append"]
    assert ".append(" in append.old and "pd.concat(" in append.new
    assert (append.library, append.version) == ("pandas", "2.0")
    # no evaluation prompt leaks into a rule: rule lines are old_code / new_code lines
    m = next(m for m in migrations if m.id == "pandas-dataframe-append")
    assert append.old in m.old_code and append.new in m.new_code


def test_strategies_put_comment_headers_before_the_unchanged_prompt(fixture_data):
    migrations, locality = fixture_data
    rules = extract_rules(migrations)
    m = migrations[0]
    ctx = m.probe_contexts[0]
    assert imported_libraries(ctx.prompt) == ["pandas"]
    heads = {s: PromptBuilder(rules, s, "oracle", 3).header(ctx.prompt, m.id) for s in ("basic", "context", "rules", "cot")}
    assert heads["basic"] == ""
    assert heads["context"] == "# requires: pandas>=2.0\n"
    assert heads["rules"].startswith("# rule: pandas>=2.0: ") and "->" in heads["rules"]
    assert heads["cot"].count("\n") == 4 and "step by step" in heads["cot"]
    for h in heads.values():
        assert all(line.startswith("#") for line in h.splitlines())
    # applied: every prompt keeps its code, behind the header; locality snippets without an
    # import of a known library stay as they were
    from trainables.evaluation import EvalSet

    b = PromptBuilder(rules, "context", "oracle", 3)
    headed = EvalSet(tuple(migrations), tuple(locality), None).with_prompts(lambda p, mid: b.header(p, mid) + p)
    new_m, new_l = headed.migrations, headed.locality
    assert new_m[0].probe_contexts[0].prompt == heads["context"] + ctx.prompt
    plain = [s for s in locality if not imported_libraries(s.prompt)]
    assert plain and all(a.prompt == b.prompt for a, b in zip(new_l, locality) if b in plain)


def test_a_deployments_comments_depend_on_the_snippet_alone_and_the_oracle_is_named(fixture_data):
    """``library``: a probe, a lookalike and a locality snippet with the same code get the same
    comments (a deployment cannot tell them apart); ``oracle``: a lookalike gets the notes of the
    migration it resembles, as its probes do; the search never offers the oracle."""
    import optuna

    from search_spaces.prompt import space
    from trainables.data import load_specificity
    from trainables.evaluation import EvalSet

    migrations, locality = fixture_data
    lookalikes = load_specificity(migrations=migrations, locality=locality)
    assert lookalikes
    rules = extract_rules(migrations)
    split = EvalSet(tuple(migrations), tuple(locality), None, tuple(lookalikes))
    for strategy in ("context", "rules", "cot"):
        deploy = PromptBuilder(rules, strategy, "library", 3)
        headed = split.with_prompts(lambda p, mid: deploy.header(p, mid) + p)
        for m, hm in zip(migrations, headed.migrations):
            for c, hc in zip(m.probe_contexts, hm.probe_contexts):
                assert hc.prompt == deploy.header(c.prompt, None) + c.prompt
        for s, hs in zip(lookalikes, headed.specificity):
            assert hs.prompt == deploy.header(s.prompt, None) + s.prompt
        oracle = PromptBuilder(rules, strategy, "oracle", 3)
        for s, hs in zip(lookalikes, split.with_prompts(lambda p, mid: oracle.header(p, mid) + p).specificity):
            rule = next(r for r in rules if r.migration == s.migration)
            assert rule.version in hs.prompt and (strategy == "context" or rule.old in hs.prompt), hs.prompt
    assert PromptConfig().knowledge == "library"
    with pytest.raises(ValueError, match="knowledge must be one of library, oracle"):
        PromptConfig(knowledge="update")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        trial = study.ask()
        space(trial, 4)
        assert "knowledge" not in trial.params
        study.tell(trial, 0.0)


def test_config_rejects_bad_values_with_the_fix():
    with pytest.raises(ValueError, match="strategy must be one of basic, context, rules, cot"):
        PromptConfig(strategy="fewshot")
    with pytest.raises(ValueError, match=r"temperature must be in \[0, 2\]"):
        PromptConfig(temperature=-1)
    assert PromptConfig().layer_range(8) == (0, 0)


def test_rules_need_a_migrations_file(tmp_path):
    f = tmp_path / "recode.jsonl"
    f.write_text(json.dumps({"dependency": "x", "new_version": "1", "description": "d", "update_info": "u",
                             "old_code": "a = 1", "new_code": "a = 2"}) + "\n")
    with pytest.raises(ValueError, match="rules come from a migrations file"):
        PromptConfig(dataset=str(f))
    PromptConfig(dataset=str(ROOT / "tests" / "fixtures" / "migrations.jsonl"))


def test_temperature_sampling_is_exact_gumbel_max(small_testbed, fixture_data):
    import torch

    from trainables.evaluation import generate
    from trainables.models import load_model
    from trainables.prompt import gumbel_sampler

    torch.set_num_threads(1)
    model, tok = load_model("testbed")
    _, locality = fixture_data
    prompts = [s.prompt for s in locality[:40]]
    greedy = generate(model, tok, prompts)
    assert generate(gumbel_sampler(model, 1e-4, seed=0), tok, prompts) == greedy  # T -> 0 is greedy
    hot = generate(gumbel_sampler(model, 2.0, seed=0), tok, prompts)
    assert sum(a != b for a, b in zip(hot, greedy)) >= 10  # T = 2 departs from greedy
    assert generate(gumbel_sampler(model, 2.0, seed=0), tok, prompts) == hot  # seeded
    # one step's samples follow softmax(logits / T): the top token's frequency matches its
    # probability within 3 standard errors over 1,000 draws (one batch of the same prompt)
    ids = tok(prompts[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1]
        p = torch.softmax(logits / 1.5, -1)
        draws = gumbel_sampler(model, 1.5, seed=1)(input_ids=ids.repeat(1000, 1)).logits[:, -1].argmax(-1)
    top = int(p.argmax())
    freq = float((draws == top).float().mean())
    se = float((p[top] * (1 - p[top]) / 1000) ** 0.5)
    assert abs(freq - float(p[top])) < 3 * se + 1e-3


@pytest.mark.slow  # a Ray sweep: ~60 s on an idle 2-core machine, 185 s measured under heavy load
def test_prompt_sweep_lands_in_mlflow_and_in_the_comparison(tmp_path, small_testbed):
    home = tmp_path / "mlruns"
    out = subprocess.run([sys.executable, "sweeps/prompt.py", "--num-samples", "3", "--name", "p",
                          "--mlruns", str(home)], cwd=ROOT, capture_output=True, text=True, env=dict(os.environ),
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    cmp = subprocess.run([sys.executable, "sweeps/compare.py", "--mlruns", str(home), "--json"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert cmp.returncode == 0, cmp.stderr[-2000:]
    rows = json.loads(cmp.stdout.strip().splitlines()[-1])
    assert [r["method"] for r in rows] == ["prompt"]
    row = rows[0]
    assert row["trainable_params"] == 0 and row["sweep"] == "p" and row["trials"] >= 1
    for k in ("efficacy", "generalization", "locality", "api_correct", "trial_seconds"):
        assert isinstance(row[k], float), k
    assert row["config"]["strategy"] in ("basic", "context", "rules", "cot")
    assert (home / "artifacts" / "compare" / "compare.png").stat().st_size > 1000
    assert "| prompt |" in (home / "artifacts" / "compare" / "compare.md").read_text()
