"""The GPU check's summary, on synthetic nvidia-smi samples and trial reports (no GPU needed),
and its refusal on a machine without NVIDIA GPUs."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_summary import main, summarise  # noqa: E402


def _trial(exp: Path, name: str, start: float, seconds: float, gpu: str, peak_mb: float = 100.0,
           tokens_per_s: float = 1000.0) -> None:
    d = exp / f"trial_{name}"
    d.mkdir(parents=True)
    rows = [{"started_at": start, "trial_seconds": seconds / 2, "gpu_ids": gpu, "peak_memory_mb": peak_mb / 2},
            {"started_at": start, "trial_seconds": seconds, "gpu_ids": gpu, "peak_memory_mb": peak_mb,
             "train_tokens_per_s": tokens_per_s}]
    (d / "result.json").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_summary_counts_busy_samples_per_gpu_and_trials_at_once(tmp_path, capsys):
    smi = tmp_path / "smi.csv"
    smi.write_text("2026/11/29 10:00:00.000, 0, 80, 1000\n"
                   "2026/11/29 10:00:00.500, 0, 0, 1000\n"
                   "2026/11/29 10:00:00.000, 1, 40, 900\n"
                   "2026/11/29 10:00:00.500, 1, 20, 900\n"
                   "garbage line\n")
    exp = tmp_path / "exp"
    _trial(exp, "a", 100.0, 10.0, "0", 300.0, 900.0)  # 100-110
    _trial(exp, "b", 105.0, 10.0, "1", 700.0, 1100.0)  # 105-115: overlaps a
    _trial(exp, "c", 110.0, 5.0, "0", 200.0, 1000.0)   # 110-115: starts as a ends (not 3 at once)
    out = summarise(smi, exp, 1.0, 42.0)
    assert out["busy_fraction"] == {"0": 0.5, "1": 1.0}
    assert out["mean_utilisation"] == {"0": 40.0, "1": 30.0}
    assert out["trials"] == 3 and out["max_trials_at_once"] == 2 and out["gpu_ids_seen"] == ["0", "1"]
    assert out["peak_memory_mb_max"] == 700 and out["train_tokens_per_s_median"] == 1000.0
    assert main([str(smi), str(exp), "0.5", "1000.0", "1042.5"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["wall_s"] == 42.5 and line["gpus_per_trial"] == 0.5


def test_gpu_check_without_nvidia_smi_is_one_line_and_exit_2(tmp_path):
    path = tmp_path / "bin"
    path.mkdir()
    for tool in ("bash", "dirname", "mkdir", "env"):  # what the script needs before its check
        found = shutil.which(tool)
        if found:
            (path / tool).symlink_to(found)
    out = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path / "out")],
                         env={**os.environ, "PATH": str(path)}, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out
    assert out.stderr.strip().splitlines() == ["error: nvidia-smi not found: this script needs NVIDIA GPUs"]


def test_gpu_trial_refuses_without_cuda_in_one_line():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_trial.py"), "--model", "testbed"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip() == "error: no CUDA device (pass --cpu for a dry run)", out
