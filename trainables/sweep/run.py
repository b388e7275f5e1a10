"""One sweep, end to end: the checks, Ray, the searcher and scheduler, the Tuner (new, resumed
or a single re-run of an exported config), tracking, the summary.

Single-worker trials run in-process in a Tune function trainable; ``--workers-per-trial > 1``
starts a Ray Train ``TorchTrainer`` per trial (``trainables.distributed``), which costs 20-27 s
of start-up a trial on 2 CPUs against well under a second for the function trainable.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from trainables.common import STATUS_FAILED
from trainables.sweep.checks import (
    ROOT, UsageError, check_dataset, check_local_gpus, check_model, check_sandbox, check_writable, load_config_file,
    resolve_model_path,
)
from trainables.models import trial_memory_bytes
from trainables.sweep.methods import Method
from trainables.trial import CONTEXT_FILE, TrialContext

@dataclass
class Setup:
    """What the checks established, before Ray starts."""

    home: Path
    storage: Path
    name: str
    model: str
    n_layers: int
    dataset: str | None
    rerun_config: dict | None
    provenance: dict
    allow_weak: bool
    sandbox_tags: dict = field(default_factory=dict)
    start: list = field(default_factory=list)  # --start-from: (file, params, left to the sampler)
    seed: int = 0
    max_over_application: float | None = None  # --max-over-application (None: the default)


@dataclass
class Slots:
    """Resources per trial and how many trials run at once."""

    cpus: int
    gpus: float
    workers: int
    trial_resources: dict
    concurrent: int


def one_model(flag: str | None, named: str | None, where: str) -> str:
    """The one model a run trains: ``--model``, or the one a config file or a resumed sweep
    names; both, and different, is refused in one line."""
    if flag and named and flag != named:
        raise UsageError(f"--model {flag} but {where} trains {named}: drop --model or pass --model {named}")
    return flag or named or "testbed"


def has_snapshot(experiment: Path) -> bool:
    """Whether Ray has written the experiment's state, so that ``Tuner.restore`` can continue it.
    ``Tuner.can_restore`` is true as soon as ``tuner.pkl`` exists, which Ray writes before the
    first ``experiment_state-*.json``; restoring a sweep killed in between, Ray logs "Failed to
    restore the run state" and goes on with a broken experiment (1 trial of 16 in the kill test)."""
    from ray.tune import Tuner

    return Tuner.can_restore(str(experiment)) and any(experiment.glob("experiment_state-*.json"))


