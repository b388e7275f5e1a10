"""Mine contexts where a model itself writes a deprecated API (EDAPIBench's trigger filter,
turned into data): intent prompts, sampled continuations, mechanical migration of the line.

A migration's *intent prompts* are its library's imports (from ``old_code`` and the train
contexts' import lines) and a comment saying what the code does (the edit-facts task phrase or
``old_code``'s own comments), with or without ``old_code``'s setup lines; nothing of the probe or
test contexts (the evaluation) is copied, and a variant that repeats one of their lines (imports
aside) is dropped. The model continues each intent prompt by exact temperature sampling through
the shared decoder; a sample whose line L uses the deprecated API (by :mod:`trainables.apicheck`)
becomes the context ``prompt = intent + the sampled lines before L``, ``old = L`` as written,
``new = L`` migrated by a rewriter of its pattern pair (:func:`rewrite_line`). A rewriter is
mechanical: it renames, moves arguments or wraps the call as the curated ``old_code`` ->
``new_code`` pair does (checked on that pair before any mining) and declines whatever it cannot
migrate exactly (an attribute whose receiver is not known to come from the library, a dict
appended to a frame without the prompt's pandas alias, ...).
"""
from __future__ import annotations

import ast
import json
import os
import random
import re
import zlib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from trainables.apicheck import (
    Pattern,
    check_completion,
    import_aliases,
    parse_pattern,
    references,
)
from trainables.data import (
    MIN_PROBE_CONTEXTS,
    MIN_TRAIN_CONTEXTS,
    Checker,
    Context,
    DataError,
    Migration,
    _contexts,
    read_records,
)

MIN_CONTEXTS = MIN_TRAIN_CONTEXTS + MIN_PROBE_CONTEXTS
# A mined prompt longer than this is dropped: the testbed has 256 positions, and a real model's
# continuation that long has drifted away from the intent.
MAX_PROMPT_LINES = 14
# Sampling stops at a blank-line pair or a code fence: past either the model has left the snippet.
STOP = ("\n\n\n", "```")


class Decline(Exception):
    """A rewriter cannot migrate this line mechanically; the message says why (one short phrase)."""


# --------------------------------------------------------------------------- one line's AST
def _is_import(line: str) -> bool:
    s = line.strip()
    return s.startswith("import ") or (s.startswith("from ") and " import " in s)


def _open_suffix(program: str) -> str | None:
    """What makes ``program`` parse: ``""``, or an indented ``pass`` for a block it leaves open
    (a prompt ending in ``def f():`` or a ``for`` header); None where nothing does."""
    last = program.rstrip("\n").split("\n")[-1] if program.strip() else ""
    indent = len(last) - len(last.lstrip())
    tail = "" if program.endswith("\n") or not program else "\n"
    for suffix in ("", *(tail + " " * (indent + k) + "pass\n" for k in (4, 0, 8))):
        try:
            ast.parse(program + suffix)
        except SyntaxError:
            continue
        return suffix
    return None


@dataclass
class Site:
    """Line ``line`` after ``prompt``, parsed with the prompt (and a dummy body when it is a
    block header such as ``for k, v in s.iteritems():``)."""

    prompt: str
    line: str
    library: str
    completion: str  # the line, plus the dummy body where it needs one
    tree: ast.Module
    aliases: dict[str, str]
    lineno: int  # the line's number in the program
    parents: dict[int, ast.AST] = field(default_factory=dict)

    @classmethod
    def parse(cls, prompt: str, line: str, library: str) -> Site:
        program = prompt + line
        suffix = _open_suffix(program)
        if suffix is None:
            raise Decline("the line does not parse after its prompt")
        tree = ast.parse(program + suffix)
        parents = {id(c): p for p in ast.walk(tree) for c in ast.iter_child_nodes(p)}
        return cls(prompt, line, library, line + suffix, tree, import_aliases(tree), prompt.count("\n") + 1, parents)

    def span(self, node: ast.AST) -> tuple[int, int]:
        """``node``'s character offsets in the line (ast columns count UTF-8 bytes)."""
        if node.lineno != self.lineno or node.end_lineno != self.lineno:
            raise Decline("the use spans several lines")
        raw = self.line.encode()
        return len(raw[: node.col_offset].decode()), len(raw[: node.end_col_offset].decode())

    def src(self, node: ast.AST) -> str:
        s, e = self.span(node)
        return self.line[s:e]

    def parent(self, node: ast.AST) -> ast.AST | None:
        return self.parents.get(id(node))

    def same(self, node: ast.AST) -> ast.AST:
        """This tree's node at ``node``'s place (``node`` from another parse of the same program)."""
        key = (type(node), node.lineno, node.col_offset, node.end_lineno, node.end_col_offset)
        return next(n for n in ast.walk(self.tree) if getattr(n, "lineno", None) is not None
                    and (type(n), n.lineno, n.col_offset, n.end_lineno, n.end_col_offset) == key)


Edit = tuple[int, int, str]  # replace line[start:end] by text


def _apply(line: str, edits: list[Edit]) -> str:
    out, at = [], 0
    for s, e, text in sorted(edits):
        if s < at:
            raise Decline("nested uses of the deprecated API")
        out += [line[at:s], text]
        at = e
    return "".join(out) + line[at:]


