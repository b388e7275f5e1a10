"""Reward components on hand-made completions: new API high, old API low, syntax error ->
format 0, a completion that runs forever -> execution 0 within its timeout, a prompt whose
library is not installed -> execution not measured (None) rather than blamed on the completion,
and a completion that imports something not installed -> execution 0 (its own fault)."""
from __future__ import annotations

import math
import time

import pytest

from trainables.policy.rewards import (
    RewardRecord, RewardScorer, api_reward, check_weights, combine, format_reward, run_programs,
)

PANDAS = RewardRecord(
    prompt='import pandas as pd\ndf = pd.DataFrame({"a": [1, 2]})\nrow = pd.DataFrame({"a": [3]})\n',
    reference="df = pd.concat([df, row], ignore_index=True)",
    deprecated=".append", replacement="pandas.concat",
    old="df = df.append(row, ignore_index=True)", source="pandas-append",
)
TF = RewardRecord(prompt="import tensorflow as tf\nx = tf.constant(3.0)\n", reference="y = tf.math.log(x)",
                  deprecated="tensorflow.log", replacement="tensorflow.math.log", old="y = tf.log(x)", source="tf-log")

COMPLETIONS = {
    "new": "df = pd.concat([df, row], ignore_index=True)\n",
    "new_variant": "df = pd.concat([df, row], axis=0, ignore_index=True)\n",  # same values, other spelling
    "wrong_value": "df = pd.concat([df, df], ignore_index=True)\n",  # new API, wrong result
    "old": "df = df.append(row, ignore_index=True)\n",  # AttributeError on pandas 2.x
    "syntax": "df = pd.concat([df, row]\n",
    "forever": "while True: pass\n",
    "truncated": "df = pd.concat([df, row], ignore_index=True)",  # no newline: hit the length limit
    # the right API tokens after an import that fails here: must not dodge execution and tests
    "uninstalled": "import apiupdate_no_such_module; df = pd.concat([df, row], ignore_index=True)\n",
}


@pytest.fixture(scope="module")
def scored():
    scorer = RewardScorer(exec_timeout=1.0)
    names = list(COMPLETIONS)
    t0 = time.monotonic()
    rows = scorer.score([PANDAS.prompt] * len(names), [COMPLETIONS[n] for n in names], [PANDAS] * len(names))
    return scorer, dict(zip(names, rows)), time.monotonic() - t0


def test_new_api_scores_high_and_old_api_low(scored):
    _, rows, _ = scored
    assert rows["new"] == {"format": 1.0, "api": 1.0, "execution": 1.0, "tests": 1.0, "reward": 1.0}
    old = rows["old"]
    assert old["api"] == 0.0 and old["execution"] == 0.0 and old["tests"] == 0.0 and old["format"] == 1.0
    assert old["reward"] < 0.2 < 0.9 < rows["new"]["reward"]


def test_tests_check_behaviour_not_spelling(scored):
    _, rows, _ = scored
    assert rows["new_variant"]["tests"] == 1.0 and rows["new_variant"]["api"] == 1.0
    assert rows["wrong_value"]["tests"] == 0.0 and rows["wrong_value"]["execution"] == 1.0
    assert rows["wrong_value"]["reward"] < rows["new"]["reward"]


def test_syntax_error_gets_format_zero_and_truncation_half(scored):
    _, rows, _ = scored
    assert rows["syntax"]["format"] == 0.0 and rows["syntax"]["execution"] == 0.0
    assert rows["truncated"]["format"] == 0.5


def test_a_completion_that_runs_forever_scores_zero_within_the_timeout(scored):
    _, rows, seconds = scored
    assert rows["forever"]["execution"] == 0.0 and rows["forever"]["tests"] == 0.0
    # one sandbox call for the context (3 programs) + one for the novel lines; the loop costs
    # its 1 s timeout, importing pandas a few seconds on a busy machine
    assert seconds < 60, seconds


def test_repeated_completions_are_cached_and_batched(scored):
    scorer, rows, _ = scored
    calls, programs = scorer.sandbox_calls, scorer.programs_run
    assert calls == 2  # the context's prompt/reference/old, then every novel line in one call
    # new and old reuse the context's runs; syntax error not run; truncated = new line
    assert programs == 3 + 4  # new_variant, wrong_value, forever, uninstalled
    again = scorer.score([PANDAS.prompt] * 2, [COMPLETIONS["new"], COMPLETIONS["forever"]], [PANDAS] * 2)
    assert scorer.sandbox_calls == calls and again[0] == rows["new"]


