"""The testbed: a tiny Llama code model, pretrained on old-API code, built and cached locally.

No machine here can download weights, so the project grows its own "model organism": a
byte-level BPE tokenizer and an 8-layer Llama trained from scratch on the deprecated form of
every migration context (train and probe) plus the locality and over-application snippets
(never the test contexts: data/test_contexts.jsonl stays unseen). The result writes
``df.append(row)`` and completes unrelated code the way it was shown; the update methods must
move it to the new APIs without disturbing the rest.

The build is seeded and deterministic for a given thread count (part of the config), written
with ``save_pretrained`` into ``<cache>/testbed/<key>/`` where ``key`` hashes the data files,
the config and ``BUILD_VERSION``; it is rebuilt only when one of those changes. A file lock
keeps concurrent processes (Ray trials) from building twice.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from trainables.data import version_tag
from trainables.tokens import TESTBED_MARK

# Bump when a code change alters what a build produces, so stale caches are not reused.
BUILD_VERSION = 1


@dataclass(frozen=True)
class TestbedConfig:
    __test__ = False  # not a pytest test class despite the name

    # 8 layers so that layer ranges mean something (the seed swept 22-31 of 32).
    num_layers: int = 8
    hidden_size: int = 96
    num_heads: int = 4
    intermediate_size: int = 256  # ~2.7x hidden, as in Llama
    vocab_size: int = 1024  # the corpus is ~60 KB of code; more merges only slow the LM head
    max_length: int = 128  # tokens per example; prompts are <= 200 chars, completions <= 90
    # Pretraining: ~0.24 s/step on 2 cores (batch 32): 2000 steps build in ~8 minutes with
    # old_api_rate 1.00, locality_accuracy 1.00 (one renamed copy per context needs > 800 steps
    # for old_api_rate >= 0.95). 2000 rather than 1000 for the latent knowledge: given the
    # version header the base writes the new API on 84% of the probe contexts (77% at 1000),
    # and the same hier-LoRA config then generalizes 0.76 instead of 0.72.
    steps: int = 2000
    batch_size: int = 32
    lr: float = 5.0e-3
    warmup_steps: int = 40
    weight_decay: float = 0.01
    # Per epoch: each old-API context verbatim + this many variable-renamed variants: teaches
    # each idiom as a pattern rather than one string per context.
    renamed_copies: int = 1
    locality_copies: int = 1  # locality snippets are memorised verbatim
    # The over-application lookalikes (data/specificity.jsonl: `rows.append(x)` on a list,
    # `d.items()`, `float(x)`) are pretrained like the locality snippets: a real code LM knows
    # list.append as well as it knows DataFrame.append, and an update must leave that knowledge
    # alone. Unseen, the testbed's completions of them were guesses any update could move, and
    # specificity would measure the guesses' fragility, not over-application. 0 leaves them out.
    specificity_copies: int = 1
    # Real code LMs have seen some new-API code, in many codebases, and still default to the old
    # form. The testbed gets the same latent knowledge: renamed copies of the contexts written
    # with the new API, only ever behind a `# requires: lib>=version` header that evaluation
    # prompts never carry. The base model therefore writes the old APIs everywhere (the header
    # makes it write the new one on 84% of the probe contexts); no probe's verbatim new line is
    # ever seen, and the update methods never train on probe contexts.
    tagged_new_copies: int = 2
    # Write the probe contexts (variables renamed, never verbatim) in the tagged new form too.
    # Off, the header-conditioned probe rate was 44% (24% with one copy and no renaming), and a
    # 3-example update had little latent knowledge to move: generalization <= 0.57.
    tagged_new_probes: bool = True
    # Loss weight of prompt tokens (completions weigh 1). The metrics only read completions;
    # down-weighting the prompts' boilerplate (imports, setup lines) spends the build budget
    # where it counts.
    prompt_loss_weight: float = 0.1
    # Knowledge editing (ROME / MEMIT, trainables/editing/requests.py): copies per epoch of each
    # migration's task-keyed statements ("# pandas call for adding rows to a frame append",
    # 3 templates), so that the API is recalled from what it is for and an edit has a fact to change.
    # Off by default (0): it is only needed by the editing sweeps.
    edit_statements: int = 0
    # Pre-tokenize identifiers whole (letters, digits and "_"), so BPE can learn
    # " get_feature_names_out" as one token. The byte-level default splits at "_": 10 of the 68
    # old / new pairs then share their first token (" fit"+"_generator" vs " fit"), and an edit
    # at the subject decides nothing but that shared token. On for the editing testbed only.
    whole_identifiers: bool = False
    seed: int = 0
    # Float reductions depend on the thread count; fixing it makes builds bit-reproducible.
    threads: int = 2

    def __post_init__(self) -> None:
        if self.num_layers < 1 or self.hidden_size % self.num_heads:
            raise ValueError("testbed: hidden_size must be divisible by num_heads, num_layers >= 1")

    def key(self, data_digest: str) -> str:
        fields = dataclasses.asdict(self)
        # Fields added later are left out at the value that builds the corpus they did not
        # change, so caches built before them (the tests' small world among them) stay valid.
        for name, default in (("edit_statements", 0), ("tagged_new_probes", False), ("whole_identifiers", False),
                              ("specificity_copies", 0)):
            if fields[name] == default:
                del fields[name]
        blob = json.dumps([BUILD_VERSION, fields, data_digest], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def default_config() -> TestbedConfig:
    """The testbed config; APIUPDATE_TESTBED (JSON of field overrides) shrinks it for tests."""
    overrides = json.loads(os.environ.get("APIUPDATE_TESTBED") or "{}")
    return TestbedConfig(**overrides)


# Pretraining steps the editing testbed needs on the full world: with the statements added, 1,000
# crowded out the code (locality_accuracy 0.14, old_api_rate 0.71) and 2,000 did not.
EDIT_STEPS = 2000


def edit_config(cfg: TestbedConfig | None = None) -> TestbedConfig:
    """The testbed the editing sweeps load for ``--model testbed``: the same world plus the
    task-keyed statements (~460 pairs beside the ~2,300 of the code corpus), twice the steps up
    to EDIT_STEPS (never fewer than ``cfg``'s), a 2x vocabulary and whole-identifier tokens. On
    an unconfident base every edit flips locality completions it never meant to touch. A config
    that already has statements is used as it is."""
    cfg = cfg or default_config()
    if cfg.edit_statements:
        return cfg
    return dataclasses.replace(cfg, edit_statements=1, steps=max(cfg.steps, min(2 * cfg.steps, EDIT_STEPS)),
                               vocab_size=2 * cfg.vocab_size, whole_identifiers=True)


def cache_root() -> Path:
    return Path(os.environ.get("APIUPDATE_CACHE", Path.home() / ".cache" / "apiupdate-sweeps"))


# Variable names for the renaming augmentation: plain words and word_word pairs.
_WORDS = ("data item items result frame table rows values batch record entry entries count total score scores "
          "user users price prices order orders sample samples feature features label labels text texts value "
          "metric metrics image images layer weights grid point points path paths name names key keys index "
          "report stats log logs event events line lines word words node nodes edge edges task tasks buffer "
          "queue size sizes rate rates level levels step steps state states signal block blocks chunk chunks "
          "part parts group groups field fields column columns matrix vector arrays series output outputs "
          "inputs temp acc vals obs sensor readings sales stock").split()


def _fresh_name(rng: random.Random, taken: set[str]) -> str:
    while True:
        name = rng.choice(_WORDS) if rng.random() < 0.5 else f"{rng.choice(_WORDS)}_{rng.choice(_WORDS)}"
        if name not in taken:
            taken.add(name)
            return name


def rename_variables(prompt: str, completion: str, rng: random.Random) -> tuple[str, str]:
    """The same program with its local variable names consistently replaced by random ones.

    Pretraining on such variants teaches the testbed the *pattern* of each old-API idiom (copy
    the frame's name into ``X = X.append(...)``) rather than one string per context, which is
    what lets an update learnt on 3 train contexts transfer to held-out probe contexts, as it
    does in real code models. Imported names, builtins, attributes, keywords arguments and
    ``self`` are kept."""
    import ast
    import builtins

    program = prompt + completion
    try:
        tree = ast.parse(program)
    except SyntaxError:
        return prompt, completion
    keep = set(dir(builtins)) | {"self", "cls"}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            keep |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            keep.add(node.name)
    spots: list[tuple[int, int, int, str]] = []  # (line, col, end_col, name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id not in keep:
            spots.append((node.lineno, node.col_offset, node.end_col_offset, node.id))
        elif isinstance(node, ast.arg) and node.arg not in keep:
            spots.append((node.lineno, node.col_offset, node.col_offset + len(node.arg), node.arg))
    if not spots:
        return prompt, completion
    taken = {name for *_, name in spots} | keep
    mapping = {name: _fresh_name(rng, taken) for name in sorted({name for *_, name in spots})}
    lines = program.split("\n")
    for line, col, end, name in sorted(spots, reverse=True):
        text = lines[line - 1]
        lines[line - 1] = text[:col] + mapping[name] + text[end:]
    new_prompt_lines = prompt.count("\n")
    return "\n".join(lines[:new_prompt_lines]) + "\n", "\n".join(lines[new_prompt_lines:])


def corpus(migrations, locality) -> list[tuple[str, str]]:
    """(prompt, completion) pairs the testbed is pretrained on: the old world only."""
    pairs = []
    for m in migrations:
        for ctx in m.train_contexts + m.probe_contexts:
            pairs.append((ctx.prompt, ctx.old))
    pairs.extend((s.prompt, s.completion) for s in locality)
    return pairs


def epoch_pairs(migrations, locality, cfg: "TestbedConfig", rng: random.Random) -> list[tuple[str, str]]:
    """One pretraining epoch: each old-API context as written plus ``cfg.renamed_copies``
    variants with fresh variable names; each locality snippet ``cfg.locality_copies`` times,
    verbatim (those must be reproduced exactly)."""
    pairs = []
    for m in migrations:
        for ctx in m.train_contexts + m.probe_contexts:
            pairs.append((ctx.prompt, ctx.old))
            pairs += [rename_variables(ctx.prompt, ctx.old, rng) for _ in range(cfg.renamed_copies)]
        for ctx in m.train_contexts + (m.probe_contexts if cfg.tagged_new_probes else ()):
            for _ in range(cfg.tagged_new_copies):
                p, c = rename_variables(ctx.prompt, ctx.new, rng)
                pairs.append((version_tag(m) + p, c))
    pairs += [(s.prompt, s.completion) for s in locality] * cfg.locality_copies
    if cfg.edit_statements:
        from trainables.editing.requests import statements

        pairs += statements(migrations) * cfg.edit_statements
    return pairs


# GPT-2's pre-tokenizer pattern with "_" moved into words: " is_monotonic_increasing" is one
# pre-token (GPT-2: " is", "_", "monotonic", ...), so BPE may merge it into one token.
_IDENTIFIER_WORDS = r"""'s|'t|'re|'ve|'m|'ll|'d| ?[\p{L}_][\p{L}\p{N}_]*| ?\p{N}+| ?[^\s\p{L}\p{N}_]+|\s+(?!\S)|\s+"""


def train_tokenizer(texts: list[str], vocab_size: int, whole_identifiers: bool = False):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    if whole_identifiers:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_IDENTIFIER_WORDS), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=["<|pad|>", "<|bos|>", "<|eos|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>"
    )
    # Every testbed sequence starts with BOS, which its tokenizer does not add by itself; a
    # saved testbed is recognised by its testbed.json (trainables.tokens), this one by the mark.
    out.__dict__[TESTBED_MARK] = True
    return out


def encode_pair(tokenizer, prompt: str, completion: str, max_length: int, end: str = "eos") -> tuple[list[int], int]:
    """start + prompt + completion + end, tokenized in two pieces exactly as evaluation sees them
    (start: ``models.start_ids``; a real model's prompt cut before its final line break:
    ``tokens.cut_at_line_start``).

    ``end``: ``"eos"`` (the testbed's pretraining: one document per line), ``"newline"`` (the
    statement ends and the code goes on, as in real code), or ``"statement"``: what follows a
    statement in the model's own pretraining (``tokens.statement_end``), the update methods'
    targets. An EOS after every training line would teach a pretrained model to end the file
    there; a newline taught to the testbed, which only ever saw EOS there, cut its locality
    lines short (a hand-picked hier-LoRA config: locality 0.948 -> 0.874).
    Returns the ids and the number of prompt ids (start included)."""
    return encode_pairs(tokenizer, [(prompt, completion)], max_length, end)[0]


def encode_pairs(tokenizer, pairs: list[tuple[str, str]], max_length: int, end: str = "eos") -> list[tuple[list[int], int]]:
    """:func:`encode_pair` for many pairs in two batched tokenizer calls (a LoRA epoch's 612
    pairs: ~0.1 s instead of ~0.5 s)."""
    from trainables.tokens import cut_at_line_start, start_ids, statement_end

    if end == "statement":
        end = statement_end(tokenizer)
    if end not in ("eos", "newline"):
        raise ValueError(f"end must be 'eos', 'newline' or 'statement', got {end!r}")
    if not pairs:
        return []
    tail = "\n" if end == "newline" else ""
    # a real model's prompt is cut before its final line break, which then starts the target
    # (tokens.cut_at_line_start): the loss also teaches the line break + indentation token
    cuts = [cut_at_line_start(tokenizer, p) for p, _ in pairs]
    prompts = tokenizer([p for p, _ in cuts], add_special_tokens=False)["input_ids"]
    completions = tokenizer([lead + c + tail for (_, lead), (_, c) in zip(cuts, pairs)],
                            add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if end == "eos" else []
    out = []
    for p_ids, c_ids in zip(prompts, completions):
        p = start_ids(tokenizer) + p_ids
        ids = (p + c_ids + eos)[:max_length]
        out.append((ids, min(len(p), len(ids))))
    return out


def _pretrain(model, tokenizer, migrations, locality, cfg: TestbedConfig, log) -> None:
    import torch

    from trainables.common import length_grouped_batches

    rng = random.Random(cfg.seed)
    examples: list[list[int]] = []
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    batches: list[list[int]] = []
    model.train()
    t0 = time.time()
    for step in range(cfg.steps):
        if not batches:
            examples = encode_pairs(tokenizer, list(epoch_pairs(migrations, locality, cfg, rng)), cfg.max_length)
            batches = length_grouped_batches([len(ids) for ids, _ in examples], cfg.batch_size, rng, group=8)
        batch = [examples[i] for i in batches.pop()]
        width = max(len(ex) for ex, _ in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        weight = torch.zeros((len(batch), width))
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (ex, n_prompt) in enumerate(batch):
            ids[i, : len(ex)] = torch.tensor(ex)
            weight[i, :n_prompt] = cfg.prompt_loss_weight
            weight[i, n_prompt : len(ex)] = 1.0
            mask[i, : len(ex)] = 1
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                               reduction="none")
        w = weight[:, 1:].reshape(-1)
        loss = (ce * w).sum() / w.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == cfg.steps - 1:
            log(f"testbed pretrain step {step + 1}/{cfg.steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    model.eval()


def build(out_dir: Path, cfg: TestbedConfig, migrations, locality, log=print) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    pairs = corpus(migrations, locality)
    texts = [p + c for p, c in pairs] + [m.old_code for m in migrations]
    texts += [p + c for p, c in epoch_pairs(migrations, locality, cfg, random.Random(cfg.seed))]
    if cfg.edit_statements:
        # A real code tokenizer keeps common API names whole (" concat", " product"); BPE learnt
        # from this small corpus split them, and 26 of the 68 old / new objects shared their
        # first token (" pro"+"duct" vs " pro"+"d"), which an edit at the subject can only
        # change through every later attention layer. Each statement object, weighted in the
        # tokenizer's training text only, becomes whole wherever the pre-tokenizer allows
        # (with whole_identifiers, everywhere but at "."; no pair then shares a first token).
        from trainables.editing.requests import statements

        texts += sorted({c for _, c in statements(migrations)}) * 100
    tokenizer = train_tokenizer(texts, cfg.vocab_size, cfg.whole_identifiers)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    try:
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_heads,
            max_position_embeddings=cfg.max_length * 2,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = LlamaForCausalLM(config)
        log(f"testbed: {sum(p.numel() for p in model.parameters()):,} parameters, "
            f"{len(pairs)} pretraining pairs (+{cfg.renamed_copies} renamed copies each), vocab {len(tokenizer)}")
        _pretrain(model, tokenizer, migrations, locality, cfg, log)
    finally:
        torch.set_num_threads(threads)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def ensure_testbed(
    cfg: TestbedConfig | None = None,
    migrations_path=None,
    locality_path=None,
    log=lambda msg: print(msg, file=sys.stderr, flush=True),
) -> Path:
    """Path of the cached testbed for this data + config, building it first if needed."""
    from filelock import FileLock

    from trainables import data

    cfg = cfg or default_config()
    mpath = Path(migrations_path or data.migrations_path())
    lpath = Path(locality_path or data.locality_path())
    spath = data.specificity_path() if migrations_path is None else Path(migrations_path).with_name("specificity.jsonl")
    with_spec = cfg.specificity_copies > 0 and spath.is_file()
    digest = data.file_digest(mpath, lpath, *([spath] if with_spec else []))
    if cfg.edit_statements:  # the statements come from templates + edit_facts.json as well
        from trainables.editing.requests import statements

        blob = json.dumps(statements(data.load_migrations(mpath)))
        digest += hashlib.sha256(blob.encode()).hexdigest()[:16]
    key = cfg.key(digest)
    root = cache_root() / "testbed"
    out = root / key
    if (out / "config.json").is_file():
        return out
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{key}.lock")):
        if (out / "config.json").is_file():
            return out
        migrations, locality = data.load_migrations(mpath), data.load_locality(lpath)
        if with_spec:  # learnt as the locality snippets are: verbatim, specificity_copies x locality_copies an epoch
            spec = data.load_specificity(spath, migrations, locality)
            locality = locality + [data.LocalitySnippet(s.id, s.prompt, s.completion)
                                   for s in spec] * cfg.specificity_copies
        log(f"building the testbed model into {out} (first run only)")
        t0 = time.time()
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
        try:
            build(tmp, cfg, migrations, locality, log)
            (tmp / "testbed.json").write_text(json.dumps(
                {"key": key, "config": dataclasses.asdict(cfg), "build_version": BUILD_VERSION,
                 "build_seconds": round(time.time() - t0, 1)}, indent=2))
            tmp.rename(out)  # atomic: a crash never leaves a half-written cache entry
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log(f"testbed built in {time.time() - t0:.0f}s")
    return out


def weights_digest(path: Path) -> str:
    """sha256 of the saved weights: equal for equal data + config."""
    return hashlib.sha256((Path(path) / "model.safetensors").read_bytes()).hexdigest()