# --------------------------------------------------------------------------- names and receivers
def spell(site: Site, target: str, prefer: str | None = None) -> str:
    """``target`` (a qualified name) as the program can name it through its imports
    (``pandas.concat`` -> ``pd.concat``); a bare builtin as itself. Declines where no import
    reaches it: the migrated line cannot add one."""
    if "." not in target:
        if target in site.aliases:
            raise Decline(f"{target!r} is imported as something else")
        return target
    reach = [(name, q) for name, q in site.aliases.items() if target == q or target.startswith(q + ".")]
    if not reach:
        raise Decline(f"{target} is not reachable through the prompt's imports")
    name, q = max(reach, key=lambda r: (r[0] == prefer, len(r[1])))
    return name + target[len(q):]


def _head(node: ast.AST) -> str | None:
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


# Libraries whose objects carry another's methods: keras models are TensorFlow's, seaborn draws
# on matplotlib Axes.
ROOTS = {"tensorflow": ("tensorflow", "keras"), "matplotlib": ("matplotlib", "seaborn")}
# Calls that turn a library object into plain Python data (a list has .append, a dict .items).
PLAIN_DATA_METHODS = {"tolist", "to_list", "to_dict", "keys", "items", "values", "split", "splitlines"}
_LITERALS = (ast.Constant, ast.List, ast.ListComp, ast.Dict, ast.DictComp, ast.Set, ast.SetComp, ast.Tuple,
             ast.JoinedStr, ast.GeneratorExp)


def _binding(site: Site, name: str, before: int) -> tuple[ast.AST | None, int] | None:
    """The value last bound to ``name`` before line ``before`` and that line; ``(None, line)``
    where the binding says nothing of the value (a loop variable, an argument); None if unbound."""
    best: tuple[int, ast.AST | None] | None = None

    def offer(line: int, value: ast.AST | None) -> None:
        nonlocal best
        if line < before and (best is None or line >= best[0]):
            best = (line, value)

    def names(target: ast.AST) -> Iterable[str]:
        return (n.id for n in ast.walk(target) if isinstance(n, ast.Name))

    for node in ast.walk(site.tree):
        if isinstance(node, ast.Assign):
            for t in node.targets:
                if isinstance(t, ast.Name) and t.id == name:
                    offer(node.lineno, node.value)
                elif isinstance(t, (ast.Tuple, ast.List)) and name in names(t):
                    parts = node.value.elts if isinstance(node.value, (ast.Tuple, ast.List)) else None
                    hit = [i for i, e in enumerate(t.elts) if isinstance(e, ast.Name) and e.id == name]
                    if parts is not None and hit and len(parts) == len(t.elts):
                        offer(node.lineno, parts[hit[0]])
                    else:  # `fig, ax = plt.subplots()`: the elements come from the call
                        offer(node.lineno, node.value if hit else None)
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)) and isinstance(node.target, ast.Name):
            if node.target.id == name and node.value is not None:
                offer(node.lineno, node.value if isinstance(node, ast.AnnAssign) else None)
        elif isinstance(node, (ast.For, ast.AsyncFor, ast.comprehension)) and name in names(node.target):
            offer(getattr(node, "lineno", node.target.lineno), None)
        elif isinstance(node, (ast.With, ast.AsyncWith)):
            if any(i.optional_vars is not None and name in names(i.optional_vars) for i in node.items):
                offer(node.lineno, None)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            a = node.args
            if name in {x.arg for x in a.posonlyargs + a.args + a.kwonlyargs + [a.vararg, a.kwarg] if x}:
                offer(node.lineno, None)
    return None if best is None else (best[1], best[0])


def _rooted(site: Site, expr: ast.AST, before: int, depth: int = 0) -> bool | None:
    """Does ``expr`` evaluate to an object of the migration's library (True), surely not (False:
    a literal, another library's module, plain data), or is that unknown (None)?"""
    roots = ROOTS.get(site.library, (site.library,))
    if depth > 12:
        return None
    if isinstance(expr, ast.Name):
        if expr.id in site.aliases:
            return site.aliases[expr.id].split(".")[0] in roots
        if expr.id == "self":
            classes = [c for c in ast.walk(site.tree) if isinstance(c, ast.ClassDef)
                       and c.lineno <= before <= (c.end_lineno or before)]
            if classes and any(_rooted(site, b, before, depth + 1) for b in classes[-1].bases):
                return True
            return None
        bound = _binding(site, expr.id, before)
        if bound is None or bound[0] is None:
            return None
        return _rooted(site, bound[0], bound[1], depth + 1)
    if isinstance(expr, ast.Call):
        if isinstance(expr.func, ast.Attribute) and expr.func.attr in PLAIN_DATA_METHODS:
            return False
        if isinstance(expr.func, ast.Name) and expr.func.id in ("list", "dict", "set", "tuple", "str", "len"):
            return False
        return _rooted(site, expr.func, before, depth + 1)
    if isinstance(expr, (ast.Attribute, ast.Subscript, ast.Starred)):
        return _rooted(site, expr.value, before, depth + 1)
    if isinstance(expr, ast.BinOp):
        sides = {_rooted(site, expr.left, before, depth + 1), _rooted(site, expr.right, before, depth + 1)}
        return True if True in sides else (False if sides == {False} else None)
    if isinstance(expr, _LITERALS):
        return False
    return None


