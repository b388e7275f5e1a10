"""Rewards for RL on API updates: execution success, tests passed, API correctness, format.

ReCode (arXiv 2506.20495) rewards format + edit similarity only and names execution feedback as
missing; here every component is a function of (prompt, completion, record) returning a float in
[0, 1], or ``None`` when it cannot be measured on this machine (TRL's ``GRPOTrainer`` turns
``None`` into NaN and leaves it out of the weighted sum, ``nansum``):

- ``format``: the completion's first line is non-blank, ``prompt + line`` parses, and the line
  was finished (a newline followed it) -> 1.0; parses but cut off by the length limit -> 0.5;
  anything else -> 0.0. Like the evaluation, only the first line counts.
- ``api``: ``trainables.apicheck.check_completion``, strict against the reference's first
  line: the replacement used as the reference uses it, on the same prompt variables, and no
  longer the deprecated API -> 1.0; the replacement named otherwise (a bare ``pd.concat``, a
  call that drops the old line's frame, or beside the old API) -> 0.5; otherwise 0.0. ``None``
  for records without AST patterns (ReCode files).
- ``execution``: ``prompt + line`` runs to the end in the sandbox within ``exec_timeout`` ->
  1.0; raises or times out -> 0.0. ``None`` when the prompt alone or the reference does not
  run here (its library is not installed, e.g. tensorflow, or it needs a file or a GPU): that
  is not the completion's fault. A completion that fails on an import the prompt and the
  reference did without (``ModuleNotFoundError`` for a package not installed here, real or
  invented) scores 0.0 like any other failure: were it ``None``, execution and tests would drop
  out and the rest be renormalised, so prefixing ``import tensorflow;`` to a line with the
  right API tokens would raise its reward from ~0.45 to 1.0. Old APIs often really fail on the
  installed versions (``df.append`` raises AttributeError on pandas 2.x, ``np.float`` on
  numpy 2.x): that is the execution feedback.
- ``tests``: our migrations carry no unit tests, so the tests are derived from the reference:
  the reference program (``prompt + record.reference``, the migrated line) and the prompt alone
  are run once per context; every top-level name the reference line created or changed is one
  test, passed when the completion leaves that name with the same value (a fingerprint of
  ``repr`` / ``to_json`` / ``tolist``, memory addresses removed). Extra ``record.tests``
  (assert statements, e.g. a dataset's unit tests) run after the program and count one each.
  ``None`` when the reference itself does not run here or changes no name and there are no
  extra tests. This checks behaviour, not spelling: ``pd.concat([df, row])`` and
  ``pd.concat([df, row], axis=0)`` both pass.

Batching: one sandbox call per batch (not per completion). Inside it a small harness imports
the batch's libraries once and forks one child per program, with its own timeout and a
SIGKILL of its process group when the timeout passes; the whole harness runs under the
sandbox's containment (trainables/sandbox.py). Each context's prompt, reference and old line
run once (cached on disk across trials); a completion equal to one of them, or seen before,
costs nothing, and completions of contexts that cannot run here are not run. Measured
(``python benchmarks/sandbox.py --json``): see ``rewards_per_second`` there.
"""
from __future__ import annotations

import ast
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Sequence

from trainables.apicheck import check_completion, parses

COMPONENTS = ("execution", "tests", "api", "format")
# Default weights: API correctness is what the evaluation scores, tests check the behaviour of
# the migrated line, execution and format are shaping terms (a line that runs / parses).
DEFAULT_WEIGHTS = {"execution": 0.5, "tests": 1.0, "api": 1.0, "format": 0.25}
EXEC_TIMEOUT_S = 3.0  # one line after a 2-6 line prompt takes < 0.6 s here even on 2 loaded cores
SANDBOX_MEMORY_MB = 2048  # address space for the harness: `import torch` needs ~1.5 GB of it
PRELOAD_BUDGET_S = 20.0  # harness start-up: importing torch + pandas + sklearn takes ~3 s


