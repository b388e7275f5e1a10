"""CodeUpdateArena evaluation (Liu et al. 2024, arXiv 2407.06249): execution-based UPass@k.

A record pairs a *synthetic* update of a library function (``update``: docstring, new
signature, ``implementation`` written on top of the captured ``old_<fn>``) with a program
synthesis problem that needs the update (``scenario``, ``problem``, ``solution_signature``) and
unit tests whose expected values are computed with the updated function. Record format:
format: one JSON record per line (update, scenario, problem, unit_tests, ref_solution, ...); sample: ``../shared/data/codeupdatearena_dev/dev_sample.jsonl``.

Each candidate solution runs twice, each time as one program in the sandbox
(``trainables.sandbox.run_code``; never in this process):

- **new**: ``prog_syn_imports`` (captures ``old_<fn>``), the update's ``implementation``
  (executed in its own namespace so a ``def pow`` does not shadow the builtin in the solution),
  ``setattr`` of it onto the owner at ``function_path`` (a module or a class such as
  ``torch.Tensor``), the candidate, then every top-level ``test_*`` of ``unit_tests``;
- **old**: the same without the implementation and the ``setattr``.

``pass_new``: every test passed in the first run; ``pass_old``: in the second; **UPass**:
``pass_new and not pass_old`` (solves the problem, and only because it uses the update).
For n samples per problem of which c UPass, UPass@k is Chen et al. (2021)'s unbiased
estimator ``1 - C(n - c, k) / C(n, k)`` averaged over problems (pass@k likewise from pass_new).

The program prints its per-test results after a random marker it reads from stdin before any
record code runs, so a candidate's own output cannot be mistaken for results. (A candidate that
searches the interpreter's frames for the marker could still forge them: this is a benchmark
harness, not a defence against adversarial code; the sandbox contains what such code can do.)
"""
from __future__ import annotations

import ast
import json
import math
import re
import secrets
import typing
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from trainables.data import Checker, DataError, read_records

# numpy / torch / sympy programs: importing torch takes ~2-4 s on the busy 2-core machine and
# ~1.3 GB of address space; 4 GiB leaves room for the tests' arrays. One test of the sample
# builds a 1000^3 float array (8 GB): it fails with MemoryError here, as on any 8 GB box.
RUN_TIMEOUT_S = 60.0
RUN_MEMORY_MB = 4096

UPDATE_FIELDS = ("docstring", "signature", "imports", "implementation", "function_path", "package")
RECORD_FIELDS = ("update_id", "scenario", "problem", "solution_signature", "unit_tests", "prog_syn_imports",
                 "ref_solution", "prog_syn_id")


@dataclass(frozen=True)
class CuaRecord:
    prog_syn_id: str
    update_id: str
    package: str
    function_path: str
    update_name: str  # the attribute the update sets (differs from the path's for renames)
    docstring: str
    update_signature: str
    implementation: str
    scenario: str
    problem: str
    solution_signature: str
    prog_syn_imports: str
    unit_tests: str
    tests: tuple[str, ...]  # names of the top-level test_* functions
    ref_solution: str


def _update_name(signature: str, implementation: str, function_path: str) -> str | None:
    """Name the update is set under: the signature's function name when the implementation
    defines it (``numpy.create_zeros_array(...)`` for a rename), else the path's last part."""
    defined = {n.name for n in ast.parse(implementation).body if isinstance(n, ast.FunctionDef)}
    for name in (signature.split("(", 1)[0].strip().rsplit(".", 1)[-1], function_path.rsplit(".", 1)[-1]):
        if name in defined:
            return name
    return None


