"""LoRA / hierarchical LoRA on the small fixture testbed, in-process (no Ray)."""
from __future__ import annotations

import pytest
import torch

from trainables.common import local_reporter
from trainables.adapters import attach_lora
from trainables.lora.loop import LoraTrainConfig
from trainables.sweep.methods import run_one
from trainables.models import load_model


def _cfg(**kw) -> LoraTrainConfig:
    base = dict(lr=5e-3, epochs=3, batch_size=4, target="all", r=4, threads=1, warmup_ratio=0.0)
    return LoraTrainConfig(**{**base, **kw})


def test_training_lowers_the_loss(small_testbed):
    history: list[dict] = []
    run_one(_cfg(epochs=4), local_reporter(history))
    losses = [h["train_loss"] for h in history]
    assert losses[-1] < 0.7 * losses[0], losses
    assert history[-1]["final"] and history[-1]["trial_status"] == "completed"


def test_divergence_guard_stops_lr_10(small_testbed):
    history: list[dict] = []
    out = run_one(_cfg(lr=10.0, max_grad_norm=None), local_reporter(history))
    assert out["trial_status"] == "diverged" and out["objective"] == -12.0
    assert out["step"] < out["total_steps"]  # stopped at once, not after all epochs
    assert "diverged_reason" in out


def test_hier_lora_leaves_every_parameter_outside_the_range_unchanged(small_testbed):
    start, end = 2, 4
    base, _ = load_model("testbed")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model, tok = load_model("testbed")
    cfg = _cfg(hierarchical=True, layer_start=start, layer_end=end, epochs=2)
    peft_model = attach_lora(model, cfg)
    lora0 = {k: v.clone() for k, v in peft_model.named_parameters() if "lora_" in k}
    assert lora0 and all(any(f".layers.{i}." in k for i in range(start, end)) for k in lora0)
    # train this very model through the shared loop's pieces
    from trainables.adapters import training_examples
    from trainables.tensors import pad_batch

    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    ex = training_examples(tok, None)
    for i in range(0, len(ex), 4):
        ids, mask, labels = pad_batch(ex[i : i + 4], tok.pad_token_id)
        peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    moved = [k for k, v in peft_model.named_parameters() if "lora_B" in k and v.abs().sum() > 0]
    assert moved, "the adapters inside the range did not learn"
    merged = peft_model.merge_and_unload().state_dict()
    for k, v in before.items():
        inside = any(f"layers.{i}." in k for i in range(start, end))
        if not inside:
            assert torch.equal(merged[k], v), f"{k} changed outside [{start}, {end})"
    changed_inside = [k for k, v in before.items() if any(f"layers.{i}." in k for i in range(start, end))
                      and not torch.equal(merged[k], v)]
    assert changed_inside


def test_hier_lora_has_fewer_trainable_parameters(small_testbed):
    full = run_one(LoraTrainConfig(epochs=1, batch_size=8, r=4, threads=1))
    half = run_one(LoraTrainConfig(epochs=1, batch_size=8, r=4, threads=1, hierarchical=True, layer_start=2, layer_end=4))
    assert half["trainable_params"] * 2 == full["trainable_params"]
    # what the summary compares with: standard LoRA at the same rank, counted from the half model
    assert half["standard_lora_params"] == full["trainable_params"] == full["standard_lora_params"]


def test_resume_continues_from_the_checkpoint_and_corrupt_ones_restart(small_testbed, tmp_path):
    keep = tmp_path / "ckpt"
    first: list[dict] = []
    run_one(_cfg(epochs=2), local_reporter(first, keep_checkpoint=str(keep)))
    resumed: list[dict] = []
    run_one(_cfg(epochs=4), local_reporter(resumed, keep_checkpoint=str(keep)))
    assert [h["epoch"] for h in resumed] == [3, 4]  # continued, did not restart
    (keep / "adapter.pt").write_bytes(b"not a checkpoint")
    again: list[dict] = []
    run_one(_cfg(epochs=2), local_reporter(again, keep_checkpoint=str(keep)))
    assert [h["epoch"] for h in again] == [1, 2]  # unusable checkpoint: from scratch


