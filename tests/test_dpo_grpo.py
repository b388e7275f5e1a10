"""DPO and GRPO (TRL) on the small fixture testbed: they learn, they touch only the adapters in
their layer range, GRPO logs every reward component, a resumed trial continues, and each
method's sweep runs end to end through the engine (slow)."""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from trainables.common import Reporter, local_reporter
from trainables.policy.dpo import DpoTrainConfig
from trainables.sweep.methods import run_one as dpo_loop  # noqa: I001
from trainables.policy.grpo import GrpoTrainConfig
from trainables.sweep.methods import run_one as grpo_loop  # noqa: F811
from trainables.policy.rewards import COMPONENTS


def _dpo(**kw) -> DpoTrainConfig:
    base = dict(lr=5e-3, epochs=3, batch_size=4, r=4, target="all", warmup_ratio=0.0, sft_weight=1.0)
    return DpoTrainConfig(**{**base, **kw})


def test_dpo_raises_the_margin_and_changes_only_adapters_in_range(small_testbed, tmp_path):
    from peft import PeftModel

    from trainables.models import load_model

    start, end = 2, 4
    history: list[dict] = []
    out = dpo_loop(_dpo(hierarchical=True, layer_start=start, layer_end=end), local_reporter(history),
                   weights_out=str(tmp_path / "adapter"))
    assert out["trial_status"] == "completed" and out["final"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[-1]["rewards_margins"] > history[0]["rewards_margins"] + 0.1, history
    assert history[-1]["loss"] < history[0]["loss"], history
    for m in ("objective", "efficacy", "generalization", "locality", "trial_seconds", "trainable_params"):
        assert m in out
    # 2 of the small testbed's 4 layers: half of what standard LoRA at the same rank trains
    assert out["standard_lora_params"] == 2 * out["trainable_params"]

    base, _ = load_model("testbed")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    merged = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).merge_and_unload().state_dict()
    changed = {k for k, v in before.items() if not torch.equal(merged[k], v)}
    assert changed, "DPO changed nothing"
    assert all(any(f"layers.{i}." in k for i in range(start, end)) for k in changed), sorted(changed)


def test_dpo_kl_weight_keeps_the_prompt_distributions_closer_to_the_base(small_testbed, tmp_path):
    from peft import PeftModel

    from trainables.adapters import prompt_kl, training_examples
    from trainables.tensors import pad_batch
    from trainables.models import load_model

    drift = {}
    for kl in (0.0, 5.0):
        out = dpo_loop(_dpo(epochs=2, kl_weight=kl), local_reporter([]), weights_out=str(tmp_path / f"a{kl}"))
        assert out["trial_status"] == "completed", out
        base, tok = load_model("testbed")
        model = PeftModel.from_pretrained(base, str(tmp_path / f"a{kl}"))
        ids, mask, labels = pad_batch(training_examples(tok, None), tok.pad_token_id)
        with torch.no_grad():
            drift[kl] = prompt_kl(model, ids, mask, labels, model(input_ids=ids, attention_mask=mask).logits).item()
    assert drift[5.0] < 0.7 * drift[0.0], drift


def test_dpo_resume_continues_at_the_next_epoch(small_testbed, tmp_path):
    keep = tmp_path / "ckpt"
    history: list[dict] = []

    def report(metrics, ckpt):
        history.append(metrics)
        if ckpt:
            shutil.rmtree(keep, ignore_errors=True)
            shutil.copytree(ckpt, keep)

    def restore():
        return str(keep) if keep.is_dir() else None

    dpo_loop(_dpo(epochs=1), Reporter(report, restore))
    assert (keep / "trainer_state.json").is_file() and (keep / "guard.json").is_file()
    history.clear()
    dpo_loop(_dpo(epochs=2), Reporter(report, restore))
    assert [h["epoch"] for h in history] == [2]  # continued from epoch 1, did not restart


def test_dpo_divergence_guard_stops_the_trial(small_testbed):
    history: list[dict] = []
    out = dpo_loop(_dpo(lr=50.0, max_grad_norm=None, epochs=2, sft_weight=0.0, beta=0.5), local_reporter(history))
    assert out["trial_status"] == "diverged" and out["objective"] == -12.0 and out["final"]
    assert "diverged_reason" in out