@dataclass(frozen=True)
class RewardRecord:
    """What the rewards know about one prompt: the migrated reference line and the patterns."""

    prompt: str
    reference: str  # the migrated (new-API) continuation
    deprecated: str | None = None  # AST patterns (data/README.md); None: no API check
    replacement: str | None = None
    tests: tuple[str, ...] = ()  # optional assert statements run after the program
    old: str | None = None  # the deprecated continuation, when known (its run is cached too)
    source: str = ""


def first_line(text: str) -> str:
    return text.split("\n", 1)[0]


# --------------------------------------------------------------------------- cheap components
def format_reward(prompt: str, completion: str, record: RewardRecord | None = None) -> float:
    line = first_line(completion)
    if not line.strip() or not parses(prompt + line + "\n"):
        return 0.0
    return 1.0 if "\n" in completion else 0.5


def api_reward(prompt: str, completion: str, record: RewardRecord) -> float | None:
    if record.deprecated is None or record.replacement is None:
        return None
    reference = first_line(record.reference)
    chk = check_completion(prompt, first_line(completion), record.deprecated, record.replacement,
                           reference if parses(prompt + reference) else None)
    if chk.correct:  # the working call on the prompt's data, as the evaluation scores it
        return 1.0
    return 0.5 if chk.syntax_ok and chk.uses_new else 0.0


def combine(components: dict[str, float | None], weights: dict[str, float]) -> float:
    """Weighted mean over the measurable components (``None`` ones drop out and the weights
    of the rest are renormalised), so a tensorflow prompt is scored on api + format alone."""
    num = den = 0.0
    for name in COMPONENTS:
        v, w = components.get(name), weights.get(name, 0.0)
        if v is None or w <= 0:
            continue
        num += w * v
        den += w
    return num / den if den > 0 else 0.0


def check_weights(weights: dict[str, float]) -> dict[str, float]:
    unknown = sorted(set(weights) - set(COMPONENTS))
    if unknown:
        raise ValueError(f"unknown reward component(s) {', '.join(unknown)}: use {', '.join(COMPONENTS)}")
    if any(w < 0 for w in weights.values()) or not any(w > 0 for w in weights.values()):
        raise ValueError(f"reward weights must be >= 0 with at least one > 0, got {weights}")
    return {k: float(weights.get(k, 0.0)) for k in COMPONENTS}


