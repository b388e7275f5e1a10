"""The one method dict matches the files on disk, and every entry point answers --help."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

from trainables.sweep.methods import METHODS

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = {"__init__.py"}  # sweeps/ holds command-line scripts only; the engine is trainables/sweep/
TOOLS = {"evaluate.py", "export_best.py", "cua_eval.py", "compare.py", "mine_triggers.py"} | LIBRARY


def test_every_method_has_its_script_and_space_and_nothing_else_does():
    scripts = {p.stem for p in (ROOT / "sweeps").glob("*.py") if p.name not in TOOLS}
    assert scripts == set(METHODS)
    for name, method in METHODS.items():
        assert (ROOT / "search_spaces" / f"{name}.py").is_file()
        assert re.search(rf'main\("{name}"\)', (ROOT / "sweeps" / f"{name}.py").read_text())
        assert isinstance(method.config_cls, type) and callable(method.fit)
        assert method.space.__module__ == f"search_spaces.{name}"  # one name per method everywhere
        assert method.fit.__module__ == method.config_cls.__module__


def test_sweeps_holds_only_command_line_scripts():
    for p in (ROOT / "sweeps").glob("*.py"):
        if p.name not in LIBRARY:
            assert 'if __name__ == "__main__":' in p.read_text(), p.name


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "sweeps").glob("*.py") if p.name not in LIBRARY))
def test_entry_points_answer_help(script):
    out = subprocess.run([sys.executable, f"sweeps/{script}", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout
    # defaults are shown where there is one; an empty one is noise after a help text
    assert "(default: None)" not in out.stdout and "(default: False)" not in out.stdout


def test_search_spaces_derive_the_layer_range():
    import optuna

    from search_spaces.hier_lora import space

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(30):
        trial = study.ask()
        fixed = space(trial, n_layers=8)
        start, span = trial.params["layer_start"], trial.params["layer_span"]
        assert fixed["layer_end"] == min(start + span, 8) and 0 <= start < fixed["layer_end"] <= 8
        assert span <= 4  # at most half of the model: hierarchical LoRA's point
        assert (fixed.get("max_grad_norm", "searched") is None) == (trial.params["clip"] is False)
        study.tell(trial, 0.0)
