"""Multi-worker (DDP) trials: a Ray Train ``TorchTrainer`` started from inside a Tune function.

Ray Train V2 (default since 2.51) forbids ``Tuner(TorchTrainer(...))``; the documented interop is
a Tune function that builds a ``TorchTrainer`` per trial with a deterministic run name and
``TuneReportCallback`` (Ray Train V2: calling ``ray.train`` inside a Tune function raises). The deterministic name (sweep + trial id) under the sweep's
storage path lets a retried trial's Train run find its own latest checkpoint again.
Start-up costs ~20-27 s per trial on 2 CPUs, hence only for ``--workers-per-trial > 1``.
"""
from __future__ import annotations

import os
from typing import Callable


def ddp_fits(nodes: list[dict], workers: int, cpus: float, gpus: float) -> bool:
    """Can ``workers`` DDP workers of ``cpus`` CPUs (x 0.99, below) and ``gpus`` GPUs each be
    placed on these nodes (Ray's per-node resource dicts, ``CPU`` / ``GPU``)? Ray would otherwise
    wait for them forever."""
    slots = 0
    for n in nodes:
        fit = int(n.get("CPU", 0) // (cpus * 0.99))
        if gpus > 0:
            fit = min(fit, int(n.get("GPU", 0) // gpus + 1e-9))
        slots += fit
    return slots >= workers


def run_ddp_trial(worker_fn: Callable[[dict], None], loop_config: dict, ctx) -> None:
    """Run ``worker_fn(loop_config)`` on ``ctx.workers`` Ray Train workers of ``ctx.threads``
    CPUs and ``ctx.gpus_per_worker`` of a GPU each, reporting to this Tune trial."""
    import ray.train
    from ray import tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    # ~5 s of teardown per trial at the default interval, ~1 s at 0.5 s (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S).
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    tctx = tune.get_context()
    storage = ctx.storage or os.path.expanduser("~/ray_results")
    gpus = ctx.gpus_per_worker if ctx.use_gpu else 0.0
    trainer = TorchTrainer(
        worker_fn,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=ctx.workers, use_gpu=ctx.use_gpu,
            # 0.99: the Tune function driving this trainer holds 0.01 CPU, so on 2 CPUs two
            # 1-CPU workers would never fit (two trainers never ran at once).
            resources_per_worker={"CPU": ctx.threads * 0.99, **({"GPU": gpus} if ctx.use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=f"{tctx.get_experiment_name()}-{tctx.get_trial_id()}-ddp",
            storage_path=storage,
            callbacks=[TuneReportCallback()],
        ),
    )
    trainer.fit()