def load_cua(path: str | Path) -> list[CuaRecord]:
    """Validated CodeUpdateArena records; a bad one raises DataError naming file, line, field."""
    path = Path(path)
    out: list[CuaRecord] = []
    for line, obj in read_records(path):
        c = Checker(path, line, obj)
        update = obj.get("update")
        if not isinstance(update, dict):
            raise c.fail("update", "missing" if update is None else "expected an object")
        u = Checker(path, line, update)
        try:
            ufields = {f: u.str(f) for f in UPDATE_FIELDS}
        except DataError as e:
            raise DataError(str(e).replace("field '", "field 'update.", 1)) from None
        rfields = {f: c.str(f) for f in RECORD_FIELDS}
        for f, src in (("update.implementation", ufields["implementation"]), ("unit_tests", rfields["unit_tests"]),
                       ("ref_solution", rfields["ref_solution"]), ("prog_syn_imports", rfields["prog_syn_imports"])):
            try:
                ast.parse(src)
            except SyntaxError as e:
                raise c.fail(f, f"does not parse: {e.msg} (line {e.lineno})") from None
        name = _update_name(ufields["signature"], ufields["implementation"], ufields["function_path"])
        if name is None:
            raise c.fail("update.implementation", f"defines no function named as in {ufields['signature']!r}")
        tests = tuple(n.name for n in ast.parse(rfields["unit_tests"]).body
                      if isinstance(n, ast.FunctionDef) and n.name.startswith("test_"))
        if not tests:
            raise c.fail("unit_tests", "no top-level test_* function")
        out.append(CuaRecord(
            prog_syn_id=rfields["prog_syn_id"], update_id=rfields["update_id"], package=ufields["package"],
            function_path=ufields["function_path"], update_name=name, docstring=ufields["docstring"],
            update_signature=ufields["signature"], implementation=ufields["implementation"],
            scenario=rfields["scenario"], problem=rfields["problem"],
            solution_signature=rfields["solution_signature"], prog_syn_imports=rfields["prog_syn_imports"],
            unit_tests=rfields["unit_tests"], tests=tests, ref_solution=rfields["ref_solution"]))
    if not out:
        raise DataError(f"{path}: no records")
    return out


# --------------------------------------------------------------------------- the program
# Runs in the sandbox. Reads the marker from stdin first, then runs the stages in its globals;
# prints {"error": stage failure or None, "tests": {name: "pass" | failure}} after the marker.
_RUNNER = r'''
import importlib as _il, json as _json, sys as _sys
_MARK = _sys.stdin.readline().strip()
_R = _json.loads(%s)
_out = {"error": None, "tests": {}}
_stage = "imports"
try:
    exec(compile(_R["imports"], "<prog_syn_imports>", "exec"), globals())
    if _R["with_update"]:
        _stage = "update"
        _ns = dict(globals())
        exec(compile(_R["implementation"], "<update>", "exec"), _ns)
        _parts = _R["function_path"].split(".")[:-1]
        _owner, _i = None, len(_parts)
        while _i > 0 and _owner is None:
            try:
                _owner = _il.import_module(".".join(_parts[:_i]))
            except ImportError:
                _i -= 1
        for _a in _parts[_i:]:
            _owner = getattr(_owner, _a)
        setattr(_owner, _R["name"], _ns[_R["name"]])
    _stage = "solution"
    exec(compile(_R["solution"], "<solution>", "exec"), globals())
    _stage = "unit_tests"
    exec(compile(_R["unit_tests"], "<unit_tests>", "exec"), globals())
except BaseException as _e:
    _out["error"] = ("%%s: %%s: %%s" %% (_stage, type(_e).__name__, _e))[:300]
else:
    for _t in _R["tests"]:
        try:
            globals()[_t]()
            _out["tests"][_t] = "pass"
        except BaseException as _e:
            _out["tests"][_t] = ("%%s: %%s" %% (type(_e).__name__, _e))[:200]
_sys.stdout.flush()
_sys.stdout.write("\n" + _MARK + _json.dumps(_out) + "\n")
'''


def program(record: CuaRecord, solution: str, with_update: bool) -> str:
    """The whole sandboxed program for one run of one candidate."""
    spec = {"imports": record.prog_syn_imports, "implementation": record.implementation,
            "function_path": record.function_path, "name": record.update_name, "with_update": with_update,
            "solution": solution, "unit_tests": record.unit_tests, "tests": list(record.tests)}
    return _RUNNER % repr(json.dumps(spec))