def check_inputs(method: Method, args) -> Setup:
    """Every check that needs no Ray, in the order a user would fix them."""
    if args.resume and not args.name:
        raise UsageError("--resume needs --name NAME of the sweep to continue")
    if args.resume and args.config:
        raise UsageError("--resume and --config cannot be combined")
    home = Path(args.mlruns).expanduser().resolve()
    storage = Path(args.storage).expanduser().resolve() if args.storage else home / "ray_results"
    if args.resume and not has_snapshot(storage / args.name):
        if not (storage / args.name).is_dir():
            raise UsageError(f"--resume: no sweep named {args.name!r} in {storage}")
        # Killed in its first seconds, before Ray wrote the experiment snapshot: nothing ran that
        # could be continued, so the sweep starts again under its name (its MLflow parent is
        # reused; runs of trials that started before the kill are removed at the end).
        print(f"--resume: sweep {args.name!r} stopped before its first snapshot; starting it again",
              file=sys.stderr, flush=True)
        args.resume = False
    rerun_config, provenance, settings = None, {}, {}
    if args.config:
        from trainables.trial import split_config

        file_config, provenance = load_config_file(args.config, method)
        rerun_config, settings = split_config(file_config)
    stored = TrialContext.load(storage / args.name / CONTEXT_FILE) if args.resume else None
    if stored is not None:  # a resumed sweep trains what it was started with
        settings = stored.settings()
    model = one_model(args.model, settings.get("model"), "--config " + str(args.config) if args.config
                      else f"sweep {args.name!r}")
    dataset = check_dataset(args.dataset, args.skip_bad) or settings.get("dataset")
    ceiling = getattr(args, "max_over_application", None)
    if stored is not None:
        if ceiling is not None and ceiling != stored.max_over_application:
            raise UsageError(f"--max-over-application {ceiling:g}: sweep {args.name!r} was started with "
                             f"{stored.max_over_application}; drop the flag to resume it")
        ceiling = stored.max_over_application
    n_layers = check_model(model)
    method.prepare_model(model)  # e.g. the editing methods' statement testbed, built once here
    if rerun_config is not None:
        from trainables.common import config_from_dict

        try:
            config_from_dict(method.config_cls, {**method.fixed, **rerun_config}).layer_range(n_layers)
        except (TypeError, ValueError) as e:
            raise UsageError(f"--config {args.config}: {e}") from None
    if args.workers_per_trial > 1 and not method.ddp:
        raise UsageError(f"{method.name} runs one worker per trial: use --workers-per-trial 1")
    gpus = args.gpus_per_trial or 0
    if args.workers_per_trial > 1 and 0 < gpus < 1:
        # Ray Train would pack the ranks onto one GPU, and NCCL stops with "Duplicate GPU detected"
        raise UsageError(f"--workers-per-trial {args.workers_per_trial} with --gpus-per-trial {gpus:g} would put two "
                         f"ranks of one trial on one GPU, which NCCL refuses: give each rank a whole GPU "
                         f"(--gpus-per-trial 1)")
    kind = "-rerun" if rerun_config is not None else ""
    name = args.name or f"{method.name}{kind}-{datetime.now():%Y%m%d-%H%M%S}"
    # A folder without a snapshot (killed in its first seconds) may be started again.
    if not args.resume and has_snapshot(storage / name):
        raise UsageError(f"a sweep named {name!r} already exists in {storage}: use --resume or another --name")
    if args.gpus_per_trial is not None and args.gpus_per_trial > 1 and args.gpus_per_trial != int(args.gpus_per_trial):
        raise UsageError("--gpus-per-trial above 1 must be a whole number")
    if args.warm_start and not (storage / args.warm_start).is_dir():
        raise UsageError(f"--warm-start {args.warm_start}: no sweep of that name in {storage}")
    if args.warm_start and args.warm_start == name:
        raise UsageError("--warm-start names this sweep itself: pass an earlier sweep's --name")
    start = []
    if args.start_from and (args.resume or args.config):
        raise UsageError(f"--start-from starts a new search: not with {'--resume' if args.resume else '--config'}")
    for path in args.start_from:
        from search_spaces.derived import start_params

        try:
            params, left = start_params(load_config_file(path, method, "--start-from")[0], method, n_layers,
                                        1 if args.smoke_test else args.max_epochs)
        except ValueError as e:
            raise UsageError(f"--start-from {path}: {e}") from None
        if not params:
            raise UsageError(f"--start-from {path}: names none of the parameters {method.name} searches")
        start.append((path, params, left))
    allow_weak = bool(getattr(args, "allow_weak_sandbox", False))
    setup = Setup(home, storage, name, model, n_layers, dataset, rerun_config, provenance, allow_weak,
                  check_sandbox(method, allow_weak), start, int(settings.get("seed", args.seed)), ceiling)
    if not args.address:
        import ray

        if not ray.is_initialized():  # else the running Ray's own GPU count is checked below
            check_local_gpus(args.gpus_per_trial)
        if args.tracking_uri is None:
            check_writable(home)
    return setup