@pytest.mark.parametrize("bad,message", [
    (dict(lr=0.0), "lr must be > 0"),
    (dict(target="everything"), "target must be one of"),
    (dict(warmup_ratio=1.5), "warmup_ratio"),
    (dict(max_grad_norm=-1.0), "max_grad_norm"),
])
def test_config_rejects_bad_values(bad, message):
    with pytest.raises(ValueError, match=message):
        LoraTrainConfig(**bad)


def test_layer_range_outside_the_model_is_rejected():
    cfg = LoraTrainConfig(hierarchical=True, layer_start=3, layer_end=12)
    with pytest.raises(ValueError, match=r"outside the model's 8 layers"):
        cfg.layer_range(8)


def test_augment_adds_renamed_copies_that_keep_the_new_api(small_testbed):
    """augment=2 triples the examples; the copies are the same programs with other variable
    names (still the new API, still parseable), and a new epoch draws new names."""
    import random

    from trainables.apicheck import check_completion
    from trainables.data import load_migrations, load_training_pairs
    from trainables.adapters import training_examples
    from trainables.testbed import rename_variables

    _, tok = load_model("testbed")
    plain = training_examples(tok, None)
    aug = training_examples(tok, None, augment=2, rng=random.Random(1))
    assert len(aug) == 3 * len(plain)
    assert aug[: len(plain)] == plain
    assert training_examples(tok, None, augment=2, rng=random.Random(2)) != aug
    by_id = {m.id: m for m in load_migrations()}
    rng = random.Random(0)
    for p in load_training_pairs():
        prompt, new = rename_variables(p.prompt, p.new, rng)
        m = by_id[p.source]
        assert check_completion(prompt, new, m.deprecated, m.replacement).correct, (prompt, new)


def test_line_logprobs_match_one_unpadded_forward_per_pair(small_testbed, fixture_data):
    from trainables.evaluation import line_logprobs

    model, tok = load_model("testbed")
    migrations = fixture_data[0]
    pairs = [(c.prompt, line) for m in migrations for c in m.probe_contexts for line in (c.old, c.new)]
    batched = line_logprobs(model, tok, pairs, batch_size=3)  # padded batches of mixed lengths
    for (prompt, line), got in zip(pairs, batched):
        p = [tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]
        c = tok(line, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([p + c])).logits[0].float(), -1)
        want = sum(logp[len(p) - 1 + k, t].item() for k, t in enumerate(c))
        assert got == pytest.approx(want, abs=1e-3), (line, got, want)
    # the base testbed memorised the old lines: it prefers them on every probe
    assert all(batched[i] > batched[i + 1] for i in range(0, len(batched), 2))


def test_soft_generalization_rises_as_the_adapter_learns_and_progress_adds_it(small_testbed):
    from trainables.evaluation import default_eval_data, soft_generalization

    model, tok = load_model("testbed")
    base = soft_generalization(model, tok, default_eval_data("testbed").validation.migrations)
    assert base < 0.2  # the base model prefers the old line on (almost) every probe
    history: list[dict] = []
    run_one(_cfg(epochs=3, lr=1e-2), local_reporter(history))
    soft = [h["soft_generalization"] for h in history]
    assert min(soft) > base + 0.3, (base, soft)
    for h in history:
        assert 0.0 <= h["soft_generalization"] <= 1.0
        assert h["progress"] == pytest.approx(h["objective"] + 0.1 * h["soft_generalization"])


