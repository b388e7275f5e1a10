"""The one trial lifecycle: every method evaluates quickly at ASHA's rungs and fully once, at
its end; the layout rules that keep the lifecycle in one place."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Three epochs (editing phases) with a rung after the first: the smallest run where a report
# could be skipped, made quick, or wrongly made full.
THREE_ROUNDS = {
    "lora": dict(epochs=3, batch_size=8, r=4),
    "hier_lora": dict(epochs=3, batch_size=8, r=4, layer_start=2, layer_end=4),
    "dpo": dict(epochs=3, batch_size=4, r=4, layer_start=2, layer_end=4),
    "grpo": dict(epochs=3, num_generations=2, prompts_per_step=2, max_completion_length=8, r=4, layer_start=2,
                 layer_end=4, contexts_per_migration=1, exec_timeout=2.0),
    "rome": dict(layer=1, v_num_grad_steps=2, phases=3),
    "memit": dict(layer_start=1, layer_end=3, v_num_grad_steps=2, phases=3, mom2_n_samples=20),
}


@pytest.mark.parametrize("method", [*THREE_ROUNDS, "prompt"])
def test_every_method_evaluates_quickly_at_the_rungs_and_fully_once_at_the_end(method, small_testbed):
    from trainables.common import local_reporter
    from trainables.sweep.methods import METHODS
    from trainables.trial import TrialContext, run_trial

    history: list[dict] = []
    ctx = TrialContext(eval_epochs=(1,), n_layers=4, threads=1)
    out = run_trial(METHODS[method], THREE_ROUNDS.get(method, {}), ctx, local_reporter(history))
    assert out["trial_status"] == "completed", out
    if method == "prompt":  # nothing trained: one report, the full evaluation
        assert [(h["epoch"], h["final"]) for h in history] == [(1, True)]
    else:
        assert [(h["epoch"], h["final"]) for h in history] == [(1, False), (3, True)]
        assert (history[0]["quick_evaluations"], history[0]["full_evaluations"]) == (1, 0)
        assert "test_generalization" not in history[0]  # the test split is scored at the end only
    assert history[-1]["full_evaluations"] == 1
    assert "test_generalization" in history[-1]


def test_a_finished_trial_restored_reports_its_result_again_without_training(small_testbed, tmp_path):
    from trainables.common import local_reporter
    from trainables.sweep.methods import METHODS
    from trainables.trial import TrialContext, run_trial

    keep = tmp_path / "ckpt"
    first: list[dict] = []
    ctx = TrialContext(n_layers=4, threads=1)
    run_trial(METHODS["prompt"], {"strategy": "rules"}, ctx, local_reporter(first, keep_checkpoint=str(keep)))
    again: list[dict] = []
    reporter = local_reporter(again, keep_checkpoint=str(keep))
    reporter.restore = lambda: str(keep)  # a prompt checkpoint holds no state.pt
    out = run_trial(METHODS["prompt"], {"strategy": "rules"}, ctx, reporter)
    assert len(again) == 1 and out["trial_seconds"] == first[-1]["trial_seconds"]
    # another config restored from that checkpoint is not taken for it
    other: list[dict] = []
    reporter = local_reporter(other, keep_checkpoint=str(keep))
    reporter.restore = lambda: str(keep)
    out = run_trial(METHODS["prompt"], {"strategy": "basic"}, ctx, reporter)
    assert out["trial_seconds"] != first[-1]["trial_seconds"]


def test_a_diverged_trial_is_reported_by_the_lifecycle_for_every_adapter_method(small_testbed):
    from trainables.common import local_reporter
    from trainables.sweep.methods import METHODS
    from trainables.trial import TrialContext, run_trial

    history: list[dict] = []
    out = run_trial(METHODS["lora"], {"lr": 10.0, "max_grad_norm": None, "epochs": 2, "batch_size": 4},
                    TrialContext(n_layers=4, threads=1), local_reporter(history))
    assert out["trial_status"] == "diverged" and out["objective"] == -12.0
    assert [h["trial_status"] for h in history] == ["diverged"] and out["trainable_params"] > 0 and out["final"]


def test_a_trial_context_round_trips_through_its_file(tmp_path):
    from trainables.trial import TrialContext

    ctx = TrialContext(model="smollm2", dataset="x.jsonl", seed=3, eval_epochs=(1, 3), state_cache_gb=0.5)
    ctx.save(tmp_path / "ctx.json")
    assert TrialContext.load(tmp_path / "ctx.json") == ctx
    assert TrialContext.load(tmp_path / "missing.json") is None


def test_a_config_file_from_before_the_context_splits_into_parameters_and_settings():
    from trainables.trial import split_config

    params, settings = split_config({"lr": 0.01, "model": "smollm2", "seed": 1, "threads": 2, "_frozen_cache": "x"})
    assert params == {"lr": 0.01} and settings == {"model": "smollm2", "seed": 1, "threads": 2}


def _functions(tree):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def test_no_function_in_trainables_is_longer_than_120_lines():
    long = []
    for path in (ROOT / "trainables").rglob("*.py"):
        for fn in _functions(ast.parse(path.read_text())):
            if fn.end_lineno - fn.lineno + 1 > 120:
                long.append(f"{path.relative_to(ROOT)}:{fn.name} ({fn.end_lineno - fn.lineno + 1} lines)")
    assert not long, long


def test_the_sweep_engine_defines_no_class_inside_a_function():
    nested = [f"{path.name}:{fn.name}" for path in (ROOT / "trainables" / "sweep").glob("*.py")
              for fn in _functions(ast.parse(path.read_text()))
              if any(isinstance(n, ast.ClassDef) for n in ast.walk(fn))]
    assert not nested, nested


def test_policy_methods_import_nothing_from_the_lora_loop():
    found = []
    for path in (ROOT / "trainables" / "policy").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            found += [f"{path.name}: {n}" for n in names if n.startswith("trainables.lora")]
    assert not found, found


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_an_untouched_adapter_keeps_locality_and_specificity_exactly_in_every_dtype(dtype, small_testbed):
    """The references and the trials score through one path: an adapter at initialisation (B = 0)
    changes no token of the base model's completions, whatever the precision."""
    from trainables.adapters import attach_lora
    from trainables.evaluation import default_eval_data
    from trainables.lora.loop import LoraTrainConfig
    from trainables.models import load_model

    model, tok = load_model("testbed", device="cpu", dtype=dtype)
    model = attach_lora(model, LoraTrainConfig(hierarchical=True, layer_start=2, layer_end=4, target="all"))
    metrics, _ = default_eval_data("testbed", "cpu", dtype).validation.evaluate(model, tok)
    assert metrics["locality"] == 1.0 and metrics.get("specificity", 1.0) == 1.0, metrics


