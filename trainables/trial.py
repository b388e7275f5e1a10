"""One trial's lifecycle, the same for every method, and the typed context it runs in.

The engine builds one :class:`TrialContext` per sweep and hands it to every trial beside the
trial's searched parameters (``tune.with_parameters``): a trial's config holds what the search
chose and nothing else. :func:`run_trial` owns what every method needs around its training:
threads and seed, the device, the evaluation data, a restored checkpoint, a quick evaluation at
ASHA's rungs and the full one (with the test split) at the end, checkpoints and reports, and the
diverged and out-of-memory results. A method supplies a config dataclass and a
``fit(cfg, session)`` step that trains and calls :meth:`Session.end_epoch` after each epoch (an
editing phase counts as one).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from trainables.common import (
    STATUS_COMPLETED, STATUS_DIVERGED, STATUS_FAILED, Diverged, Reporter, config_from_dict, local_reporter,
    set_threads, with_progress,
)
from trainables.hooks import fire
from trainables.objective import DIVERGED_OBJECTIVE, OOM_OBJECTIVE, over_application_ceiling

# The config fields a trial takes from its context, never from the search.
SETTINGS = ("model", "dataset", "seed", "threads", "workers", "use_gpu", "dtype", "gradient_checkpointing")
# A sweep's TrialContext, written beside Ray's experiment state: what --resume and --warm-start read.
CONTEXT_FILE = "trial_context.json"


@dataclass(frozen=True)
class TrialContext:
    """What every trial of a sweep shares; built once by the engine, read-only in the trials."""

    model: str = "testbed"  # as the user named it; trainables.models.resolve finds its files
    dataset: str | None = None  # training data the driver checked (None: data/)
    n_layers: int | None = None  # the model's decoder layers, as the driver read them
    seed: int = 0
    threads: int = 1  # torch intra-op threads: the trial's CPUs
    workers: int = 1  # > 1: DDP through a Ray Train TorchTrainer
    use_gpu: bool = False
    gpus_per_worker: float = 0.0  # each DDP worker's share of a GPU
    gpu_share: float = 0.0  # the GPU share of a one-worker trial: < 1 packs trials onto one GPU
    dtype: str = "auto"  # auto: bf16 on a GPU that has it, fp32 on the CPU
    gradient_checkpointing: bool = False
    # Epochs (or editing phases) after which a trial evaluates and reports besides its last:
    # ASHA's rungs. None: every epoch; (): the last only (the multi-objective searcher reads
    # final results alone).
    eval_epochs: tuple[int, ...] | None = None
    frozen_cache: str | None = None  # folder the trials share for the frozen base model's states
    state_cache_gb: float | None = None  # that folder's disk budget (None: the default)
    allow_weak_sandbox: bool = False  # run generated code under weaker containment when asked
    storage: str | None = None  # the sweep's Ray storage folder (DDP trials keep their runs there)
    max_over_application: float | None = None  # the objective's ceiling (None: trainables.objective's)

    def settings(self) -> dict:
        """The fields every method's config takes from the context."""
        return {k: getattr(self, k) for k in SETTINGS}

    def reports_at(self, epoch: int, final: bool) -> bool:
        return final or self.eval_epochs is None or epoch in self.eval_epochs

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: Path) -> "TrialContext | None":
        """The context a sweep was started with, or None where its folder has none (or holds
        no JSON object there)."""
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(raw, dict):
            return None
        known = {f.name for f in fields(cls)}
        raw = {k: v for k, v in raw.items() if k in known}
        if raw.get("eval_epochs") is not None:
            raw["eval_epochs"] = tuple(raw["eval_epochs"])
        return cls(**raw)


def split_config(config: dict) -> tuple[dict, dict]:
    """(searched and fixed parameters, context settings) of a config that may carry both, as
    files exported before the context existed do."""
    settings = {k: v for k, v in config.items() if k in SETTINGS}
    params = {k: v for k, v in config.items() if k not in SETTINGS and not k.startswith("_")}
    return params, settings


