"""Rules + prompt baseline: rule extraction, the strategies' headers (InsertPrompt's among them),
ReplaceAPI's splices and its hook in the shared evaluation, exact temperature sampling, and the
sweep end to end into MLflow and the comparison table."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainables.prompt import PromptBuilder, PromptConfig, ReplaceApi, extract_rules, imported_libraries, splice

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
    # rules per prompt are searched where a header lists them; ReplaceAPI watches them all
    for strategy, has_rules in (("insert", True), ("rules", True), ("replace", False), ("context", False)):
        trial = optuna.trial.FixedTrial({"strategy": strategy, "max_rules": 2, "temperature": 0.0})
        space(trial, 4)
        assert ("max_rules" in trial.params) == has_rules, strategy


def test_insert_prompt_names_the_apis_from_the_patterns_never_the_evaluation_lines(fixture_data):
    migrations, locality = fixture_data
    rules = extract_rules(migrations)
    m = next(m for m in migrations if m.id == "pandas-dataframe-append")
    evaluation_lines = {line.strip() for mm in migrations for c in mm.train_contexts + mm.probe_contexts
                        for line in (c.prompt + "\n" + c.old + "\n" + c.new).splitlines() if line.strip()}
    for ctx in m.train_contexts + m.probe_contexts:
        for knowledge in ("library", "oracle"):
            header = PromptBuilder(rules, "insert", knowledge, 3).header(ctx.prompt, m.id)
            assert header == "# .append is deprecated, use pandas.concat instead\n", header
            assert not any(line in header for line in evaluation_lines if len(line) > 3)
    # library knowledge: at most max_rules lines, each library's rules only where it is imported
    both = "import numpy as np\nimport pandas as pd\nlog = pd.DataFrame()\n"
    header = PromptBuilder(rules, "insert", "library", 1).header(both, None)
    assert header.count("\n") == 1 and "is deprecated, use" in header
    assert "numpy.float is deprecated, use float instead" in PromptBuilder(rules, "insert", "library", 3).header(both, None)
    assert PromptBuilder(rules, "insert", "library", 3).header("x = 1\n", None) == ""
    assert PromptBuilder(rules, "replace", "library", 3).header(both, None) == ""  # ReplaceAPI adds no comment


@pytest.fixture(scope="module")
def all_rules():
    from trainables.data import load_migrations

    return {r.migration: r for r in extract_rules(load_migrations(ROOT / "data" / "migrations.jsonl"))}


@pytest.mark.parametrize("prompt, statement, migration, spliced", [
    ("import pandas as pd\nlog = pd.DataFrame()\n", "log = log.append(new_rows, ignore_index=True)",
     "pandas-dataframe-append", "log = pd.concat("),
    ("import pandas\n", "log = log.append(new_rows)", "pandas-dataframe-append", "log = pandas.concat("),
    ("import numpy as np\n", "mass = np.float(grams) / 1000", "numpy-float-alias", "mass = float("),
    ("import numpy as np\n", "x = arr.astype(np.float)", "numpy-float-alias", "x = arr.astype(float"),
    ("import numpy as np\n", "v = np.asscalar(a + b)", "numpy-asscalar", "v = (a + b).item("),
    ("from sklearn.preprocessing import OneHotEncoder\nenc = OneHotEncoder().fit(X)\n",
     "features = enc.get_feature_names()", "sklearn-get-feature-names", "features = enc.get_feature_names_out("),
    ("import scipy.sparse\n", "dense = m.A", "scipy-sparse-dot-a", "dense = m.toarray"),
    # a replacement that prefixes the deprecated name is spliced with the call opened, so the
    # model cannot write the deprecated name again by extending it
    ("import tensorflow as tf\n", "cnn.fit_generator(batches, epochs=3)", "tensorflow-fit-generator", "cnn.fit("),
    ("from sklearn.preprocessing import OneHotEncoder\n", "enc = OneHotEncoder(sparse=False)",
     "sklearn-onehot-sparse", "enc = OneHotEncoder(sparse_output="),
    ("import pandas as pd\n", "df = pd.read_csv(path,\n                 error_bad_lines=False)",
     "pandas-read-csv-error-bad-lines", "df = pd.read_csv(path,\n                 on_bad_lines="),
    ("import tensorflow as tf\n", "opt = tf.train.AdamOptimizer(0.01)", "tensorflow-adam-optimizer",
     "opt = tf.keras.optimizers.Adam(learning_rate="),
    ("from datetime import datetime\n", "stamp = datetime.utcnow()", "datetime-utcnow", "stamp = datetime.now("),
    ("import pandas as pd\n", "df = df.fillna(method='ffill')", "pandas-fillna-method", "df = df.ffill("),
])
def test_replace_api_cuts_at_the_deprecated_reference_and_splices_the_replacement(all_rules, prompt, statement,
                                                                                  migration, spliced):
    from trainables.apicheck import check_completion

    rule = all_rules[migration]
    assert splice(prompt, statement, list(all_rules.values())) == spliced
    assert not check_completion(prompt, spliced, rule.deprecated, rule.replacement).uses_old


def test_replace_api_leaves_statements_without_a_watched_deprecated_api_untouched(all_rules):
    rules = list(all_rules.values())
    assert splice("import pandas as pd\n", "log = pd.concat([log, row])", rules) is None
    assert splice("import pandas as pd\n", "log = log.append(", rules) is None  # does not parse: no use seen
    # after the spliced start only the model's own text is searched
    assert splice("import pandas as pd\n", "log = log.append(row)", rules, start=7) is None
    builder = PromptBuilder(rules, "replace", "library", 3)
    prompts = ["import pandas as pd\nlog = pd.DataFrame()\n", "rows = []\nfor r in src:\n", "def add(a, b):\n"]
    statements = ["log = pd.concat([log, row], ignore_index=True)", "    rows.append(r)", "    return a + b"]
    hook = ReplaceApi(builder)
    # no model is needed where nothing is rewritten: a list's append without a pandas import is
    # not watched under library knowledge
    assert hook(None, None, prompts, statements, ["pandas-dataframe-append"] * 2 + [None]) == statements
    assert hook.calls == [(0, 3)]


def test_replace_api_rewrites_lookalikes_and_the_evaluation_judges_the_repaired_statements(small_testbed,
                                                                                            fixture_data):
    """The hook sees every prompt kind's final statement, proven or decoded, and what it
    returns is what is judged: ReplaceAPI's rewrite of a list's ``append`` in a pandas file is
    over-application."""
    import torch

    from trainables.evaluation import EvalSet
    from trainables.models import load_model

    torch.set_num_threads(1)
    model, tok = load_model("testbed")
    migrations, locality = fixture_data
    rules = extract_rules(migrations)
    lookalike = "import pandas as pd\nrows = []\nfor r in source:\n"
    out = ReplaceApi(PromptBuilder(rules, "replace", "library", 3))(
        model, tok, [lookalike, "import pandas as pd\n"], ["    rows.append(r)", "x = 1"], [None, None])
    # the 4-layer testbed's continuation need not parse: the splice is what is pinned here
    assert out[0].startswith("    pd.concat(") and out[1] == "x = 1"

    from trainables.data import load_specificity

    spec = tuple(load_specificity(migrations=migrations, locality=locality))
    split = EvalSet(tuple(migrations), tuple(locality), None, spec)
    seen = []
    new_line = {c.prompt: c.new for m in migrations for c in m.train_contexts + m.probe_contexts}
    by_id = {m.id: m for m in migrations}

    indent = {s.prompt: s.completion[: len(s.completion) - len(s.completion.lstrip())] for s in spec}

    def new_api(prompt, mid):  # a use of the lookalike's migration's new API, indented as its reference line
        target = by_id[mid].replacement.split("(")[0]
        return indent[prompt] + "x = " + ("obj" if target[0] == "." else "") + target

    def oracle_repair(model, tokenizer, prompts, statements, mids):
        seen.append(list(zip(prompts, mids)))
        # every context gets its reference line, every lookalike its migration's new API
        return [new_line.get(p) or (new_api(p, mid) if mid else st) for p, st, mid in zip(prompts, statements, mids)]

    plain, _ = split.evaluate(model, tok)
    repaired, preds = EvalSet(tuple(migrations), tuple(locality), None, spec, repair=oracle_repair).evaluate(model, tok)
    assert len(seen) == 1 and len(seen[0]) == len(preds)
    kinds = {p.kind for p in preds}
    assert kinds == {"train", "probe", "locality", "specificity"}
    resembles = {s.id: s.migration for s in spec}
    assert [mid for _, mid in seen[0]] == [p.ref_id if p.kind in ("train", "probe") else resembles.get(p.ref_id)
                                          for p in preds]
    assert plain["generalization"] < 1.0 and repaired["generalization"] == 1.0 and repaired["efficacy"] == 1.0
    assert plain["over_application"] < 1.0 and repaired["over_application"] == 1.0


def test_a_replace_api_trial_completes_and_reports_over_application(small_testbed, tmp_path):
    from trainables.apicheck import check_completion
    from trainables.common import local_reporter
    from trainables.data import load_migrations
    from trainables.sweep.methods import METHODS
    from trainables.trial import TrialContext, run_trial

    history: list[dict] = []
    keep = tmp_path / "ckpt"
    out = run_trial(METHODS["prompt"], {"strategy": "replace"}, TrialContext(n_layers=4, threads=1),
                    local_reporter(history, keep_checkpoint=str(keep)))
    assert out["trial_status"] == "completed", out
    last = history[-1]
    for k in ("over_application", "test_over_application", "generalization", "repaired", "test_repaired"):
        assert isinstance(last[k], float), k
    assert last["repaired"] > 0 and last["header_lines"] == 0
    # every probe imports its library, so no deprecated call is left where ReplaceAPI watched
    assert last["old_api_rate"] == 0.0 and last["locality"] == 1.0
    preds = json.loads((keep / "predictions.json").read_text())
    migrations = {m.id: m for m in load_migrations()}
    probes = [p for p in preds if p["kind"] == "probe"]
    assert probes and not any(check_completion(p["prompt"], p["completion"], migrations[p["ref_id"]].deprecated,
                                               migrations[p["ref_id"]].replacement).uses_old for p in probes)


def test_config_rejects_bad_values_with_the_fix():
    with pytest.raises(ValueError, match="strategy must be one of basic, context, rules, cot, insert, replace, got"):
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
    assert row["config"]["strategy"] in ("basic", "context", "rules", "cot", "insert", "replace")
    assert (home / "artifacts" / "compare" / "compare.png").stat().st_size > 1000
    assert "| prompt |" in (home / "artifacts" / "compare" / "compare.md").read_text()


def test_a_samplers_lines_are_scored_in_slices_that_fit_the_logit_budget(small_testbed, fixture_data, monkeypatch):
    """A sampler's every position goes through the head; past the budget its forward runs on a
    few rows at a time (Gemma 3's 262k vocabulary took 21 GB at once) with the same figures."""
    import torch

    from trainables.evaluation import scoring
    from trainables.models import load_model

    model, tok = load_model("testbed")

    class Wrapped(torch.nn.Module):  # not a PreTrainedModel: scored the way a sampler is
        def __init__(self):
            super().__init__()
            self.inner, self.calls = model, []

        @property
        def config(self):
            return model.config

        def forward(self, *args, **kwargs):
            self.calls.append(kwargs["input_ids"].shape[0])
            return self.inner(*args, **kwargs)

    migrations, _ = fixture_data
    pairs = [(c.prompt, c.new) for m in migrations for c in m.probe_contexts]
    w = Wrapped()
    whole = scoring.score_lines(w, tok, pairs, argmax=True)
    assert w.calls == [len(pairs)]
    monkeypatch.setattr(scoring, "LOGIT_BUDGET", 3 * 40 * model.config.vocab_size)
    w.calls.clear()
    sliced = scoring.score_lines(w, tok, pairs, argmax=True)
    assert len(w.calls) > 1 and max(w.calls) <= 3 and sum(w.calls) == len(pairs)
    assert [r[2] for r in sliced] == [r[2] for r in whole]
    assert [r[0] for r in sliced] == pytest.approx([r[0] for r in whole], abs=1e-4)
