"""sweeps/mine_triggers.py and trainables/mining.py: the rewriters on concrete lines, contexts
cut from sampled text, the written file, and intent prompts that never copy the evaluation."""
from __future__ import annotations

import json

import pytest

from tests.conftest import FIXTURES, ROOT
from trainables import mining
from trainables.data import Context, DataError, load_migrations, read_records
from trainables.mining import Decline, rewrite_line

PANDAS_APPEND = (".append", "pandas.concat", "pandas")
NP_FLOAT = ("numpy.float", "float", "numpy")
ONEHOT = ("sklearn.preprocessing.OneHotEncoder(sparse=)", "sklearn.preprocessing.OneHotEncoder(sparse_output=)",
          "sklearn")
ITERITEMS = (".iteritems", ".items", "pandas")


@pytest.mark.parametrize("prompt, line, patterns, expected", [
    ("import pandas as pd\nlog = pd.DataFrame({'a': [1]})\nnew_rows = pd.DataFrame({'a': [2]})\n",
     "log = log.append(new_rows, ignore_index=True)", PANDAS_APPEND,
     "log = pd.concat([log, new_rows], ignore_index=True)"),
    ("import pandas as pd\ndf = pd.DataFrame()\n", "df = df.append({'a': 1}, ignore_index=True)", PANDAS_APPEND,
     "df = pd.concat([df, pd.DataFrame([{'a': 1}])], ignore_index=True)"),
    ("import numpy as np\nv = '2.5'\n", "x = np.float(v)", NP_FLOAT, "x = float(v)"),
    ("import numpy\n", "y = numpy.float(a) + numpy.float(b)", NP_FLOAT, "y = float(a) + float(b)"),
    ("from sklearn.preprocessing import OneHotEncoder\n", "enc = OneHotEncoder(sparse=False)", ONEHOT,
     "enc = OneHotEncoder(sparse_output=False)"),
    ("import pandas as pd\ns = pd.Series([1, 2])\n", "for k, v in s.iteritems():", ITERITEMS, "for k, v in s.items():"),
    ("import numpy as np\n", "shape_size = np.product(dims)", ("numpy.product", "numpy.prod", "numpy"),
     "shape_size = np.prod(dims)"),
    ("import pandas as pd\ndf = pd.read_csv('a.csv')\n", "df = df.fillna(method='ffill', limit=3)",
     (".fillna(method=)", ".ffill", "pandas"), "df = df.ffill(limit=3)"),
    ("import pandas as pd\n", "t = pd.read_csv(p, error_bad_lines=False)",
     ("pandas.read_csv(error_bad_lines=)", "pandas.read_csv(on_bad_lines=)", "pandas"),
     't = pd.read_csv(p, on_bad_lines="skip")'),
    ("import numpy as np\n", "v = np.asscalar(a + b)", ("numpy.asscalar", ".item", "numpy"), "v = (a + b).item()"),
    ("import seaborn as sns\n", 'g = sns.factorplot(x="a", data=d)', ("seaborn.factorplot", "seaborn.catplot", "seaborn"),
     'g = sns.catplot(x="a", data=d, kind="point")'),
    ("import torch\n", "x = torch.solve(rhs, M).solution", ("torch.solve", "torch.linalg.solve", "torch"),
     "x = torch.linalg.solve(M, rhs)"),
])
def test_rewriters_on_concrete_lines(prompt, line, patterns, expected):
    deprecated, replacement, library = patterns
    assert rewrite_line(prompt, line, deprecated, replacement, library) == expected


@pytest.mark.parametrize("prompt, line, patterns, why", [
    ("import pandas as pd\nrows = []\n", "rows.append(3)", PANDAS_APPEND, "not used"),
    ("import pandas as pd\nrows = []\n", "more = rows.append(3)", PANDAS_APPEND, "not a pandas object"),
    ("import pandas as pd\n\ndef f(history, batch):\n", "    history = history.append(batch)", PANDAS_APPEND, "unknown"),
    ("import pandas as pd\nimport numpy as np\n", "b = np.append(a)", PANDAS_APPEND, "not a pandas object"),
    ("from pandas import DataFrame\ndf = DataFrame()\n", "df = df.append(other)", PANDAS_APPEND, "not reachable"),
    ("import os\nfrom PIL import ImageFont\n", "n = os.path.getsize(p)", (".getsize", ".getbbox", "PIL"), "not a PIL"),
    ("from sklearn import metrics\n", "e = metrics.mean_squared_error(a, b, squared=True)",
     ("sklearn.metrics.mean_squared_error(squared=)", "sklearn.metrics.root_mean_squared_error", "sklearn"), "not False"),
    ("import torch\n", "x, lu = torch.solve(rhs, M)", ("torch.solve", "torch.linalg.solve", "torch"), ".solution"),
    ("import pandas as pd\ndf = pd.DataFrame()\n", "df = df.append({'a': 1})", PANDAS_APPEND, "ignore_index"),
])
def test_rewriters_decline_what_is_not_mechanical(prompt, line, patterns, why):
    with pytest.raises(Decline, match=why):
        rewrite_line(prompt, line, *patterns)