# --------------------------------------------------------------------------- Ray
def init_ray(args) -> dict:
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")  # snapshot often: less to redo after a crash
    # Ray Train's worker health check: 0.5 s instead of its default cuts the ~5 s a DDP trial
    # spends after its workers end to ~1 s
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    if not args.address:
        # A private single-machine Ray: token auth only adds a warning at every start.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "TOKENIZERS_PARALLELISM": "false"}
    for var in ("APIUPDATE_CACHE", "APIUPDATE_DATA_DIR", "APIUPDATE_TESTBED", "APIUPDATE_TEST_HOOK"):
        if var in os.environ:
            env[var] = os.environ[var]
    kwargs = dict(include_dashboard=False, log_to_driver=True, runtime_env={"env_vars": env},
                  configure_logging=True, logging_level="WARNING")
    if args.address:
        ray.init(address=args.address, **kwargs)
    elif not ray.is_initialized():
        ray.init(**kwargs)
    return ray.cluster_resources()


def max_gpus_per_node() -> float:
    import ray

    return max((n.get("Resources", {}).get("GPU", 0.0) for n in ray.nodes() if n.get("Alive")), default=0.0)


def max_memory_per_node() -> float:
    import ray

    return max((n.get("Resources", {}).get("memory", 0.0) for n in ray.nodes() if n.get("Alive")), default=0.0)


