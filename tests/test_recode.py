"""ReCode-format training data: validation with file/line/field messages, --skip-bad."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainables.data import DataError, load_training_pairs, recode_pair, scan_training_data

ROOT = Path(__file__).resolve().parent.parent
RECODE = ROOT.parent / "shared" / "data" / "recode_train" / "api_update.jsonl"
needs_recode = pytest.mark.skipif(not RECODE.is_file(), reason="../shared/data is not beside the checkout")

GOOD = {"dependency": "pandas", "new_version": "==2.0.0", "description": "Append rows.",
        "update_info": "DataFrame.append was removed; use pandas.concat.",
        "old_code": "import pandas as pd\ndf = pd.DataFrame()\ndf = df.append(row)",
        "new_code": "import pandas as pd\ndf = pd.DataFrame()\ndf = pd.concat([df, row])"}


def _write(tmp_path, lines: list) -> Path:
    p = tmp_path / "recode.jsonl"
    p.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return p


def test_pair_puts_shared_lines_and_the_note_in_the_prompt():
    pair = recode_pair(GOOD, "x:1")
    assert pair.prompt == ("# requires: pandas==2.0.0: DataFrame.append was removed; use pandas.concat.\n"
                           "import pandas as pd\ndf = pd.DataFrame()\n")
    assert (pair.old, pair.new) == ("df = df.append(row)", "df = pd.concat([df, row])")


def test_each_bad_record_names_file_line_and_field(tmp_path):
    cases = [
        ({**GOOD, "update_info": None}, "field 'update_info': expected a string, got null"),
        ({k: v for k, v in GOOD.items() if k != "old_code"}, "field 'old_code': missing"),
        ({**GOOD, "new_code": GOOD["old_code"] + "  "}, "field 'new_code': same as old_code"),
        ({**GOOD, "dependency": 3}, "field 'dependency': expected a string, got number"),
        ('{"dependency": "pandas", ', "malformed JSON"),
    ]
    for bad, msg in cases:
        p = _write(tmp_path, [GOOD, bad, GOOD])
        with pytest.raises(DataError, match=rf"^{p}:2: {msg}"):
            load_training_pairs(p)


def test_skip_bad_keeps_the_good_records_and_counts_the_rest(tmp_path):
    p = _write(tmp_path, [GOOD, {**GOOD, "old_code": None}, "not json", "", {**GOOD, "dependency": "numpy"}])
    scan = scan_training_data(p)
    assert scan.format == "recode" and len(scan.pairs) == 2
    assert [n for n, _ in scan.bad] == [2, 3]  # the blank line 4 is no record
    assert "skipped 2 bad record(s) of 4 (lines 2, 3)" in scan.summary()
    assert [x.source for x in load_training_pairs(p, skip_bad=True)] == ["recode.jsonl:1", "recode.jsonl:5"]
    with pytest.raises(DataError, match="no usable records"):
        load_training_pairs(_write(tmp_path, [{**GOOD, "old_code": None}]), skip_bad=True)


def test_engine_validates_once_and_hands_trials_a_clean_file(tmp_path, capsys, monkeypatch):
    from trainables.sweep.checks import UsageError, check_dataset

    monkeypatch.setenv("APIUPDATE_CACHE", str(tmp_path / "cache"))
    p = _write(tmp_path, [GOOD, {**GOOD, "update_info": None}, {**GOOD, "dependency": "numpy"}])
    with pytest.raises(UsageError, match=r"recode.jsonl:2: field 'update_info'.*--skip-bad trains on the other 2"):
        check_dataset(str(p))
    clean = check_dataset(str(p), skip_bad=True)
    assert "skipped 1 bad record(s) of 3" in capsys.readouterr().out
    assert Path(clean).parent == tmp_path / "cache" / "datasets"
    assert len(load_training_pairs(clean)) == 2  # the strict loader the trainables use accepts it
    assert check_dataset(str(_write(tmp_path, [GOOD]))) == str((tmp_path / "recode.jsonl").resolve())


@needs_recode
def test_the_shared_recode_copy():
    with pytest.raises(DataError, match=r"api_update.jsonl:\d+: field '"):
        load_training_pairs(RECODE)
    scan = scan_training_data(RECODE)
    bad = dict(scan.bad)
    assert "field 'update_info': expected a string, got null" in bad[661]
    assert all(n in bad for n in range(661, 682))  # 21 null records
    assert len(scan.pairs) + len(scan.bad) == 1781 and len(scan.pairs) > 1500