def test_every_curated_migration_is_reproduced_by_its_rewriter():
    """The curated old_code -> new_code pair specifies each migration: a rewriter that writes
    anything else for old_code's line would migrate mined lines wrongly."""
    migrations = load_migrations(ROOT / "data" / "migrations.jsonl")
    problems = {m.id: mining.support(m) for m in migrations}
    assert {k: v for k, v in problems.items() if v} == {}
    assert len(migrations) == 68
    # and the check does reject a rewriter's disagreement
    m = migrations[0]
    wrong = type(m)(**{**m.__dict__, "new_code": m.new_code.replace("ignore_index=True", "ignore_index=False")})
    assert "new_code has" in mining.support(wrong)


def _migration(mid="pandas-dataframe-append"):
    return next(m for m in load_migrations(FIXTURES / "migrations.jsonl") if m.id == mid)


def test_context_cuts_at_the_first_deprecated_line_and_keeps_the_prefix():
    m = _migration()
    intent = "import pandas as pd\n# adding rows to a frame\n"
    text = ('frame = pd.DataFrame({"a": [1]})\nextra = pd.DataFrame({"a": [2]})\nfor i in range(2):\n'
            "    print(i)\nframe = frame.append(extra, ignore_index=True)\nprint(frame)\n")
    found = mining.context_from_sample(intent, text, m)
    assert found.reason == "kept" and found.used
    assert found.context == Context(
        intent + 'frame = pd.DataFrame({"a": [1]})\nextra = pd.DataFrame({"a": [2]})\nfor i in range(2):\n    print(i)\n',
        "frame = frame.append(extra, ignore_index=True)",
        "frame = pd.concat([frame, extra], ignore_index=True)")
    # a last line the token limit may have cut is not used
    cut = mining.context_from_sample(intent, 'frame = pd.DataFrame({"a": [1]})\nframe = frame.append(frame)', m,
                                     complete=False)
    assert cut.context is None and cut.reason == "no use"
    # a block header or a statement over several lines is no one-line context
    header = mining.context_from_sample("import pandas as pd\n", "s = pd.Series([1])\nfor k, v in s.iteritems():\n"
                                        "    print(k)\n", _iteritems())
    assert header.context is None and header.reason == "block header"
    multi = mining.context_from_sample(intent, 'frame = pd.DataFrame({"a": [1]})\nframe = frame.append(\n'
                                       "    frame, ignore_index=True)\n", m)
    assert multi.context is None and multi.reason == "multi-line statement"
    # an old line that copies an evaluation line is dropped
    copied = mining.context_from_sample(intent, text, m, forbidden=frozenset({'extra = pd.DataFrame({"a": [2]})'}))
    assert copied.context is None and copied.reason == "repeats an evaluation line"


def _iteritems():
    m = _migration()
    return type(m)(**{**m.__dict__, "id": "pandas-iteritems", "deprecated": ".iteritems", "replacement": ".items"})


def test_written_file_loads(tmp_path):
    m = _migration()
    intent = "import pandas as pd\n# adding rows to a frame\n"
    samples = [f'frame{i} = pd.DataFrame({{"a": [{i}]}})\nframe{i} = frame{i}.append(row, ignore_index=True)\n'
               for i in range(6)]
    contexts = [mining.context_from_sample(intent, s, m).context for s in samples]
    assert all(contexts)
    chosen = mining.select(contexts + contexts[:2], 8)
    assert len(chosen) == 6  # one per prompt
    train, probe = mining.split_contexts(chosen, 0, m.id)
    assert (len(train), len(probe)) == (4, 2) and set(train).isdisjoint(probe)
    assert mining.split_contexts(chosen, 0, m.id) == (train, probe)  # seeded
    out = tmp_path / "mined.jsonl"
    mining.write_jsonl(out, [mining.record(m, train, probe, {"model": "x"})], check=load_migrations)
    loaded = load_migrations(out)
    assert [x.id for x in loaded] == [m.id]
    assert loaded[0].train_contexts == tuple(train) and loaded[0].probe_contexts == tuple(probe)
    assert loaded[0].old_code == m.old_code
    # a file that does not load is never written, and leaves no temporary file behind
    bad = tmp_path / "bad.jsonl"
    with pytest.raises(DataError, match="need at least 3"):
        mining.write_jsonl(bad, [mining.record(m, train[:2], probe, {})], check=load_migrations)
    assert not bad.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["mined.jsonl"]


def _evaluation_prompt_lines(data_dir):
    lines = set()
    for m in load_migrations(data_dir / "migrations.jsonl"):
        for c in m.probe_contexts:
            lines.update(c.prompt.split("\n"))
    for _, rec in read_records(data_dir / "test_contexts.jsonl"):
        for c in rec["contexts"]:
            lines.update(c["prompt"].split("\n"))
    return {x.strip() for x in lines if x.strip() and not x.strip().startswith(("import ", "from "))}


