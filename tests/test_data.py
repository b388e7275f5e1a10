import json
import re
from pathlib import Path

import pytest

from trainables.apicheck import check_completion
from trainables.data import (
    DataError, PROJECT_DATA, load_locality, load_migrations, load_specificity, load_test_contexts, shared_head,
)

FIX = Path(__file__).parent / "fixtures"


def records():
    return [json.loads(line) for line in (FIX / "migrations.jsonl").read_text().splitlines()]


def _write(tmp_path, records, name="m.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return p


def test_project_data_meets_the_testbed_spec():
    migrations = load_migrations(PROJECT_DATA / "migrations.jsonl")
    locality = load_locality(PROJECT_DATA / "locality.jsonl")
    assert len(migrations) >= 60
    assert len({m.library for m in migrations}) >= 8
    assert all(len(m.train_contexts) >= 3 and len(m.probe_contexts) >= 2 for m in migrations)
    assert len(locality) >= 200


def test_missing_field_names_file_line_and_field(tmp_path):
    recs = records()
    del recs[2]["replacement"]
    p = _write(tmp_path, recs)
    with pytest.raises(DataError, match=rf"^{p}:3: field 'replacement': missing$"):
        load_migrations(p)


def test_too_few_probe_contexts(tmp_path):
    recs = records()
    recs[1]["probe_contexts"] = recs[1]["probe_contexts"][:1]
    with pytest.raises(DataError, match=r":2: field 'probe_contexts': need at least 2 contexts, got 1"):
        load_migrations(_write(tmp_path, recs))


def test_old_line_must_use_the_deprecated_api(tmp_path):
    recs = records()
    recs[0]["train_contexts"][1]["old"] = recs[0]["train_contexts"][1]["new"]
    with pytest.raises(DataError, match=r":1: field 'train_contexts\[1\]\.old': does not match the deprecated"):
        load_migrations(_write(tmp_path, recs))


def test_context_field_missing(tmp_path):
    recs = records()
    del recs[3]["probe_contexts"][0]["prompt"]
    with pytest.raises(DataError, match=r":4: field 'probe_contexts\[0\]\.prompt': missing"):
        load_migrations(_write(tmp_path, recs))


def test_malformed_json_line(tmp_path):
    p = tmp_path / "m.jsonl"
    lines = (FIX / "migrations.jsonl").read_text().splitlines()
    lines[1] = lines[1][:-5]
    p.write_text("\n".join(lines))
    with pytest.raises(DataError, match=rf"^{p}:2: malformed JSON"):
        load_migrations(p)


def test_non_utf8_file(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_bytes((FIX / "migrations.jsonl").read_bytes() + b'{"id": "\xff"}\n')
    with pytest.raises(DataError, match=rf"^{p}:5: not valid UTF-8"):
        load_migrations(p)


def test_bad_pattern_and_duplicate_id(tmp_path):
    recs = records()
    recs[0]["deprecated"] = "pd concat"
    with pytest.raises(DataError, match=r":1: field 'deprecated': bad API pattern"):
        load_migrations(_write(tmp_path, recs))
    recs = records()
    recs[2]["id"] = recs[0]["id"]
    with pytest.raises(DataError, match=r":3: field 'id': duplicate id"):
        load_migrations(_write(tmp_path, recs))


def test_missing_file_and_locality_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_migrations(tmp_path / "nope.jsonl")
    p = tmp_path / "l.jsonl"
    p.write_text(json.dumps({"id": "a", "prompt": "x = 1", "completion": "y = 2"}) + "\n")
    with pytest.raises(DataError, match=r":1: field 'prompt': must end with a newline"):
        load_locality(p)


# ---------------------------------------------------------------- test split and over-application set
def _jsonl(name):
    return [json.loads(line) for line in (FIX / name).read_text().splitlines()]


def _project():
    migrations = load_migrations(PROJECT_DATA / "migrations.jsonl")
    return migrations, load_locality(PROJECT_DATA / "locality.jsonl")


def test_project_test_split_is_new_code_for_every_migration():
    migrations, _ = _project()
    split = load_test_contexts(PROJECT_DATA / "test_contexts.jsonl", migrations)
    assert sorted(split) == sorted(m.id for m in migrations)
    assert all(len(cs) == 2 for cs in split.values())
    assert sum(len(cs) for cs in split.values()) == 136
    seen = {c.prompt for m in migrations for c in m.train_contexts + m.probe_contexts}
    indented = 0
    for m in migrations:
        known = m.train_contexts + m.probe_contexts
        for ctx in split[m.id]:
            assert shared_head(ctx.old, ctx.new).strip(), (m.id, ctx.old)
            assert 2 <= ctx.prompt.count("\n") <= 6, (m.id, ctx.prompt)
            assert ctx.prompt not in seen, (m.id, ctx.prompt)
            assert not any(k.prompt in ctx.prompt or ctx.prompt in k.prompt for k in known), (m.id, ctx.prompt)
            assert ctx.old not in {k.old for k in known}, (m.id, ctx.old)
            indented += ctx.old.startswith(" ")
    assert 40 <= indented <= 96  # module-level and inside-function contexts both


def test_project_specificity_covers_every_attribute_migration():
    migrations, locality = _project()
    snippets = load_specificity(PROJECT_DATA / "specificity.jsonl", migrations, locality)
    by_id = {m.id: m for m in migrations}
    per = {m.id: 0 for m in migrations}
    for s in snippets:
        per[s.migration] += 1
        m = by_id[s.migration]
        r = check_completion(s.prompt, s.completion, m.deprecated, m.replacement)
        assert r.syntax_ok and not r.uses_new, (s.id, s.completion)
    attribute = [m.id for m in migrations if m.deprecated.startswith(".")]
    assert len(attribute) == 19
    assert {i: per[i] for i in attribute if per[i] < 3} == {}
    assert {i for i, n in per.items() if n == 0} == set()
    assert not {s.prompt for s in snippets} & {s.prompt for s in locality}


def test_missing_split_files_give_empty_results(tmp_path, monkeypatch):
    assert len(load_test_contexts()) == 4 and len(load_specificity()) >= 4  # the fixture folder's
    (tmp_path / "migrations.jsonl").write_bytes((FIX / "migrations.jsonl").read_bytes())
    monkeypatch.setenv("APIUPDATE_DATA_DIR", str(tmp_path))
    assert load_test_contexts() == {} and load_specificity() == []
    with pytest.raises(DataError, match="no such file"):
        load_test_contexts(tmp_path / "test_contexts.jsonl")


def _bad_split(recs, probe):
    """Break the fixture split: recs[i] is the fixture record of migration i."""
    if probe == "old-line-in-new":
        recs[0]["contexts"][1]["new"] = recs[0]["contexts"][1]["old"]
        return r":1: field 'contexts\[1\]\.new': must match 'pandas\.concat' and not '\.append' \(new=False, old=True\)"
    if probe == "count":
        recs[2]["contexts"] = recs[2]["contexts"][:1]
        return r":3: field 'contexts': need exactly 2 contexts, got 1"
    if probe == "seen-prompt":
        recs[1]["contexts"][0]["prompt"] = "import numpy as np\nmass = grams / 1000\n"  # a probe prompt
        return r":2: field 'contexts\[0\]\.prompt': same as a train or probe prompt: .*"
    if probe == "contains-prompt":
        recs[3]["contexts"][0] = {"prompt": "from PIL import Image\nimg = Image.open(path)\n# a smaller copy\n",  # train + 1 line
                                  "old": "small = img.resize((64, 64), Image.ANTIALIAS)",
                                  "new": "small = img.resize((64, 64), Image.LANCZOS)"}
        return r":4: field 'contexts\[0\]\.prompt': overlaps another prompt of 'pil-antialias': .*"
    if probe == "no-head":
        recs[1]["contexts"][1] = {"prompt": "import numpy as np\nx = '2.5'\n", "old": "np.float(x) + 1", "new": "float(x) + 1"}
        return r":2: field 'contexts\[1\]\.new': old and new share no statement start \(shared_head is empty\)"
    if probe == "unknown-id":
        recs[2]["id"] = "numpy-flaot"
        return r":3: field 'id': unknown migration 'numpy-flaot'"
    raise AssertionError(probe)


@pytest.mark.parametrize("probe", ["old-line-in-new", "count", "seen-prompt", "contains-prompt", "no-head", "unknown-id"])
def test_test_split_rejects_a_bad_record_in_one_line(tmp_path, probe):
    recs = _jsonl("test_contexts.jsonl")
    message = _bad_split(recs, probe)
    p = _write(tmp_path, recs, "t.jsonl")
    with pytest.raises(DataError, match=rf"^{re.escape(str(p))}{message}$"):
        load_test_contexts(p, load_migrations(FIX / "migrations.jsonl"))


def test_test_split_needs_every_migration(tmp_path):
    p = _write(tmp_path, _jsonl("test_contexts.jsonl")[:3], "t.jsonl")
    with pytest.raises(DataError, match=rf"^{re.escape(str(p))}: no test contexts for 1 migration\(s\): pil-antialias$"):
        load_test_contexts(p, load_migrations(FIX / "migrations.jsonl"))


@pytest.mark.parametrize("field, value, message", [
    ("completion", "    rows = pd.concat([rows, pd.DataFrame([r])])",
     r"field 'completion': matches the replacement 'pandas\.concat': a lookalike must not"),
    ("completion", "    rows.append(r", r"field 'completion': prompt \+ completion does not parse"),
    ("prompt", "def add(a, b):\n", r"field 'prompt': same as a locality prompt: 'def add\(a, b\):\\n'"),
    ("migration", "pandas-append", r"field 'migration': unknown migration 'pandas-append'"),
    ("id", "spec-1", r"field 'id': expected spec-NNN, got 'spec-1'"),
])
def test_specificity_rejects_a_bad_record_in_one_line(tmp_path, field, value, message):
    recs = _jsonl("specificity.jsonl")
    recs[1] = {"id": "spec-002", "migration": "pandas-dataframe-append",
               "prompt": "import pandas as pd\nrows = []\nfor r in source:\n", "completion": "    rows.append(r)"}
    p = _write(tmp_path, recs, "s.jsonl")
    migrations, locality = load_migrations(FIX / "migrations.jsonl"), load_locality(FIX / "locality.jsonl")
    assert [s.completion for s in load_specificity(p, migrations, locality)][1] == "    rows.append(r)"
    recs[1][field] = value
    p = _write(tmp_path, recs, "s.jsonl")
    with pytest.raises(DataError, match=rf"^{re.escape(str(p))}:2: {message}$"):
        load_specificity(p, migrations, locality)


def test_validation_and_test_splits_are_fixed_halves_with_every_group_on_both_sides():
    from trainables.data import split

    migrations, locality = _project()
    snippets = load_specificity(PROJECT_DATA / "specificity.jsonl", migrations, locality)
    val, test = split(locality)
    assert len(val) + len(test) == len(locality) and abs(len(val) - len(test)) <= 1
    assert not {s.id for s in val} & {s.id for s in test}
    assert split(list(reversed(locality))) == (list(reversed(val)), list(reversed(test)))  # not file order
    sval, stest = split(snippets, group=lambda s: s.migration)
    attribute = {m.id for m in migrations if m.deprecated.startswith(".")}
    assert attribute <= {s.migration for s in sval} and attribute <= {s.migration for s in stest}
    # a record's side depends on its own group only: dropping another migration's lookalikes moves nothing
    rest = [s for s in snippets if s.migration != snippets[0].migration]
    assert split(rest, group=lambda s: s.migration)[1] == [s for s in stest if s.migration != snippets[0].migration]


def test_default_eval_data_keeps_the_test_split_apart(small_testbed):
    from trainables.evaluation import default_eval_data

    data = default_eval_data("testbed")
    val, test = data.validation, data.test
    assert test is not None and len(val.migrations) == len(test.migrations) == 4
    val_prompts = {c.prompt for m in val.migrations for c in m.probe_contexts + m.train_contexts}
    assert not val_prompts & {c.prompt for m in test.migrations for c in m.probe_contexts}
    assert not {s.id for s in val.locality} & {s.id for s in test.locality}
    assert not {s.id for s in val.specificity} & {s.id for s in test.specificity}
    assert len(val.base_locality) == len(val.locality) and len(test.base_specificity) == len(test.specificity)