def _receiver(site: Site, node: ast.AST) -> None:
    """An attribute pattern (``.iteritems``) cannot see its receiver's type: rewrite only where
    the receiver is known to be an object of the migration's library."""
    if not isinstance(node, ast.Attribute):
        raise Decline("the attribute is not called on an object")
    r = _rooted(site, node.value, site.lineno)
    if r is False:
        raise Decline(f"the receiver is not a {site.library} object")
    if r is None:
        raise Decline("the receiver's type is unknown")


def _str(site: Site, text: str) -> str:
    """A string literal in the quotes the line already uses (double where it uses none)."""
    q = "'" if "'" in site.line and '"' not in site.line else '"'
    return q + text + q


def _kw(call: ast.Call | None, name: str) -> ast.keyword | None:
    return next((k for k in call.keywords if k.arg == name), None) if call is not None else None


def _literal(node: ast.AST):
    try:
        return ast.literal_eval(node)
    except ValueError:
        raise Decline("a keyword value is not a literal") from None


def _drop_arg(site: Site, call: ast.Call, node: ast.AST) -> Edit:
    """The edit that removes argument ``node`` (positional or keyword) and one adjacent comma."""
    items = sorted([*call.args, *call.keywords], key=lambda n: (n.lineno, n.col_offset))
    i = items.index(node)
    s, e = site.span(node)
    if i + 1 < len(items):
        return s, site.span(items[i + 1])[0], ""
    if i > 0:
        return site.span(items[i - 1])[1], e, ""
    return s, e, ""


def _call_args(site: Site, call: ast.Call, *, drop: Iterable[ast.AST] = ()) -> list[str]:
    skip = {id(d) for d in drop}
    return [site.src(a) for a in sorted([*call.args, *call.keywords], key=lambda n: (n.lineno, n.col_offset))
            if id(a) not in skip]


# --------------------------------------------------------------------------- rewriters
Rewriter = Callable[[Site, ast.AST, "ast.Call | None", Pattern, Pattern], list[Edit]]


def rename_attribute(site, node, call, old, new):
    """``x.iteritems()`` -> ``x.items()``: the attribute's name, nothing else."""
    _receiver(site, node)
    e = site.span(node)[1]
    return [(e - len(node.attr), e, new.target[1:])]


def rename_name(site, node, call, old, new):
    """``np.product(x)`` -> ``np.prod(x)``, ``np.float`` -> ``float``: the qualified name,
    spelt through the prompt's imports."""
    s, e = site.span(node)
    return [(s, e, spell(site, new.target, _head(node)))]


def rename_keyword(site, node, call, old, new, value: Callable[[ast.AST, Site], str] | None = None):
    """``OneHotEncoder(sparse=False)`` -> ``OneHotEncoder(sparse_output=False)``; ``value`` maps
    the keyword's value where the new keyword takes other values."""
    if old.is_attribute:
        _receiver(site, node)
    kw = _kw(call, old.keyword)
    if _kw(call, new.keyword) is not None:
        raise Decline(f"the call already passes {new.keyword}=")
    text = value(kw.value, site) if value else site.src(kw.value)
    return [(site.span(kw)[0], site.span(kw.value)[1], f"{new.keyword}={text}")]


def attribute_to_call(site, node, call, old, new):
    """``M.A`` -> ``M.toarray()``: the dense-array attribute became a method."""
    if call is not None:
        raise Decline("the attribute is called")
    _receiver(site, node)
    e = site.span(node)[1]
    return [(e - len(node.attr), e, new.target[1:] + "()")]


def _frame_value(site: Site, arg: ast.AST) -> str:
    """What ``df.append(arg)`` appends, as a frame ``pd.concat`` takes."""
    rows_of_dicts = isinstance(arg, ast.List) and arg.elts and all(isinstance(e, ast.Dict) for e in arg.elts)
    if isinstance(arg, ast.Dict) or rows_of_dicts:
        ignore = _kw(site.parent(arg), "ignore_index")
        if ignore is None or _literal(ignore.value) is not True:
            raise Decline("a dict appended without ignore_index=True (append raised)")
        rows = site.src(arg) if isinstance(arg, ast.List) else f"[{site.src(arg)}]"
        return f"{spell(site, 'pandas.DataFrame')}({rows})"
    if isinstance(arg, (ast.List, ast.Tuple, ast.Constant, ast.ListComp, ast.GeneratorExp)):
        raise Decline("the appended value is not a frame")
    return site.src(arg)


def append_to_concat(site, node, call, old, new):
    """``X = X.append(Y, ignore_index=True)`` -> ``X = pd.concat([X, Y], ignore_index=True)``: a
    dict (or a list of dicts) appended becomes ``pd.DataFrame([...])`` as ``append`` read it."""
    if call is None or len(call.args) != 1 or any(k.arg is None for k in call.keywords):
        raise Decline("not a call append(other, keywords...)")
    if isinstance(site.parent(call), ast.Expr):
        raise Decline("the result is not used (a list append)")
    _receiver(site, node)
    if isinstance(call.args[0], ast.List) and not all(isinstance(e, ast.Dict) for e in call.args[0].elts):
        raise Decline("a list of frames or values appended")
    if any(k.arg not in ("ignore_index", "sort", "verify_integrity") for k in call.keywords):
        raise Decline("a keyword concat does not take")
    parts = [f"[{site.src(node.value)}, {_frame_value(site, call.args[0])}]"] + [site.src(k) for k in call.keywords]
    s, e = site.span(call)
    return [(s, e, f"{spell(site, new.target)}({', '.join(parts)})")]


