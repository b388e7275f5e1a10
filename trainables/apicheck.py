"""AST check of API usage in a completion: is the new call used, the deprecated one not?

Patterns (documented in data/README.md):

- ``pandas.concat``: a fully qualified name, matched through any import form
  (``import pandas as pd; pd.concat``, ``from pandas import concat``, ``import pandas``).
- ``float``: a bare name that the program does not import (a builtin or a global).
- ``.append``: an attribute of that exact name on any object (receiver type unknown).
- ``P(kw=)``: a call of P (any of the above) that passes keyword ``kw``.

Only nodes on the completion's lines are matched; imports are read from the whole program,
so ``import numpy as np`` in the prompt makes ``np.float`` in the completion ``numpy.float``.
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


def _aliases(tree: ast.AST) -> dict[str, str]:
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


def _matches(tree: ast.AST, first_line: int, pattern: Pattern, aliases: dict[str, str]) -> bool:
    for node in ast.walk(tree):
        if getattr(node, "lineno", 0) < first_line:
            continue
        if pattern.keyword is not None:
            if (
                isinstance(node, ast.Call)
                and _refs(node.func, pattern, aliases)
                and any(k.arg == pattern.keyword for k in node.keywords)
            ):
                return True
        elif _refs(node, pattern, aliases):
            return True
    return False


@dataclass(frozen=True)
class ApiCheck:
    syntax_ok: bool
    uses_new: bool
    uses_old: bool

    @property
    def correct(self) -> bool:
        """Parses, uses the replacement, and no longer uses the deprecated API."""
        return self.syntax_ok and self.uses_new and not self.uses_old


def check_completion(prompt: str, completion: str, deprecated: str, replacement: str) -> ApiCheck:
    """Check the completion line(s) appended to ``prompt``.

    A completion that does not parse in its prompt gets ``syntax_ok=False``; the old/new flags
    then come from the completion alone when it parses by itself (so ``old_api_rate`` still
    counts a truncated ``df.append(`` as nothing rather than guessing).
    """
    program = prompt + completion
    first_line = prompt.count("\n") + 1
    try:
        tree = ast.parse(program)
    except SyntaxError:
        return ApiCheck(False, False, False)
    aliases = _aliases(tree)
    return ApiCheck(
        True,
        _matches(tree, first_line, parse_pattern(replacement), aliases),
        _matches(tree, first_line, parse_pattern(deprecated), aliases),
    )


def parses(source: str) -> bool:
    try:
        ast.parse(source)
    except SyntaxError:
        return False
    return True
