"""Sandbox calls per second for a trivial program, the number GRPO rewards pay per completion.

Measures ``run_code("print(1)")`` sequentially and from two threads at once (the machine has
two cores; each call blocks in its thread on the sandbox's pipes, so threads overlap the start-up
of one sandbox with another's), plus a bare interpreter started with and without ``-I -S`` as
the floor that no sandbox can beat. Run from the repo root:

    python benchmarks/sandbox.py --json

With ``--json`` the last line is one JSON object, e.g.
{"calls_per_second": 45.1, "calls_per_second_parallel2": 57.3, "backend": "bwrap", ...}.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402

from trainables.sandbox import BACKENDS, detect_backend, run_code  # noqa: E402

PROGRAM = "print(1)"


def sandbox_rate(calls: int, threads: int, backend: str) -> float:
    """Calls per second of ``run_code(PROGRAM)``; every call must succeed."""

    def one(_: int) -> None:
        outcome = run_code(PROGRAM, backend=backend)  # type: ignore[arg-type]
        if outcome.status != "ok" or outcome.stdout != "1\n":
            raise RuntimeError(f"sandbox call failed: {outcome}")

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(calls)))
    return calls / (time.perf_counter() - start)


def interpreter_rate(calls: int, flags: list[str]) -> float:
    """Calls per second of a bare ``python FLAGS -c PROGRAM``: the cost of starting Python."""
    start = time.perf_counter()
    for _ in range(calls):
        subprocess.run([sys.executable, *flags, "-c", PROGRAM], capture_output=True, check=True)
    return calls / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100, help="calls per measurement")
    parser.add_argument("--backend", choices=BACKENDS, default=None,
                        help="containment to measure (default: the detected one)")
    parser.add_argument("--json", action="store_true", help="print one JSON line last")
    args = parser.parse_args()

    backend = args.backend or detect_backend()
    sandbox_rate(3, 1, backend)  # warm-up: backend probe, page cache
    result = {
        "calls_per_second": round(sandbox_rate(args.calls, 1, backend), 1),
        "calls_per_second_parallel2": round(sandbox_rate(args.calls, 2, backend), 1),
        "backend": backend,
        "python_calls_per_second": round(interpreter_rate(args.calls // 2, []), 1),
        "python_IS_calls_per_second": round(interpreter_rate(args.calls // 2, ["-I", "-S"]), 1),
        "calls": args.calls,
    }
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>28}: {value}")


if __name__ == "__main__":
    main()
