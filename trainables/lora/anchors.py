"""Anchor code for the no-forgetting KL: short windows of CPython's own standard library.

The LoRA loop's KL term (``trainables.adapters.prompt_kl``) keeps the adapted model's next-token
distributions equal to the base model's on the *prompt* tokens of the training pairs. Those are
all library code around the migrations, so nothing holds the update back on unrelated code, and
that is where locality is lost: on the testbed the best hier-LoRA configs broke method calls in
plain Python (``no_comma.split()`` -> ``no_comma.get_oton_a_fet``). Anchor rows are windows of
ordinary code appended to each training batch with no language-model loss, only the KL: the
update must leave them alone. The standard library is on every machine that runs Python, is
not the evaluation's locality set (hand-written snippets in ``data/locality.jsonl``) and is
not downloaded.

The windows are drawn with a fixed seed from a fixed list of pure-Python modules, so a run is
reproducible on one Python version; another version's library gives other windows. Windows that
share a line with the locality set are dropped (decontamination: the standard library has
idioms such as ``args = parser.parse_args()`` that a hand-written snippet can repeat).
"""
from __future__ import annotations

import random
import sysconfig
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

# Pure-Python standard-library modules (present from 3.9 on), general-purpose code.
MODULES = (
    "textwrap", "string", "shlex", "fnmatch", "glob", "csv", "json/encoder", "json/decoder", "heapq",
    "bisect", "colorsys", "calendar", "difflib", "filecmp", "fractions", "statistics", "pprint", "random",
    "shutil", "tempfile", "tokenize", "zipfile", "gzip", "base64", "quopri", "ftplib", "smtplib", "mailbox",
    "configparser", "argparse", "optparse", "getopt", "logging/__init__", "dataclasses", "enum", "functools",
    "operator", "inspect", "ast", "dis", "pickletools", "traceback", "linecache", "netrc", "plistlib",
    "html/parser", "http/cookies", "urllib/parse", "ipaddress", "uuid", "secrets", "hmac", "datetime",
    "locale", "gettext", "codecs", "sched", "queue", "threading", "selectors", "socketserver", "wave",
    "tarfile", "lzma", "bz2", "zipapp", "compileall", "py_compile", "pydoc", "timeit", "cProfile", "pstats",
    "trace", "tracemalloc", "contextlib", "abc", "numbers", "decimal", "copy", "reprlib", "weakref", "types",
    "typing", "collections/__init__", "_collections_abc", "posixpath", "ntpath", "pathlib", "os", "stat",
    "io", "_pyio", "subprocess", "signal",
)
PER_MODULE = 40  # windows drawn from each module
LINES = 4  # lines per window


def _code_lines(text: str) -> list[str]:
    """Lines worth anchoring on: code (no blank, comment or docstring-quote lines), < 100 chars."""
    return [ln for ln in text.splitlines()
            if ln.strip() and not ln.strip().startswith("#") and len(ln) < 100 and '"""' not in ln and "'''" not in ln]


@lru_cache(maxsize=4)
def stdlib_windows(seed: int = 0, exclude: frozenset[str] = frozenset()) -> tuple[str, ...]:
    """Dedented windows of ``LINES`` consecutive code lines, ``PER_MODULE`` per module, shuffled;
    none with a line (stripped) in ``exclude``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    rng = random.Random(seed)
    out: list[str] = []
    for name in MODULES:
        path = root / f"{name}.py"
        if not path.is_file():
            path = root / name / "__init__.py"
            if not path.is_file():
                continue
        src = _code_lines(path.read_text(encoding="utf-8", errors="ignore"))
        for _ in range(PER_MODULE if len(src) > LINES else 0):
            i = rng.randrange(len(src) - LINES)
            window = src[i : i + LINES]
            if any(ln.strip() in exclude for ln in window):
                continue
            indent = min(len(ln) - len(ln.lstrip()) for ln in window)
            out.append("\n".join(ln[indent:] for ln in window) + "\n")
    rng.shuffle(out)
    return tuple(out)


def locality_lines(min_chars: int = 20) -> frozenset[str]:
    """The lines (stripped) of the evaluation's locality snippets, prompts and completions, of at
    least ``min_chars`` characters: statements, not ``try:`` or ``return None``."""
    from trainables.data import load_locality

    return frozenset(ln.strip() for s in load_locality() for ln in (s.prompt + s.completion).splitlines()
                     if len(ln.strip()) >= min_chars)


class AnchorPool(Sequence):
    """The windows tokenized as the training pairs are (BOS first), cut at ``max_length``, on
    first access, ``BLOCK`` windows at a time: a trial reads the first few hundred of ~3,700
    (tokenizing all of them took ~0.55 s a trial)."""

    BLOCK = 256

    def __init__(self, tokenizer, windows: tuple[str, ...], max_length: int):
        self.tokenizer, self.windows, self.max_length = tokenizer, windows, max_length
        from trainables.tokens import start_ids

        self._bos = start_ids(tokenizer)
        self._blocks: dict[int, list[list[int]]] = {}

    def __len__(self) -> int:
        return len(self.windows)

    def _row(self, i: int) -> list[int]:
        b = i // self.BLOCK
        if b not in self._blocks:
            texts = list(self.windows[b * self.BLOCK : (b + 1) * self.BLOCK])
            self._blocks[b] = [(self._bos + ids)[: self.max_length]
                               for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]
        return self._blocks[b][i % self.BLOCK]

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._row(j) for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        return self._row(i % len(self))


def anchor_ids(tokenizer, max_length: int, seed: int = 0) -> AnchorPool:
    """The windows (decontaminated against the locality set) as token ids: an
    :class:`AnchorPool` (a sequence of id lists)."""
    windows = stdlib_windows(seed, locality_lines())
    if len(windows) < 100:
        raise ValueError(f"anchors: found only {len(windows)} code windows in the standard library at "
                         f"{sysconfig.get_paths()['stdlib']} (is its source installed?); set anchors to 0")
    return AnchorPool(tokenizer, windows, max_length)
