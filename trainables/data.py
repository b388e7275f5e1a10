"""Load and validate the project's API-update data (schema: data/README.md).

Every record is checked on load; the first bad one stops the load with a single message
naming the file, the line and the field, e.g.
``data/migrations.jsonl:12: field 'probe_contexts': need at least 2 contexts, got 1``.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from trainables.apicheck import check_completion, parse_pattern

PROJECT_DATA = Path(__file__).resolve().parent.parent / "data"


def data_dir() -> Path:
    """data/, or APIUPDATE_DATA_DIR: a folder of the same layout (tests use a 4-migration
    fixture so that whole sweeps run in seconds). Read at call time, so Ray workers and
    tests that set it later see it."""
    return Path(os.environ.get("APIUPDATE_DATA_DIR") or PROJECT_DATA)


def migrations_path() -> Path:
    return data_dir() / "migrations.jsonl"


def locality_path() -> Path:
    return data_dir() / "locality.jsonl"


def testset_path() -> Path:
    return data_dir() / "test_contexts.jsonl"


def specificity_path() -> Path:
    return data_dir() / "specificity.jsonl"

MIN_TRAIN_CONTEXTS = 3
MIN_PROBE_CONTEXTS = 2


class DataError(ValueError):
    """Bad input data; the message is one line: ``file:line: field 'f': what is wrong``."""


@dataclass(frozen=True)
class Context:
    prompt: str
    old: str
    new: str

    @property
    def head(self) -> str:
        """The start of the statement that the old and new lines share (:func:`shared_head`):
        the evaluation prompts with ``prompt + head``, so the completion begins where the two
        APIs part (``df =`` -> `` df.append(...)`` / `` pd.concat(...)``; ``names = vec.`` ->
        ``get_feature_names()`` / ``get_feature_names_out()``)."""
        return shared_head(self.old, self.new)


def _ident_start(ch: str) -> bool:
    return ch.isalpha() or ch == "_"


def shared_head(old: str, new: str) -> str:
    """The longest common start of ``old`` and ``new`` that ends on a token boundary: before a
    space, or after a ``.``, ``(`` or ``[`` that an identifier follows in both. A prompt that ends there tokenizes
    exactly as the whole line does under GPT-2-style pre-tokenizers (a space starts a new piece,
    as does a letter after punctuation), and the completion still has to choose the API.

    A prompt that stops before the line lets a pretrained model write any other plausible
    statement (SmolLM2-135M wrote neither API on 98% of the probe contexts so prompted); one that
    stops inside the shared part asks exactly which API comes next."""
    n = 0
    limit = min(len(old), len(new))
    while n < limit and old[n] == new[n]:
        n += 1
    for p in range(min(n, limit - 1), 0, -1):
        if old[p] == " " and new[p] == " ":
            return old[:p] if old[:p].strip() else ""
        if old[p - 1] in ".([" and _ident_start(old[p]) and _ident_start(new[p]):
            return old[:p]
    return ""


@dataclass(frozen=True)
class Migration:
    id: str
    library: str
    old_version: str
    new_version: str
    note: str
    deprecated: str
    replacement: str
    old_code: str
    new_code: str
    train_contexts: tuple[Context, ...]
    probe_contexts: tuple[Context, ...]


@dataclass(frozen=True)
class LocalitySnippet:
    id: str
    prompt: str
    completion: str


@dataclass(frozen=True)
class SpecificitySnippet:
    """Code that looks like migration ``migration``'s old API but is correct as written:
    after ``prompt`` the right next line is ``completion``, unchanged."""

    id: str
    migration: str
    prompt: str
    completion: str


def _lines(path: Path) -> Iterator[tuple[int, str, dict[str, Any] | DataError]]:
    """(line number, raw line, object or the DataError for that line) for each non-blank line.
    Only a missing or non-UTF-8 file raises here: per-line problems are yielded, so a lenient
    reader (``--skip-bad``) can step over them."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte {e.start})") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            yield n, line, DataError(f"{path}:{n}: malformed JSON: {e.msg} (column {e.colno})")
            continue
        if not isinstance(obj, dict):
            yield n, line, DataError(f"{path}:{n}: expected a JSON object, got {_json_type(obj)}")
            continue
        yield n, line, obj


def read_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for each non-blank line; bad JSON or encoding -> DataError."""
    for n, _, obj in _lines(path):
        if isinstance(obj, DataError):
            raise obj
        yield n, obj


def _json_type(v: Any) -> str:
    """The JSON name of a decoded value's type: messages say `null`, not `NoneType`."""
    names = {type(None): "null", bool: "boolean", int: "number", float: "number", str: "string",
             list: "array", dict: "object"}
    return names.get(type(v), type(v).__name__)


class Checker:
    def __init__(self, path: Path, line: int, obj: dict[str, Any]):
        self.path, self.line, self.obj = path, line, obj

    def fail(self, field: str, msg: str) -> DataError:
        return DataError(f"{self.path}:{self.line}: field '{field}': {msg}")

    def str(self, field: str, *, allow_empty: bool = False) -> str:
        if field not in self.obj:
            raise self.fail(field, "missing")
        v = self.obj[field]
        if not isinstance(v, str):
            raise self.fail(field, f"expected a string, got {_json_type(v)}")
        if not allow_empty and not v.strip():
            raise self.fail(field, "empty")
        return v

    def unique(self, field: str, seen: dict[str, int]) -> str:
        """A string field whose value no earlier record used (``seen``: value -> line)."""
        v = self.str(field)
        if v in seen:
            raise self.fail(field, f"duplicate {field} {v!r} (first on line {seen[v]})")
        seen[v] = self.line
        return v

    def pattern(self, field: str) -> str:
        v = self.str(field)
        try:
            parse_pattern(v)
        except ValueError as e:
            raise self.fail(field, str(e)) from None
        return v


def _contexts(c: Checker, field: str, minimum: int, deprecated: str, replacement: str) -> tuple[Context, ...]:
    raw = c.obj.get(field)
    if raw is None:
        raise c.fail(field, "missing")
    if not isinstance(raw, list):
        raise c.fail(field, f"expected a list, got {_json_type(raw)}")
    if len(raw) < minimum:
        raise c.fail(field, f"need at least {minimum} contexts, got {len(raw)}")
    out = []
    for i, ctx in enumerate(raw):
        where = f"{field}[{i}]"
        if not isinstance(ctx, dict):
            raise c.fail(where, "expected an object with prompt, old, new")
        sub = Checker(c.path, c.line, ctx)
        try:
            prompt, old, new = sub.str("prompt"), sub.str("old"), sub.str("new")
        except DataError as e:
            raise DataError(str(e).replace("field '", f"field '{where}.", 1)) from None
        if not prompt.endswith("\n"):
            raise c.fail(f"{where}.prompt", "must end with a newline")
        for name, line in (("old", old), ("new", new)):
            if "\n" in line:
                raise c.fail(f"{where}.{name}", "must be a single line")
        o = check_completion(prompt, old, deprecated, replacement)
        if not o.syntax_ok:
            raise c.fail(f"{where}.old", "prompt + old does not parse")
        if not o.uses_old:
            raise c.fail(f"{where}.old", f"does not match the deprecated pattern {deprecated!r}")
        n = check_completion(prompt, new, deprecated, replacement)
        if not n.syntax_ok:
            raise c.fail(f"{where}.new", "prompt + new does not parse")
        if not n.correct:
            raise c.fail(
                f"{where}.new",
                f"must match {replacement!r} and not {deprecated!r} (new={n.uses_new}, old={n.uses_old})",
            )
        out.append(Context(prompt, old, new))
    return tuple(out)


def _cached(default_path):
    """Memoise a loader per (resolved path, mtime, size): a reused Ray worker runs many trials
    and should validate the same file once, yet an edited file is read again."""

    def decorate(loader):
        cache: dict = {}

        @functools.wraps(loader)
        def wrapper(path: str | Path | None = None):
            p = Path(path or default_path())
            try:
                st = p.stat()
                key = (str(p.resolve()), st.st_mtime_ns, st.st_size)
            except OSError:
                return loader(p)  # raises the one-line DataError
            if key not in cache:
                cache[key] = loader(p)
            return list(cache[key])

        return wrapper

    return decorate


def _migration(c: Checker, seen: dict[str, int], prompts: dict[str, int]) -> Migration:
    """One validated migration record. ``seen`` (ids) and ``prompts`` are updated only when the
    record is good, so a skipped record never blocks a later one."""
    mid = c.str("id")
    if mid in seen:
        raise c.fail("id", f"duplicate id {mid!r} (first on line {seen[mid]})")
    deprecated, replacement = c.pattern("deprecated"), c.pattern("replacement")
    m = Migration(
        id=mid,
        library=c.str("library"),
        old_version=c.str("old_version"),
        new_version=c.str("new_version"),
        note=c.str("note"),
        deprecated=deprecated,
        replacement=replacement,
        old_code=c.str("old_code"),
        new_code=c.str("new_code"),
        train_contexts=_contexts(c, "train_contexts", MIN_TRAIN_CONTEXTS, deprecated, replacement),
        probe_contexts=_contexts(c, "probe_contexts", MIN_PROBE_CONTEXTS, deprecated, replacement),
    )
    mine: dict[str, int] = {}
    for ctx in m.train_contexts + m.probe_contexts:
        if ctx.prompt in prompts or ctx.prompt in mine:
            first = prompts.get(ctx.prompt, c.line)
            raise c.fail("prompt", f"duplicate prompt (also on line {first}): {ctx.prompt[:40]!r}")
        mine[ctx.prompt] = c.line
    seen[mid] = c.line
    prompts.update(mine)
    return m


@_cached(migrations_path)
def load_migrations(path: str | Path | None = None) -> list[Migration]:
    path = Path(path or migrations_path())
    seen: dict[str, int] = {}
    prompts: dict[str, int] = {}
    out = [_migration(Checker(path, line, obj), seen, prompts) for line, obj in read_records(path)]
    if not out:
        raise DataError(f"{path}: no records")
    return out


def snippet_text(c: Checker, prompts: dict[str, int]) -> tuple[str, str]:
    """A snippet's ``prompt`` (ending in a newline, not seen on an earlier line) and its one-line
    ``completion``: the rules the locality and the over-application files share."""
    prompt, completion = c.str("prompt"), c.str("completion")
    if not prompt.endswith("\n"):
        raise c.fail("prompt", "must end with a newline")
    if "\n" in completion:
        raise c.fail("completion", "must be a single line")
    if prompt in prompts:
        raise c.fail("prompt", f"duplicate prompt (also on line {prompts[prompt]})")
    return prompt, completion


@_cached(locality_path)
def load_locality(path: str | Path | None = None) -> list[LocalitySnippet]:
    path = Path(path or locality_path())
    out: list[LocalitySnippet] = []
    seen: dict[str, int] = {}
    prompts: dict[str, int] = {}
    for line, obj in read_records(path):
        c = Checker(path, line, obj)
        sid = c.unique("id", seen)
        prompt, completion = snippet_text(c, prompts)
        prompts[prompt] = line
        out.append(LocalitySnippet(sid, prompt, completion))
    if not out:
        raise DataError(f"{path}: no records")
    return out


TEST_CONTEXTS_PER_MIGRATION = 2
TEST_PROMPT_LINES = (2, 6)
SPECIFICITY_ID = re.compile(r"spec-\d{3,}")


def _by_id(migrations: list[Migration] | None) -> dict[str, Migration]:
    return {m.id: m for m in (load_migrations() if migrations is None else migrations)}


def load_test_contexts(
    path: str | Path | None = None, migrations: list[Migration] | None = None
) -> dict[str, tuple[Context, ...]]:
    """The held-out test split (data/README.md): migration id -> its 2 test contexts.

    Checked against ``migrations`` (default: :func:`load_migrations` of the data dir): every id
    is a migration and every migration has a record; each context obeys the probe rules, has a
    non-empty :func:`shared_head`, and neither contains nor is contained in another prompt of
    its migration (train, probe or test); no prompt equals any train or probe prompt. With no
    ``path`` and no test_contexts.jsonl in the data dir, the split is empty: ``{}``."""
    if path is None:
        path = testset_path()
        if not path.is_file():
            return {}
    path = Path(path)
    by_id = _by_id(migrations)
    seen_prompts = {c.prompt for m in by_id.values() for c in m.train_contexts + m.probe_contexts}
    test_prompts: dict[str, int] = {}
    first_line: dict[str, int] = {}
    out: dict[str, tuple[Context, ...]] = {}
    for line, obj in read_records(path):
        c = Checker(path, line, obj)
        mid = c.str("id")
        if mid not in by_id:
            raise c.fail("id", f"unknown migration {mid!r}")
        if mid in first_line:
            raise c.fail("id", f"duplicate id {mid!r} (first on line {first_line[mid]})")
        raw = obj.get("contexts")
        if isinstance(raw, list) and len(raw) != TEST_CONTEXTS_PER_MIGRATION:
            raise c.fail("contexts", f"need exactly {TEST_CONTEXTS_PER_MIGRATION} contexts, got {len(raw)}")
        m = by_id[mid]
        contexts = _contexts(c, "contexts", TEST_CONTEXTS_PER_MIGRATION, m.deprecated, m.replacement)
        known = m.train_contexts + m.probe_contexts
        for i, ctx in enumerate(contexts):
            where = f"contexts[{i}]"
            lo, hi = TEST_PROMPT_LINES
            n_lines = ctx.prompt.count("\n")
            if not lo <= n_lines <= hi:
                raise c.fail(f"{where}.prompt", f"need {lo}-{hi} lines, got {n_lines}")
            if not ctx.head.strip():
                raise c.fail(f"{where}.new", "old and new share no statement start (shared_head is empty)")
            if ctx.prompt in seen_prompts:
                raise c.fail(f"{where}.prompt", f"same as a train or probe prompt: {ctx.prompt[:40]!r}")
            if ctx.prompt in test_prompts:
                raise c.fail(f"{where}.prompt", f"duplicate prompt (also on line {test_prompts[ctx.prompt]})")
            for other in known + contexts[:i]:
                if other.prompt in ctx.prompt or ctx.prompt in other.prompt:
                    raise c.fail(f"{where}.prompt", f"overlaps another prompt of {mid!r}: {other.prompt[:40]!r}")
                if other.old == ctx.old:
                    raise c.fail(f"{where}.old", f"same line as another context of {mid!r}")
        for ctx in contexts:
            test_prompts[ctx.prompt] = line
        first_line[mid] = line
        out[mid] = contexts
    missing = [mid for mid in by_id if mid not in out]
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise DataError(f"{path}: no test contexts for {len(missing)} migration(s): {shown}")
    return out


def load_specificity(
    path: str | Path | None = None,
    migrations: list[Migration] | None = None,
    locality: list[LocalitySnippet] | None = None,
) -> list[SpecificitySnippet]:
    """The over-application set (data/README.md): lookalikes of old APIs that must stay.

    ``migrations`` / ``locality`` default to the data dir's. Each completion is one line that
    parses after its prompt and does not match its migration's ``replacement`` (an update applied
    where it does not belong would write it); it may match ``deprecated``, which is the point.
    No prompt repeats, or equals a locality prompt or a migration's train or probe prompt. With
    no ``path`` and no specificity.jsonl in the data dir, the set is empty: ``[]``."""
    if path is None:
        path = specificity_path()
        if not path.is_file():
            return []
    path = Path(path)
    by_id = _by_id(migrations)
    if locality is None:
        locality = load_locality() if locality_path().is_file() else []
    taken = {s.prompt: "a locality" for s in locality}
    for m in by_id.values():
        for ctx in m.train_contexts + m.probe_contexts:
            taken.setdefault(ctx.prompt, f"a {m.id!r} context")
    out: list[SpecificitySnippet] = []
    seen: dict[str, int] = {}
    prompts: dict[str, int] = {}
    for line, obj in read_records(path):
        c = Checker(path, line, obj)
        sid = c.unique("id", seen)
        if not SPECIFICITY_ID.fullmatch(sid):
            raise c.fail("id", f"expected spec-NNN, got {sid!r}")
        mid = c.str("migration")
        if mid not in by_id:
            raise c.fail("migration", f"unknown migration {mid!r}")
        prompt, completion = snippet_text(c, prompts)
        if prompt in taken:
            raise c.fail("prompt", f"same as {taken[prompt]} prompt: {prompt[:40]!r}")
        m = by_id[mid]
        r = check_completion(prompt, completion, m.deprecated, m.replacement)
        if not r.syntax_ok:
            raise c.fail("completion", "prompt + completion does not parse")
        if r.uses_new:
            raise c.fail("completion", f"matches the replacement {m.replacement!r}: a lookalike must not")
        prompts[prompt] = line
        out.append(SpecificitySnippet(sid, mid, prompt, completion))
    if not out:
        raise DataError(f"{path}: no records")
    return out


def split(records, group=None) -> tuple[list, list]:
    """The fixed validation / test split of a snippet set: (validation, test), each in file order.

    Within each group (``group(record)``; one group when None), the records taken in order of
    sha256 of their id alternate validation, test, validation, ...: the halves differ by at
    most one record per group, a record's side depends on its group's ids only (not on the
    file's order, or on other groups), and every group of 2 or more has records on both sides
    (the over-application set groups by migration: each attribute-style migration's 3+
    lookalikes are read by the search and by the test)."""
    groups: dict = {}
    for r in records:
        groups.setdefault(group(r) if group else None, []).append(r)
    test_ids = set()
    for members in groups.values():
        ordered = sorted(members, key=lambda r: hashlib.sha256(r.id.encode()).hexdigest())
        test_ids.update(r.id for r in ordered[1::2])
    return [r for r in records if r.id not in test_ids], [r for r in records if r.id in test_ids]


def file_digest(*paths: str | Path) -> str:
    """sha256 over the bytes of the given files: keys the testbed cache."""
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).read_bytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- training pairs
@dataclass(frozen=True)
class TrainPair:
    """One training example for every update method: ``prompt`` then the ``new`` (preferred)
    or ``old`` (deprecated) continuation. ``source`` names the migration or ReCode record."""

    prompt: str
    old: str
    new: str
    source: str