@dataclass(frozen=True)
class RunResult:
    passed: bool
    status: str  # the sandbox's: ok / error / timeout / memory / killed
    error: str | None  # stage failure, or the first failing test's message
    tests_passed: int
    seconds: float


def run_tests(record: CuaRecord, solution: str, with_update: bool, *, timeout: float = RUN_TIMEOUT_S,
              memory_mb: int = RUN_MEMORY_MB) -> RunResult:
    """One sandboxed run; passed = the program ran and every test passed."""
    from trainables.sandbox import run_code

    mark = "@@cua-" + secrets.token_hex(16) + "@@"
    out = run_code(program(record, solution, with_update), timeout=timeout, memory_mb=memory_mb,
                   max_processes=64, stdin=mark + "\n")
    found = out.stdout.rfind(mark)
    if found < 0:
        tail = (out.stderr.strip().splitlines() or [""])[-1][:200]
        return RunResult(False, out.status, f"no results ({out.status}): {tail}", 0, out.seconds)
    try:
        res = json.loads(out.stdout[found + len(mark):].splitlines()[0])
    except (ValueError, IndexError):
        return RunResult(False, out.status, "unreadable results", 0, out.seconds)
    tests = res.get("tests", {})
    ok = [t for t in record.tests if tests.get(t) == "pass"]
    first_fail = next((f"{t}: {tests.get(t)}" for t in record.tests if tests.get(t) != "pass"), None)
    passed = res.get("error") is None and len(ok) == len(record.tests)
    return RunResult(passed, out.status, res.get("error") or first_fail, len(ok), out.seconds)


@dataclass(frozen=True)
class Score:
    prog_syn_id: str
    sample: int
    pass_new: bool
    pass_old: bool
    upass: bool
    error_new: str | None
    error_old: str | None


def score(record: CuaRecord, solution: str, sample: int = 0, **kw) -> Score:
    new = run_tests(record, solution, True, **kw)
    old = run_tests(record, solution, False, **kw)
    return Score(record.prog_syn_id, sample, new.passed, old.passed, new.passed and not old.passed,
                 new.error, old.error)


def score_all(records: list[CuaRecord], solutions: list[list[str]], threads: int = 2, **kw) -> list[list[Score]]:
    """Scores per record per sample. Sandboxed runs are mostly interpreter start-up and imports,
    so ``threads`` of them run at once (the sandbox's benchmark: ~1.4x calls/s from 2 threads)."""
    jobs = [(i, j, r, s) for i, (r, sols) in enumerate(zip(records, solutions)) for j, s in enumerate(sols)]
    with ThreadPoolExecutor(max(1, threads)) as pool:
        done = list(pool.map(lambda job: score(job[2], job[3], job[1], **kw), jobs))
    out: list[list[Score]] = [[] for _ in records]
    for (i, _, _, _), s in zip(jobs, done):
        out[i].append(s)
    return out


