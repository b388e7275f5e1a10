"""Rules + prompt baseline: no weights change; the prompt carries the update.

Rules are extracted automatically from the migration data: for each migration, the line that
``old_code`` -> ``new_code`` changes (difflib) gives a concrete rewrite, e.g.
``df = df.append(row, ignore_index=True) -> df = pd.concat([df, row], ignore_index=True)``,
and the ``deprecated`` / ``replacement`` AST patterns name the calls (``.append`` ->
``pandas.concat``). Only ``old_code`` / ``new_code`` and the patterns are read, never the train
or probe contexts, so no evaluation prompt leaks into a rule.

Prompt strategies. The models scored here are base code LMs (the testbed has ~1 M parameters and
256 positions): they do not follow instructions, so every strategy is a few *comment lines*
placed before the unchanged code prompt, and the completion is scored by the shared evaluation
(``trainables.evaluation.evaluate``) exactly like a trained method's:

- ``basic``: the code prompt alone (the base model; the zero row of the comparison);
- ``context``: a ``# requires: <lib>>=<version>`` line per library: the form in which real code
  states its environment (requirements headers, PEP 723 ``dependencies``), and the form in which
  the testbed saw its few new-API files (``trainables.data.version_tag``);
- ``rules``: ``# <lib>>=<version>: <old line> -> <new line>`` rewrite rules;
- ``cot``: "chain of thought" as far as a code model can take it: the version line, the rules
  as numbered steps and a last step saying to write the new API. A 1 M-parameter model cannot
  reason; this measures whether a step-by-step scaffold in comments helps or hurts completion.

``knowledge`` says which updates the comments describe:

- ``library`` (the default; what a deployment knows): every library the prompt imports at its
  newest version in the data, and the ``max_rules`` rules of those libraries whose old line
  shares the most identifiers with the prompt. Probes, locality snippets and lookalikes are
  treated alike: a deployment cannot tell them apart, so neither can the header;
- ``oracle``: the one migration the prompt belongs to (CodeUpdateArena's update-in-context
  protocol, where the relevant update is given). Lookalikes get the notes of the migration they
  resemble, locality snippets (no migration) the ``library`` comments. The search never picks
  it: a figure reached with an oracle is not a baseline a deployment can run (``--config`` with
  ``knowledge: oracle`` runs it).

``temperature > 0`` samples instead of greedy decoding: the shared greedy decoder runs on logits
divided by the temperature plus Gumbel noise, whose argmax is an exact sample from
``softmax(logits / T)`` (the Gumbel-max trick), so the evaluation code stays the one all methods
share.
"""
from __future__ import annotations

import ast
import difflib
import json
import re
from dataclasses import asdict, dataclass

from trainables.common import RunSettings

STRATEGIES = ("basic", "context", "rules", "cot")
KNOWLEDGE = ("library", "oracle")


@dataclass
class PromptConfig(RunSettings):
    """One evaluation of a prompt strategy. Nothing is trained (trainable_params = 0)."""

    model: str = "testbed"
    dataset: str | None = None  # migrations (data/README.md format) to extract rules from; None = data/
    strategy: str = "rules"  # basic | context | rules | cot
    knowledge: str = "library"  # library (imports + the data's rules) | oracle (the prompt's own migration)
    max_rules: int = 3  # library knowledge: rules per prompt; each costs ~25 of the testbed's 256 positions
    temperature: float = 0.0  # 0 = greedy, as every trained method is scored

    def __post_init__(self) -> None:
        from trainables.models import check_dtype

        check_dtype(self.dtype)
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.knowledge not in KNOWLEDGE:
            raise ValueError(f"knowledge must be one of {', '.join(KNOWLEDGE)}, got {self.knowledge!r}")
        if not 1 <= self.max_rules <= 10:
            raise ValueError(f"max_rules must be in [1, 10], got {self.max_rules}")
        if not 0 <= self.temperature <= 2:
            raise ValueError(f"temperature must be in [0, 2] (0 = greedy), got {self.temperature}")
        if self.workers != 1:
            raise ValueError("the prompt baseline runs in one process: use --workers-per-trial 1")
        if self.dataset:
            from trainables.data import detect_format

            if detect_format(self.dataset) != "migrations":
                raise ValueError(f"prompt: rules come from a migrations file (data/README.md format); "
                                 f"{self.dataset} is not one (ReCode records carry no AST patterns)")

    def layer_range(self, n_layers: int) -> tuple[int, int]:
        """No layer is changed: the empty range."""
        return 0, 0


# --------------------------------------------------------------------------- rules
@dataclass(frozen=True)
class Rule:
    migration: str
    library: str
    version: str
    old: str  # the deprecated line of old_code
    new: str  # its migrated line in new_code
    deprecated: str  # AST patterns
    replacement: str

    def text(self) -> str:
        return f"{self.library}>={self.version}: {self.old} -> {self.new}"


def _version_key(v: str) -> tuple:
    return tuple(int(x) if x.isdigit() else 0 for x in re.findall(r"\d+", v))