def fillna_to_ffill(site, node, call, old, new):
    """``df.fillna(method="ffill", limit=2)`` -> ``df.ffill(limit=2)``."""
    _receiver(site, node)
    kw = _kw(call, "method")
    if call.args or _kw(call, "value") is not None or _literal(kw.value) not in ("ffill", "pad"):
        raise Decline("not a forward fill")
    rest = _call_args(site, call, drop=[kw])
    s, e = site.span(call)
    return [(s, e, f"{site.src(node.value)}.{new.target[1:]}({', '.join(rest)})")]


def function_to_method(site, node, call, old, new):
    """``np.asscalar(a)`` -> ``a.item()``."""
    if call is None or len(call.args) != 1 or call.keywords:
        raise Decline("not a call with one argument")
    arg = call.args[0]
    text = site.src(arg)
    if not isinstance(arg, (ast.Name, ast.Attribute, ast.Call, ast.Subscript)):
        text = f"({text})"
    s, e = site.span(call)
    return [(s, e, f"{text}.{new.target[1:]}()")]


def mse_to_rmse(site, node, call, old, new):
    """``mean_squared_error(a, b, squared=False)`` -> ``root_mean_squared_error(a, b)``."""
    kw = _kw(call, "squared")
    if _literal(kw.value) is not False:
        raise Decline("squared= is not False")
    return [(*site.span(node), spell(site, new.target, _head(node))), _drop_arg(site, call, kw)]


def symeig_to_eigh(site, node, call, old, new):
    """``torch.symeig(A, eigenvectors=True)`` -> ``torch.linalg.eigh(A)``."""
    if call is None or not call.args or len(call.args) > 2:
        raise Decline("not a call symeig(A[, eigenvectors])")
    drop = [k for k in call.keywords if k.arg == "eigenvectors"] + call.args[1:]
    if any(_literal(d.value if isinstance(d, ast.keyword) else d) is not True for d in drop):
        raise Decline("eigenvectors= is not True")
    if any(k.arg != "eigenvectors" for k in call.keywords):
        raise Decline("a keyword eigh does not take")
    s, e = site.span(call)
    return [(s, e, f"{spell(site, new.target, _head(node))}({site.src(call.args[0])})")]


def solve_swapped(site, node, call, old, new):
    """``torch.solve(b, A).solution`` -> ``torch.linalg.solve(A, b)``: the arguments swap, and
    the new function returns the solution itself."""
    if call is None or len(call.args) != 2 or call.keywords:
        raise Decline("not a call solve(B, A)")
    outer = site.parent(call)
    if not ((isinstance(outer, ast.Attribute) and outer.attr == "solution")
            or (isinstance(outer, ast.Subscript) and isinstance(outer.slice, ast.Constant) and outer.slice.value == 0)):
        raise Decline("the result is not read as .solution")
    s, e = site.span(outer)
    b, a = (site.src(x) for x in call.args)
    return [(s, e, f"{spell(site, new.target, _head(node))}({a}, {b})")]


def lstsq_swapped(site, node, call, old, new):
    """``torch.lstsq(B, A)`` -> ``torch.linalg.lstsq(A, B)``."""
    if call is None or len(call.args) != 2 or call.keywords:
        raise Decline("not a call lstsq(B, A)")
    b, a = (site.src(x) for x in call.args)
    s, e = site.span(call)
    return [(s, e, f"{spell(site, new.target, _head(node))}({a}, {b})")]


def chain_to_multi_dot(site, node, call, old, new):
    """``torch.chain_matmul(A, B, C)`` -> ``torch.linalg.multi_dot([A, B, C])``."""
    if call is None or call.keywords or not call.args:
        raise Decline("not a call chain_matmul(*matrices)")
    s, e = site.span(call)
    return [(s, e, f"{spell(site, new.target, _head(node))}([{', '.join(site.src(a) for a in call.args)}])")]


def qr_plain(site, node, call, old, new):
    """``torch.qr(M)`` -> ``torch.linalg.qr(M)``; ``some=False`` is ``mode="complete"``."""
    if call is None or len(call.args) != 1 or any(k.arg != "some" for k in call.keywords):
        raise Decline("not a call qr(M[, some=])")
    edits = [(*site.span(node), spell(site, new.target, _head(node)))]
    for k in call.keywords:
        some = _literal(k.value)
        edits.append((*site.span(k), f"mode={_str(site, 'complete')}") if some is False else _drop_arg(site, call, k))
    return edits


def adam_optimizer(site, node, call, old, new):
    """``tf.train.AdamOptimizer(1e-3, beta1=0.9)`` -> ``tf.keras.optimizers.Adam(learning_rate=1e-3, beta_1=0.9)``."""
    if call is None or len(call.args) > 1:
        raise Decline("not a call AdamOptimizer([learning_rate], keywords...)")
    names = {"learning_rate": "learning_rate", "beta1": "beta_1", "beta2": "beta_2", "epsilon": "epsilon",
             "name": "name"}
    if any(k.arg not in names for k in call.keywords):
        raise Decline("a keyword Adam does not take")
    parts = [f"learning_rate={site.src(a)}" for a in call.args]
    parts += [f"{names[k.arg]}={site.src(k.value)}" for k in call.keywords]
    if not any(p.startswith("learning_rate=") for p in parts):
        parts.insert(0, "learning_rate=0.001")  # AdamOptimizer's default
    s, e = site.span(call)
    return [(s, e, f"{spell(site, new.target, _head(node))}({', '.join(parts)})")]


