import pytest

from trainables.apicheck import check_completion, parse_pattern

PD = "import pandas as pd\ndf = pd.DataFrame(rows)\n"


def check(prompt, completion, old=".append", new="pandas.concat"):
    return check_completion(prompt, completion, old, new)


def test_new_api_is_correct():
    c = check(PD, "df = pd.concat([df, row])")
    assert c.syntax_ok and c.uses_new and not c.uses_old and c.correct


def test_old_api_is_incorrect():
    c = check(PD, "df = df.append(row, ignore_index=True)")
    assert c.syntax_ok and c.uses_old and not c.uses_new and not c.correct


def test_both_apis_is_incorrect():
    c = check(PD, "df = pd.concat([df.append(row), other])")
    assert c.uses_new and c.uses_old and not c.correct


def test_syntax_error_is_invalid():
    c = check(PD, "df = pd.concat([df, row]")
    assert not c.syntax_ok and not c.correct


@pytest.mark.parametrize("prompt,completion", [
    ("import pandas as pd\n", "out = pd.concat([a, b])"),
    ("import pandas\n", "out = pandas.concat([a, b])"),
    ("from pandas import concat\n", "out = concat([a, b])"),
    ("from pandas import concat as cat\n", "out = cat([a, b])"),
])
def test_import_aliases_resolve(prompt, completion):
    assert check(prompt, completion).uses_new


def test_unimported_name_is_not_the_library_function():
    # `concat` defined locally, not imported from pandas: not the new API
    assert not check("def concat(x):\n    return x\n", "out = concat([a, b])").uses_new


def test_only_the_completion_lines_are_matched():
    prompt = "import pandas as pd\nold = df.append(row)\n"
    assert not check(prompt, "df = pd.concat([df, row])").uses_old


def test_builtin_pattern_and_module_attribute():
    p = "import numpy as np\n"
    assert check_completion(p, "x = float(v)", "numpy.float", "float").correct
    assert not check_completion(p, "x = np.float(v)", "numpy.float", "float").correct
    # an imported name called float is not the builtin
    assert not check_completion("from numpy import float\n", "x = float(v)", "numpy.float", "float").correct


def test_keyword_patterns():
    p = "from sklearn.preprocessing import OneHotEncoder\n"
    old, new = "sklearn.preprocessing.OneHotEncoder(sparse=)", "sklearn.preprocessing.OneHotEncoder(sparse_output=)"
    assert check_completion(p, "enc = OneHotEncoder(sparse_output=False)", old, new).correct
    assert not check_completion(p, "enc = OneHotEncoder(sparse=False)", old, new).correct


def test_attribute_name_is_exact():
    p = "v = make()\n"
    c = check_completion(p, "names = v.get_feature_names_out()", ".get_feature_names", ".get_feature_names_out")
    assert c.correct


@pytest.mark.parametrize("bad", ["", "pd concat", "x(", "a.(b=)", "1abc"])
def test_bad_patterns_are_rejected(bad):
    with pytest.raises(ValueError):
        parse_pattern(bad)


LOG = 'import pandas as pd\nlog = pd.DataFrame({"step": [1]})\nnew_rows = pd.DataFrame({"step": [2]})\n'
LOG_REF = "log = pd.concat([log, new_rows], ignore_index=True)"


@pytest.mark.parametrize("completion, lax, strict", [
    ("log = pd.concat", True, False),  # names the API, calls nothing
    ("log = pd.concat(new_rows)", True, False),  # drops the frame the old line appended to
    ("log = pd.concat([log, new_rows])", True, True),  # the working call, without the reference's keyword
    (LOG_REF, True, True),
    ("log = log.append(new_rows, ignore_index=True)", False, False),
    ("log = pd.concat([log, new_rows]", False, False),  # does not parse
])
def test_the_strict_check_wants_the_working_call_on_the_prompts_data(completion, lax, strict):
    c = check_completion(LOG, completion, ".append", "pandas.concat", LOG_REF)
    assert (c.lax, c.correct) == (lax, strict)
    assert check_completion(LOG, completion, ".append", "pandas.concat").correct == lax  # no reference: lax


def test_the_strict_check_follows_how_the_reference_uses_the_api():
    p = "import pandas as pd\ninventory = pd.read_csv('inv.csv')\nitem = 'bolt'\n"
    ref = 'qty = inventory.loc[item, "qty"]'
    assert check_completion(p, 'qty = inventory.loc[item, "qty"]', ".ix", ".loc", ref).correct
    assert not check_completion(p, "qty = inventory.loc", ".ix", ".loc", ref).correct  # not indexed
    # a value, not a call, in the reference: naming it on the same data is the whole use
    p = "import numpy as np\nsize = 3\n"
    ref = "res = np.full(size, np.nan)"
    assert check_completion(p, "res = np.full(size, np.nan)", "numpy.NaN", "numpy.nan", ref).correct
    assert not check_completion(p, "res = np.full(4, np.nan)", "numpy.NaN", "numpy.nan", ref).correct
    # a keyword replacement is a call by its pattern
    p = "from sklearn.preprocessing import OneHotEncoder\n"
    ref = "enc = OneHotEncoder(sparse_output=False)"
    assert check_completion(p, ref, "sklearn.preprocessing.OneHotEncoder(sparse=)",
                            "sklearn.preprocessing.OneHotEncoder(sparse_output=)", ref).correct


def test_every_reference_line_of_the_data_passes_its_own_strict_check_and_its_bare_name_does_not():
    from trainables.data import PROJECT_DATA, load_migrations, load_test_contexts

    migrations = load_migrations(PROJECT_DATA / "migrations.jsonl")
    tests = load_test_contexts(PROJECT_DATA / "test_contexts.jsonl", migrations)
    bare = 0
    for m in migrations:
        for c in (*m.train_contexts, *m.probe_contexts, *tests[m.id]):
            assert check_completion(c.prompt, c.new, m.deprecated, m.replacement, c.new).correct, (m.id, c.new)
            if "(" in c.new:  # the statement cut before its first call's arguments
                stub = check_completion(c.prompt, c.new[: c.new.index("(")], m.deprecated, m.replacement, c.new)
                assert not stub.correct, (m.id, c.new)
                bare += stub.lax
    assert bare > 100  # the lax check passes hundreds of such stubs
