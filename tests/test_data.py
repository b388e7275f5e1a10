import json
from pathlib import Path

import pytest

from trainables.data import DataError, PROJECT_DATA, load_locality, load_migrations

FIX = Path(__file__).parent / "fixtures"


def _records():
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
    recs = _records()
    del recs[2]["replacement"]
    p = _write(tmp_path, recs)
    with pytest.raises(DataError, match=rf"^{p}:3: field 'replacement': missing$"):
        load_migrations(p)


def test_too_few_probe_contexts(tmp_path):
    recs = _records()
    recs[1]["probe_contexts"] = recs[1]["probe_contexts"][:1]
    with pytest.raises(DataError, match=r":2: field 'probe_contexts': need at least 2 contexts, got 1"):
        load_migrations(_write(tmp_path, recs))


def test_old_line_must_use_the_deprecated_api(tmp_path):
    recs = _records()
    recs[0]["train_contexts"][1]["old"] = recs[0]["train_contexts"][1]["new"]
    with pytest.raises(DataError, match=r":1: field 'train_contexts\[1\]\.old': does not match the deprecated"):
        load_migrations(_write(tmp_path, recs))


def test_context_field_missing(tmp_path):
    recs = _records()
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
    recs = _records()
    recs[0]["deprecated"] = "pd concat"
    with pytest.raises(DataError, match=r":1: field 'deprecated': bad API pattern"):
        load_migrations(_write(tmp_path, recs))
    recs = _records()
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