def pass_at_k(n: int, c: int, k: int) -> float:
    """Chen et al. (2021)'s unbiased pass@k for n samples of which c pass: 1 - C(n-c, k) / C(n, k),
    computed as a product to stay exact for large n."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def summarize(scores: list[list[Score]], k: int | None = None) -> dict[str, Any]:
    """Counts over the first sample of each record (``pass_new``, ``pass_old``, ``upass``),
    plus pass@k and UPass@k over all samples when every record has >= k."""
    firsts = [s[0] for s in scores if s]
    out: dict[str, Any] = {
        "records": len(scores),
        "pass_new": sum(s.pass_new for s in firsts),
        "pass_old": sum(s.pass_old for s in firsts),
        "upass": sum(s.upass for s in firsts),
    }
    n = min((len(s) for s in scores), default=0)
    if k is not None and n >= k:
        out["samples"] = n
        out[f"pass@{k}"] = sum(pass_at_k(len(s), sum(x.pass_new for x in s), k) for s in scores) / len(scores)
        out[f"upass@{k}"] = sum(pass_at_k(len(s), sum(x.upass for x in s), k) for s in scores) / len(scores)
    return out


# --------------------------------------------------------------------------- generation
def prompt(record: CuaRecord) -> str:
    """The paper's program-synthesis prompt with the update in context: the update's docstring
    (with its new signature), then the scenario, the problem and the solution signature.

    Written as a Python file (comments, the record's imports, then the signature) because the
    models this project scores are base code LMs that continue code; the body they write after
    the signature is the candidate."""
    def comment(title: str, text: str) -> str:
        lines = [f"# {title}:"] + [f"#   {ln}".rstrip() for ln in text.strip().splitlines()]
        return "\n".join(lines) + "\n"

    imports = [ln for ln in record.prog_syn_imports.splitlines()
               if ln.startswith(("import ", "from ")) and "old_" not in ln]
    sig = record.solution_signature.strip()
    # Signatures use typing names (List, Union, ...) that the record's imports lack; the
    # reference solutions import them themselves, so the prompt does too.
    names = sorted({w for w in re.findall(r"[A-Za-z_]\w*", sig) if w in typing.__all__ and w[0].isupper()})
    if names:
        imports.append(f"from typing import {', '.join(names)}")
    imports = "\n".join(imports)
    if not sig.startswith("def "):
        sig = "def " + sig  # 3 of the 24 sample records omit it
    if not sig.endswith(":"):
        sig += ":"
    return (comment(f"Update to {record.function_path} (new signature: {record.update_signature})", record.docstring)
            + comment("Scenario", record.scenario) + comment("Problem", record.problem)
            + "# Solve the problem using the updated API.\n" + imports + "\n\n" + sig + "\n")


def extract_solution(record: CuaRecord, prompt_text: str, completion: str) -> str:
    """The candidate: the prompt's imports and signature plus the completion up to the first
    non-blank line back at column 0 (HumanEval's stop rule: the function has ended)."""
    body = []
    for line in completion.split("\n"):
        if line.strip() and not line[0].isspace():
            break
        body.append(line)
    head = prompt_text[prompt_text.index("# Solve the problem using the updated API.\n"):]
    text = head + "\n".join(body).rstrip()
    if not any(ln.strip() for ln in body):
        text += "    pass"
    return text + "\n"


STOP_STRINGS = ("\ndef ", "\nclass ", "\nif ", "\nprint(", "\n#", "\nimport ", "\nfrom ")


def sample_solutions(model, tokenizer, records: list[CuaRecord], k: int, temperature: float = 0.8,
                     top_p: float = 0.95, max_new_tokens: int = 256, seed: int = 0) -> list[list[str]]:
    """k sampled candidates per record (greedy when temperature == 0, then k must be 1).
    CodeUpdateArena samples at temperature 0.8 for pass@5-style metrics; top_p 0.95 as Codex."""
    import torch

    torch.manual_seed(seed)
    out = []
    device = next(model.parameters()).device
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit:  # the testbed has 256 positions: keep at least half of them for the prompt
        max_new_tokens = min(max_new_tokens, limit // 2)
    for r in records:
        text = prompt(r)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        from trainables.tokens import start_ids

        if start_ids(tokenizer):
            ids = torch.cat([torch.tensor([start_ids(tokenizer)]), ids], dim=1)
        if limit and ids.shape[1] + max_new_tokens > limit:  # keep the end: the signature matters most
            ids = ids[:, -(limit - max_new_tokens):]
        ids = ids.to(device)
        kwargs = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
        with torch.inference_mode():
            # Codex's stop sequences: a line back at column 0 ends the function (extract_solution
            # cuts there too); without them the testbed ran all 256 tokens (~5 s per record).
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 num_return_sequences=k, pad_token_id=tokenizer.pad_token_id,
                                 stop_strings=list(STOP_STRINGS), tokenizer=tokenizer, **kwargs)
        comps = tokenizer.batch_decode(gen[:, ids.shape[1]:], skip_special_tokens=True)
        out.append([extract_solution(r, text, c) for c in comps])
    return out


def scores_as_dicts(scores: list[list[Score]]) -> list[dict]:
    return [asdict(s) for row in scores for s in row]