def plan_slots(args, resources: dict, trial_memory: int | None = None) -> Slots:
    """Per-trial resources from the flags and what the cluster offers; one-line errors.

    ``trial_memory``: a CPU trial's host memory (``models.trial_memory_bytes``), asked of Ray
    with the CPUs, so that Ray never packs more trials on a node than its memory holds (two Gemma
    3 270M trials overran a 24 GB node, whose memory monitor then killed one)."""
    gpus_here = max_gpus_per_node()
    gpus = args.gpus_per_trial if args.gpus_per_trial is not None else (1.0 if gpus_here >= 1 else 0.0)
    if gpus > 0 and gpus > max(gpus_here, 0.0):
        raise UsageError(f"--gpus-per-trial {gpus:g}: no node offers that many GPUs (largest: {gpus_here:g})")
    cpus, workers = args.cpus_per_trial, args.workers_per_trial
    if workers > 1:
        import ray

        from trainables.distributed import ddp_fits

        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        if not ddp_fits(nodes, workers, cpus, gpus):
            have = ", ".join(f"{n.get('CPU', 0):g} CPU + {n.get('GPU', 0):g} GPU" for n in nodes)
            raise UsageError(f"--workers-per-trial {workers} x ({cpus} CPU + {gpus:g} GPU) cannot be placed on this "
                             f"cluster's nodes ({have}): lower --workers-per-trial or --gpus-per-trial, or add nodes")
        # the Tune function only drives the TorchTrainer; a trial of {"cpu": 0} is refused by
        # Ray ("Cannot initialize a ResourceRequest with an empty head and zero worker bundles")
        trial_resources = {"cpu": 0.01}
        slots = int(resources.get("CPU", 1) // (cpus * workers)) or 1
    else:
        trial_resources = {"cpu": cpus, "gpu": gpus}
        slots = int(resources.get("CPU", 1) // cpus) or 1
        node_memory = max_memory_per_node()
        if gpus == 0 and trial_memory and node_memory:
            ask = min(float(trial_memory), node_memory)  # more than a node has would never be placed
            trial_resources["memory"] = ask
            by_memory = max(1, int(resources.get("memory", node_memory) // ask))
            if by_memory < slots:
                print(f"{by_memory} trial(s) at once, not {slots}: each needs ~{trial_memory / 1e9:.1f} GB of "
                      f"host memory, the largest node offers {node_memory / 1e9:.1f} GB", flush=True)
                slots = by_memory
    if gpus > 0:  # each DDP worker takes its own GPU share
        slots = min(slots, int(resources.get("GPU", 0) // (gpus * workers)) or 1)
    return Slots(cpus, gpus, workers, trial_resources, args.max_concurrent or max(1, slots))


def trial_context(args, setup: Setup, slots: Slots, eval_epochs) -> TrialContext:
    """What every trial of the sweep gets besides its searched parameters."""
    return TrialContext(
        model=setup.model, dataset=setup.dataset, n_layers=setup.n_layers, seed=setup.seed, threads=slots.cpus,
        workers=slots.workers, use_gpu=slots.gpus > 0, gpus_per_worker=slots.gpus if slots.workers > 1 else 0.0,
        gpu_share=slots.gpus if slots.workers == 1 else 0.0,
        dtype=args.dtype, gradient_checkpointing=args.gradient_checkpointing,
        eval_epochs=None if eval_epochs is None else tuple(eval_epochs),
        # the frozen base model's states, shared by this sweep's trials (trainables/lora/frozen.py);
        # removed when the sweep finishes
        frozen_cache=str(setup.storage / setup.name / "frozen-states"), state_cache_gb=args.state_cache_gb,
        allow_weak_sandbox=setup.allow_weak, storage=str(setup.storage),
        max_over_application=setup.max_over_application)


def make_references(model: str, slots: Slots, dtype: str, progress_too: bool) -> float | None:
    """``evaluation.references`` on the trials' device and precision: a Ray task holding a
    trial's GPU share when trials have GPUs (decoding 230 prompts on the driver's CPU in fp32
    took minutes for a 1.5 B model while the GPUs idled, and the trials' bf16 completions were
    then compared with an fp32 CPU reference), in the driver otherwise."""
    from trainables.evaluation import references

    if slots.gpus <= 0:
        return references(model, "cpu", dtype, progress_too)
    import ray

    task = ray.remote(num_gpus=min(1.0, slots.gpus), num_cpus=min(1, slots.cpus))(references)
    return ray.get(task.remote(model, "cuda", dtype, progress_too))


def _trial_dirname(trial) -> str:
    """Short trial folders (Ray's default embeds the whole config in the path)."""
    return f"trial_{trial.trial_id}"


# --------------------------------------------------------------------------- the run
def run(method: Method, args) -> int:
    setup = check_inputs(method, args)
    slots = plan_slots(args, init_ray(args), trial_memory_bytes(resolve_model_path(setup.model)))
    if args.address and args.tracking_uri is None:  # on a cluster: only once the nodes have been asked
        check_writable(setup.home)

    # The base model's references (locality completions; the stall rule's progress) are made
    # once, where the trials run, so that the trials only read caches.
    stall = bool(args.stop_stalled and method.stall_rule and not args.multi_objective)
    base_progress = make_references(setup.model, slots, args.dtype, stall)

    from trainables.sweep import tracking

    tracking_uri, artifact_root = tracking.mlflow_home_uri(setup.home)
    tracking_uri = args.tracking_uri or tracking_uri
    client = tracking.retry_locked(tracking.client_for, tracking_uri)
    exp_id = tracking.retry_locked(tracking.experiment_id, client, method.name, artifact_root)
    if method.stall_rule:  # the LoRA methods are the ones that store states
        from trainables.lora.frozen import describe_estimate

        line = describe_estimate(resolve_model_path(setup.model), setup.dataset, args.num_samples, args.max_epochs,
                                 args.state_cache_gb)
        if line:
            print(line, flush=True)

    from ray import tune

    from trainables.sweep.scheduler import asha_rungs
    from trainables.trial import tune_trial

    max_epochs = 1 if args.smoke_test else args.max_epochs
    # rungs: where ASHA decides; the multi-objective searcher reads final results only
    ctx = trial_context(args, setup, slots, [] if args.multi_objective else asha_rungs(max_epochs))
    trainable = tune.with_resources(tune.with_parameters(tune_trial, method=method, ctx=ctx), slots.trial_resources)
    if setup.rerun_config is not None:
        return rerun(method, args, setup, ctx, trainable, tracking_uri, artifact_root, exp_id)
    (setup.storage / setup.name).mkdir(parents=True, exist_ok=True)
    ctx.save(setup.storage / setup.name / CONTEXT_FILE)

    parent_id = tracking.open_parent(client, exp_id, setup.name, method.name, {
        "num_samples": args.num_samples, "model": setup.model, "dataset": setup.dataset or "data/",
        "skip_bad": args.skip_bad, "seed": setup.seed, "cpus_per_trial": slots.cpus, "gpus_per_trial": slots.gpus,
        "workers_per_trial": slots.workers, "max_epochs": args.max_epochs, "multi_objective": args.multi_objective,
        "smoke_test": args.smoke_test, "lockstep": not args.asynchronous, "warm_start": args.warm_start or "",
        "start_from": ", ".join(path for path, _, _ in setup.start)})
    tracker = tracking.MlflowTracker(tracking_uri, artifact_root, method.name, setup.name, parent_id,
                                     extra_tags=setup.sandbox_tags, context=ctx.settings())
    num_samples = 2 if args.smoke_test else args.num_samples
    metric, mode, scheduler = search_policy(args, slots, max_epochs, base_progress if stall else None)
    searcher = searcher_for(method, args, setup, slots, max_epochs, metric, mode, num_samples)
    run_config = tune.RunConfig(
        name=setup.name, storage_path=str(setup.storage), callbacks=[tracker],
        failure_config=tune.FailureConfig(max_failures=args.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        verbose=1,
    )
    t0 = time.time()
    fixed = dict(method.fixed)  # a trial's config: these and what the search chose
    if args.resume:
        tuner = tune.Tuner.restore(str(setup.storage / setup.name), trainable=trainable, resume_errored=True,
                                   param_space=fixed)
    else:
        # reuse_actors: a fresh trial process spends ~4 s importing torch/transformers/peft, as
        # much as one testbed epoch; reusing the worker saves it on every trial after the first.
        tuner = tune.Tuner(trainable, param_space=fixed, run_config=run_config, tune_config=tune.TuneConfig(
            search_alg=searcher, scheduler=scheduler, num_samples=num_samples,
            trial_dirname_creator=_trial_dirname, reuse_actors=True))
    print(f"sweep {setup.name}: {num_samples} trials of {method.name} on {setup.model} ({setup.n_layers} layers), "
          f"{slots.concurrent} at once, {slots.cpus} CPU + {slots.gpus:g} GPU per trial\n"
          f"  browse it: {tracking.browse_url(tracking_uri, exp_id)}", flush=True)
    results = tuner.fit()
    return finish(method, setup, results, metric, args.multi_objective, client, parent_id, tracker, time.time() - t0)


def search_policy(args, slots: Slots, max_epochs: int, base_progress: float | None):
    """(metric, mode, scheduler): the efficacy / locality Pareto front without early stopping,
    or the objective under ASHA; with ``base_progress`` (--stop-stalled), trials that have not
    improved on the untrained model by the first rung stop there."""
    if args.multi_objective:
        return ["efficacy", "locality"], ["max", "max"], None
    from trainables.sweep.scheduler import make_scheduler

    floor = None
    if base_progress is not None:
        from trainables.objective import STALL_DELTA

        floor = base_progress + STALL_DELTA
    return "objective", "max", make_scheduler(floor, max_epochs, "max",
                                              lag=None if args.asynchronous else slots.concurrent)


def searcher_for(method: Method, args, setup: Setup, slots: Slots, max_epochs: int, metric, mode, num_samples: int):
    """The seeded TPE searcher, with an earlier sweep's trials (--warm-start) and first trials
    (--start-from)."""
    from trainables.sweep.searcher import make_searcher, warm_start_points

    warm = []
    if args.warm_start and not args.resume:  # a resumed study already holds them
        warm, skipped = warm_start_points(setup.storage / args.warm_start, method, setup.model, setup.n_layers,
                                          max_epochs, args.multi_objective)
        print(f"warm start: {len(warm)} finished trials of sweep {args.warm_start!r}"
              + (f" ({skipped} left out: sampled on another search space)" if skipped else ""), flush=True)
    for path, params, left in setup.start:
        print(f"start from {path}: a first trial with {len(params)} of its parameters fixed"
              + (f", the sampler draws {', '.join(left)}" if left else ""), flush=True)
    return make_searcher(method, setup.n_layers, max_epochs, metric, mode, setup.seed, slots.concurrent,
                         lockstep_total=None if args.asynchronous else num_samples, warm_start=warm,
                         start=[params for _, params, _ in setup.start])


def finish(method: Method, setup: Setup, results, metric, multi_objective: bool, client, parent_id: str, tracker,
           seconds: float) -> int:
    """Reconcile MLflow with the trials Ray has, summarise, close the parent run, remove the
    state cache; 1 when every trial failed."""
    from trainables.sweep import report, tracking

    trials = results._experiment_analysis.trials  # Trial objects, errored ones included
    removed = tracker.reconcile(trials)
    if removed:
        print(f"removed {removed} MLflow run(s) of trials lost in an earlier crash")
    summary = report.summarise(method, results, metric, multi_objective)
    tracking.retry_locked(tracking.finish_parent, client, parent_id, setup.storage / setup.name, summary, method.name)
    all_failed = bool(summary["rows"]) and all(r["status"] == STATUS_FAILED for r in summary["rows"])
    tracking.retry_locked(tracking.close_parent, client, parent_id, all_failed)
    # a cache: removed whatever the trials did (a --resume recomputes what it needs)
    shutil.rmtree(setup.storage / setup.name / "frozen-states", ignore_errors=True)
    report.print_summary(method, setup.name, summary, seconds)
    if all_failed:  # nothing to export: a script or CI job must see it
        print(f"error: every trial of sweep {setup.name} failed ({len(summary['rows'])}): "
              f"{first_failure(results)}", file=sys.stderr)
        return 1
    return 0


def first_failure(results) -> str:
    """One line saying why the first failed trial failed (its failure_reason, or its error)."""
    for r in results:
        reason = (r.metrics or {}).get("failure_reason")
        if not reason and r.error is not None:
            lines = [line for line in str(r.error).splitlines() if line.strip()]
            reason = lines[-1].strip() if lines else type(r.error).__name__
        if reason:
            return str(reason)[:300]
    return "see each trial's failure_reason in MLflow"


def rerun(method: Method, args, setup: Setup, ctx: TrialContext, trainable, tracking_uri: str,
          artifact_root: str, exp_id: str) -> int:
    """One trial of an exported config (``--config``), tracked as its own run."""
    from ray import tune

    from trainables.sweep.report import SHOW
    from trainables.sweep.tracking import MlflowTracker, browse_url

    tags = {"rerun_of_sweep": str(setup.provenance.get("sweep", "")),
            "rerun_of_trial": str(setup.provenance.get("trial_id", "")),
            "rerun_config": args.config, **setup.sandbox_tags}
    tracker = MlflowTracker(tracking_uri, artifact_root, method.name, setup.name, None, extra_tags=tags,
                            context=ctx.settings())
    tuner = tune.Tuner(trainable, param_space={**method.fixed, **setup.rerun_config},
                       tune_config=tune.TuneConfig(num_samples=1, trial_dirname_creator=_trial_dirname),
                       run_config=tune.RunConfig(name=setup.name, storage_path=str(setup.storage), callbacks=[tracker],
                                                 failure_config=tune.FailureConfig(max_failures=args.max_failures),
                                                 verbose=1))
    res = tuner.fit()[0]
    if res.error:
        print(f"error: the re-run failed: {res.error}", file=sys.stderr)
        return 1
    m = res.metrics or {}
    if m.get("trial_status") == STATUS_FAILED:
        print(f"error: the re-run failed: {m.get('failure_reason')}", file=sys.stderr)
        return 1
    print(f"re-run of {args.config} finished; MLflow run {setup.name} in experiment {method.name}")
    print(f"browse it: {browse_url(tracking_uri, exp_id)}")
    print(json.dumps({k: m.get(k) for k in SHOW + ["trial_status"] if k in m}))  # last: read by scripts
    return 0
