"""AST check of API usage in a completion: is the new call used, the deprecated one not?

Patterns (documented in data/README.md):

- ``pandas.concat``: a fully qualified name, matched through any import form
  (``import pandas as pd; pd.concat``, ``from pandas import concat``, ``import pandas``).
- ``float``: a bare name that the program does not import (a builtin or a global).
- ``.append``: an attribute of that exact name on any object (receiver type unknown).
- ``P(kw=)``: a call of P (any of the above) that passes keyword ``kw``.

Only nodes on the completion's lines are matched; imports are read from the whole program,
so ``import numpy as np`` in the prompt makes ``np.float`` in the completion ``numpy.float``.

Given the reference new line, the check is strict (``ApiCheck.correct``): the new API is used
as the reference uses it (called where the reference calls it, subscripted where it indexes
with it), and the completion reads every variable of the prompt that the reference reads
(``log`` and ``new_rows`` in ``log = pd.concat([log, new_rows])``). ``log = pd.concat`` and
``pd.concat(new_rows)`` parse and name the new API, but neither is the working call; they pass
only the lax check (``ApiCheck.lax``).
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from functools import lru_cache

_PATTERN = re.compile(r"^(?P<target>\.?[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)(?:\((?P<kw>[A-Za-z_]\w*)=\))?$")


@dataclass(frozen=True)
class Pattern:
    target: str  # "pandas.concat", "float" or ".append"
    keyword: str | None = None

    @property
    def is_attribute(self) -> bool:
        return self.target.startswith(".")


@lru_cache(maxsize=4096)
def parse_pattern(text: str) -> Pattern:
    m = _PATTERN.match(text.strip())
    if not m:
        raise ValueError(
            f"bad API pattern {text!r}: use 'pkg.mod.name', 'name', '.attr' or any of these "
            "followed by '(kw=)'"
        )
    return Pattern(m.group("target"), m.group("kw"))


def import_aliases(tree: ast.AST) -> dict[str, str]:
    """Map each imported local name to the qualified name it stands for."""
    out: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname:
                    out[a.asname] = a.name
                else:  # `import a.b` binds `a`
                    top = a.name.split(".")[0]
                    out[top] = top
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                if a.name != "*":
                    out[a.asname or a.name] = f"{node.module}.{a.name}"
    return out


def _dotted(node: ast.AST) -> list[str] | None:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return parts[::-1]
    return None


def _qualified(node: ast.AST, aliases: dict[str, str]) -> str | None:
    parts = _dotted(node)
    if parts is None:
        return None
    head = aliases.get(parts[0])
    if head is None:
        return ".".join(parts)  # not imported: a builtin or a global
    return ".".join([head, *parts[1:]])


def _refs(node: ast.AST, pattern: Pattern, aliases: dict[str, str]) -> bool:
    """Does this Name/Attribute node refer to the pattern's target?"""
    if pattern.is_attribute:
        return isinstance(node, ast.Attribute) and node.attr == pattern.target[1:]
    if not isinstance(node, (ast.Name, ast.Attribute)):
        return False
    q = _qualified(node, aliases)
    if q is None:
        return False
    if "." not in pattern.target:
        # a bare builtin pattern: the name itself, not imported, not an attribute
        return isinstance(node, ast.Name) and node.id == pattern.target and node.id not in aliases
    return q == pattern.target


def _found(tree: ast.AST, first_line: int, pattern: Pattern, aliases: dict[str, str]):
    """Each reference to the pattern's target on the completion's lines: ``(node, call, role)``,
    the Name or Attribute node, the Call it is the function of (None when not called) and its
    role, ``call``, ``index`` (the value of a subscript) or ``name`` (any other use); for
    ``P(kw=)`` only calls that pass ``kw``."""
    calls, indexed = {}, set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            calls[id(node.func)] = node
        elif isinstance(node, ast.Subscript):
            indexed.add(id(node.value))
    for node in ast.walk(tree):
        if getattr(node, "lineno", 0) < first_line or not _refs(node, pattern, aliases):
            continue
        call = calls.get(id(node))
        if pattern.keyword is not None and (call is None or all(k.arg != pattern.keyword for k in call.keywords)):
            continue
        yield node, call, "call" if call is not None else "index" if id(node) in indexed else "name"


