"""Precision, gradient checkpointing and DDP placement, pinned on the CPU: which dtype each
choice resolves to where, that every method's config and TRL's flags follow it, that
checkpointing trains the same, and that a DDP trial that cannot be placed is refused in one line."""
from __future__ import annotations

import pytest
import torch

from trainables.common import local_reporter


def test_auto_is_bf16_on_a_gpu_that_has_it_and_fp32_elsewhere():
    from trainables.models import attention_for, resolve_dtype

    assert resolve_dtype("auto", "cpu") == "fp32"
    assert resolve_dtype("auto", "cuda", bf16_ok=True) == "bf16"
    assert resolve_dtype("auto", "cuda:1", bf16_ok=False) == "fp32"  # pre-Ampere: no bf16
    assert resolve_dtype("fp16", "cuda", bf16_ok=True) == "fp16" and resolve_dtype("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match="dtype must be one of auto, bf16, fp16, fp32"):
        resolve_dtype("int8", "cpu")
    assert attention_for("cpu", "fp32") == "sdpa" and attention_for("cuda", "fp32") == "sdpa"


@pytest.mark.parametrize("cls", ["trainables.lora.loop:LoraTrainConfig", "trainables.policy.dpo:DpoTrainConfig",
                                 "trainables.policy.grpo:GrpoTrainConfig", "trainables.editing.loop:RomeConfig",
                                 "trainables.editing.loop:MemitConfig", "trainables.prompt:PromptConfig"])
def test_every_method_takes_the_dtype_and_rejects_a_bad_one(cls):
    import importlib

    mod, _, name = cls.partition(":")
    config = getattr(importlib.import_module(mod), name)
    assert config(dtype="bf16").dtype == "bf16" and config().dtype == "auto"
    with pytest.raises(ValueError, match="dtype must be one of"):
        config(dtype="half")


def test_trl_flags_follow_the_trials_dtype(tmp_path):
    from trl import DPOConfig

    from trainables.policy.dpo import DpoTrainConfig
    from trainables.policy.trl_loop import training_args

    auto = training_args(DPOConfig, DpoTrainConfig(), str(tmp_path / "a"), 4)
    assert (auto.bf16, auto.fp16, auto.gradient_checkpointing) == (False, False, False)  # auto on the CPU: fp32
    bf16 = training_args(DPOConfig, DpoTrainConfig(dtype="bf16", gradient_checkpointing=True), str(tmp_path / "b"), 4)
    assert (bf16.bf16, bf16.fp16, bf16.gradient_checkpointing) == (True, False, True)


def test_load_model_loads_the_chosen_precision(small_testbed):
    from trainables.models import load_model

    assert {p.dtype for p in load_model("testbed", dtype="bf16")[0].parameters()} == {torch.bfloat16}
    assert {p.dtype for p in load_model("testbed", dtype="auto")[0].parameters()} == {torch.float32}


def test_gradient_checkpointing_trains_the_same(small_testbed):
    from trainables.common import local_reporter
    from trainables.lora.loop import LoraTrainConfig
    from trainables.sweep.methods import run_one

    base = dict(lr=5e-3, epochs=1, batch_size=4, target="all", r=4, threads=1, warmup_ratio=0.0, dropout=0.0)
    plain = run_one(LoraTrainConfig(**base), local_reporter([]))
    ckpt = run_one(LoraTrainConfig(**base, gradient_checkpointing=True), local_reporter([]))
    assert plain["trial_status"] == ckpt["trial_status"] == "completed"
    assert ckpt["train_loss"] == pytest.approx(plain["train_loss"], rel=1e-4)
    assert ckpt["efficacy"] == plain["efficacy"] and ckpt["locality"] == plain["locality"]


def test_ddp_placement_counts_gpu_shares_per_node():
    from trainables.distributed import ddp_fits

    one_gpu = [{"CPU": 16, "GPU": 1}]
    assert not ddp_fits(one_gpu, 2, 1, 1.0)  # waited forever before: two whole GPUs on a one-GPU node
    assert ddp_fits(one_gpu, 2, 1, 0.5)  # two half-GPU workers share it
    assert ddp_fits([{"CPU": 8, "GPU": 1}, {"CPU": 8, "GPU": 1}], 2, 4, 1.0)  # one per node
    assert not ddp_fits([{"CPU": 2}], 3, 1, 0.0) and ddp_fits([{"CPU": 2}], 2, 1, 0.0)


def test_a_ddp_sweep_that_cannot_be_placed_is_refused_in_one_line(tmp_path, capsys, small_testbed):
    from trainables.sweep.cli import main

    code = main("hier_lora", ["--workers-per-trial", "3", "--num-samples", "1", "--mlruns", str(tmp_path / "m")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--workers-per-trial 3" in err[0] and "cannot be placed" in err[0], err


def test_a_ddp_rank_takes_the_gpu_ray_train_gave_it(monkeypatch):
    """Ray Train gives the workers of a node one CUDA_VISIBLE_DEVICES: a rank on bare "cuda"
    would land on cuda:0 beside rank 0."""
    import ray.train.torch
    import torch

    from trainables.trial import TrialContext, trial_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(ray.train.torch, "get_device", lambda: torch.device("cuda:1"))
    assert trial_device(TrialContext(use_gpu=True, workers=2)) == "cuda:1"
    assert trial_device(TrialContext(use_gpu=False, workers=2)) == "cpu"


def test_two_ranks_of_one_trial_on_one_gpu_are_refused_in_one_line(tmp_path, capsys):
    from trainables.sweep.cli import main

    code = main("hier_lora", ["--workers-per-trial", "2", "--gpus-per-trial", "0.5", "--num-samples", "1",
                              "--mlruns", str(tmp_path / "m")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "two ranks of one trial on one GPU" in err[0], err
    assert not (tmp_path / "m").exists()


# --------------------------------------------------------------------------- every method in half precision
# bf16 for every method, fp16 for the adapter methods (the editing and prompt methods do not train
# through a loss scaler), on a tiny BOS-less Qwen2 (tests/test_models.py): the CPU runs both dtypes.
HALF_PRECISION = [(m, "bf16") for m in ("lora", "hier_lora", "dpo", "grpo", "rome", "memit", "prompt")] + \
                 [(m, "fp16") for m in ("lora", "hier_lora", "dpo", "grpo")]


@pytest.fixture(scope="module")
def tiny_qwen2(small_testbed, tmp_path_factory):
    from tests.test_models import _tiny_model

    return _tiny_model("qwen2", small_testbed, tmp_path_factory.mktemp("qwen2-half"))


@pytest.mark.parametrize("method,dtype", HALF_PRECISION, ids=[f"{m}-{d}" for m, d in HALF_PRECISION])
def test_every_method_completes_in_half_precision(method, dtype, tiny_qwen2):
    from tests.test_models import METHOD_SMOKE
    from trainables.sweep.methods import METHODS
    from trainables.trial import TrialContext, run_trial, split_config

    params, settings = split_config(METHOD_SMOKE[method])
    out = run_trial(METHODS[method], params, TrialContext(**{**settings, "model": str(tiny_qwen2), "dtype": dtype}))
    assert out["trial_status"] == "completed", out.get("diverged_reason", out)
    assert 0.0 <= out["locality"] <= 1.0 and out["objective"] == out["objective"]  # not NaN


# --------------------------------------------------------------------------- the divergence guard and fp16
def test_a_scaler_skipped_step_is_not_a_divergence_but_a_non_finite_loss_is():
    from trainables.common import Diverged, DivergenceGuard, scaler_skipped

    inf, nan = float("inf"), float("nan")
    guard = DivergenceGuard(max_skipped=3)
    guard.check(0, 2.0, 1.0)
    guard.check(1, 2.1, inf, skipped=scaler_skipped(True, 2.1, inf))
    guard.check(2, 2.0, nan, skipped=scaler_skipped(True, 2.0, nan))
    assert guard.skipped == 2 and guard.ema is not None
    guard.check(3, 1.9, 0.5)  # a normal step ends the run of skipped ones
    assert guard.skipped_run == 0
    with pytest.raises(Diverged, match="non-finite"):  # without loss scaling inf is a divergence
        DivergenceGuard().check(0, 2.0, inf, skipped=scaler_skipped(False, 2.0, inf))
    with pytest.raises(Diverged, match="non-finite"):  # a non-finite loss always is
        DivergenceGuard().check(0, nan, inf, skipped=scaler_skipped(True, nan, inf))
    with pytest.raises(Diverged, match="non-finite"):
        DivergenceGuard().check(0, inf, 1.0, skipped=True)
    stuck = DivergenceGuard(max_skipped=3)
    with pytest.raises(Diverged, match="skipped 4 steps in a row"):  # the scale cannot fix these
        for step in range(10):
            stuck.check(step, 2.0, inf, skipped=True)


def test_trl_fp16_inf_grad_norm_with_a_finite_loss_is_a_skipped_step_not_a_divergence():
    from types import SimpleNamespace

    from trainables.common import Diverged, DivergenceGuard
    from trainables.policy.trl_loop import guard_logged_step, make_bridge

    inf = float("inf")
    assert guard_logged_step(DivergenceGuard(), 1, {"loss": 0.69, "grad_norm": inf}, fp16=True)
    assert guard_logged_step(DivergenceGuard(), 1, {"loss": 0.69, "grad_norm": float("nan")}, fp16=True)
    assert not guard_logged_step(DivergenceGuard(), 1, {"loss": 0.69, "grad_norm": 0.3}, fp16=True)
    with pytest.raises(Diverged):  # bf16 / fp32 have no scaler: inf is a blow-up
        guard_logged_step(DivergenceGuard(), 1, {"loss": 0.69, "grad_norm": inf}, fp16=False)
    with pytest.raises(Diverged):
        guard_logged_step(DivergenceGuard(), 1, {"loss": float("nan"), "grad_norm": inf}, fp16=True)

    # through the callback, as the Trainer calls it: the scaler's first steps log inf
    notes = []
    session = SimpleNamespace(note=lambda **kw: notes.append(kw))
    guard = DivergenceGuard()
    bridge = make_bridge(session, None, None, guard, ())
    state = SimpleNamespace(global_step=0, epoch=0.0)
    for step, grad_norm in enumerate([inf, inf, 0.8, inf, 0.7], 1):
        state.global_step, state.epoch = step, step / 5
        bridge.on_log(SimpleNamespace(fp16=True), state, None, logs={"loss": 0.7, "grad_norm": grad_norm})
    assert guard.skipped == 3 and len(notes) == 5
    assert [r.get("scaler_skipped", 0) for r in bridge.steps] == [1, 1, 0, 1, 0]
    with pytest.raises(Diverged):
        bridge.on_log(SimpleNamespace(fp16=False), state, None, logs={"loss": 0.7, "grad_norm": inf})


class _InfGrad(torch.autograd.Function):
    """Identity forward; an infinite gradient backward: one fp16 overflow, loss finite."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


def _poison_step(monkeypatch, at_step: int, how: str):
    """Make LoRA step ``at_step`` overflow its gradients (``grad``) or its loss (``loss``)."""
    from trainables.lora.loop import LoraRun

    orig = LoraRun.micro_batch_loss

    def micro_batch_loss(self, idx, batch_no):
        loss = orig(self, idx, batch_no)
        if self.step != at_step:
            return loss
        return _InfGrad.apply(loss) if how == "grad" else loss * float("nan")

    monkeypatch.setattr(LoraRun, "micro_batch_loss", micro_batch_loss)


def _fp16_lora(model, **kw):
    from trainables.lora.loop import LoraTrainConfig

    base = dict(model=str(model), dtype="fp16", lr=5e-3, epochs=1, batch_size=4, target="all", r=4, threads=1,
                warmup_ratio=0.0)
    return LoraTrainConfig(**{**base, **kw})


def test_an_fp16_step_the_scaler_skips_does_not_end_a_lora_trial(tiny_qwen2, monkeypatch):
    from trainables.sweep.methods import run_one

    _poison_step(monkeypatch, 1, "grad")
    history: list[dict] = []
    out = run_one(_fp16_lora(tiny_qwen2), local_reporter(history))
    assert out["trial_status"] == "completed", out.get("diverged_reason")
    assert out["scaler_skipped_steps"] == 1 and out["loss_scale"] == 2.0**15  # halved once, from 2**16
    assert out["step"] == out["total_steps"]


def test_an_fp16_non_finite_loss_still_diverges(tiny_qwen2, monkeypatch):
    from trainables.sweep.methods import run_one

    _poison_step(monkeypatch, 1, "loss")
    out = run_one(_fp16_lora(tiny_qwen2), local_reporter([]))
    assert out["trial_status"] == "diverged" and "non-finite" in out["diverged_reason"]


def test_fp16_checkpoints_carry_the_loss_scale_and_resume(tiny_qwen2, tmp_path, monkeypatch):
    from trainables.sweep.methods import run_one

    _poison_step(monkeypatch, 0, "grad")
    keep = tmp_path / "ckpt"
    first: list[dict] = []
    run_one(_fp16_lora(tiny_qwen2, epochs=1), local_reporter(first, keep_checkpoint=str(keep)))
    assert torch.load(keep / "state.pt", weights_only=False)["scaler"]["scale"] == 2.0**15
    monkeypatch.undo()
    resumed: list[dict] = []
    out = run_one(_fp16_lora(tiny_qwen2, epochs=2), local_reporter(resumed, keep_checkpoint=str(keep)))
    assert [h["epoch"] for h in resumed] == [2] and out["trial_status"] == "completed"
    assert out["loss_scale"] == 2.0**15  # the restored scale, not a fresh scaler's 2**16


def test_fp32_and_bf16_lora_run_without_a_scaler(tiny_qwen2):
    from trainables.sweep.methods import run_one

    for dtype in ("fp32", "bf16"):
        out = run_one(_fp16_lora(tiny_qwen2, dtype=dtype), local_reporter([]))
        assert out["trial_status"] == "completed" and "loss_scale" not in out


# --------------------------------------------------------------------------- editing in bf16
@pytest.mark.parametrize("method", ["rome", "memit"])
def test_editing_in_bf16_writes_finite_bf16_weights(method, tiny_qwen2, tmp_path):
    from tests.test_models import METHOD_SMOKE
    from trainables.models import load_model
    from trainables.sweep.methods import METHODS
    from trainables.trial import TrialContext, run_trial, split_config

    params, settings = split_config(METHOD_SMOKE[method])
    out_file = tmp_path / "edited.pt"
    out = run_trial(METHODS[method], params, TrialContext(**{**settings, "model": str(tiny_qwen2), "dtype": "bf16"}),
                    weights_out=str(out_file))
    assert out["trial_status"] == "completed", out
    edited = torch.load(out_file, weights_only=True)["weights"]
    base = dict(load_model(str(tiny_qwen2), dtype="bf16")[0].named_parameters())
    assert edited and out["delta_norm"] > 0
    for name, w in edited.items():
        assert w.dtype == torch.bfloat16 and torch.isfinite(w).all(), name
    assert any(not torch.equal(w, base[name].detach()) for name, w in edited.items())


def test_the_edit_representations_are_fp32_whatever_the_models_dtype(tiny_qwen2):
    import importlib

    from trainables.editing import compat
    from trainables.models import load_model

    compat.load()
    reprs = compat._fp32_repr_tools(importlib.import_module("easyeditor.models.rome.repr_tools"))
    model, tok = load_model(str(tiny_qwen2), dtype="bf16")
    tok = compat.edit_tokenizer(tok)
    args = dict(model=model, tok=tok, layer=1, module_template="model.layers.{}.mlp.down_proj")
    k = reprs.get_reprs_at_idxs(contexts=["x = 1"], idxs=[[-1]], track="in", **args)
    k_in, v_out = reprs.get_reprs_at_word_tokens(context_templates=["{} = 1"], words=["x"], subtoken="last",
                                                 track="both", **args)
    assert k.dtype == k_in.dtype == v_out.dtype == torch.float32


def test_grpos_supervised_warm_start_scales_its_fp16_loss_like_the_lora_loop(tiny_qwen2, monkeypatch):
    """The SFT warm start before GRPO shares the LoRA loop's precision handling: in fp16 an
    overflowing step is skipped by the scaler (the loss scale halves), not a divergence, and the
    adapters still learn."""
    import torch.nn.functional as F

    from trainables.adapters import attach_lora, supervised_warmup
    from trainables.lora.loop import LoraTrainConfig
    from trainables.models import load_model

    model, tok = load_model(str(tiny_qwen2), dtype="fp16")
    model = attach_lora(model, LoraTrainConfig(target="all", r=4))
    scales, calls = [], {"n": 0}
    real_scale = torch.amp.GradScaler.scale

    def scale(self, outputs):
        scales.append(float(self.get_scale()))
        return real_scale(self, outputs)

    monkeypatch.setattr(torch.amp.GradScaler, "scale", scale)
    real_ce = F.cross_entropy

    def poisoned(*a, **kw):  # the first step's gradients overflow, its loss stays finite
        calls["n"] += 1
        out = real_ce(*a, **kw)
        return _InfGrad.apply(out) if calls["n"] == 1 else out

    monkeypatch.setattr(F, "cross_entropy", poisoned)
    losses = supervised_warmup(model, tok, None, 2, 5e-3, batch_size=4, precision="fp16")
    assert calls["n"] > 1 and scales[:2] == [2.0**16, 2.0**15], scales[:3]  # skipped once, scale halved
    assert len(losses) == 2 and all(x == x and abs(x) != float("inf") for x in losses) and losses[-1] < losses[0], losses


def test_cpu_trials_ask_ray_for_their_memory_and_are_packed_by_it(monkeypatch, small_testbed, capsys):
    """A model whose trial needs ~12 GB runs one trial at a time on a node offering 17.5 GB, two
    CPUs or not; the testbed's trials are packed by CPUs; a request never exceeds a node."""
    from types import SimpleNamespace

    from trainables.models import trial_memory_bytes
    from trainables.sweep import run

    monkeypatch.setattr(run, "max_gpus_per_node", lambda: 0.0)
    monkeypatch.setattr(run, "max_memory_per_node", lambda: 17.5e9)
    args = SimpleNamespace(gpus_per_trial=None, cpus_per_trial=1, workers_per_trial=1, max_concurrent=None)
    cluster = {"CPU": 2.0, "memory": 17.5e9}
    big = run.plan_slots(args, cluster, int(11.8e9))
    assert big.concurrent == 1 and big.trial_resources == {"cpu": 1, "gpu": 0.0, "memory": 11.8e9}
    assert "1 trial(s) at once, not 2" in capsys.readouterr().out
    tb = trial_memory_bytes(str(small_testbed))
    assert 0 < tb < 1e9
    small = run.plan_slots(args, cluster, tb)
    assert small.concurrent == 2 and small.trial_resources["memory"] == tb
    huge = run.plan_slots(args, cluster, int(40e9))
    assert huge.concurrent == 1 and huge.trial_resources["memory"] == 17.5e9
    assert run.plan_slots(args, cluster, None).trial_resources == {"cpu": 1, "gpu": 0.0}  # a hub id: no estimate