def predict_classes(site, node, call, old, new):
    """``model.predict_classes(x)`` -> ``np.argmax(model.predict(x), axis=-1)``."""
    if call is None:
        raise Decline("not a call")
    _receiver(site, node)
    args = ", ".join(_call_args(site, call))
    s, e = site.span(call)
    return [(s, e, f"{spell(site, 'numpy.argmax')}({site.src(node.value)}.predict({args}), axis=-1)")]


def get_cmap_to_registry(site, node, call, old, new):
    """``mpl.cm.get_cmap(name)`` -> ``mpl.colormaps[name]``."""
    if call is None or len(call.args) != 1 or call.keywords:
        raise Decline("not a call get_cmap(name)")
    s, e = site.span(call)
    return [(s, e, f"{spell(site, new.target, _head(node))}[{site.src(call.args[0])}]")]


def simps_to_simpson(site, node, call, old, new):
    """``integrate.simps(y, x)`` -> ``integrate.simpson(y, x=x)``: only ``y`` stays positional."""
    if call is None or not call.args or len(call.args) > 4 or _kw(call, "even") is not None:
        raise Decline("not a call simps(y[, x, dx, axis])")
    parts = [site.src(call.args[0])] + [f"{n}={site.src(a)}" for n, a in zip(("x", "dx", "axis"), call.args[1:])]
    parts += [site.src(k) for k in call.keywords]
    s, e = site.span(call)
    return [(s, e, f"{spell(site, new.target, _head(node))}({', '.join(parts)})")]


def binom_test(site, node, call, old, new):
    """``stats.binom_test(k, n, p)`` -> ``stats.binomtest(k, n, p).pvalue``."""
    if call is None or any(k.arg not in ("n", "p", "alternative") for k in call.keywords):
        raise Decline("not a call binom_test(k, n, ...)")
    if len(call.args) < 2 and _kw(call, "n") is None:
        raise Decline("binom_test of a success/failure pair")
    s, e = site.span(call)
    return [(s, e, f"{spell(site, new.target, _head(node))}({', '.join(_call_args(site, call))}).pvalue")]


def textsize_to_textbbox(site, node, call, old, new):
    """``draw.textsize(text, font=f)`` -> ``draw.textbbox((0, 0), text, font=f)[2:]``."""
    if call is None or not call.args:
        raise Decline("not a call textsize(text, ...)")
    _receiver(site, node)
    s, e = site.span(call)
    return [(s, e, f"{site.src(node.value)}.textbbox({', '.join(['(0, 0)', *_call_args(site, call)])})[2:]")]


def getsize_to_getbbox(site, node, call, old, new):
    """``font.getsize(text)`` -> ``font.getbbox(text)[2:]``."""
    if call is None or not call.args:
        raise Decline("not a call getsize(text, ...)")
    _receiver(site, node)
    s, e = site.span(call)
    return [(s, e, f"{site.src(node.value)}.getbbox({', '.join(_call_args(site, call))})[2:]")]


def factorplot_to_catplot(site, node, call, old, new):
    """``sns.factorplot(...)`` -> ``sns.catplot(..., kind="point")``: factorplot drew points by
    default, catplot strips."""
    edits = [(*site.span(node), spell(site, new.target, _head(node)))]
    if call is not None and _kw(call, "kind") is None:
        if any(k.arg is None for k in call.keywords):
            raise Decline("keywords passed through **")
        edits.append((site.span(call)[1] - 1, site.span(call)[1] - 1,
                      (", " if call.args or call.keywords else "") + f"kind={_str(site, 'point')}"))
    return edits


def distplot_to_histplot(site, node, call, old, new):
    """``sns.distplot(x, bins=20)`` -> ``sns.histplot(x, bins=20)``, for the keywords both take."""
    shared = ("bins", "kde", "color", "ax", "label")
    if call is None or len(call.args) > 1 or any(k.arg not in shared for k in call.keywords):
        raise Decline("a distplot argument histplot does not take")
    return rename_name(site, node, call, old, new)


def yaml_safe_load(site, node, call, old, new):
    """``yaml.load(f, Loader=...)`` -> ``yaml.safe_load(f)``."""
    if call is None or not call.args or len(call.args) > 2 or any(k.arg != "Loader" for k in call.keywords):
        raise Decline("not a call load(stream[, Loader])")
    s, e = site.span(call)
    return [(s, e, f"{spell(site, new.target, _head(node))}({site.src(call.args[0])})")]


def event_loop_to_run(site, node, call, old, new):
    """``asyncio.get_event_loop().run_until_complete(main())`` -> ``asyncio.run(main())``."""
    outer = site.parent(call) if call is not None else None
    run = site.parent(outer) if outer is not None else None
    if not (isinstance(outer, ast.Attribute) and outer.attr == "run_until_complete" and isinstance(run, ast.Call)
            and run.func is outer and len(run.args) == 1 and not run.keywords and not call.args):
        raise Decline("not get_event_loop().run_until_complete(coroutine)")
    s, e = site.span(run)
    return [(s, e, f"{spell(site, new.target, _head(node))}({site.src(run.args[0])})")]


def utcnow_to_now(site, node, call, old, new):
    """``datetime.utcnow()`` -> ``datetime.now(timezone.utc)``."""
    if call is None or call.args or call.keywords:
        raise Decline("not a call utcnow()")
    s, e = site.span(call)
    return [(s, e, f"{spell(site, new.target, _head(node))}({spell(site, 'datetime.timezone.utc')})")]


