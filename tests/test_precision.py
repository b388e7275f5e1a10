"""Precision, gradient checkpointing and DDP placement, pinned on the CPU: which dtype each
choice resolves to where, that every method's config and TRL's flags follow it, that
checkpointing trains the same, and that a DDP trial that cannot be placed is refused in one line."""
from __future__ import annotations

import pytest
import torch


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