def test_a_snippets_figures_do_not_depend_on_what_is_scored_beside_it(small_testbed, fixture_data):
    """Batched with other groups' pairs, each group scores as it does alone (bf16 rounds by
    batch shape): what lets a trial's evaluation agree with references made on the snippets alone."""
    from trainables.evaluation import score_lines
    from trainables.models import load_model

    migrations, locality = fixture_data
    model, tok = load_model("testbed", device="cpu", dtype="bf16")
    snippets = [(s.prompt, s.completion) for s in locality]
    contexts = [(c.prompt, c.new) for m in migrations for c in m.train_contexts + m.probe_contexts]
    alone = score_lines(model, tok, snippets, batch_size=8, argmax=True)
    mixed = score_lines(model, tok, contexts + snippets, batch_size=8, argmax=True,
                        groups=[0] * len(contexts) + [1] * len(snippets))
    assert mixed[len(contexts):] == alone


def test_a_sweeps_over_application_ceiling_reaches_its_trials_reports(small_testbed, monkeypatch):
    """--max-over-application travels in the trial context: every report says the ceiling it was
    scored under, and a later reader (rank, compare.py) applies that one, not its own."""
    from trainables.common import local_reporter
    from trainables.objective import OVER_APPLICATION_CEILING, objective
    from trainables.sweep.methods import METHODS
    from trainables.trial import TrialContext, run_trial

    monkeypatch.delenv("APIUPDATE_MAX_OVER_APPLICATION", raising=False)
    for ceiling, said in ((None, OVER_APPLICATION_CEILING), (0.5, 0.5)):
        history = []
        out = run_trial(METHODS["prompt"], {"strategy": "basic"},
                        TrialContext(n_layers=4, threads=1, max_over_application=ceiling), local_reporter(history))
        assert out["max_over_application"] == said and all(h["max_over_application"] == said for h in history)
        assert out["objective"] == objective(out)
        monkeypatch.delenv("APIUPDATE_MAX_OVER_APPLICATION", raising=False)
