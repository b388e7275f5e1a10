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

MIN_TRAIN_CONTEXTS = 3
MIN_PROBE_CONTEXTS = 2


class DataError(ValueError):
    """Bad input data; the message is one line: ``file:line: field 'f': what is wrong``."""


@dataclass(frozen=True)
class Context:
    prompt: str
    old: str
    new: str


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


def _records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for each non-blank line; bad JSON or encoding -> DataError."""
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
            raise DataError(f"{path}:{n}: malformed JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
        yield n, obj


class _Checker:
    def __init__(self, path: Path, line: int, obj: dict[str, Any]):
        self.path, self.line, self.obj = path, line, obj

    def fail(self, field: str, msg: str) -> DataError:
        return DataError(f"{self.path}:{self.line}: field '{field}': {msg}")

    def str(self, field: str, *, allow_empty: bool = False) -> str:
        if field not in self.obj:
            raise self.fail(field, "missing")
        v = self.obj[field]
        if not isinstance(v, str):
            raise self.fail(field, f"expected a string, got {type(v).__name__}")
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


def _contexts(c: _Checker, field: str, minimum: int, deprecated: str, replacement: str) -> tuple[Context, ...]:
    raw = c.obj.get(field)
    if raw is None:
        raise c.fail(field, "missing")
    if not isinstance(raw, list):
        raise c.fail(field, f"expected a list, got {type(raw).__name__}")
    if len(raw) < minimum:
        raise c.fail(field, f"need at least {minimum} contexts, got {len(raw)}")
    out = []
    for i, ctx in enumerate(raw):
        where = f"{field}[{i}]"
        if not isinstance(ctx, dict):
            raise c.fail(where, "expected an object with prompt, old, new")
        sub = _Checker(c.path, c.line, ctx)
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


@_cached(migrations_path)
def load_migrations(path: str | Path | None = None) -> list[Migration]:
    path = Path(path or migrations_path())
    out: list[Migration] = []
    seen: dict[str, int] = {}
    prompts: dict[str, int] = {}
    for line, obj in _records(path):
        c = _Checker(path, line, obj)
        mid = c.unique("id", seen)
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
        for ctx in m.train_contexts + m.probe_contexts:
            if ctx.prompt in prompts:
                raise c.fail("prompt", f"duplicate prompt (also on line {prompts[ctx.prompt]}): {ctx.prompt[:40]!r}")
            prompts[ctx.prompt] = line
        out.append(m)
    if not out:
        raise DataError(f"{path}: no records")
    return out


@_cached(locality_path)
def load_locality(path: str | Path | None = None) -> list[LocalitySnippet]:
    path = Path(path or locality_path())
    out: list[LocalitySnippet] = []
    seen: dict[str, int] = {}
    prompts: dict[str, int] = {}
    for line, obj in _records(path):
        c = _Checker(path, line, obj)
        sid = c.unique("id", seen)
        prompt, completion = c.str("prompt"), c.str("completion")
        if not prompt.endswith("\n"):
            raise c.fail("prompt", "must end with a newline")
        if "\n" in completion:
            raise c.fail("completion", "must be a single line")
        if prompt in prompts:
            raise c.fail("prompt", f"duplicate prompt (also on line {prompts[prompt]})")
        prompts[prompt] = line
        out.append(LocalitySnippet(sid, prompt, completion))
    if not out:
        raise DataError(f"{path}: no records")
    return out


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


def detect_format(path: str | Path) -> str:
    """``migrations`` (data/README.md) or ``recode`` (ReCode's api_update.jsonl), from the
    first record's keys."""
    for _, obj in _records(Path(path)):
        if "train_contexts" in obj:
            return "migrations"
        if "old_code" in obj and "update_info" in obj:
            return "recode"
        return "migrations"  # let the migrations loader name the missing field
    raise DataError(f"{path}: no records")


def recode_pair(obj: dict[str, Any], source: str) -> TrainPair:
    """A ReCode record as prompt + differing tail: the shared leading lines of old_code and
    new_code go into the prompt after a comment with the update note, the rest is old / new."""
    old_lines, new_lines = obj["old_code"].splitlines(), obj["new_code"].splitlines()
    k = 0
    while k < min(len(old_lines), len(new_lines)) - 1 and old_lines[k] == new_lines[k]:
        k += 1
    note = " ".join(str(obj["update_info"]).split())
    header = f"# {obj['dependency']} {obj['new_version']}: {note}\n"
    prompt = header + "".join(line + "\n" for line in old_lines[:k])
    return TrainPair(prompt, "\n".join(old_lines[k:]), "\n".join(new_lines[k:]), source)


def load_training_pairs(path: str | Path | None = None) -> list[TrainPair]:
    """Training pairs from our migrations (their train contexts) or from a ReCode file."""
    if path is None or detect_format(path) == "migrations":
        return [TrainPair(c.prompt, c.old, c.new, m.id) for m in load_migrations(path) for c in m.train_contexts]
    out = []
    for line, obj in _records(Path(path)):
        c = _Checker(Path(path), line, obj)
        for f in RECODE_FIELDS:
            c.str(f)
        out.append(recode_pair(obj, f"{Path(path).name}:{line}"))
    if not out:
        raise DataError(f"{path}: no records")
    return out