def extract_rules(migrations) -> list[Rule]:
    """One rule per migration: the first line that differs between old_code and new_code."""
    rules = []
    for m in migrations:
        old, new = m.old_code.splitlines(), m.new_code.splitlines()
        pair = None
        for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, old, new, autojunk=False).get_opcodes():
            if tag == "replace":
                pair = (old[i1].strip(), new[j1].strip())
                break
        if pair is None:  # a pure insertion or deletion: fall back to the patterns
            pair = (m.deprecated, m.replacement)
        rules.append(Rule(m.id, m.library, m.new_version, pair[0], pair[1], m.deprecated, m.replacement))
    return rules


def imported_libraries(prompt: str) -> list[str]:
    """Top-level modules a prompt imports, in order (a prompt that does not parse: by regex)."""
    try:
        tree = ast.parse(prompt)
        names = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names += [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.append(node.module.split(".")[0])
    except SyntaxError:
        names = re.findall(r"^\s*(?:from|import)\s+([A-Za-z_]\w*)", prompt, flags=re.M)
    return list(dict.fromkeys(names))


def _idents(text: str) -> set[str]:
    return set(re.findall(r"[A-Za-z_]\w*", text))


class PromptBuilder:
    """Comment headers for a strategy, from the rules of a migration set."""

    def __init__(self, rules: list[Rule], strategy: str, knowledge: str, max_rules: int):
        self.strategy, self.knowledge, self.max_rules = strategy, knowledge, max_rules
        self.by_migration = {r.migration: r for r in rules}
        self.by_library: dict[str, list[Rule]] = {}
        for r in rules:
            self.by_library.setdefault(r.library, []).append(r)
        self.newest = {lib: max((r.version for r in rs), key=_version_key) for lib, rs in self.by_library.items()}

    def _library_knowledge(self, prompt: str) -> tuple[list[tuple[str, str]], list[Rule]]:
        libs = [lib for lib in imported_libraries(prompt) if lib in self.by_library]
        versions = [(lib, self.newest[lib]) for lib in libs]
        words = _idents(prompt)
        ranked = sorted((r for lib in libs for r in self.by_library[lib]),
                        key=lambda r: -len(words & _idents(r.old)))  # stable: data order breaks ties
        return versions, ranked[: self.max_rules]

    def header(self, prompt: str, migration: str | None) -> str:
        """The comments before ``prompt``; ``migration``: the one it belongs to or resembles,
        read only by the oracle."""
        if self.strategy == "basic":
            return ""
        if migration is not None and self.knowledge == "oracle":
            r = self.by_migration[migration]
            versions, rules = [(r.library, r.version)], [r]
        else:
            versions, rules = self._library_knowledge(prompt)
        if not versions:
            return ""
        if self.strategy == "context":
            return "".join(f"# requires: {lib}>={v}\n" for lib, v in versions)
        if self.strategy == "rules":
            return "".join(f"# rule: {r.text()}\n" for r in rules)
        steps = ["# Let's think step by step."]
        steps += [f"# requires: {lib}>={v}" for lib, v in versions]
        steps += [f"# Step {i}: {r.library} {r.version} replaced `{r.old}` with `{r.new}`."
                  for i, r in enumerate(rules, 1)]
        steps.append(f"# Step {len(rules) + 1}: so the next line uses the new API.")
        return "\n".join(steps) + "\n"


# --------------------------------------------------------------------------- sampling
def gumbel_sampler(model, temperature: float, seed: int):
    """``model`` whose next-token logits are ``logits / T + Gumbel noise``: the shared greedy
    decoder (argmax) then draws exact samples from softmax(logits / T)."""
    import torch

    class GumbelSampler(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model
            self.gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)

        @property
        def config(self):
            return self.inner.config

        def forward(self, *args, **kwargs):
            out = self.inner(*args, **kwargs)
            u = torch.rand(out.logits.shape, generator=self.gen, device=out.logits.device,
                           dtype=out.logits.dtype).clamp_(1e-10, 1 - 1e-10)
            out.logits = out.logits / temperature - torch.log(-torch.log(u))
            return out

    return GumbelSampler()


# --------------------------------------------------------------------------- the trial
def fit(cfg: PromptConfig, session) -> dict:
    """Nothing to train: one final evaluation with every prompt behind its header."""
    from trainables.data import load_migrations
    from trainables.models import load_model

    model, tokenizer = load_model(cfg.model, device=session.device, dtype=cfg.dtype)
    migrations = load_migrations()  # evaluation: always data/
    rules = extract_rules(load_migrations(cfg.dataset) if cfg.dataset else migrations)
    builder = PromptBuilder(rules, cfg.strategy, cfg.knowledge, cfg.max_rules)
    # every prompt behind its header; the base completions stay the plain prompts' greedy ones
    data = session.eval_data.with_prompts(lambda p, mid: builder.header(p, mid) + p)
    scorer = gumbel_sampler(model, cfg.temperature, cfg.seed) if cfg.temperature > 0 else model
    header_lines = [builder.header(c.prompt, m.id).count("\n") for m in migrations for c in m.probe_contexts]
    session.common.update(trainable_params=0)
    session.end_epoch(1, True, scorer, tokenizer, save=lambda path: None, eval_data=data,
                      extra={"header_lines": sum(header_lines) / max(1, len(header_lines)), "n_rules": len(rules)},
                      files={"rules.json": json.dumps([asdict(r) for r in rules], indent=1)})
    return session.last