@dataclass(frozen=True)
class Method:
    """One update method: its config, its fit step and its search space."""

    name: str
    config_cls: type  # the trial's typed config (defaults, validation)
    fit: Callable[[Any, "Session"], dict]  # trains cfg, calling session.end_epoch after each epoch
    space: Callable[..., dict]  # Optuna define-by-run space
    fixed: dict = field(default_factory=dict)  # constants for every trial of this method
    summary: str = ""
    # called in the driver with --model before Ray starts (the editing testbed is built there)
    prepare: Callable[[str], Any] | None = None
    # ASHA also stops trials that have not improved on the untrained model's `progress` by the
    # first rung (trainables/sweep/scheduler.py): for methods whose reports are that figure
    stall_rule: bool = False
    # Its trials run generated code in trainables/sandbox.py (GRPO's rewards): the sweep checks
    # the sandbox before Ray starts and takes --allow-weak-sandbox
    sandboxed: bool = False
    ddp: bool = False  # may run one trial over several workers (--workers-per-trial)

    def prepare_model(self, model: str) -> None:
        if self.prepare is not None:
            self.prepare(model)

    def config(self, params: dict, ctx: TrialContext):
        """The typed config of one trial: its parameters over the method's constants, the
        context's settings over both."""
        return config_from_dict(self.config_cls, {**self.fixed, **params, **ctx.settings()})


