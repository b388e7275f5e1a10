import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainables.testbed import TestbedConfig, ensure_testbed, weights_digest

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
TINY = TestbedConfig(num_layers=2, hidden_size=32, num_heads=2, intermediate_size=64, vocab_size=400, steps=12,
                     batch_size=8, warmup_steps=2)


def test_same_data_and_config_give_the_same_weights(tmp_path, monkeypatch):
    digests = []
    for i in range(2):
        monkeypatch.setenv("APIUPDATE_CACHE", str(tmp_path / f"c{i}"))
        digests.append(weights_digest(ensure_testbed(TINY, log=lambda m: None)))
    assert digests[0] == digests[1]


def test_a_changed_record_invalidates_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("APIUPDATE_CACHE", str(tmp_path / "c"))
    first = ensure_testbed(TINY, log=lambda m: None)
    assert ensure_testbed(TINY, log=lambda m: None) == first  # cached: same folder, no rebuild
    changed = tmp_path / "migrations.jsonl"
    lines = (FIX / "migrations.jsonl").read_text().splitlines()
    rec = json.loads(lines[0])
    rec["note"] += " (edited)"
    lines[0] = json.dumps(rec)
    changed.write_text("\n".join(lines) + "\n")
    second = ensure_testbed(TINY, migrations_path=changed, locality_path=FIX / "locality.jsonl", log=lambda m: None)
    assert second != first and (second / "model.safetensors").is_file()


def test_base_testbed_writes_the_old_apis(small_testbed, fixture_data):
    from trainables.evaluation import evaluate
    from trainables.models import load_model

    model, tok = load_model("testbed")
    metrics, preds = evaluate(model, tok, *fixture_data, None)
    assert metrics["old_api_rate"] >= 0.9, preds
    assert metrics["efficacy"] <= 0.1 and metrics["generalization"] <= 0.1
    assert metrics["locality_accuracy"] >= 0.9
    assert any(".append(" in p.completion for p in preds if p.kind == "probe")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_any_local_model_path_works_like_a_hub_model(arch, tmp_path, small_testbed, fixture_data):
    """`--model PATH`: a tiny model built from a transformers config, saved like a hub checkpoint."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from trainables.evaluation import evaluate
    from trainables.adapters import attach_lora, trainable_parameters
    from trainables.lora.loop import LoraTrainConfig
    from trainables.models import load_model

    tok = AutoTokenizer.from_pretrained(small_testbed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2))
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=3, n_head=2, n_positions=256))
    model.save_pretrained(tmp_path / arch)
    tok.save_pretrained(tmp_path / arch)

    loaded, tokenizer = load_model(str(tmp_path / arch))
    metrics, _ = evaluate(loaded, tokenizer, *fixture_data, None)
    assert 0.0 <= metrics["generalization"] <= 1.0 and metrics["n_migrations"] == 4
    peft_model = attach_lora(loaded, LoraTrainConfig(model=str(tmp_path / arch), hierarchical=True,
                                                     layer_start=1, layer_end=3, r=4))
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert names and all(".0." not in n for n in names)  # nothing on layer 0
    assert trainable_parameters(peft_model) > 0


def test_evaluate_cli_prints_one_json_line(small_testbed):
    out = subprocess.run([sys.executable, "sweeps/evaluate.py", "--model", "testbed", "--json"], cwd=ROOT,
                         capture_output=True, text=True, env=os.environ.copy(), timeout=300)
    assert out.returncode == 0, out.stderr
    metrics = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("efficacy", "generalization", "old_api_rate", "locality", "locality_accuracy", "api_correct",
                "syntax_ok", "exact_match", "edit_similarity", "n_migrations", "n_libraries", "n_locality"):
        assert key in metrics
    assert metrics["n_migrations"] == 4 and metrics["old_api_rate"] >= 0.9


def test_evaluate_cli_bad_model_is_one_line():
    out = subprocess.run([sys.executable, "sweeps/evaluate.py", "--model", "./no/such/model"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "no such file" in out.stderr


def test_specificity_counts_lookalikes_the_update_no_longer_completes_as_the_base_did(small_testbed):
    """Scored against the base model's own completions the base keeps every lookalike; against
    other references (what an update that moved them would be compared with) it loses them, and
    the objective pays for it like for locality."""
    from trainables.evaluation import default_eval_data
    from trainables.models import load_model
    from trainables.objective import LOCALITY_FLOOR, LOCALITY_PENALTY

    model, tok = load_model("testbed")
    val = default_eval_data("testbed").validation
    assert val.specificity
    same, _ = val.evaluate(model, tok)
    assert same["specificity"] == 1.0 and same["n_specificity"] == len(val.specificity)
    from dataclasses import replace

    # compared with another reference (its own tokens: no base argmax rows for it)
    moved = replace(val, base_specificity=tuple("x = 1" for _ in val.specificity), base_specificity_argmax=None)
    got, preds = moved.evaluate(model, tok)
    assert got["specificity_exact"] == 0.0 and got["specificity"] < 0.5 and got["locality"] == same["locality"]
    assert got["objective"] == pytest.approx(same["objective"] - LOCALITY_PENALTY * (LOCALITY_FLOOR - got["specificity"]))
    assert sum(p.kind == "specificity" for p in preds) == len(val.specificity)


def test_the_triggered_subset_holds_exactly_the_probes_where_the_base_model_writes_the_old_api(small_testbed):
    """EDAPIBench's filter, made with the references: on it the base model itself has a
    deprecated-use rate of exactly 1 and no strict hit; every other probe it completes without
    the old API."""
    from dataclasses import replace

    from trainables.apicheck import check_completion
    from trainables.evaluation import default_eval_data
    from trainables.models import load_model

    model, tok = load_model("testbed")
    val = default_eval_data("testbed").validation
    got, preds = val.evaluate(model, tok)
    assert got["n_triggered"] == len(val.triggered) > 0
    assert got["deprecated_use_rate"] == 1.0 and got["replacement_hit_rate"] == 0.0
    by_id = {m.id: m for m in val.migrations}
    for p in (p for p in preds if p.kind == "probe"):
        m = by_id[p.ref_id]
        i = [c.prompt for c in m.probe_contexts].index(p.prompt)
        assert check_completion(p.prompt, p.completion, m.deprecated, m.replacement).uses_old == \
            ((m.id, i) in val.triggered)
    # over every probe, the subset's figures are the probe figures
    every = frozenset((m.id, i) for m in val.migrations for i in range(len(m.probe_contexts)))
    whole, _ = replace(val, triggered=every).evaluate(model, tok)
    assert whole["deprecated_use_rate"] == whole["old_api_rate"]
    assert whole["replacement_hit_rate"] == whole["generalization"]
    none, _ = replace(val, triggered=frozenset()).evaluate(model, tok)
    assert none["n_triggered"] == 0 and "deprecated_use_rate" not in none