def test_prompt_kl_is_zero_for_fresh_adapters_and_grows_when_they_move(small_testbed):
    from trainables.adapters import prompt_kl, training_examples
    from trainables.tensors import pad_batch

    model, tok = load_model("testbed")
    model = attach_lora(model, _cfg())
    ids, mask, labels = pad_batch(training_examples(tok, None)[:4], tok.pad_token_id)
    kl0 = prompt_kl(model, ids, mask, labels, model(input_ids=ids, attention_mask=mask).logits)
    assert abs(kl0.item()) < 1e-5  # LoRA's B starts at 0: the adapted model is the base model
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.05 * torch.randn_like(p))
    logits = model(input_ids=ids, attention_mask=mask).logits
    kl1 = prompt_kl(model, ids, mask, labels, logits)
    assert kl1.item() > 1e-4 and kl1.requires_grad  # it trains the adapters
    kl1.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_" in n)


def _moved(model, scale: float = 0.05):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(scale * torch.randn_like(p))
    return model


@pytest.mark.parametrize("start", [0, 1])
def test_base_pass_equals_a_full_forward_with_the_adapters_off(small_testbed, start):
    """The KL's base logits from the kept lower-layer state (start > 0) or a full pass
    (start 0) are the base model's, and the adapters train again afterwards."""
    from trainables.adapters import BasePass, training_examples
    from trainables.tensors import pad_batch

    torch.manual_seed(0)
    model, tok = load_model("testbed")
    model = _moved(attach_lora(model, _cfg(hierarchical=start > 0, layer_start=start)))
    base = BasePass(model, start)
    assert (base._hook is not None) == (start > 0)
    model.train()
    ids, mask, labels = pad_batch(training_examples(tok, None)[:5], tok.pad_token_id)
    adapted = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).logits
    got = base.logits(ids, mask)
    with torch.no_grad(), model.disable_adapter():
        want = model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(got, want, atol=1e-5)
    assert (adapted - want).abs().max() > 1e-3  # the adapters did change the logits
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    # a batch the adapted model did not just run gets a full pass, not a stale state
    other_ids, other_mask, _ = pad_batch(training_examples(tok, None)[5:8], tok.pad_token_id)
    with torch.no_grad(), model.disable_adapter():
        want = model(input_ids=other_ids, attention_mask=other_mask).logits
    assert torch.allclose(base.logits(other_ids, other_mask), want, atol=1e-5)