def _uses(tree: ast.AST, first_line: int, pattern: Pattern, aliases: dict[str, str]) -> set[str]:
    """How the completion's lines use the pattern's target: the roles of :func:`_found`; empty
    where they do not use it."""
    return {role for _, _, role in _found(tree, first_line, pattern, aliases)}


def _matches(tree: ast.AST, first_line: int, pattern: Pattern, aliases: dict[str, str]) -> bool:
    return bool(_uses(tree, first_line, pattern, aliases))


def _read_names(tree: ast.AST, first_line: int) -> set[str]:
    """The variables the completion's lines read."""
    return {n.id for n in ast.walk(tree)
            if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load) and n.lineno >= first_line}


def _prompt_names(prompt: str, aliases: dict[str, str]) -> set[str]:
    """The identifiers the prompt defines or mentions, less its imports (the API check reads
    those)."""
    return set(re.findall(r"[A-Za-z_]\w*", prompt)) - set(aliases)


@dataclass(frozen=True)
class ApiCheck:
    syntax_ok: bool
    uses_new: bool
    uses_old: bool
    # strict parts, against the reference new line (True where none was given)
    used_as_reference: bool = True  # called where the reference calls it, indexed where it indexes
    keeps_data: bool = True  # reads every prompt variable the reference reads

    @property
    def lax(self) -> bool:
        """Parses, names the replacement, and no longer uses the deprecated API."""
        return self.syntax_ok and self.uses_new and not self.uses_old

    @property
    def correct(self) -> bool:
        """The lax check, and the new API used as the reference uses it, on the same data."""
        return self.lax and self.used_as_reference and self.keeps_data


def check_completion(prompt: str, completion: str, deprecated: str, replacement: str,
                     reference: str | None = None) -> ApiCheck:
    """Check the completion line(s) appended to ``prompt``; strictly where ``reference`` (the
    reference new line, which must use the replacement) is given.

    A completion that does not parse in its prompt gets ``syntax_ok=False`` and uses neither
    API (so ``old_api_rate`` counts a truncated ``df.append(`` as nothing rather than guessing).
    """
    first_line = prompt.count("\n") + 1
    try:
        tree = ast.parse(prompt + completion)
    except SyntaxError:
        return ApiCheck(False, False, False, False, False)
    aliases = import_aliases(tree)
    new = parse_pattern(replacement)
    roles = _uses(tree, first_line, new, aliases)
    uses_old = _matches(tree, first_line, parse_pattern(deprecated), aliases)
    if reference is None:
        return ApiCheck(True, bool(roles), uses_old)
    want_roles, want_names = _reference_use(prompt, reference, replacement)
    return ApiCheck(True, bool(roles), uses_old, bool(roles & want_roles) or not want_roles,
                    want_names <= _read_names(tree, first_line))


@lru_cache(maxsize=4096)
def _reference_use(prompt: str, reference: str, replacement: str) -> tuple[frozenset[str], frozenset[str]]:
    """How the reference line uses the replacement (its roles) and which prompt variables it reads."""
    tree = ast.parse(prompt + reference)
    first_line = prompt.count("\n") + 1
    aliases = import_aliases(tree)
    roles = _uses(tree, first_line, parse_pattern(replacement), aliases)
    # a call or an index is the working form; a reference that only names the API asks no more
    want = frozenset(roles & {"call", "index"})
    return want, frozenset(_read_names(tree, first_line) & _prompt_names(prompt, aliases))


def parses(source: str) -> bool:
    try:
        ast.parse(source)
    except SyntaxError:
        return False
    return True


def references(prompt: str, completion: str, pattern: str) -> list[tuple[ast.AST, ast.Call | None]]:
    """Where ``completion`` refers to ``pattern``, in source order: each reference's Name or
    Attribute node and the Call it is the function of (None when it is not called), positioned
    in ``prompt + completion``; for ``P(kw=)`` only calls that pass ``kw``. Empty when the
    program does not parse, as :func:`check_completion` then sees no use either."""
    program = prompt + completion
    first_line = prompt.count("\n") + 1
    try:
        tree = ast.parse(program)
    except SyntaxError:
        return []
    found = [(node, call) for node, call, _ in _found(tree, first_line, parse_pattern(pattern), import_aliases(tree))]
    return sorted(found, key=lambda r: (r[0].lineno, r[0].col_offset))
