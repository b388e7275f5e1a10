"""Input checks of a sweep, all before anything is written or Ray starts where they can be:
each failure is a ``UsageError``, printed as one line with exit status 2."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from trainables.sweep.methods import Method


ROOT = Path(__file__).resolve().parent.parent.parent
DEFAULT_HOME = ROOT / "mlruns"


class UsageError(Exception):
    """Bad input: printed as one line on stderr, exit status 2, nothing written."""


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


def load_config_file(path: str, method: Method, flag: str = "--config") -> tuple[dict, dict]:
    """(config, provenance) from an export_best.py YAML; one-line errors for bad files, naming
    ``flag``."""
    import yaml

    try:
        doc = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{flag} {path}: no such file") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(f"{flag} {path}: cannot read it as YAML ({first})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("config"), dict):
        raise UsageError(f"{flag} {path}: expected a mapping with a 'config' mapping (export_best.py format)")
    if doc.get("method", method.name) != method.name:
        raise UsageError(f"{flag} {path}: exported for method {doc['method']!r}, not {method.name!r}")
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
