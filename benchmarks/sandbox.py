"""Sandbox calls per second for a trivial program, the number GRPO rewards pay per completion.

Measures ``run_code("print(1)")`` sequentially and from two threads at once (the machine has
two cores; each call blocks in its thread on the sandbox's pipes, so threads overlap the start-up
of one sandbox with another's), plus a bare interpreter started with and without ``-I -S`` as
the floor that no sandbox can beat. Run from the repo root:

    python benchmarks/sandbox.py --json

With ``--json`` the last line is one JSON object, e.g.
{"calls_per_second": 45.1, "calls_per_second_parallel2": 57.3, "backend": "bwrap",
"containment": "bwrap; processes bounded by: uid", ...}. ``APIUPDATE_SANDBOX_CGROUP=0`` /
``APIUPDATE_SANDBOX_BACKENDS`` (trainables/sandbox.py) measure another machine's containment.

GRPO reward throughput (``--reward-steps N``, 0 skips it): N simulated GRPO steps of 8 prompts x
8 completions from data/ (the migrated line, the old line, a novel variant of the migrated line,
a syntax error, in a fixed mix) scored by ``trainables.policy.rewards.RewardScorer`` (one batched
sandbox call per step, contexts prepared once), as ``rewards_per_second``; and the same
completions' distinct programs run one sandbox call each, as ``rewards_per_second_unbatched``.
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

from trainables.sandbox import BACKENDS, containment, detect_backend, run_code  # noqa: E402

PROGRAM = "print(1)"


def sandbox_rate(calls: int, threads: int, backend: str) -> float:
    """Calls per second of ``run_code(PROGRAM)``; every call must succeed."""

    def one(_: int) -> None:
        # weak containment allowed: a trusted program, and --backend may name a weak one
        outcome = run_code(PROGRAM, backend=backend, allow_weak=True)  # type: ignore[arg-type]
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


def reward_rates(steps: int, seed: int = 0) -> dict:
    """Rewards per second of the batched scorer vs one sandbox call per distinct program."""
    import random

    from trainables.data import load_migrations
    from trainables.policy.rewards import RewardScorer, records_from_migrations
    from trainables.testbed import cache_root

    rng = random.Random(seed)
    records = list(records_from_migrations(load_migrations()).values())
    scorer = RewardScorer()
    t0 = time.perf_counter()
    scorer.prepare(records, cache_dir=cache_root() / "rewards")  # once per machine; then from disk
    prepare_s = time.perf_counter() - t0
    batches = []
    for step in range(steps):
        prompts, completions, recs = [], [], []
        for rec in rng.sample(records, 8):
            for g in range(8):
                kind = g % 4
                line = [rec.reference, rec.old or rec.reference, f"{rec.reference}  # {step}.{g}",
                        rec.reference[:-1]][kind]
                prompts.append(rec.prompt)
                completions.append(line + "\n")
                recs.append(rec)
        batches.append((prompts, completions, recs))
    t0 = time.perf_counter()
    n = 0
    for prompts, completions, recs in batches:
        n += len(scorer.score(prompts, completions, recs))
    batched = n / (time.perf_counter() - t0)
    # unbatched: what the same steps cost with one sandbox call per distinct runnable program
    programs = list(dict.fromkeys(p + c for ps, cs, rs in batches for p, c, r in zip(ps, cs, rs)
                                  if scorer.runnable(r)))[: max(8, 4 * steps)]
    t0 = time.perf_counter()
    for prog in programs:
        run_code(prog, timeout=3.0, memory_mb=2048)
    unbatched = len(programs) / (time.perf_counter() - t0)
    return {"rewards_per_second": round(batched, 1), "rewards_per_second_unbatched_programs": round(unbatched, 2),
            "reward_steps": steps, "reward_sandbox_calls": scorer.sandbox_calls,
            "reward_programs_run": scorer.programs_run, "reward_prepare_seconds": round(prepare_s, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100, help="calls per measurement")
    parser.add_argument("--backend", choices=BACKENDS, default=None,
                        help="containment to measure (default: the detected one)")
    parser.add_argument("--reward-steps", type=int, default=3,
                        help="simulated GRPO steps (8 prompts x 8 completions) for rewards/s; 0 skips")
    parser.add_argument("--json", action="store_true", help="print one JSON line last")
    args = parser.parse_args()

    backend = args.backend or detect_backend()
    sandbox_rate(3, 1, backend)  # warm-up: backend probe, page cache
    result = {
        "calls_per_second": round(sandbox_rate(args.calls, 1, backend), 1),
        "calls_per_second_parallel2": round(sandbox_rate(args.calls, 2, backend), 1),
        "backend": backend,
        "containment": containment(backend).summary(),  # type: ignore[arg-type]
        "python_calls_per_second": round(interpreter_rate(args.calls // 2, []), 1),
        "python_IS_calls_per_second": round(interpreter_rate(args.calls // 2, ["-I", "-S"]), 1),
        "calls": args.calls,
    }
    if args.reward_steps > 0:
        result.update(reward_rates(args.reward_steps))
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>28}: {value}")


if __name__ == "__main__":
    main()