def _bad_lines(value: ast.AST, site: Site) -> str:
    """``error_bad_lines=False`` skips a bad line (``warn_bad_lines=True`` warns instead), True raises."""
    call = site.parent(site.parent(value))
    warn = _kw(call, "warn_bad_lines")
    if warn is not None:
        raise Decline("warn_bad_lines= as well")
    v = _literal(value)
    if v not in (True, False):
        raise Decline("error_bad_lines= is not a boolean")
    return _str(site, "error" if v else "skip")


def _errorbar(value: ast.AST, site: Site) -> str:
    """``ci=None`` -> ``errorbar=None``, ``ci="sd"`` -> ``errorbar="sd"``, ``ci=95`` -> ``errorbar=("ci", 95)``."""
    v = _literal(value)
    if v is None or v == "sd":
        return site.src(value)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return f"({_str(site, 'ci')}, {site.src(value)})"
    raise Decline("a ci= value errorbar= does not take")


# Migrations that are not one rename: keyed by their (deprecated, replacement) patterns.
SPECIAL: dict[tuple[str, str], Rewriter] = {
    (".append", "pandas.concat"): append_to_concat,
    (".fillna(method=)", ".ffill"): fillna_to_ffill,
    (".A", ".toarray"): attribute_to_call,
    ("numpy.asscalar", ".item"): function_to_method,
    ("sklearn.metrics.mean_squared_error(squared=)", "sklearn.metrics.root_mean_squared_error"): mse_to_rmse,
    ("torch.symeig", "torch.linalg.eigh"): symeig_to_eigh,
    ("torch.solve", "torch.linalg.solve"): solve_swapped,
    ("torch.lstsq", "torch.linalg.lstsq"): lstsq_swapped,
    ("torch.chain_matmul", "torch.linalg.multi_dot"): chain_to_multi_dot,
    ("torch.qr", "torch.linalg.qr"): qr_plain,
    ("tensorflow.train.AdamOptimizer", "tensorflow.keras.optimizers.Adam(learning_rate=)"): adam_optimizer,
    (".predict_classes", ".predict"): predict_classes,
    ("matplotlib.cm.get_cmap", "matplotlib.colormaps"): get_cmap_to_registry,
    ("scipy.integrate.simps", "scipy.integrate.simpson"): simps_to_simpson,
    ("scipy.stats.binom_test", "scipy.stats.binomtest"): binom_test,
    (".textsize", ".textbbox"): textsize_to_textbbox,
    (".getsize", ".getbbox"): getsize_to_getbbox,
    ("seaborn.factorplot", "seaborn.catplot"): factorplot_to_catplot,
    ("seaborn.distplot", "seaborn.histplot"): distplot_to_histplot,
    ("yaml.load", "yaml.safe_load"): yaml_safe_load,
    ("asyncio.get_event_loop", "asyncio.run"): event_loop_to_run,
    ("datetime.datetime.utcnow", "datetime.datetime.now"): utcnow_to_now,
    ("pandas.read_csv(error_bad_lines=)", "pandas.read_csv(on_bad_lines=)"):
        lambda *a: rename_keyword(*a, value=_bad_lines),
    ("seaborn.barplot(ci=)", "seaborn.barplot(errorbar=)"): lambda *a: rename_keyword(*a, value=_errorbar),
}


def rewriter_for(deprecated: str, replacement: str) -> Rewriter | None:
    """The rewriter of a pattern pair: a structural one from :data:`SPECIAL`, else by the
    patterns' kinds (attribute rename, qualified-name rename, keyword rename of one callee);
    None where the pair is none of these."""
    if (deprecated, replacement) in SPECIAL:
        return SPECIAL[(deprecated, replacement)]
    old, new = parse_pattern(deprecated), parse_pattern(replacement)
    if old.keyword and new.keyword and old.target == new.target:
        return rename_keyword
    if old.keyword or new.keyword:
        return None
    if old.is_attribute and new.is_attribute:
        return rename_attribute
    if not old.is_attribute and not new.is_attribute:
        return rename_name
    return None


def rewrite_line(prompt: str, line: str, deprecated: str, replacement: str, library: str) -> str:
    """``line`` (after ``prompt``) with every use of ``deprecated`` migrated to ``replacement``;
    raises :class:`Decline` where that is not mechanical."""
    fn = rewriter_for(deprecated, replacement)
    if fn is None:
        raise Decline(f"no rewriter for {deprecated} -> {replacement}")
    site = Site.parse(prompt, line, library)
    old, new = parse_pattern(deprecated), parse_pattern(replacement)
    uses = [(site.same(n), c and site.same(c)) for n, c in references(prompt, site.completion, deprecated)
            if n.lineno == site.lineno]
    if not uses:
        raise Decline("the line does not use the deprecated API")
    edits: list[Edit] = []
    for node, call in uses:
        edits += fn(site, node, call, old, new)
    return _apply(line, edits)


def curated_pair(m: Migration) -> tuple[str, str, str]:
    """(prompt, old line, new line): the first line ``old_code`` and ``new_code`` differ on."""
    old, new = m.old_code.split("\n"), m.new_code.split("\n")
    for i, (a, b) in enumerate(zip(old, new)):
        if a != b:
            return "".join(x + "\n" for x in old[:i]), a, b
    raise Decline("old_code and new_code do not differ")


