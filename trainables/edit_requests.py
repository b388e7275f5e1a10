"""Knowledge-edit requests built from the migrations (ROME / MEMIT's input format).

ROME and MEMIT rewrite a fact ``(subject, relation) -> object`` stored in MLP weights, keyed by
the subject's last token. Their input is a request ``{prompt, subject, target_new,
target_true}`` where the prompt contains the subject and ends where the object is predicted.
For an API migration the subject is the deprecated name as written in code (``append``,
``iteritems``, ``error_bad_lines``), the old object is that API as the old library spells it and
the new object is its replacement (``concat``, ``items``, ``on_bad_lines``): the shortest strings
that tell the two worlds apart, so most targets are one or two BPE tokens.

A code model sees the deprecated name *inside* the line it completes (``df = df.append(``), so
a ROME edit keyed on that name cannot steer the tokens before it. The testbed therefore learns
subject-keyed statements as well (``TestbedConfig.edit_statements``, off by default): each
migration's facts in the three comment templates below, always with the old object. Template 0
is the edit prompt; templates 1-2 are its paraphrases (generalization); the other migrations'
template-0 prompts are the neighbourhood (they must keep their old object).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

# Comment lines a codebase could hold ("# pandas append: use append"); no braces, because
# easyeditor formats prompts with str.format.
TEMPLATES = (
    "# {library} api {subject}: use",
    "# in {library} code, the {subject} call is spelled",
    "# {library}: instead of guessing {subject}, write",
)

# Neighbourhood (ROME's "neighborhood success"): per library, a stable API that no migration
# touches. Its statement is in the same template, is learnt the same way, and must keep
# predicting its own name after every edit (rather than an edit's new object).
NEIGHBOURS = {
    "pandas": "merge", "numpy": "zeros", "sklearn": "fit_transform", "torch": "matmul",
    "tensorflow": "reduce_sum", "matplotlib": "subplots", "scipy": "minimize", "PIL": "open",
    "seaborn": "lineplot", "yaml": "dump", "collections": "defaultdict", "asyncio": "sleep",
    "datetime": "timedelta", "urllib3": "PoolManager", "networkx": "Graph", "transformers": "AutoModel",
    "unittest": "assertTrue", "time": "sleep",
}
DEFAULT_NEIGHBOUR = "get"

_CALL = re.compile(r"^(?P<callee>[\w.]*?)(?:\((?P<kw>\w+)=\))?$")


@dataclass(frozen=True)
class EditRequest:
    migration_id: str
    subject: str  # the deprecated name, as it appears in the prompt
    prompt: str  # template 0 with the subject in place (ends before the object)
    target_new: str  # replacement, no leading space (ROME / MEMIT prepend one)
    target_old: str
    paraphrases: tuple[str, ...]  # templates 1.. with the subject in place
    neighbour_prompt: str  # template 0 for a stable API of the same library
    neighbour_target: str  # what that prompt must keep predicting

    def easyedit(self) -> dict:
        """The dict easyeditor's apply_*_to_model takes (prompt with ``{}`` for the subject)."""
        return {"prompt": self.prompt.replace(self.subject, "{}", 1), "subject": self.subject,
                "target_new": self.target_new, "target_true": self.target_old,
                "case_id": self.migration_id}


def _parts(pattern: str) -> tuple[list[str], str | None]:
    m = _CALL.match(pattern)
    if not m:
        raise ValueError(f"unsupported API pattern {pattern!r}")
    return [p for p in m.group("callee").split(".") if p], m.group("kw")


def subject_and_targets(deprecated: str, replacement: str) -> tuple[str, str, str]:
    """(subject, target_old, target_new) for one migration's AST patterns.

    - a renamed keyword of the same callee (``read_csv(error_bad_lines=)`` ->
      ``read_csv(on_bad_lines=)``): the keyword;
    - a renamed callee (``.append`` -> ``pandas.concat``, ``fillna(method=)`` -> ``.ffill``):
      the last name of each;
    - the same last name under a new module (``torch.qr`` -> ``torch.linalg.qr``): the last two
      names, so the targets differ (``torch.qr`` vs ``linalg.qr``), the subject stays ``qr``.
    """
    old, old_kw = _parts(deprecated)
    new, new_kw = _parts(replacement)
    if old_kw and new_kw and old[-1:] == new[-1:]:
        return old_kw, old_kw, new_kw
    if old[-1] != new[-1]:
        return old[-1], old[-1], new[-1]
    return old[-1], ".".join(old[-2:]), ".".join(new[-2:])


def requests_for(migrations) -> list[EditRequest]:
    out = []
    for m in migrations:
        subject, old, new = subject_and_targets(m.deprecated, m.replacement)
        fill = {"library": m.library, "subject": subject}
        stable = NEIGHBOURS.get(m.library, DEFAULT_NEIGHBOUR)
        out.append(EditRequest(m.id, subject, TEMPLATES[0].format(**fill), new, old,
                               tuple(t.format(**fill) for t in TEMPLATES[1:]),
                               TEMPLATES[0].format(library=m.library, subject=stable), stable))
    return out


def statements(migrations) -> list[tuple[str, str]]:
    """(prompt, completion) pretraining pairs: every template of every migration with its old
    object, and of each library's neighbour API with its own name."""
    pairs = []
    for r in requests_for(migrations):
        for prompt in (r.prompt, *r.paraphrases):
            pairs.append((prompt, " " + r.target_old))
    for library in sorted({m.library for m in migrations}):
        stable = NEIGHBOURS.get(library, DEFAULT_NEIGHBOUR)
        pairs += [(t.format(library=library, subject=stable), " " + stable) for t in TEMPLATES]
    return pairs
