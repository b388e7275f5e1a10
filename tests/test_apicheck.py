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