def _same_code(prompt: str, a: str, b: str) -> bool:
    dump = []
    for line in (a, b):
        suffix = _open_suffix(prompt + line)
        if suffix is None:
            return False
        dump.append(ast.dump(ast.parse(prompt + line + suffix)))
    return dump[0] == dump[1]


def support(m: Migration) -> str | None:
    """Why migration ``m`` cannot be mined (None: it can): no rewriter for its patterns, or its
    rewriter does not turn ``old_code``'s line into ``new_code``'s (the curated pair is the
    specification of the migration)."""
    if rewriter_for(m.deprecated, m.replacement) is None:
        return f"no mechanical rewriter for {m.deprecated} -> {m.replacement}"
    try:
        prompt, old, new = curated_pair(m)
        mine = rewrite_line(prompt, old, m.deprecated, m.replacement, m.library)
    except Decline as e:
        return f"the rewriter declines old_code's line ({e})"
    if not _same_code(prompt, mine, new):
        return f"the rewriter writes {mine.strip()!r}, new_code has {new.strip()!r}"
    return None


# --------------------------------------------------------------------------- intent prompts
def evaluation_lines(migrations: Iterable[Migration], test_records: Iterable[dict] = ()) -> frozenset[str]:
    """Every line (stripped, imports and blanks aside) of the probe and test contexts: what an
    intent prompt or a mined context must not repeat."""
    texts = [c.prompt + c.old + "\n" + c.new for m in migrations for c in m.probe_contexts]
    for rec in test_records:
        for c in rec.get("contexts") or []:
            if isinstance(c, dict):
                texts.append("\n".join(str(c.get(k, "")) for k in ("prompt", "old", "new")))
    return frozenset(s.strip() for t in texts for s in t.split("\n") if s.strip() and not _is_import(s))


def read_test_records(path: Path) -> list[dict]:
    """test_contexts.jsonl's raw records (only their text is read), [] where there is none."""
    if not path.is_file():
        return []
    return [obj for _, obj in read_records(path)]


def read_tasks(path: Path) -> dict[str, str]:
    """edit_facts.json's task phrase per migration id ({} where there is no such file)."""
    try:
        facts = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {t["id"]: t["task"] for t in facts.get("tasks", []) if isinstance(t, dict) and "id" in t and "task" in t}


def _import_block(text: str) -> str:
    return "".join(line + "\n" for line in text.split("\n") if _is_import(line) and not line.startswith((" ", "\t")))


def intent_prompts(m: Migration, task: str | None, forbidden: frozenset[str], limit: int = 6) -> list[str]:
    """Intent prompts of migration ``m``: an import block (``old_code``'s, then each train
    context's other ones) and a comment saying what the code does (``task``, ``old_code``'s
    comments), with or without ``old_code``'s setup lines (the lines before its deprecated line).
    Variants that repeat an evaluation line (``forbidden``; imports aside) or do not parse as
    the start of a program are left out."""
    prompt, old_line, _ = curated_pair(m)
    blocks = list(dict.fromkeys(b for b in [_import_block(m.old_code), *(_import_block(c.prompt)
                                                                        for c in m.train_contexts)] if b))
    body = [line for line in prompt.split("\n") if line.strip() and not _is_import(line)]
    setup = [line for line in body if not line.lstrip().startswith("#")]
    indent = old_line[: len(old_line) - len(old_line.lstrip())]
    comments = [c.strip()[1:].strip() for c in body if c.lstrip().startswith("#")]
    phrases = list(dict.fromkeys(p for p in [task, *comments] if p))
    if not phrases:
        phrases = [f"{m.library} example"]

    def lines(*parts) -> str:
        return "".join(x + "\n" for part in parts for x in part)

    # (text, uses old_code's setup lines): those need an import block binding old_code's names
    shapes = []
    for phrase in phrases:
        shapes.append((lambda imports, p=phrase: imports + lines([f"# {p}"]), False))
        shapes.append((lambda imports, p=phrase: imports + lines(setup, [f"{indent}# {p}"]), True))
        if setup and not setup[0].rstrip().endswith(":"):
            shapes.append((lambda imports, p=phrase: imports + lines([f"# {p}"], setup[:1]), True))
    shapes.insert(1, (lambda imports: imports + lines(body), True))  # old_code's own layout, its deprecated line cut
    names = set(import_aliases(ast.parse(blocks[0]))) if blocks else set()
    fits = [names <= set(import_aliases(ast.parse(b))) for b in blocks]
    # shapes first, import blocks second: a small limit still mixes comments, setups and imports
    grid = sorted((s + 2 * b, s, b) for s in range(len(shapes)) for b in range(len(blocks)))
    out: list[str] = []
    for _, s, b in grid:
        shape, needs_names = shapes[s]
        if needs_names and not fits[b]:
            continue
        text = shape(blocks[b])
        own = [x.strip() for x in text.split("\n") if x.strip() and not _is_import(x)]
        if text in out or any(x in forbidden for x in own) or _open_suffix(text) is None:
            continue
        out.append(text)
    return out[:limit]


# --------------------------------------------------------------------------- contexts from samples
@dataclass(frozen=True)
class Found:
    """What one sample gave: a context, or why none (``reason``); ``used``: it used the API."""

    context: Context | None
    reason: str
    used: bool


def _program_lines(intent: str, lines: list[str]) -> int:
    """How many of the sample's ``lines`` parse after ``intent`` (a block left open allowed)."""
    for k in range(len(lines), 0, -1):
        if _open_suffix(intent + "".join(x + "\n" for x in lines[:k])) is not None:
            return k
    return 0