def test_grpo_runs_and_logs_every_reward_component(small_testbed):
    import shutil

    from trainables.testbed import cache_root

    # The context runs are cached on disk across trials; start cold so that the count of
    # programs run below means the same whatever ran earlier against this cache.
    shutil.rmtree(cache_root() / "rewards", ignore_errors=True)
    history: list[dict] = []
    cfg = GrpoTrainConfig(lr=3e-3, epochs=1, num_generations=4, prompts_per_step=2, max_completion_length=16,
                          r=4, contexts_per_migration=1, exec_timeout=2.0)
    out = grpo_loop(cfg, local_reporter(history))
    assert out["trial_status"] == "completed" and out["final"], out
    assert out["step"] == 2  # 4 prompts (one per fixture migration) / 2 per step
    for c in (*COMPONENTS, "reward"):
        v = out[f"rewards_{c}_mean"]
        assert math.isnan(v) or 0.0 <= v <= 1.0, (c, v)
    assert not math.isnan(out["rewards_api_mean"]) and not math.isnan(out["rewards_format_mean"])
    assert out["sandbox_calls"] >= 1 and out["programs_run"] >= 12  # 4 contexts x 3 programs, then lines
    for m in ("objective", "efficacy", "generalization", "locality", "trainable_params"):
        assert m in out
    # every optimizer step, each reward component at its own global step
    assert [r["step"] for r in out["step_log"]] == [1, 2]
    for row in out["step_log"]:
        assert {f"rewards/{c}/mean" for c in ("api", "format", "reward")} <= set(row), row


def test_grpo_sft_warm_start_teaches_the_new_api_before_rl(small_testbed):
    history: list[dict] = []
    cfg = GrpoTrainConfig(lr=1e-3, epochs=1, num_generations=4, prompts_per_step=4, max_completion_length=16,
                          r=4, contexts_per_migration=1, exec_timeout=2.0, sft_epochs=4, sft_lr=1e-2)
    out = grpo_loop(cfg, local_reporter(history))
    assert out["trial_status"] == "completed", out
    # the base small testbed writes no new API (test_testbed); 4 SFT epochs make it write some,
    # and the RL phase then samples groups that hold new-API completions (api reward > 0)
    assert out["warmup_efficacy"] > 0.0 and out["warmup_soft_generalization"] > 0.05, out
    assert out["warmup_loss"] < 1.5
    assert out["rewards_api_mean"] > 0.0, out


@pytest.mark.parametrize("cls,bad,message", [
    (DpoTrainConfig, dict(beta=0.0), "beta must be > 0"),
    (DpoTrainConfig, dict(loss_type="kto"), "loss_type must be one of"),
    (DpoTrainConfig, dict(workers=2), "one worker per trial"),
    (GrpoTrainConfig, dict(num_generations=1), "num_generations must be >= 2"),
    (GrpoTrainConfig, dict(w_api=0.0, w_execution=0.0, w_tests=0.0, w_format=0.0), "at least one > 0"),
    (GrpoTrainConfig, dict(loss_type="ppo"), "loss_type must be one of"),
])
def test_configs_reject_bad_values(cls, bad, message):
    with pytest.raises(ValueError, match=message):
        cls(**bad)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dpo", "grpo"])
def test_smoke_sweep_through_the_engine(method, tmp_path, small_testbed):
    from tests.test_sweep import children_of, mlflow_runs, sweep

    home = tmp_path / "mlruns"
    out = sweep(method, "--smoke-test", "--name", "smoke", "--mlruns", str(home))
    assert out.returncode == 0, out.stderr[-3000:]
    parent, kids = children_of(mlflow_runs(home, method), "smoke")
    assert parent["status"] == "FINISHED" and len(kids) == 2
    for k in kids:
        assert k["tags"]["trial_status"] in {"completed", "pruned", "diverged"}
        for m in ("efficacy", "generalization", "locality", "objective", "trainable_params", "trial_seconds"):
            assert m in k["metrics"], (m, k["metrics"])
        if method == "grpo" and k["tags"]["trial_status"] == "completed":
            assert {f"rewards_{c}_mean" for c in COMPONENTS} <= set(k["metrics"])
            # per-step reward components reach MLflow at their global step
            import sqlite3

            con = sqlite3.connect(home / "mlflow.db")
            steps = [s for (s,) in con.execute("select step from metrics where run_uuid = ? and key = ? order by step",
                                               (k["id"], "step/rewards/api/mean"))]
            con.close()
            assert steps and steps == list(range(1, len(steps) + 1)), steps
    assert Path(home / "mlflow.db").is_file()