# --------------------------------------------------------------------------- the sandbox harness
# Runs inside ONE sandbox call. stdin: {"timeout", "preload", "jobs": [{"program", "tests"}]};
# stdout: one JSON line per job, in order. Children write nothing to stdout (redirected to
# /dev/null), so a program cannot forge another job's result; results travel over a pipe.
_HARNESS = r'''
import hashlib, importlib.util, json, os, re, select, signal, sys, time, types
spec = json.loads(sys.stdin.read())
for mod in spec["preload"]:
    try:
        __import__(mod)
    except BaseException:
        pass
try:
    import warnings; warnings.simplefilter("ignore")
except BaseException:
    pass
ADDR = re.compile(r" at 0x[0-9a-fA-F]+")

def fingerprint(v):
    try:
        mod = type(v).__module__ or ""
        if mod.startswith("pandas") and hasattr(v, "to_json"):
            s = type(v).__name__ + str(getattr(v, "dtypes", "")) + v.to_json()
        elif hasattr(v, "tolist") and hasattr(v, "dtype"):
            s = "%s:%s:%r" % (type(v).__name__, v.dtype, v.tolist())
        else:
            s = repr(v)
    except BaseException:
        s = type(v).__name__
    return hashlib.sha1(ADDR.sub("", s).encode("utf-8", "replace")).hexdigest()[:12]

def missing(e):
    name = getattr(e, "name", None)
    if isinstance(e, ImportError) and name:
        top = name.split(".")[0]
        try:
            return importlib.util.find_spec(top) is None and top
        except BaseException:
            return top
    return False

def run(job):
    import random
    random.seed(0)
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed(0)
    if "torch" in sys.modules:
        sys.modules["torch"].manual_seed(0)
    g = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        exec(compile(job["program"], "<program>", "exec"), g)
    except BaseException as e:
        return {"status": "error", "error": type(e).__name__, "message": str(e)[:200], "missing": missing(e)}
    fps = {k: fingerprint(v) for k, v in list(g.items())
           if not k.startswith("__") and not isinstance(v, (types.ModuleType, type))}
    passed = 0
    for t in job.get("tests", ()):
        try:
            exec(compile(t, "<test>", "exec"), g)
            passed += 1
        except BaseException:
            pass
    return {"status": "ok", "fps": fps, "tests_passed": passed}

devnull = os.open(os.devnull, os.O_RDWR)
for job in spec["jobs"]:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.setpgid(0, 0)
        os.dup2(devnull, 0); os.dup2(devnull, 1); os.dup2(devnull, 2)
        try:
            res = run(job)
        except BaseException as e:
            res = {"status": "error", "error": type(e).__name__, "message": "", "missing": False}
        data = json.dumps(res).encode()
        while data:
            data = data[os.write(w, data):]
        os._exit(0)
    os.close(w)
    t0 = time.monotonic()
    deadline = t0 + spec["timeout"]
    chunks, timed_out = [], False
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            break
        ready, _, _ = select.select([r], [], [], left)
        if ready:
            chunk = os.read(r, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    os.close(r)
    try:
        os.killpg(pid, signal.SIGKILL)  # the child's leftovers too (a fork inside the program)
    except ProcessLookupError:
        pass
    os.waitpid(pid, 0)
    if timed_out:
        res = {"status": "timeout"}
    else:
        try:
            res = json.loads(b"".join(chunks))
        except ValueError:
            res = {"status": "error", "error": "Crashed", "message": "", "missing": False}
    res["seconds"] = round(time.monotonic() - t0, 4)
    sys.stdout.write(json.dumps(res) + "\n")
    sys.stdout.flush()
'''


