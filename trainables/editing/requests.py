"""Knowledge-edit requests built from the migrations (ROME / MEMIT's input format).

ROME and MEMIT rewrite a fact ``(subject, relation) -> object`` stored in MLP weights, keyed by
the subject's last token. Their input is a request ``{prompt, subject, target_new,
target_true}`` where the prompt contains the subject and ends where the object is predicted.
For an API migration the object is the API as the old library spells it (``append``,
``iteritems``, ``error_bad_lines``) or its replacement (``concat``, ``items``,
``on_bad_lines``): the shortest strings that tell the two worlds apart.

The subject is what the API is *for*, in a few words of our own (``adding rows to a frame``;
``data/edit_facts.json``), never the deprecated name itself. Keyed on the name, the old fact
reads "# pandas api append: use" -> " append": a copy of a token already in the prompt, which a
model does with attention, not with an MLP lookup at the subject, so no value vector at the
subject could outvote it (measured: ROME's own v* optimisation reached P(new) 0.03-0.4 at
every layer, with a clamp of 20, and no edit took). A task phrase has to be *recalled*: the
fact lives where ROME looks for it.

The testbed learns these statements only with ``TestbedConfig.edit_statements`` (off by
default): every template below with each migration's old object. Template 0 is the edit prompt;
templates 1-2 are its paraphrases (generalization); each library's stable API (``merge``,
``zeros``, ...) in the same templates is the neighbourhood: it must keep its own name after
every edit. The subject ends each prompt, so the object is predicted right after its last token.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

# Comment lines a codebase could hold; no braces beyond the fields, because easyeditor formats
# prompts with str.format.
TEMPLATES = (
    "# {library} call for {task}",
    "# the {library} function used for {task}",
    "# {library} helper doing {task}",
)
FACTS_FILE = "edit_facts.json"


@dataclass(frozen=True)
class Facts:
    """``edit_facts.json`` of a data folder: a task phrase per migration id, and per library a
    stable API with its own task phrase (the neighbourhood)."""

    tasks: dict[str, str]
    neighbours: dict[str, tuple[str, str]]  # library -> (api, task)


def load_facts(path: str | Path | None = None) -> Facts:
    from trainables.data import data_dir

    path = Path(path or data_dir() / FACTS_FILE)
    try:
        doc = json.loads(path.read_text())
        tasks = {r["id"]: r["task"] for r in doc["tasks"]}
        neighbours = {r["library"]: (r["api"], r["task"]) for r in doc["neighbours"]}
    except FileNotFoundError:
        raise ValueError(f"{path}: missing; knowledge editing needs a task phrase per migration "
                         f"(format: data/README.md)") from None
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: bad edit facts ({type(e).__name__}: {e})") from None
    for text in [*tasks.values(), *(t for _, t in neighbours.values())]:
        if not text or "{" in text or "}" in text:
            raise ValueError(f"{path}: task phrases must be non-empty and brace-free, got {text!r}")
    return Facts(tasks, neighbours)


_CALL = re.compile(r"^(?P<callee>[\w.]*?)(?:\((?P<kw>\w+)=\))?$")


@dataclass(frozen=True)
class EditRequest:
    migration_id: str
    subject: str  # the task phrase, as it appears in the prompt
    prompt: str  # template 0 with the subject in place (ends right before the object)
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


def objects(deprecated: str, replacement: str) -> tuple[str, str]:
    """(old object, new object) for one migration's AST patterns.

    - a renamed keyword of the same callee (``read_csv(error_bad_lines=)`` ->
      ``read_csv(on_bad_lines=)``): the keywords;
    - a renamed callee (``.append`` -> ``pandas.concat``, ``fillna(method=)`` -> ``.ffill``):
      the last name of each;
    - the same last name under a new module (``torch.qr`` -> ``torch.linalg.qr``): the last two
      names, so the objects differ (``torch.qr`` vs ``linalg.qr``).
    """
    old, old_kw = _parts(deprecated)
    new, new_kw = _parts(replacement)
    if old_kw and new_kw and old[-1:] == new[-1:]:
        return old_kw, new_kw
    if old[-1] != new[-1]:
        return old[-1], new[-1]
    return ".".join(old[-2:]), ".".join(new[-2:])


def requests_for(migrations, facts: Facts | None = None) -> list[EditRequest]:
    facts = facts or load_facts()
    missing = [m.id for m in migrations if m.id not in facts.tasks]
    missing += [f"library {m.library}" for m in migrations if m.library not in facts.neighbours]
    if missing:
        raise ValueError(f"{FACTS_FILE}: no task phrase for {', '.join(sorted(set(missing)))}")
    out = []
    for m in migrations:
        old, new = objects(m.deprecated, m.replacement)
        task = facts.tasks[m.id]
        stable, stable_task = facts.neighbours[m.library]
        prompts = [t.format(library=m.library, task=task) for t in TEMPLATES]
        out.append(EditRequest(m.id, task, prompts[0], new, old, tuple(prompts[1:]),
                               TEMPLATES[0].format(library=m.library, task=stable_task), stable))
    return out


def statements(migrations, facts: Facts | None = None) -> list[tuple[str, str]]:
    """(prompt, completion) pretraining pairs: every template of every migration with its old
    object, the same behind the version header with its new object (the testbed's code corpus
    does the same: a model has seen the new names, in the few files that state the new
    version), and each library's stable API with its own name."""
    from trainables.data import version_tag

    facts = facts or load_facts()
    pairs = []
    by_id = {m.id: m for m in migrations}
    for r in requests_for(migrations, facts):
        tag = version_tag(by_id[r.migration_id])
        for prompt in (r.prompt, *r.paraphrases):
            pairs.append((prompt, " " + r.target_old))
            pairs.append((tag + prompt, " " + r.target_new))
    for library in sorted({m.library for m in migrations}):
        stable, task = facts.neighbours[library]
        pairs += [(t.format(library=library, task=task), " " + stable) for t in TEMPLATES]
    return pairs