RECODE_FIELDS = ("dependency", "new_version", "description", "update_info", "old_code", "new_code")
# The update note heads the prompt as one comment line. ReCode's notes run up to ~400
# characters; the testbed trains on 128 tokens per example and its 1,024-token BPE spends ~1
# token per 2 characters of prose, so a long note crowds the code out of the window. Measured on
# the 1,628 good ReCode pairs: notes cut at 160 characters left 125 pairs with no completion token
# inside 128 tokens, at 100 characters 81 (those pairs add no loss; their rows are all -100).
MAX_NOTE_CHARS = 100


def detect_format(path: str | Path) -> str:
    """``migrations`` (data/README.md) or ``recode`` (ReCode's api_update.jsonl), from the
    first well-formed record's keys."""
    for _, _, obj in _lines(Path(path)):
        if isinstance(obj, DataError):
            continue
        if "train_contexts" in obj:
            return "migrations"
        if "old_code" in obj and "update_info" in obj:
            return "recode"
        return "migrations"  # let the migrations loader name the missing field
    raise DataError(f"{path}: no records")


def _recode_record(c: Checker) -> TrainPair:
    """One validated ReCode record as a training pair.

    Every field must be a non-empty string (the public copy has 21 records, lines 661-681, with
    ``update_info`` and ``old_code`` null), and ``new_code`` must differ from ``old_code``
    (132 records are identical: no update to learn). The code itself need not parse: 89 of
    ReCode's snippets do not (fragments, Python 2), and ReCode trains on them as text."""
    for f in RECODE_FIELDS:
        c.str(f)
    if " ".join(c.obj["old_code"].split()) == " ".join(c.obj["new_code"].split()):
        raise c.fail("new_code", "same as old_code (no API change to learn)")
    return recode_pair(c.obj, f"{c.path.name}:{c.line}")