class Session:
    """What a method's fit step talks to: the device, the evaluation data, the restored
    checkpoint, and :meth:`end_epoch`, which evaluates, checkpoints and reports when the
    context says so."""

    def __init__(self, cfg, ctx: TrialContext, reporter: Reporter, weights_out: str | None = None):
        from trainables.models import resolve_dtype

        self.cfg, self.ctx, self.reporter, self.weights_out = cfg, ctx, reporter, weights_out
        self.t_start = time.time()  # reported as `started_at`: tests check which trials overlapped
        self.device = trial_device(ctx)
        self.precision = resolve_dtype(ctx.dtype, self.device)  # fp32, bf16 or fp16, as the model loads
        self.common: dict = {"started_at": self.t_start}  # carried by every report
        if ctx.max_over_application is not None:  # the evaluation's objective reads it here
            os.environ["APIUPDATE_MAX_OVER_APPLICATION"] = str(ctx.max_over_application)
        self.common["max_over_application"] = over_application_ceiling()
        self.quick_evaluations = self.full_evaluations = 0
        self.last: dict = {}  # what the last report said (a fit step's return value)
        self.progress: dict = {}  # step / train_loss / epoch so far, for a diverged report
        self._eval_data = None
        # what the evaluation's references were made for: the method may load another build
        # (the editing testbed) and say so before the first evaluation
        self.model_name = cfg.model
        self._restored: str | None = None
        self._restore_asked = False
        self.on_gpu = self.device != "cpu"  # trial_device names a GPU only where torch has one

    # ---------------------------------------------------------------- inputs
    @property
    def eval_data(self):
        """The shared evaluation's splits, with the base model's references (read from their cache)."""
        if self._eval_data is None:
            from trainables.evaluation import default_eval_data

            self._eval_data = default_eval_data(self.model_name, self.device, self.ctx.dtype)
        return self._eval_data

    def restore(self) -> str | None:
        """The checkpoint folder to resume from (asked once), or None."""
        if not self._restore_asked:
            self._restore_asked = True
            self._restored = self.reporter.restore()
        return self._restored

    def note(self, **progress) -> None:
        """Where training is (step, train_loss, epoch): what a diverged report says."""
        self.progress.update(progress)

    # ---------------------------------------------------------------- reports
    def evaluate(self, model, tokenizer, final: bool, start_states=None, eval_data=None) -> tuple[dict, list]:
        """The validation split (what the search reads); at the final report the test split too.
        ``start_states`` (the frozen lower layers' states) only in fp32: in bf16 / fp16 states
        computed in other batches round differently from the full pass that made the base
        model's references, and an unchanged model would lose locality at near-ties."""
        if self.precision != "fp32":
            start_states = None
        data = eval_data or self.eval_data
        metrics, preds = data.validation.evaluate(model, tokenizer, quick=not final, start_states=start_states)
        if final:
            metrics.update(data.test_metrics(model, tokenizer, start_states))
            self.full_evaluations += 1
        else:
            self.quick_evaluations += 1
        return metrics, preds

    def end_epoch(self, epoch: int, final: bool, model, tokenizer, *, save: Callable[[Path], None],
                  extra: dict | None = None, start_states=None, eval_data=None,
                  score: Callable[[dict], dict] | None = None, files: dict | None = None) -> dict | None:
        """After epoch (or phase) ``epoch``: at a rung, a quick evaluation and a report; at the
        end, the full evaluation and the final report; elsewhere nothing (a report there would
        decide nothing and its evaluation costs as much as a third of a testbed epoch). ``save``
        writes the method's state into a checkpoint folder; ``score`` adds figures computed
        from the evaluation's; ``files``: name -> text written beside the final checkpoint."""
        if not self.ctx.reports_at(epoch, final):
            return None
        # DDP: rank 0 evaluates (Ray Train reports its metrics); the others wait at the report
        metrics, preds = self.evaluate(model, tokenizer, final, start_states, eval_data) if self.reporter.is_chief \
            else ({}, [])
        if score is not None and self.reporter.is_chief:
            metrics.update(score(metrics))
        metrics.update(self.common, **(extra or {}), epoch=epoch, final=final,
                       trial_seconds=time.time() - self.t_start, quick_evaluations=self.quick_evaluations,
                       full_evaluations=self.full_evaluations,
                       trial_status=STATUS_COMPLETED if final else "running")
        if self.on_gpu:  # benchmarks/gpu_check.sh reads it
            import torch

            metrics["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
        ckpt = Path(tempfile.mkdtemp(prefix="ckpt-"))
        try:
            save(ckpt)
            if final:
                (ckpt / "metrics.json").write_text(json.dumps(metrics, default=str))
                (ckpt / "predictions.json").write_text(json.dumps([asdict(p) for p in preds[:200]]))
                # not config.json: a TRL checkpoint folder is read back by the Trainer, which
                # takes that name for a model config
                (ckpt / "trial_config.json").write_text(json.dumps(asdict(self.cfg), default=str))
                for name, text in (files or {}).items():
                    (ckpt / name).write_text(text)
            self.reporter.report(metrics, str(ckpt))
        finally:
            shutil.rmtree(ckpt, ignore_errors=True)
        self.last = metrics
        if not final:
            fire("epoch_end", epoch=epoch)
        return metrics

    def report_diverged(self, reason: str) -> dict:
        """A non-finite or exploding trial: objective DIVERGED_OBJECTIVE, reported at once."""
        print(f"diverged: {reason}", flush=True)
        loss = self.progress.get("train_loss", float("nan"))
        metrics = {**self.common, "objective": DIVERGED_OBJECTIVE, "efficacy": 0.0, "generalization": 0.0,
                   "locality": 0.0, "train_loss": loss, "step": self.progress.get("step", 0),
                   "epoch": self.progress.get("epoch", 0), "trial_seconds": time.time() - self.t_start,
                   "final": True, "trial_status": STATUS_DIVERGED, "diverged_reason": reason}
        self.reporter.report(metrics, None)
        self.last = metrics
        return metrics

    def report_finished(self) -> dict | None:
        """A restored checkpoint of this very trial, finished: its final report again, nothing
        recomputed (a checkpoint of the same trial with fewer epochs trains on)."""
        restored = self.restore()
        if not restored or not Path(restored, "metrics.json").is_file():
            return None
        try:
            same = json.loads(Path(restored, "trial_config.json").read_text()) == json.loads(
                json.dumps(asdict(self.cfg), default=str))
            metrics = json.loads(Path(restored, "metrics.json").read_text())
        except (OSError, ValueError):
            return None
        if not (same and metrics.get("final")):
            return None
        self.reporter.report(metrics, restored)
        self.last = metrics
        return metrics


def trial_device(ctx: TrialContext) -> str:
    """The trial's torch device: its GPU where it has one (a DDP worker's own, from Ray Train),
    else the CPU."""
    import torch

    if not (ctx.use_gpu and torch.cuda.is_available()):
        return "cpu"
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        import ray.train.torch

        return str(ray.train.torch.get_device())
    return "cuda"


def run_trial(method: Method, params: dict, ctx: TrialContext, reporter: Reporter | None = None,
              weights_out: str | None = None) -> dict:
    """One trial of ``method`` with ``params`` in ``ctx``: returns its final metrics.
    ``reporter``: where reports go (Ray Tune, Ray Train, or a plain list when None)."""
    return run_config(method, method.config(params, ctx), ctx, reporter, weights_out)


def run_config(method: Method, cfg, ctx: TrialContext, reporter: Reporter | None = None,
               weights_out: str | None = None) -> dict:
    """The lifecycle around ``method.fit`` for a built ``cfg`` (whose settings are ``ctx``'s)."""
    import torch

    set_threads(ctx.threads)
    fire("trial_start")
    torch.manual_seed(ctx.seed)
    session = Session(cfg, ctx, reporter or local_reporter([]), weights_out)
    finished = session.report_finished()
    if finished is not None:
        return finished
    try:
        return method.fit(cfg, session)
    except Diverged as e:
        return session.report_diverged(str(e))


def settings_context(cfg, **fields_) -> TrialContext:
    """The context a built config implies (its settings), for Ray-free runs of one config."""
    return TrialContext(**{k: getattr(cfg, k) for k in SETTINGS if hasattr(cfg, k)}, **fields_)


# --------------------------------------------------------------------------- inside Ray
def tune_trial(config: dict, method: Method, ctx: TrialContext) -> None:
    """The Ray Tune function trainable of every method (``tune.with_parameters`` binds
    ``method`` and ``ctx``): one worker in this process, or a DDP trial of ``ctx.workers``."""
    t0 = time.time()
    try:
        if method.sandboxed:
            sandbox_policy(ctx)
        if ctx.workers > 1:
            from trainables.distributed import run_ddp_trial

            run_ddp_trial(_ddp_worker, {"params": dict(config), "method": method, "ctx": ctx}, ctx)
        else:
            from trainables.common import tune_reporter

            run_trial(method, dict(config), ctx, tune_reporter())
    except Exception as e:  # noqa: BLE001 - everything but running out of memory is re-raised
        if not is_oom(e):
            raise
        from ray import tune

        tune.report(out_of_memory(e, time.time() - t0, shared=0 < ctx.gpu_share < 1))


def sandbox_policy(ctx: TrialContext) -> None:
    """This process runs generated code under the sweep's containment policy (--allow-weak-sandbox),
    whatever an earlier trial in the same reused worker was allowed."""
    from trainables.sandbox import allow_weak_containment

    allow_weak_containment(ctx.allow_weak_sandbox)


def _ddp_worker(loop_config: dict) -> None:
    from trainables.common import train_reporter

    run_trial(loop_config["method"], loop_config["params"], loop_config["ctx"], train_reporter())


def is_oom(e: BaseException | None) -> bool:
    """torch.OutOfMemoryError (= torch.cuda.OutOfMemoryError), also when wrapped by another error."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if type(e).__name__ == "OutOfMemoryError" or "CUDA out of memory" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def out_of_memory(e: BaseException, seconds: float, shared: bool = False) -> dict:
    """The result of a trial that ran out of accelerator memory: a finished trial with
    ``trial_status = failed`` and its reason, not an error, so Tune does not retry it and MLflow
    records why. Alone on its device, the config itself needs too much memory: objective
    ``OOM_OBJECTIVE``, which TPE is told (it ignores a FAIL state), so it learns to avoid that
    corner. ``shared`` (packed beside another trial on one GPU): the neighbour may have filled
    the memory, so the result is marked a failure of the packing and the searcher tells TPE
    nothing of it."""
    reason = f"{type(e).__module__}.{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if shared:
        reason = f"out of memory while sharing its GPU (a failure of the packing, not of the config): {reason}"
    print(f"trial ran out of memory, recorded as failed: {reason}", flush=True)
    return with_progress({"objective": OOM_OBJECTIVE, "efficacy": 0.0, "generalization": 0.0, "locality": 0.0,
                          "trial_status": STATUS_FAILED, "failure_reason": reason, "final": True,
                          "trial_seconds": seconds, **({"packing_failure": True} if shared else {})})