@pytest.mark.parametrize("data_dir", [ROOT / "data", FIXTURES])
def test_intent_prompts_never_copy_evaluation_prompt_lines(data_dir):
    migrations = load_migrations(data_dir / "migrations.jsonl")
    forbidden = mining.evaluation_lines(migrations, mining.read_test_records(data_dir / "test_contexts.jsonl"))
    tasks = mining.read_tasks(data_dir / "edit_facts.json")
    evaluation = _evaluation_prompt_lines(data_dir)
    n = 0
    for m in migrations:
        for p in mining.intent_prompts(m, tasks.get(m.id), forbidden, limit=20):
            n += 1
            own = {x.strip() for x in p.split("\n") if x.strip() and not x.strip().startswith(("import ", "from "))}
            assert not own & evaluation, (m.id, p)
            assert p.endswith("\n") and not own & {m.old_code.split("\n")[-2].strip()}
    assert n >= 2 * len(migrations)


def test_intent_prompts_drop_a_setup_line_that_a_probe_uses():
    m = _migration()
    setup = m.old_code.split("\n")[1]  # df = pd.DataFrame({'a': [1]})
    probe = Context("import pandas as pd\n" + setup + "\n", m.probe_contexts[0].old, m.probe_contexts[0].new)
    leaked = type(m)(**{**m.__dict__, "probe_contexts": (probe, *m.probe_contexts[1:])})
    with_setup = mining.intent_prompts(m, "adding rows", frozenset(), limit=20)
    assert any(setup in p for p in with_setup)
    without = mining.intent_prompts(leaked, "adding rows", mining.evaluation_lines([leaked]), limit=20)
    assert without and not any(setup in p for p in without)


def test_cli_mines_on_the_small_testbed(small_testbed, tmp_path, capsys):
    from sweeps.mine_triggers import main

    out = tmp_path / "triggers.jsonl"
    rc = main(["--model", "testbed", "--out", str(out), "--samples-per-prompt", "6", "--max-new-tokens", "32"])
    text = capsys.readouterr()
    ids = [m.id for m in load_migrations(FIXTURES / "migrations.jsonl")]
    assert all(any(line.startswith(f"{mid}: ") for line in text.out.splitlines()) for mid in ids), text.out
    assert "mined " in text.out and " samples in " in text.out
    if rc == 0:
        loaded = load_migrations(out)
        assert loaded and all(len(x.probe_contexts) >= 2 for x in loaded)
        assert all(json.loads(line)["mined"]["model"] == "testbed" for line in out.read_text().splitlines())
    else:
        assert rc == 1 and "nothing written" in text.err and not out.exists()


def test_cli_writes_a_loadable_file_from_sampled_text(small_testbed, tmp_path, capsys, monkeypatch):
    """The whole command on scripted samples (the small testbed writes too few old-API lines to
    fill a migration): progress counts, the written file, the seeded split."""
    from sweeps.mine_triggers import main
    from trainables.evaluation import decoding

    calls = []

    def scripted(model, tokenizer, prompts, max_new_tokens, stop):
        calls.append((list(prompts), max_new_tokens, stop))
        out = []
        for i, p in enumerate(prompts):
            assert p.startswith("import pandas") and p.endswith("\n")
            if i % 4 == 3:  # a list append: declined
                out.append("rows = []\nrows.append(1)\n")
            else:
                out.append(f'part{i} = pd.DataFrame({{"a": [{i}]}})\npart{i} = part{i}.append(row, ignore_index=True)\n')
        return out

    monkeypatch.setattr(decoding, "generate", scripted)
    out = tmp_path / "mined.jsonl"
    args = ["--model", "testbed", "--only", "pandas-dataframe-append", "--out", str(out), "--samples-per-prompt", "4",
            "--variants", "2"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "pandas-dataframe-append: 8 samples, 8 used the old API, 6 kept, 6 distinct chosen; " \
           "dropped: 2 rewrite declined: the result is not used (a list append)" in printed, printed
    assert f"wrote {out}" in printed and len(calls) == 1 and calls[0][1:] == (80, mining.STOP)
    (m,) = load_migrations(out)
    assert (len(m.train_contexts), len(m.probe_contexts)) == (4, 2)
    assert all(c.new.startswith("part") and "pd.concat([part" in c.new for c in m.train_contexts + m.probe_contexts)
    first = out.read_text()
    assert main(args) == 0 and out.read_text() == first  # seeded: the same file again


def test_cli_bad_input_is_one_error_line(capsys):
    from sweeps.mine_triggers import main

    assert main(["--model", "./no-such-model"]) == 2
    assert main(["--model", "testbed", "--dataset", "/no/such.jsonl"]) == 2
    assert main(["--model", "testbed", "--only", "not-a-migration"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err)