def recode_pair(obj: dict[str, Any], source: str) -> TrainPair:
    """A ReCode record as prompt + differing tail: the shared leading lines of old_code and
    new_code go into the prompt after a comment with the update note, the rest is old / new.

    The comment reads ``# requires: <dependency><new_version>: <note>``, e.g.
    ``# requires: pandas==2.0.0: DataFrame.append was removed ...``: the same
    ``# requires:`` header the testbed's rare new-API files carry (data.version_tag)."""
    old_lines, new_lines = obj["old_code"].splitlines(), obj["new_code"].splitlines()
    k = 0
    while k < min(len(old_lines), len(new_lines)) - 1 and old_lines[k] == new_lines[k]:
        k += 1
    note = " ".join(str(obj["update_info"]).split())
    if len(note) > MAX_NOTE_CHARS:
        note = note[: MAX_NOTE_CHARS - 3].rsplit(" ", 1)[0] + " ..."
    version = str(obj["new_version"]).strip()
    if version[:1].isdigit():
        version = "==" + version
    header = f"# requires: {str(obj['dependency']).strip().lower()}{version}: {note}\n"
    prompt = header + "".join(line + "\n" for line in old_lines[:k])
    return TrainPair(prompt, "\n".join(old_lines[k:]), "\n".join(new_lines[k:]), source)


