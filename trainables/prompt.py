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
  reason; this measures whether a step-by-step scaffold in comments helps or hurts completion;
- ``insert``: InsertPrompt (Wang et al., "LLMs Meet Library Evolution", ICSE'25): a line
  ``# <old API> is deprecated, use <new API> instead`` per rule, the APIs spelt from the
  patterns (``.append``, ``pandas.concat``, ``pandas.read_csv(error_bad_lines=...)``);
- ``replace``: ReplaceAPI (the same paper): no header; where a completion uses a deprecated
  API, it is cut where that reference begins, the replacement is spliced in (spelt with the
  prompt's import aliases) and the model goes on decoding from there (:class:`ReplaceApi`, the
  shared evaluation's ``repair`` hook). It rewrites every prompt kind alike, lookalikes included.

``knowledge`` says which updates the comments describe:

- ``library`` (the default; what a deployment knows): every library the prompt imports at its
  newest version in the data, and the ``max_rules`` rules of those libraries whose old line
  shares the most identifiers with the prompt. Probes, locality snippets and lookalikes are
  treated alike: a deployment cannot tell them apart, so neither can the header. ReplaceAPI
  watches every rule of those libraries (a rewrite costs no prompt positions);
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

from trainables.apicheck import check_completion, import_aliases, parse_pattern, references
from trainables.common import RunSettings

STRATEGIES = ("basic", "context", "rules", "cot", "insert", "replace")
KNOWLEDGE = ("library", "oracle")


@dataclass
class PromptConfig(RunSettings):
    """One evaluation of a prompt strategy. Nothing is trained (trainable_params = 0)."""

    model: str = "testbed"
    dataset: str | None = None  # migrations (data/README.md format) to extract rules from; None = data/
    strategy: str = "rules"  # basic | context | rules | cot | insert | replace
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

    def deprecation(self) -> str:
        """InsertPrompt's line: ``.append is deprecated, use pandas.concat instead``."""
        return f"{api_name(self.deprecated)} is deprecated, use {api_name(self.replacement)} instead"


def api_name(pattern: str) -> str:
    """An API pattern as a developer reads it: ``.append``, ``pandas.concat``,
    ``pandas.read_csv(error_bad_lines=...)``."""
    p = parse_pattern(pattern)
    return p.target + (f"({p.keyword}=...)" if p.keyword else "")


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

    def watched(self, prompt: str, migration: str | None) -> list[Rule]:
        """ReplaceAPI's rules for ``prompt``: the oracle's migration, else every rule of the
        libraries the prompt imports."""
        if migration is not None and self.knowledge == "oracle":
            return [self.by_migration[migration]]
        return [r for lib in imported_libraries(prompt) for r in self.by_library.get(lib, [])]

    def header(self, prompt: str, migration: str | None) -> str:
        """The comments before ``prompt``; ``migration``: the one it belongs to or resembles,
        read only by the oracle."""
        if self.strategy in ("basic", "replace"):
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
        if self.strategy == "insert":
            return "".join(f"# {r.deprecation()}\n" for r in rules)
        steps = ["# Let's think step by step."]
        steps += [f"# requires: {lib}>={v}" for lib, v in versions]
        steps += [f"# Step {i}: {r.library} {r.version} replaced `{r.old}` with `{r.new}`."
                  for i, r in enumerate(rules, 1)]
        steps.append(f"# Step {len(rules) + 1}: so the next line uses the new API.")
        return "\n".join(steps) + "\n"


# --------------------------------------------------------------------------- ReplaceAPI
# splices per statement: a continuation may use a deprecated API again, as in the paper's loop
REPLACE_ROUNDS = 3


def _spell(target: str, aliases: dict[str, str]) -> str:
    """``target`` as the program names it: through the import whose qualified name is its
    longest prefix (``pd.concat``, ``datetime.now``), else in full."""
    best = max((q for q in aliases.values() if target == q or target.startswith(q + ".")), key=len, default=None)
    if best is None:
        return target
    name = next(n for n, q in aliases.items() if q == best)
    return name + target[len(best):]


def splice(prompt: str, statement: str, rules: list[Rule], start: int = 0) -> str | None:
    """ReplaceAPI's new start of ``statement``: cut where its first use (at or after offset
    ``start``) of a deprecated API of ``rules`` begins, with the replacement spliced in; None
    where it uses none there (or the replacement cannot be spelt).

    An attribute is cut before its receiver (``log = log.append(x)`` -> ``log = pd.concat(``,
    ``enc.get_feature_names()`` -> ``enc.get_feature_names_out(``), a qualified name before its
    first part (``dtype=np.float`` -> ``dtype=float``), a keyword pattern of the same call at the
    keyword (``OneHotEncoder(sparse=False)`` -> ``OneHotEncoder(sparse_output=``). A called API
    stays called: the splice ends with the call's bracket."""
    program = prompt + statement
    lines = program.split("\n")
    line_start = [0]
    for line in lines:
        line_start.append(line_start[-1] + len(line) + 1)

    def at(lineno: int, col: int) -> int:  # ast columns count UTF-8 bytes
        return line_start[lineno - 1] + len(lines[lineno - 1].encode()[:col].decode(errors="ignore")) - len(prompt)

    hits = []
    for order, r in enumerate(rules):
        if not check_completion(prompt, statement, r.deprecated, r.replacement).uses_old:
            continue
        for node, call in references(prompt, statement, r.deprecated):
            if at(node.lineno, node.col_offset) >= start:
                hits.append((at(node.lineno, node.col_offset), order, node, call, r))
                break
    if not hits:
        return None
    cut, _, node, call, rule = min(hits, key=lambda h: h[:2])
    old, new = parse_pattern(rule.deprecated), parse_pattern(rule.replacement)
    if old.keyword and new.keyword and old.target == new.target:
        kw = next(k for k in call.keywords if k.arg == old.keyword)
        return statement[: at(kw.lineno, kw.col_offset)] + f"{new.keyword}="
    if new.is_attribute:
        if old.is_attribute:  # the receiver and its dot, as written
            receiver = statement[cut: at(node.end_lineno, node.end_col_offset) - len(node.attr)]
        elif call is not None and call.args:  # a function of its argument becomes its method
            arg = call.args[0]
            receiver = statement[at(arg.lineno, arg.col_offset): at(arg.end_lineno, arg.end_col_offset)]
            if not isinstance(arg, (ast.Name, ast.Attribute, ast.Call, ast.Subscript)):
                receiver = f"({receiver})"
            receiver += "."
        else:
            return None
        text = receiver + new.target[1:]
    else:
        # the check's own import resolution, so the spliced name resolves to the replacement under it
        text = _spell(new.target, import_aliases(ast.parse(program)))
    if new.keyword:
        text += f"({new.keyword}="
    elif call is not None:
        # without the bracket the testbed extended `cnn.fit` back into `cnn.fit_generator` and
        # `self.assertEqual` into `assertEquals`; a method turned function also needs it for its receiver
        text += "("
    return statement[:cut] + text


class ReplaceApi:
    """ReplaceAPI as the shared evaluation's ``repair`` hook (``metrics.evaluate``): every final
    statement that uses a deprecated API the deployment watches (:meth:`PromptBuilder.watched`)
    is cut there, the replacement spliced in (:func:`splice`) and the model continues greedily
    from ``prompt + spliced start`` with the shared decoder, up to ``REPLACE_ROUNDS`` times.
    ``calls``: per evaluation, (statements rewritten, statements)."""

    def __init__(self, builder: PromptBuilder, batch_size: int = 96):
        self.builder, self.batch_size = builder, batch_size
        self.calls: list[tuple[int, int]] = []

    def __call__(self, model, tokenizer, prompts: list[str], statements: list[str],
                 migrations: list[str | None]) -> list[str]:
        from trainables.evaluation.decoding import generate

        out = list(statements)
        watched = [self.builder.watched(p, m) for p, m in zip(prompts, migrations)]
        fixed = [0] * len(out)  # where each statement's model-written rest begins after a splice
        touched = set()
        for _ in range(REPLACE_ROUNDS):
            todo = {}
            for i, (p, st, rules) in enumerate(zip(prompts, out, watched)):
                head = splice(p, st, rules, fixed[i]) if rules else None
                if head is not None:
                    todo[i] = head
            if not todo:
                break
            rest = generate(model, tokenizer, [prompts[i] for i in todo], batch_size=self.batch_size,
                            heads=list(todo.values()))
            for (i, head), r in zip(todo.items(), rest):
                out[i], fixed[i] = head + r, len(head)
                touched.add(i)
        self.calls.append((len(touched), len(out)))
        return out


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
    repair = ReplaceApi(builder) if cfg.strategy == "replace" else None
    if repair is not None:
        data = data.with_repair(repair)
    scorer = gumbel_sampler(model, cfg.temperature, cfg.seed) if cfg.temperature > 0 else model
    header_lines = [builder.header(c.prompt, m.id).count("\n") for m in migrations for c in m.probe_contexts]
    session.common.update(trainable_params=0)

    def repaired(metrics: dict) -> dict:
        """The share of statements ReplaceAPI rewrote, per split (the validation one is evaluated first)."""
        if repair is None:
            return {}
        return {k: n / max(1, total) for k, (n, total) in zip(("repaired", "test_repaired"), repair.calls)}

    session.end_epoch(1, True, scorer, tokenizer, save=lambda path: None, eval_data=data, score=repaired,
                      extra={"header_lines": sum(header_lines) / max(1, len(header_lines)), "n_rules": len(rules)},
                      files={"rules.json": json.dumps([asdict(r) for r in rules], indent=1)})
    return session.last