def test_length_grouped_batches_cover_every_example_once_with_less_padding():
    import random

    from trainables.common import length_grouped_batches

    rng = random.Random(0)
    lengths = [rng.randint(20, 100) for _ in range(301)]
    batches = length_grouped_batches(lengths, 8, random.Random(1))
    assert sorted(i for b in batches for i in b) == list(range(301))
    assert len(batches) == -(-301 // 8) and all(len(b) <= 8 for b in batches)

    def padded(bs):
        return sum(len(b) * max(lengths[i] for i in b) for b in bs)

    order = list(range(301))
    random.Random(1).shuffle(order)
    plain = [order[i : i + 8] for i in range(0, 301, 8)]
    assert padded(batches) < 0.85 * padded(plain)
    assert length_grouped_batches(lengths, 8, random.Random(2)) != batches  # still shuffled


def test_evaluation_through_a_merged_copy_scores_the_adapted_model(small_testbed, fixture_data):
    from trainables.evaluation import evaluate, merged_copy

    torch.manual_seed(0)
    model, tok = load_model("testbed")
    model = _moved(attach_lora(model, _cfg()), 0.2).eval()  # PEFT leaves it in train mode (dropout)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    merged = merged_copy(model)
    assert merged is not model and not any("lora_" in n for n, _ in merged.named_parameters())
    ids = torch.tensor([[tok.bos_token_id, 5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-4)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # untouched
    migrations, locality = fixture_data
    got, _ = evaluate(model, tok, migrations, locality, None)
    assert got["locality"] == 1.0  # scoring the model itself: its own completions
    base_model, _ = load_model("testbed")
    assert merged_copy(base_model) is base_model  # nothing to merge


def test_eval_epochs_limit_the_reports_to_those_epochs_and_the_last(small_testbed):
    history: list[dict] = []
    run_one(_cfg(epochs=3), local_reporter(history), eval_epochs=(1,))
    assert [h["epoch"] for h in history] == [1, 3]
    assert history[-1]["final"] and history[-1]["step"] == history[-1]["total_steps"]


def test_anchor_windows_are_reproducible_and_share_no_line_with_the_locality_set():
    from trainables.lora.anchors import locality_lines, stdlib_windows

    raw = stdlib_windows(0)
    assert len(raw) > 1000 and raw == stdlib_windows(0) and raw != stdlib_windows(1)
    line = "raise NotImplementedError"  # the library repeats idioms that a snippet may use too
    assert any(line in w for w in raw)
    for exclude in (frozenset([line]), locality_lines()):
        clean = stdlib_windows(0, exclude)
        assert 0.9 * len(raw) < len(clean) <= len(raw)
        assert not any(ln.strip() in exclude for w in clean for ln in w.splitlines())
    assert len(stdlib_windows(0, frozenset([line]))) < len(raw)


def test_anchor_rows_add_kl_positions_but_no_lm_loss(small_testbed):
    from trainables.lora.anchors import anchor_ids
    from trainables.adapters import training_examples
    from trainables.lora.loop import anchor_indices, anchor_rows
    from trainables.tensors import pad_batch

    torch.manual_seed(0)
    model, tok = load_model("testbed")
    model = _moved(attach_lora(model, _cfg())).eval()
    rows = training_examples(tok, None)[:4]
    width = max(len(ids) for ids, _ in rows)
    pool = anchor_ids(tok, 128)
    eager = [([tok.bos_token_id] + tok(w, add_special_tokens=False)["input_ids"])[:128] for w in pool.windows]
    assert pool[-1] == eager[-1] and pool[250:260] == eager[250:260] and len(pool) == len(eager)  # lazy, same ids
    assert anchor_indices(len(pool), 3, 5) == [15, 16, 17] and anchor_indices(10, 3, 3) == [9, 0, 1]
    extra = anchor_rows(pool, anchor_indices(len(pool), 3, 5), width)
    assert extra != anchor_rows(pool, anchor_indices(len(pool), 3, 6), width)
    assert all(len(ids) <= width and n == len(ids) for ids, n in extra)
    plain = pad_batch(rows, tok.pad_token_id)
    mixed = pad_batch(rows + extra, tok.pad_token_id)
    assert mixed[0].shape == (7, width)  # no wider than the batch
    assert (mixed[2][4:] == -100).all()  # anchors: prompt only
    with torch.no_grad():
        lm_plain = model(input_ids=plain[0], attention_mask=plain[1], labels=plain[2]).loss
        lm_mixed = model(input_ids=mixed[0], attention_mask=mixed[1], labels=mixed[2]).loss
    assert lm_mixed.item() == pytest.approx(lm_plain.item(), abs=1e-4)


def test_anchors_keep_unrelated_code_closer_to_the_base(small_testbed, tmp_path):
    """The same update with and without anchor rows: with them the adapted model drifts less
    from the base on standard-library code it never trained on (windows past the used ones)."""
    from peft import PeftModel

    from trainables.lora.anchors import anchor_ids
    from trainables.adapters import prompt_kl
    from trainables.tensors import pad_batch

    _, tok = load_model("testbed")
    held_out = [(ids, len(ids)) for ids in anchor_ids(tok, 64)[-24:]]
    ids, mask, labels = pad_batch(held_out, tok.pad_token_id)
    drift = {}
    for anchors in (0, 4):
        out = tmp_path / f"a{anchors}"
        run_one(LoraTrainConfig(lr=1e-2, epochs=3, batch_size=4, target="all", r=4, threads=1, warmup_ratio=0.0,
                                kl_weight=1.0, anchors=anchors), weights_out=str(out))
        base, _ = load_model("testbed")
        model = PeftModel.from_pretrained(base, str(out)).eval()
        with torch.no_grad():
            drift[anchors] = prompt_kl(model, ids, mask, labels, model(input_ids=ids, attention_mask=mask).logits).item()
    assert drift[4] < 0.7 * drift[0], drift


@pytest.mark.parametrize("start,kl", [(2, True), (0, True), (3, False)])
def test_frozen_states_give_the_ordinary_forward_and_base_logits(small_testbed, start, kl):
    """Starting the adapted forward at layer k from the stored base input to it, and taking
    the KL's base logits from the stored final state, equals running the whole model (adapters
    on, then off), anchor rows (stored at full length, cut to the batch) included."""
    from trainables.lora.anchors import anchor_ids
    from trainables.lora.frozen import FrozenStates
    from trainables.adapters import training_examples
    from trainables.lora.loop import anchor_rows
    from trainables.tensors import pad_batch

    torch.manual_seed(0)
    model, tok = load_model("testbed")
    model = _moved(attach_lora(model, _cfg(hierarchical=start > 0, layer_start=start)))
    model.eval()  # no LoRA dropout: the two forwards must see the same function
    frozen = FrozenStates.make(model, start, kl)
    examples = training_examples(tok, None)
    frozen.prepare(examples, tok.pad_token_id)
    idx = [3, 0, 7]
    rows = [examples[i] for i in idx]
    width = max(len(ids) for ids, _ in rows)
    pool = anchor_ids(tok, 128)
    pool_rows = [1, 300]  # two stored chunks (ANCHOR_CHUNK rows each), cut to the batch width
    rows += anchor_rows(pool, pool_rows, width)
    ids, mask, labels = pad_batch(rows, tok.pad_token_id)
    hk, final = frozen.batch(idx, width, frozen.anchor_batch(pool, pool_rows, width, tok.pad_token_id))
    got = frozen.forward(model, ids, mask, labels, hk)
    want = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
    real = mask.bool()
    assert torch.allclose(got.logits[real], want.logits[real], atol=1e-4)
    assert got.loss.item() == pytest.approx(want.loss.item(), abs=1e-5)
    got.loss.backward()  # gradients reach the adapters through the shortened stack
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    assert (hk is None) == (start == 0) and (final is None) == (not kl)
    if kl:
        with torch.no_grad(), model.disable_adapter():
            base = model(input_ids=ids, attention_mask=mask).logits
        assert torch.allclose(frozen.base_logits(final)[real], base[real], atol=1e-4)
        assert (want.logits[real] - base[real]).abs().max() > 1e-3  # the adapters matter here
    assert len(list(model.get_base_model().get_decoder().layers)) == model.config.num_hidden_layers  # restored


def test_frozen_states_are_shared_through_the_cache_and_change_nothing(small_testbed, tmp_path):
    """Trials with a cache folder write each example set's states once (every layer's input
    and the final state; anchor rows and evaluation sequences included) and read them after; a
    run that reads them trains and scores exactly like one that computed them, and like one
    without a folder."""
    cache = tmp_path / "frozen"
    n_layers = load_model("testbed")[0].config.num_hidden_layers
    cfg = _cfg(hierarchical=True, layer_start=2, layer_end=4, epochs=2, augment=1, kl_weight=0.5, anchors=2)
    runs, stamps = [], []
    for folder in (cache, cache, None):
        history: list[dict] = []
        runs.append(run_one(cfg, local_reporter(history), frozen_cache=str(folder) if folder else None))
        if folder:
            files = sorted(cache.iterdir())
            stamps.append({p.name: p.stat().st_mtime_ns for p in files})
            # (L - 1 inputs + final) x (2 training sets (augment: one per epoch), the anchor
            # pool's first chunk, the quick and the final evaluation's sequences, the test split's)
            assert len(files) == n_layers * 6
            names = [p.name.split("-")[0] for p in files]
            assert {n: names.count(n) for n in names} == {**{f"h{i}": 6 for i in range(1, n_layers)}, "final": 6}
    assert stamps[0] == stamps[1]  # the second run read, it did not write
    first, warm, memory = runs
    for key in ("train_loss", "efficacy", "generalization", "locality", "soft_generalization"):
        assert first[key] == warm[key] == memory[key], key
    # another layer range finds its states already there
    run_one(_cfg(hierarchical=True, layer_start=3, layer_end=4, epochs=1, augment=1, kl_weight=0.5),
               local_reporter([]), frozen_cache=str(cache))
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == stamps[0]


def test_frozen_state_cache_stays_under_its_disk_limit(small_testbed, tmp_path):
    """With a limit smaller than one example set the folder stays empty and the trial trains
    and scores as without a cache; with room for some sets it stops writing at the limit."""
    from trainables.lora import frozen

    cfg = _cfg(hierarchical=True, layer_start=2, layer_end=4, epochs=2, augment=1, kl_weight=0.5)
    memory = run_one(cfg, local_reporter([]))
    none = run_one(cfg, local_reporter([]), frozen_cache=str(tmp_path / "none"), state_cache_gb=0.0)
    assert not (tmp_path / "none").exists() or not any((tmp_path / "none").iterdir())
    limit = 300_000  # bytes: a few of the small testbed's parts, not all of them
    some = run_one(cfg, local_reporter([]), frozen_cache=str(tmp_path / "some"), state_cache_gb=limit / 2**30)
    used = frozen.folder_bytes(tmp_path / "some")
    assert 0 < used <= limit
    for key in ("train_loss", "efficacy", "generalization", "locality", "soft_generalization"):
        assert memory[key] == none[key] == some[key], key


def test_frozen_states_stay_off_where_they_do_not_apply(small_testbed):
    from trainables.lora.frozen import FrozenStates

    model, _ = load_model("testbed")
    model = attach_lora(model, _cfg())
    assert FrozenStates.make(model, 0, False) is None  # standard LoRA without KL: nothing frozen to reuse
    model.get_base_model().config.attention_dropout = 0.1
    assert FrozenStates.make(model, 0, True) is None  # a stochastic base forward cannot be stored


def test_score_lines_proves_exactly_the_lines_greedy_decoding_writes(small_testbed, fixture_data):
    """A verified (prompt, line) is one that decoding the prompt writes: most decoded
    one-line completions are verified (not those decoded through another tokenization of the
    same text: the proof follows the canonical tokens; a statement continued over lines is never
    verified), and the same line with one more character, or cut short, never is."""
    from trainables.evaluation import generate, score_lines

    torch.manual_seed(0)
    model, tok = load_model("testbed")
    model = _moved(attach_lora(model, _cfg()), 0.2).merge_and_unload().eval()
    migrations, locality = fixture_data
    prompts = [c.prompt for m in migrations for c in m.train_contexts + m.probe_contexts] + [s.prompt for s in locality]
    decoded = generate(model, tok, prompts)
    roundtrip = [tok.decode(tok(d, add_special_tokens=False)["input_ids"]) == d for d in decoded]
    verdicts = score_lines(model, tok, list(zip(prompts, decoded)), batch_size=7)
    verified = [v for _, v in verdicts]
    one_line = [i for i, d in enumerate(decoded) if "\n" not in d]
    assert len(one_line) >= len(prompts) // 2
    assert sum(verified[i] for i in one_line) > 0.8 * len(one_line)
    assert not any(verified[i] for i in range(len(prompts)) if i not in one_line)
    assert all(r for v, r in zip(verified, roundtrip) if v)
    longer = score_lines(model, tok, [(p, d + "x") for p, d in zip(prompts, decoded)])
    shorter = score_lines(model, tok, [(p, d[:-1]) for p, d in zip(prompts, decoded) if d])
    assert not any(v for _, v in longer) and not any(v for _, v in shorter)


def test_evaluation_decodes_only_what_it_cannot_prove_and_scores_the_same(small_testbed, fixture_data, monkeypatch):
    """The metrics and predictions with the teacher-forced proofs equal those of decoding
    every prompt, for a base model and an adapted one, quick and full."""
    from trainables import evaluation
    from trainables.evaluation import scoring

    torch.manual_seed(0)
    migrations, locality = fixture_data
    base_model, tok = load_model("testbed")
    base_loc = evaluation.generate(base_model, tok, [s.prompt for s in locality])
    model, _ = load_model("testbed")
    adapted = _moved(attach_lora(model, _cfg()), 0.1).eval()
    got = {(name, quick): evaluation.evaluate(m, tok, migrations, locality, base_loc, quick=quick)
           for name, m in (("base", base_model), ("adapted", adapted)) for quick in (False, True)}
    assert got["base", False][0]["locality"] == 1.0 and got["base", False][0]["decoded"] < 1.0
    monkeypatch.setattr(scoring, "_plain", lambda model: None)  # no proofs: decode everything
    for (name, quick), (metrics, preds) in got.items():
        m = base_model if name == "base" else adapted
        want, want_preds = evaluation.evaluate(m, tok, migrations, locality, base_loc, quick=quick)
        assert want["decoded"] == 1.0
        assert preds == want_preds, (name, quick)
        for key, value in want.items():
            if key != "decoded":
                assert metrics[key] == pytest.approx(value, abs=1e-6), (name, quick, key)


def test_an_unmerged_lora_model_is_proven_and_scored_like_its_merged_copy(small_testbed, fixture_data, monkeypatch):
    """A model too large for a merged copy is scored through the PEFT model itself: its base
    model's trunk holds the LoRA layers, so the proofs still apply and the metrics are those of
    the merged copy (a real model of 135 M parameters took minutes through the whole head)."""
    from trainables import evaluation
    from trainables.evaluation import decoding, scoring

    torch.manual_seed(0)
    migrations, locality = fixture_data
    base_model, tok = load_model("testbed")
    base_loc = evaluation.generate(base_model, tok, [s.prompt for s in locality])
    model, _ = load_model("testbed")
    adapted = _moved(attach_lora(model, _cfg()), 0.02).eval()  # moved, but most lines survive
    assert scoring._trunk(scoring._plain(adapted)) is not None
    merged, merged_preds = evaluation.evaluate(adapted, tok, migrations, locality, base_loc)
    monkeypatch.setattr(decoding, "MERGED_COPY_MAX_PARAMS", 0)
    assert evaluation.merged_copy(adapted) is adapted
    unmerged, preds = evaluation.evaluate(adapted, tok, migrations, locality, base_loc)
    assert unmerged["decoded"] == merged["decoded"] < 0.9 and preds == merged_preds
    for key, value in merged.items():
        assert unmerged[key] == pytest.approx(value, abs=1e-5), key


def test_evaluation_from_stored_states_scores_like_the_whole_model(small_testbed, fixture_data, tmp_path):
    """Hierarchical LoRA: the evaluation's teacher-forced pass starts the merged model at
    layer_start from the base model's stored input to it, and scores exactly what the whole
    model does (predictions, metrics; log-probabilities up to float rounding)."""
    from trainables import evaluation
    from trainables.lora.frozen import FrozenStates

    torch.manual_seed(0)
    migrations, locality = fixture_data
    model, tok = load_model("testbed")
    base_loc = evaluation.generate(model, tok, [s.prompt for s in locality])
    adapted = _moved(attach_lora(model, _cfg(hierarchical=True, layer_start=2, layer_end=3)), 0.1).eval()
    frozen = FrozenStates.make(adapted, 2, False, str(tmp_path))
    calls = []

    def start_states(seqs):
        calls.append(len(seqs))
        return frozen.sequence_states(seqs, tok.pad_token_id)

    for quick in (True, False):
        want, want_preds = evaluation.evaluate(adapted, tok, migrations, locality, base_loc, quick=quick)
        got, preds = evaluation.evaluate(adapted, tok, migrations, locality, base_loc, quick=quick,
                                         start_states=start_states)
        assert preds == want_preds
        for key, value in want.items():
            assert got[key] == pytest.approx(value, abs=1e-5), (quick, key)
        assert want["locality"] < 1.0  # the adapters matter
    assert len(calls) == 2 and len(list(tmp_path.iterdir())) == 2 * adapted.config.num_hidden_layers


def test_the_state_cache_estimate_bounds_what_a_trial_writes(small_testbed, tmp_path):
    """The driver's one-line estimate (per trial) is an upper bound of what a trial with renamed
    copies, a KL and anchors actually stores."""
    import re

    from trainables.lora import frozen
    from trainables.models import resolve

    cfg = _cfg(hierarchical=True, layer_start=2, layer_end=4, epochs=2, augment=2, kl_weight=0.5, anchors=2)
    run_one(cfg, local_reporter([]), frozen_cache=str(tmp_path / "cache"))
    written_mb = frozen.folder_bytes(tmp_path / "cache") / 2**20
    line = frozen.describe_estimate(resolve("testbed"), None, 10, 2, 8.0)
    per_trial = float(re.search(r"up to (\d+) MB a trial", line).group(1))
    assert 0 < written_mb <= per_trial + 1, (written_mb, line)


def test_locality_is_the_base_models_argmax_kept_along_its_own_completions(small_testbed, fixture_data):
    """``locality`` (and ``specificity``) is token-level: teacher-forced on the base model's
    completion, the share of positions where the model's argmax is the base model's; the
    whole-completion equality is ``locality_exact``. The base scores 1 on both; a moved adapter
    scores what its argmax rows say, snippet by snippet."""
    from trainables import evaluation
    from trainables.evaluation import base_argmax, default_eval_data, score_lines, token_agreement

    assert token_agreement([1, 2, 3, 4], [True] * 4, [1, 2, 9, 4]) == 0.75
    assert token_agreement([1, 2], [True, False], None) == 0.5  # no base argmax: the completion's own tokens
    with pytest.raises(ValueError, match="argmax row"):
        token_agreement([1, 2], [True, True], [1])
    torch.manual_seed(0)
    migrations, locality = fixture_data
    base, tok = load_model("testbed")
    comps = evaluation.generate(base, tok, [s.prompt for s in locality])
    refs = base_argmax("testbed", locality, comps)
    assert [len(r) for r in refs] == [len(evaluation.encode(tok, c)) + 1 for c in comps]
    m0, _ = evaluation.evaluate(base, tok, migrations, locality, comps, base_locality_argmax=refs)
    assert m0["locality"] == 1.0 and m0["locality_exact"] == 1.0
    model, _ = load_model("testbed")
    adapted = _moved(attach_lora(model, _cfg()), 0.03).eval()
    m1, _ = evaluation.evaluate(adapted, tok, migrations, locality, comps, base_locality_argmax=refs)
    rows = score_lines(adapted.merge_and_unload(), tok, [(s.prompt, c) for s, c in zip(locality, comps)], argmax=True)
    by_hand = sum(sum(a == b for a, b in zip(r[2], ref)) / len(ref) for r, ref in zip(rows, refs)) / len(refs)
    assert m1["locality"] == pytest.approx(by_hand) and 0.0 < m1["locality"] < 1.0
    assert m1["locality_exact"] < m1["locality"]  # one flip costs a completion, not its other tokens
    data = default_eval_data("testbed")
    for split in (data.validation, data.test):
        assert len(split.base_locality_argmax) == len(split.locality)
        assert len(split.base_specificity_argmax) == len(split.specificity)