@dataclass(frozen=True)
class DatasetScan:
    """A training file read leniently: its format, the good records' pairs and raw lines, and
    one message per bad record (``file:line: field 'f': what is wrong``)."""

    path: Path
    format: str
    pairs: tuple[TrainPair, ...]
    good_lines: tuple[str, ...]  # the raw JSON lines of the good records, in file order
    bad: tuple[tuple[int, str], ...]  # (line, message) per bad record

    def summary(self) -> str:
        """One line for the driver to print once, e.g. ``skipped 21 bad records of 1781 ...``."""
        if not self.bad:
            return f"{self.path}: no bad records"
        shown = ", ".join(str(n) for n, _ in self.bad[:12]) + (", ..." if len(self.bad) > 12 else "")
        return (f"{self.path}: skipped {len(self.bad)} bad record(s) of {len(self.bad) + len(self.good_lines)} "
                f"(lines {shown}); first: {self.bad[0][1]}")


def scan_training_data(path: str | Path) -> DatasetScan:
    """Read a training file of either format without stopping at bad records."""
    path = Path(path)
    fmt = detect_format(path)
    pairs: list[TrainPair] = []
    good: list[str] = []
    bad: list[tuple[int, str]] = []
    seen: dict[str, int] = {}
    prompts: dict[str, int] = {}
    for line, raw, obj in _lines(path):
        if isinstance(obj, DataError):
            bad.append((line, str(obj)))
            continue
        c = Checker(path, line, obj)
        try:
            if fmt == "recode":
                pairs.append(_recode_record(c))
            else:
                m = _migration(c, seen, prompts)
                pairs += [TrainPair(x.prompt, x.old, x.new, m.id) for x in m.train_contexts]
        except DataError as e:
            bad.append((line, str(e)))
            continue
        good.append(raw)
    return DatasetScan(path, fmt, tuple(pairs), tuple(good), tuple(bad))


def load_training_pairs(path: str | Path | None = None, *, skip_bad: bool = False) -> list[TrainPair]:
    """Training pairs from our migrations (their train contexts) or from a ReCode file.

    Strict by default: the first bad record raises its one-line DataError. ``skip_bad``
    trains on the good records and says nothing (the sweep engine reports the count once, in
    the driver, from :func:`scan_training_data`)."""
    if path is None:
        return [TrainPair(c.prompt, c.old, c.new, m.id) for m in load_migrations() for c in m.train_contexts]
    scan = scan_training_data(path)
    if scan.bad and not skip_bad:
        raise DataError(scan.bad[0][1])
    if not scan.pairs:
        raise DataError(f"{path}: no usable records" + (f" ({len(scan.bad)} bad)" if scan.bad else ""))
    return list(scan.pairs)


def version_tag(m) -> str:
    """Header line of the rare new-API files in the corpus (``# requires: pandas>=2.0``)."""
    return f"# requires: {m.library}>={m.new_version}\n"