def _imports(source: str) -> list[str]:
    """Top-level packages a program imports (what the harness pre-imports before forking)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    out: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module.split(".")[0])
    return out


def _installed(mod: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(mod) is not None
    except (ImportError, ValueError):
        return False


def run_programs(programs: Sequence[tuple[str, tuple[str, ...]]], timeout: float = EXEC_TIMEOUT_S,
                 memory_mb: int = SANDBOX_MEMORY_MB) -> list[dict]:
    """Run (program, tests) pairs in ONE sandbox call; one result dict per program:
    status ok / error / timeout, plus fingerprints of the top-level names (ok) or the exception
    (error, with ``missing`` = an uninstalled top-level package or False, for diagnostics)."""
    from trainables.sandbox import run_code

    if not programs:
        return []
    preload = sorted({m for p, _ in programs for m in _imports(p) if m not in sys.builtin_module_names})
    preload = [m for m in preload if _installed(m)]
    spec = {"timeout": timeout, "preload": preload, "jobs": [{"program": p, "tests": list(t)} for p, t in programs]}
    budget = PRELOAD_BUDGET_S + len(programs) * (timeout + 0.5)
    out = run_code(_HARNESS, stdin=json.dumps(spec), timeout=budget, memory_mb=memory_mb, max_processes=64,
                   max_output=max(65536, 4096 * len(programs)))
    lines = [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]
    if len(lines) != len(programs):  # the harness itself died (should not happen): count as errors
        reason = f"harness {out.status}: {out.stderr.strip()[-200:]}"
        lines += [{"status": "error", "error": "HarnessFailed", "message": reason, "missing": False}] \
            * (len(programs) - len(lines))
    return lines


# --------------------------------------------------------------------------- batched scorer
@dataclass
class RewardScorer:
    """Scores batches of completions on every component, with caches.

    Per context (prompt + reference) the prompt alone, the reference program and the old line
    run once (:meth:`prepare` does all contexts in one sandbox call and keeps the results on
    disk, keyed by the programs, so later trials load them). A completion equal to the
    reference or the old line reuses that run; completions of a context whose prompt or
    reference does not run here (tensorflow, a plot that needs seconds) are not run at all
    (execution and tests are ``None``); every other distinct (prompt, line) runs once. GRPO's
    groups repeat completions a lot, so a step usually runs a handful of programs, and the
    harness imports only the libraries those programs need."""

    weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    exec_timeout: float = EXEC_TIMEOUT_S
    _ctx: dict = field(default_factory=dict)  # (prompt, reference, old, tests) -> {"base", "ref", "old"}
    _runs: dict = field(default_factory=dict)  # (prompt, line, tests) -> run result
    sandbox_calls: int = 0
    programs_run: int = 0

    def __post_init__(self) -> None:
        self.weights = check_weights(self.weights)

    @staticmethod
    def _ckey(rec: RewardRecord) -> tuple:
        return (rec.prompt, rec.reference, rec.old, rec.tests)

    def prepare(self, records: Sequence[RewardRecord], cache_dir=None) -> None:
        """Run every context's prompt, reference and old line (one sandbox call for all that are
        not cached yet); ``cache_dir``: a folder for the results (None: memory only)."""
        import hashlib
        from pathlib import Path

        todo = [r for r in dict.fromkeys(records) if self._ckey(r) not in self._ctx]
        if not todo:
            return
        programs = []
        for r in todo:
            programs += [(r.prompt, ()), (r.prompt + r.reference + "\n", r.tests),
                         (r.prompt + (r.old or "") + "\n", r.tests)]
        path = None
        if cache_dir is not None:
            digest = hashlib.sha256(json.dumps([programs, self.exec_timeout]).encode()).hexdigest()[:16]
            path = Path(cache_dir) / f"contexts-{digest}.json"
        if path is not None and path.is_file():
            results = json.loads(path.read_text())
        else:
            results = self._run(programs)
            if path is not None and not any(x.get("error") == "HarnessFailed" for x in results):
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps(results))
                tmp.replace(path)
        for i, r in enumerate(todo):
            base, ref, old = results[3 * i : 3 * i + 3]
            self._ctx[self._ckey(r)] = {"base": base, "ref": ref, "old": old if r.old else None}

    def _run(self, programs) -> list[dict]:
        self.sandbox_calls += 1
        self.programs_run += len(programs)
        return run_programs(programs, self.exec_timeout)

    def runnable(self, rec: RewardRecord) -> bool:
        ctx = self._ctx[self._ckey(rec)]
        return ctx["base"]["status"] == "ok" and ctx["ref"]["status"] == "ok"

    def score(self, prompts: Sequence[str], completions: Sequence[str],
              records: Sequence[RewardRecord]) -> list[dict[str, float | None]]:
        """Components + ``reward`` (the weighted combination) for each completion."""
        self.prepare(records)
        lines = [first_line(c) for c in completions]
        new_runs: list[tuple] = []
        for p, line, rec in zip(prompts, lines, records):
            k = (p, line, rec.tests)
            if (k in self._runs or k in new_runs or not self.runnable(rec) or self._known(rec, line) is not None
                    or not line.strip() or not parses(p + line + "\n")):
                continue
            new_runs.append(k)
        if new_runs:
            results = self._run([(p + line + "\n", tests) for p, line, tests in new_runs])
            self._runs.update(zip(new_runs, results))
        return [self._components(p, c, line, rec) for p, c, line, rec in zip(prompts, completions, lines, records)]

    def _known(self, rec: RewardRecord, line: str) -> dict | None:
        """The context's own run when the line is its reference or its old line."""
        ctx = self._ctx[self._ckey(rec)]
        if line.strip() == rec.reference.strip():
            return ctx["ref"]
        if rec.old is not None and line.strip() == rec.old.strip():
            return ctx["old"]
        return None

    def _components(self, prompt: str, completion: str, line: str, rec: RewardRecord) -> dict[str, float | None]:
        ctx = self._ctx[self._ckey(rec)]
        out: dict[str, float | None] = {"format": format_reward(prompt, completion, rec),
                                        "api": api_reward(prompt, completion, rec)}
        if not self.runnable(rec):
            # the prompt or the reference does not run here (missing library, a file, too slow):
            # neither execution nor tests can be measured, and that is not the completion's fault
            out["execution"] = out["tests"] = None
        else:
            run = self._known(rec, line) or self._runs.get((prompt, line, rec.tests))
            if run is None:  # blank or unparsable line: nothing to run
                out["execution"], out["tests"] = 0.0, self._tests(ctx, None, rec)
            else:  # a failed import too: the prompt and the reference ran without it
                out["execution"] = 1.0 if run["status"] == "ok" else 0.0
                out["tests"] = self._tests(ctx, run, rec)
        out["reward"] = combine(out, self.weights)
        return out

    @staticmethod
    def _tests(ctx: dict, run: dict | None, rec: RewardRecord) -> float | None:
        before, after = ctx["base"]["fps"], ctx["ref"]["fps"]
        names = sorted(k for k, v in after.items() if before.get(k) != v)
        total = len(names) + len(rec.tests)
        if total == 0:
            return None  # the reference changes nothing observable and there are no unit tests
        if run is None or run["status"] != "ok":
            return 0.0
        # a program could write its own result to the harness's pipe: never more than all
        extra = min(max(int(run.get("tests_passed", 0)), 0), len(rec.tests))
        passed = sum(run["fps"].get(k) == after[k] for k in names) + extra
        return passed / total

    def trl_reward_funcs(self, records: dict[str, RewardRecord],
                         key: str = "record_id") -> tuple[list[Callable], list[float]]:
        """Reward functions for TRL's ``GRPOTrainer`` and their weights: one per component with
        weight 0 (TRL logs ``rewards/<name>/mean`` every step; NaN for ``None``) and ``reward``,
        the combination, with weight 1. The dataset carries ``key`` naming each prompt's record;
        all five share one batched, cached scoring, so the extra functions cost nothing."""
        memo: dict = {}

        def scored(prompts, completions, kwargs):
            ident = (tuple(prompts), tuple(completions))
            if memo.get("ident") != ident:
                recs = [records[r] for r in kwargs[key]]
                # a prompt that carries the statement's head (a real model's: grpo.prompt_dataset)
                # was completed after it: the line judged is head + completion
                heads = kwargs.get("head") or [""] * len(completions)
                lines = [h + c for h, c in zip(heads, completions)]
                # the records' own prompts: the trainer's carry a BOS marker (trainables/policy/trl_loop.py)
                memo.update(ident=ident, rows=self.score([r.prompt for r in recs], lines, recs))
            return memo["rows"]

        def make(name: str) -> Callable:
            def func(prompts, completions, **kwargs):
                return [row[name] for row in scored(prompts, completions, kwargs)]

            func.__name__ = name
            return func

        names = [*COMPONENTS, "reward"]
        return [make(n) for n in names], [0.0] * len(COMPONENTS) + [1.0]


def records_from_migrations(migrations, which: str = "train") -> dict[str, RewardRecord]:
    """One record per context of our migrations, keyed ``<migration id>/<train|probe>/<i>``."""
    out = {}
    for m in migrations:
        ctxs = m.train_contexts if which == "train" else m.probe_contexts
        for i, c in enumerate(ctxs):
            key = f"{m.id}/{which}/{i}"
            out[key] = RewardRecord(c.prompt, c.new, m.deprecated, m.replacement, old=c.old, source=key)
    return out


def records_from_pairs(pairs) -> dict[str, RewardRecord]:
    """Records for training pairs without AST patterns (a ReCode file): api is then None."""
    return {f"{p.source}/{i}": RewardRecord(p.prompt, first_line(p.new), old=first_line(p.old), source=p.source)
            for i, p in enumerate(pairs)}