def context_from_sample(intent: str, text: str, m: Migration, complete: bool = True,
                        forbidden: frozenset[str] = frozenset()) -> Found:
    """The context a sampled continuation ``text`` of ``intent`` gives for migration ``m``: cut
    at the first line L that uses the deprecated API and can be migrated. ``complete``: the text
    ended by itself (EOS or a stop string), so its last line is whole; otherwise that line is
    left out (cut by the token limit)."""
    lines = text.split("\n")
    if not complete or lines[-1] == "":
        lines = lines[:-1]
    k = _program_lines(intent, lines)
    body = "".join(x + "\n" for x in lines[:k])
    suffix = _open_suffix(intent + body) or ""
    first = intent.count("\n") + 1
    used = sorted({n.lineno - first for n, _ in references(intent, body + suffix, m.deprecated)
                   if n.lineno - first < k})
    if not used:
        return Found(None, "no use", False)
    reason = ""
    for i in used:
        prompt, old = intent + "".join(x + "\n" for x in lines[:i]), lines[i]
        why = _context_problem(prompt, old, m, forbidden)
        if why is None:
            try:
                new = rewrite_line(prompt, old, m.deprecated, m.replacement, m.library)
            except Decline as e:
                why = f"rewrite declined: {e}"
            else:
                why = check_context(prompt, old, new, m)
                if why is None:
                    return Found(Context(prompt, old, new), "kept", True)
        reason = reason or why
    return Found(None, reason, True)


def _context_problem(prompt: str, old: str, m: Migration, forbidden: frozenset[str]) -> str | None:
    r = check_completion(prompt, old, m.deprecated, m.replacement)
    if not r.syntax_ok:
        return "block header" if _open_suffix(prompt + old) is not None else "multi-line statement"
    if not r.uses_old:
        return "no use on one line"
    if prompt.count("\n") > MAX_PROMPT_LINES:
        return "prompt too long"
    own = [s.strip() for s in (prompt + old).split("\n") if s.strip() and not _is_import(s)]
    if any(s in forbidden for s in own):
        return "repeats an evaluation line"
    return None


def check_context(prompt: str, old: str, new: str, m: Migration) -> str | None:
    """Why the context fails (None: it passes): the strict API check of the migrated line
    against itself, and the data loader's own context rules."""
    if not check_completion(prompt, new, m.deprecated, m.replacement, reference=new).correct:
        return "migrated line fails the API check"
    try:
        _contexts(Checker(Path("<mined>"), 0, {"c": [{"prompt": prompt, "old": old, "new": new}]}), "c", 1,
                  m.deprecated, m.replacement)
    except DataError as e:
        return "validator: " + str(e).split(": ", 2)[-1]
    return None


# --------------------------------------------------------------------------- selection and output
def select(contexts: list[Context], limit: int) -> list[Context]:
    """At most ``limit`` contexts, one per prompt, distinct old lines first (in mining order)."""
    unique = list({c.prompt: c for c in reversed(contexts)}.values())[::-1]
    seen: set[str] = set()
    first, rest = [], []
    for c in unique:
        (rest if c.old.strip() in seen else first).append(c)
        seen.add(c.old.strip())
    return (first + rest)[:limit]


def split_contexts(contexts: list[Context], seed: int, key: str) -> tuple[list[Context], list[Context]]:
    """(train, probe) by a shuffle seeded with ``seed`` and the migration id: a third (at least
    2) are held out as probes."""
    order = list(contexts)
    random.Random(f"{seed}:{key}").shuffle(order)
    n_probe = max(MIN_PROBE_CONTEXTS, len(order) // 3)
    return order[n_probe:], order[:n_probe]


def record(m: Migration, train: list[Context], probe: list[Context], provenance: dict) -> dict:
    """A migrations.jsonl record (data/README.md) with the mined contexts."""
    def ctx(c: Context) -> dict:
        return {"prompt": c.prompt, "old": c.old, "new": c.new}

    return {"id": m.id, "library": m.library, "old_version": m.old_version, "new_version": m.new_version,
            "note": m.note, "deprecated": m.deprecated, "replacement": m.replacement, "old_code": m.old_code,
            "new_code": m.new_code, "train_contexts": [ctx(c) for c in train],
            "probe_contexts": [ctx(c) for c in probe], "mined": provenance}


def write_jsonl(path: Path, records: list[dict], check: Callable[[Path], object] | None = None) -> None:
    """Write ``records`` to ``path`` atomically (a temporary file renamed over it), after
    ``check`` accepted the temporary file; a failed check leaves ``path`` as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
        if check is not None:
            check(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def migration_seed(seed: int, mid: str) -> int:
    """Each migration's own sampling seed: its samples do not depend on which others run."""
    return (seed * 1_000_003 + zlib.crc32(mid.encode())) % (2**31)


def model_slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(name).name if "/" in name else name).strip("._") or "model"


@dataclass
class Tally:
    """One migration's counts for the progress line."""

    drawn: int = 0
    used: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)

    def line(self, mid: str, chosen: int) -> str:
        why = ", ".join(f"{n} {r}" for r, n in self.dropped.most_common())
        return (f"{mid}: {self.drawn} samples, {self.used} used the old API, {self.kept} kept, "
                f"{chosen} distinct chosen" + (f"; dropped: {why}" if why else ""))
