"""sweeps/compare.py on a small MLflow store written directly: the best completed trial per
method, pruned / diverged trials left out, markdown + PNG + JSON written."""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _client(home: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{home / 'mlflow.db'}")


def _trial(client, exp: str, method: str, i: int, status: str, objective: float, efficacy: float, params: int,
           sweep: str = "s") -> None:
    run = client.create_run(exp, run_name=f"{sweep}/{i}", tags={"kind": "trial", "trial_status": status,
                                                              "sweep": sweep, "trial_id": f"t{i}"})
    for k, v in {"objective": objective, "efficacy": efficacy, "generalization": objective,
                 "locality": 0.95, "api_correct": efficacy * 0.8, "trainable_params": params,
                 "trial_seconds": 12.5}.items():
        client.log_metric(run.info.run_id, k, v)
    if method == "lora":  # the over-application figure and the test split, beside validation
        for k, v in {"specificity": 0.97, "test_generalization": objective - 0.1, "test_locality": 0.96,
                     "test_specificity": 0.98, "locality_exact": 0.81, "specificity_exact": 0.77,
                     "over_application": 0.02}.items():
            client.log_metric(run.info.run_id, k, v)
    if method == "hier_lora":  # adapters on a quarter of the layers: a quarter of standard LoRA's
        client.log_metric(run.info.run_id, "standard_lora_params", 4 * params)
    client.log_param(run.info.run_id, "lr", str(0.001 * (i + 1)))
    client.log_param(run.info.run_id, "model", "testbed")
    client.set_terminated(run.info.run_id)


def _store(home: Path) -> None:
    home.mkdir(parents=True)
    client = _client(home)
    trials = {
        "lora": [("completed", 0.30, 0.9, 32768), ("completed", 0.55, 0.8, 16384), ("pruned", 0.90, 0.9, 8192),
                 ("diverged", -12.0, 0.0, 8192)],
        "hier_lora": [("completed", 0.10, 0.2, 9216)],
        "prompt": [("completed", 0.04, 0.6, 0)],
    }
    for method, rows in trials.items():
        exp = client.create_experiment(method, artifact_location=(home / "artifacts" / method).as_uri())
        for i, row in enumerate(rows):
            _trial(client, exp, method, i, *row)


def test_best_completed_trial_per_method(tmp_path):
    home = tmp_path / "mlruns"
    _store(home)
    out = subprocess.run([sys.executable, "sweeps/compare.py", "--mlruns", str(home), "--json"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {r["method"]: r for r in json.loads(out.stdout.strip().splitlines()[-1])}
    assert set(rows) == {"lora", "hier_lora", "prompt"}
    lora = rows["lora"]
    # the pruned trial has the higher objective but did not finish: not the best
    assert (lora["trial_id"], lora["objective"], lora["efficacy"], lora["trainable_params"]) == ("t1", 0.55, 0.8, 16384)
    assert lora["trials"] == 2 and lora["config"] == {"lr": "0.002"} and lora["model"] == "testbed"
    assert rows["prompt"]["trainable_params"] == 0
    md = (home / "artifacts" / "compare" / "compare.md").read_text()
    assert ("| lora | 0.800 | 0.550 | 0.950 | 0.970 | 0.020 | 0.810 / 0.770 | 0.450 | 0.960 | 0.980 | 16,384 | - | 12 | 0.550 "
            "| s / t1 |") in md
    assert "| hier_lora | 0.200 | 0.100 | 0.950 | - | - | - / - | - | - | - | 9,216 | 0.25 | 12 | 0.100 | s / t0 |" in md
    assert "| prompt | 0.600 | 0.040 | 0.950 | - | - | - / - | - | - | - | 0 | - | 12 | 0.040 | s / t0 |" in md
    assert rows["hier_lora"]["standard_lora_params"] == 4 * 9216
    assert (home / "artifacts" / "compare" / "compare.png").read_bytes()[:4] == b"\x89PNG"


def test_missing_store_is_one_line(tmp_path):
    out = subprocess.run([sys.executable, "sweeps/compare.py", "--mlruns", str(tmp_path / "none")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and "run a sweep first" in out.stderr
    assert not (tmp_path / "none").exists()


BLOCK = re.compile(r"^<!-- generated: (.+?) -->\n(.*?)^<!-- end generated -->$", re.MULTILINE | re.DOTALL)


def _compare(*args):
    return subprocess.run([sys.executable, "sweeps/compare.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, check=False)


def test_write_creates_the_results_document_from_the_store(tmp_path):
    home = tmp_path / "mlruns"
    _store(home)
    doc = tmp_path / "docs" / "results.md"
    out = _compare("--mlruns", str(home), "--write", str(doc))
    assert out.returncode == 0, out.stderr[-2000:]
    text = doc.read_text()
    assert text.startswith("# Results\n") and "## `--model testbed`, store `" + str(home) + "`" in text
    blocks = dict(BLOCK.findall(text))
    best = f"python sweeps/compare.py --mlruns {home} --model testbed --no-ids"
    hist = f"python sweeps/compare.py --mlruns {home} --model testbed --history -"
    assert list(blocks) == [best, hist]
    # the store's values: lora's completed best (t1, not the pruned trial), no sweep / trial column
    assert blocks[best].startswith(f"    {best}\n\n| method |")
    assert ("| lora | 0.800 | 0.550 | 0.950 | 0.970 | 0.020 | 0.810 / 0.770 | 0.450 | 0.960 | 0.980 | 16,384 | - | 12 | 0.550 |"
            in blocks[best].splitlines())
    assert "| hier_lora | s | 1 | 0.200 | 0.100 | 0.950 | - | - | - | - | - | 9,216 | 0.25 | 12 |" in blocks[hist].splitlines()
    assert "| lora | s | 2 | 0.800 | 0.550 |" in blocks[hist]
    # each block's command prints its table
    for cmd, content in blocks.items():
        argv = shlex.split(cmd)
        printed = subprocess.run([sys.executable, *argv[1:]], cwd=ROOT, capture_output=True, text=True, timeout=120,
                                 check=False)
        assert printed.returncode == 0, printed.stderr[-2000:]
        table = content.split("\n\n", 1)[1]
        assert table in printed.stdout


def test_second_write_replaces_the_tables_and_keeps_the_prose(tmp_path):
    home = tmp_path / "mlruns"
    _store(home)
    best = f"python sweeps/compare.py --mlruns {home} --model testbed --no-ids"
    hist = f"python sweeps/compare.py --mlruns {home} --model testbed --history -"
    doc = tmp_path / "results.md"
    # hand-written: prose around an empty block to fill, a block of a store not given (kept as is),
    # and trailing text without a final newline
    original = (f"# Findings\n\nWhat the table answers.\n\n<!-- generated: {best} -->\n<!-- end generated -->\n\n"
                "Measured earlier:  0.228 (kept)\n\n<!-- generated: python sweeps/compare.py --mlruns gone "
                "--model smollm2 --no-ids -->\n| lora | 0.275 |\n<!-- end generated -->\n\nlast line, no newline")
    doc.write_text(original)

    def prose(text):  # the file with the rewritten blocks' contents left out: kept byte for byte
        return BLOCK.sub(lambda m: m.group(0) if "gone" in m.group(1) else f"<{m.group(1)}>", text)

    assert _compare("--mlruns", str(home), "--write", str(doc)).returncode == 0
    first = doc.read_text()
    blocks = dict(BLOCK.findall(first))
    assert "| lora | 0.800 | 0.550 |" in blocks[best] and "| lora | s | 2 | 0.800 | 0.550 |" in blocks[hist]
    assert first.count(f"<!-- generated: {best} -->") == 1  # filled in place, not appended again
    assert first.index("What the table answers.") < first.index(best) < first.index("Measured earlier")
    assert prose(first) == prose(original) + f"\n\n## `--model testbed`, store `{home}`\n\n<{hist}>\n"  # the new block appended

    client = _client(home)  # a new sweep whose best lora trial beats the old one
    _trial(client, client.get_experiment_by_name("lora").experiment_id, "lora", 7, "completed", 0.75, 0.95, 4096,
           sweep="s2")
    out = _compare("--mlruns", str(home), "--write", str(doc))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "2 tables rewritten, 0 added" in out.stdout
    second = doc.read_text()
    new = dict(BLOCK.findall(second))
    assert list(new) == list(blocks)
    assert "| lora | 0.950 | 0.750 |" in new[best] and "| lora | 0.800 | 0.550 |" not in new[best]
    assert "| lora | s2 | 1 | 0.950 | 0.750 |" in new[hist] and "| lora | s | 2 | 0.800 | 0.550 |" in new[hist]
    assert prose(second) == prose(first) and second != first
    assert second.startswith("# Findings\n\nWhat the table answers.\n\n<!-- generated: ")
    assert f"last line, no newline\n\n## `--model testbed`, store `{home}`\n\n<!-- generated: {hist} -->" in second
    assert "<!-- generated: python sweeps/compare.py --mlruns gone --model smollm2 --no-ids -->\n| lora | 0.275 |\n" in second
