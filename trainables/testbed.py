"""The testbed: a tiny Llama code model, pretrained on old-API code, built and cached locally.

No machine here can download weights, so the project grows its own "model organism": a
byte-level BPE tokenizer and an 8-layer Llama trained from scratch on the deprecated form of
every migration context (train and probe) plus the locality snippets. The result writes
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

# Bump when a code change alters what a build produces, so stale caches are not reused.
BUILD_VERSION = 1


@dataclass(frozen=True)
class TestbedConfig:
    # 8 layers so that layer ranges mean something (the seed swept 22-31 of 32).
    num_layers: int = 8
    hidden_size: int = 128
    num_heads: int = 4
    intermediate_size: int = 344  # ~2.7x hidden, as in Llama
    vocab_size: int = 2048
    max_length: int = 128  # tokens per example; prompts are <= 200 chars, completions <= 90
    # Pretraining: lr 3e-3 memorised `df.append(row)` in ~70 steps on the prototype (DESIGN s5).
    steps: int = 900
    batch_size: int = 32
    lr: float = 3.0e-3
    warmup_steps: int = 40
    weight_decay: float = 0.01
    seed: int = 0
    # Float reductions depend on the thread count; fixing it makes builds bit-reproducible.
    threads: int = 2

    def __post_init__(self) -> None:
        if self.num_layers < 1 or self.hidden_size % self.num_heads:
            raise ValueError("testbed: hidden_size must be divisible by num_heads, num_layers >= 1")

    def key(self, data_digest: str) -> str:
        blob = json.dumps([BUILD_VERSION, dataclasses.asdict(self), data_digest], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def default_config() -> TestbedConfig:
    """The testbed config; APIUPDATE_TESTBED (JSON of field overrides) shrinks it for tests."""
    overrides = json.loads(os.environ.get("APIUPDATE_TESTBED") or "{}")
    return TestbedConfig(**overrides)


def cache_root() -> Path:
    return Path(os.environ.get("APIUPDATE_CACHE", Path.home() / ".cache" / "apiupdate-sweeps"))


def corpus(migrations, locality) -> list[tuple[str, str]]:
    """(prompt, completion) pairs the testbed is pretrained on: the old world only."""
    pairs = []
    for m in migrations:
        for ctx in m.train_contexts + m.probe_contexts:
            pairs.append((ctx.prompt, ctx.old))
    pairs.extend((s.prompt, s.completion) for s in locality)
    return pairs


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=["<|pad|>", "<|bos|>", "<|eos|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>"
    )


def encode_pair(tokenizer, prompt: str, completion: str, max_length: int) -> tuple[list[int], int]:
    """bos + prompt + completion + eos, tokenized in two pieces exactly as evaluation sees them.

    Returns the ids and the number of prompt ids (bos included)."""
    p = [tokenizer.bos_token_id] + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (p + c)[:max_length]
    return ids, min(len(p), len(ids))


def _pretrain(model, tokenizer, pairs, cfg: TestbedConfig, log) -> None:
    import torch

    examples = [encode_pair(tokenizer, p, c, cfg.max_length)[0] for p, c in pairs]
    rng = random.Random(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    order: list[int] = []
    model.train()
    t0 = time.time()
    for step in range(cfg.steps):
        if len(order) < cfg.batch_size:
            fresh = list(range(len(examples)))
            rng.shuffle(fresh)
            order.extend(fresh)
        batch = [examples[i] for i in order[: cfg.batch_size]]
        del order[: cfg.batch_size]
        width = max(map(len, batch))
        ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, ex in enumerate(batch):
            ids[i, : len(ex)] = torch.tensor(ex)
            labels[i, : len(ex)] = torch.tensor(ex)
            mask[i, : len(ex)] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
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
    tokenizer = train_tokenizer(texts, cfg.vocab_size)
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
            f"{len(pairs)} pretraining pairs, vocab {len(tokenizer)}")
        _pretrain(model, tokenizer, pairs, cfg, log)
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
    mpath = Path(migrations_path or data.MIGRATIONS)
    lpath = Path(locality_path or data.LOCALITY)
    key = cfg.key(data.file_digest(mpath, lpath))
    root = cache_root() / "testbed"
    out = root / key
    if (out / "config.json").is_file():
        return out
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{key}.lock")):
        if (out / "config.json").is_file():
            return out
        migrations, locality = data.load_migrations(mpath), data.load_locality(lpath)
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
