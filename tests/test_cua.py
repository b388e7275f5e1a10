"""CodeUpdateArena harness: the estimator, the sandboxed with/without-update runs, the CLI."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from trainables.cua import load_cua, pass_at_k, score, summarize, Score
from trainables.data import DataError

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT.parent / "shared" / "data" / "codeupdatearena_dev" / "dev_sample.jsonl"
needs_sample = pytest.mark.skipif(not SAMPLE.is_file(), reason="../shared/data is not beside the checkout")


@pytest.mark.parametrize("n,c,k,expected", [
    (5, 0, 1, 0.0),
    (5, 1, 1, 1 / 5),  # pass@1 is the pass rate
    (5, 2, 2, 1 - 3 / 10),  # 1 - C(3,2)/C(5,2)
    (10, 3, 5, 1 - 21 / 252),  # 1 - C(7,5)/C(10,5)
    (4, 2, 3, 1.0),  # n - c < k: every draw of 3 holds a pass
    (200, 1, 100, 0.5),  # 1 - C(199,100)/C(200,100) = 1 - 100/200
])
def test_pass_at_k_matches_hand_computed_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)
    assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)


def test_pass_at_k_rejects_impossible_counts():
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 5)


def test_summarize_averages_the_estimator_over_problems():
    def s(new, old):
        return Score("p", 0, new, old, new and not old, None, None)

    scores = [[s(True, False), s(False, False)], [s(True, True), s(True, False)]]
    out = summarize(scores, k=1)
    assert out["records"] == 2 and out["pass_new"] == 2 and out["pass_old"] == 1 and out["upass"] == 1
    assert out["pass@1"] == pytest.approx((0.5 + 1.0) / 2)
    assert out["upass@1"] == pytest.approx((0.5 + 0.5) / 2)


@needs_sample
def test_bad_record_names_line_and_field(tmp_path):
    lines = SAMPLE.read_text().splitlines()[:3]
    rec = json.loads(lines[1])
    rec["update"]["implementation"] = None
    lines[1] = json.dumps(rec)
    p = tmp_path / "cua.jsonl"
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"^{p}:2: field 'update.implementation': expected a string, got null$"):
        load_cua(p)


@needs_sample
def test_reference_upasses_and_hand_made_wrong_solutions_fail():
    rec = load_cua(SAMPLE)[0]  # math.pow gains mod=: expected = math.pow(7, key, 13)
    ref = score(rec, rec.ref_solution)
    assert ref.pass_new and not ref.pass_old and ref.upass
    wrong = score(rec, "def generate_signature(key: int) -> int:\n    return key % 13\n")
    assert not wrong.pass_new and not wrong.upass and "AssertionError" in wrong.error_new
    broken = score(rec, "def generate_signature(key: int) -> int:\n    return (\n")
    assert not broken.pass_new and "SyntaxError" in broken.error_new
    # A candidate that exits before the tests run, or prints something that looks like results,
    # does not pass.
    quitter = score(rec, 'import os\nprint(\'{"error": null, "tests": {}}\')\nos._exit(0)\n')
    assert not quitter.pass_new


@needs_sample
def test_candidates_run_in_the_sandbox_not_in_this_process(tmp_path):
    rec = load_cua(SAMPLE)[0]
    marker = tmp_path / f"escaped-{uuid.uuid4().hex}"
    sneaky = (f"open({str(marker)!r}, 'w').write('x')\n" + rec.ref_solution)
    s = score(rec, sneaky)
    assert not marker.exists()  # the write stayed inside the sandbox (read-only root, private /tmp)
    assert not s.pass_new  # and it raised there


@needs_sample
def test_oracle_cli_on_the_math_records():
    out = subprocess.run([sys.executable, "sweeps/cua_eval.py", "--oracle", str(SAMPLE), "--limit", "5", "--json"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert (got["records"], got["pass_new"], got["pass_old"], got["upass"]) == (5, 5, 0, 5)


@needs_sample
@pytest.mark.slow
def test_oracle_cli_on_the_whole_sample_is_23_of_24():
    out = subprocess.run([sys.executable, "sweeps/cua_eval.py", "--oracle", str(SAMPLE), "--json"],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert (got["records"], got["upass"], got["pass_old"]) == (24, 23, 0), got


def test_cli_usage_errors(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "sweeps/cua_eval.py", *a], cwd=ROOT, capture_output=True,  # noqa: E731
                                    text=True, timeout=120)
    out = run(str(tmp_path / "missing.jsonl"), "--oracle")
    assert out.returncode == 2 and out.stderr.strip().endswith("missing.jsonl: no such file")
    out = run(str(tmp_path / "x.jsonl"), "--model", "testbed", "--k", "5", "--samples", "2")
    assert out.returncode == 2 and "n >= k" in out.stderr