def test_missing_library_is_not_the_completions_fault():
    scorer = RewardScorer(exec_timeout=1.0)
    right, wrong = scorer.score([TF.prompt] * 2, ["y = tf.math.log(x)\n", "y = tf.log(x)\n"], [TF] * 2)
    assert right["execution"] is None and right["tests"] is None  # tensorflow is not installed here
    assert right["api"] == 1.0 and wrong["api"] == 0.0
    # renormalised over api + format: the right line still gets the full reward
    assert right["reward"] == 1.0 and wrong["reward"] < 0.5
    assert scorer.programs_run == 3  # only the context; completions of an unrunnable prompt do not run


def test_an_uninstalled_import_cannot_raise_the_reward(scored):
    """Were a failed import "not measured", execution and tests would drop out and the
    combination renormalise over api + format: the line would score 1.0, like the right one."""
    _, rows, _ = scored
    row = rows["uninstalled"]
    assert row["api"] == 1.0 and row["format"] == 1.0  # the right API tokens, and it parses
    assert row["execution"] == 0.0 and row["tests"] == 0.0
    assert row["reward"] == pytest.approx((1.0 + 0.25) / 2.75)  # default weights
    assert row["reward"] < 0.5 < rows["new"]["reward"]


def test_run_programs_names_an_uninstalled_import():
    out = run_programs([("import tensorflow\n", ()), ("import pandas.no_such_module\n", ()), ("1/0\n", ())], 2.0)
    assert out[0]["status"] == "error" and out[0]["missing"] == "tensorflow"
    assert out[1]["status"] == "error" and out[1]["missing"] is False  # pandas exists: the line is wrong
    assert out[2]["error"] == "ZeroDivisionError"


def test_cheap_components_and_combiner():
    assert format_reward("x = 1\n", "\n") == 0.0  # blank line
    assert format_reward("x = 1\n", "y = x\nmore") == 1.0  # only the first line counts
    assert api_reward(PANDAS.prompt, "df = pd.concat([df.append(row)])\n", PANDAS) == 0.5  # both APIs
    assert api_reward("x = 1\n", "y = 2\n", RewardRecord("x = 1\n", "y = 2")) is None  # no patterns
    w = check_weights({"execution": 1.0, "tests": 0.0, "api": 3.0, "format": 0.0})
    assert combine({"execution": 0.0, "tests": 1.0, "api": 1.0, "format": 0.0}, w) == pytest.approx(0.75)
    assert combine({"execution": None, "tests": None, "api": 1.0, "format": 0.0}, w) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown reward component"):
        check_weights({"speed": 1.0})
    with pytest.raises(ValueError, match="at least one > 0"):
        check_weights({"api": 0.0})


def test_trl_reward_functions_name_every_component_and_pass_none_through(scored):
    scorer, rows, _ = scored
    funcs, weights = scorer.trl_reward_funcs({"p": PANDAS, "t": TF})
    assert [f.__name__ for f in funcs] == ["execution", "tests", "api", "format", "reward"]
    assert weights == [0.0, 0.0, 0.0, 0.0, 1.0]
    out = {f.__name__: f(prompts=["<|bos|>" + PANDAS.prompt] * 2, completions=[COMPLETIONS["new"], COMPLETIONS["old"]],
                         record_id=["p", "p"]) for f in funcs}
    assert out["api"] == [1.0, 0.0] and out["reward"][0] == 1.0
    assert out["execution"] == [rows["new"]["execution"], rows["old"]["execution"]]
    assert not any(isinstance(v, float) and math.isnan(v) for v in out["reward"])
    # a real model's prompt carries the statement's head: the completion is the rest of the line
    headed = {f.__name__: f(prompts=[PANDAS.prompt + "df ="] * 2, completions=[" pd.concat([df, row], ignore_index=True)\n",
                                                                             " df.append(row, ignore_index=True)\n"],
                            record_id=["p", "p"], head=["df =", "df ="]) for f in funcs}
    assert headed == out
