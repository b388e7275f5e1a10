"""The frozen base model's activations on the training examples, computed once and shared.

Hierarchical LoRA leaves layers ``[0, k)`` frozen (``k = layer_start``), and the KL regulariser
compares against the base model with every adapter off. Both are functions of the example
alone, and every trial of a sweep trains on the same example sets (one set per seed, epoch and
``augment``, ``lora.training_examples``). So for each example the base model's input to layer
``k`` (``h_k``) and its final hidden state (after the norm, ``final``) are computed once, in a
fixed order and fixed chunks (deterministic: a trial gets the same numbers whether the states
came from disk or were just computed), and:

- the adapted forward starts at layer ``k`` from ``h_k`` instead of running layers ``[0, k)``;
- the KL's base logits are ``lm_head(final)`` instead of a second pass through ``[k, L)``.

On the testbed's default hier-LoRA range (layers 4-5 of 8, KL on) that is 8 of the ~19
layer-passes a training step makes. Two more kinds of set are stored the same way:

- anchor rows (``trainables/lora/anchors.py``): the pool's states per ``ANCHOR_CHUNK`` rows at full
  length, cut to each batch's width (:meth:`FrozenStates.anchor_batch`);
- the evaluation's teacher-forced sequences: ``evaluation.score_lines`` starts the merged model
  at layer ``k`` from their stored ``h_k`` (:meth:`FrozenStates.sequence_states`).

With a ``cache_dir`` (the sweep engine gives one per sweep) the states are files keyed by the
model, ``k`` and the examples' token ids: the first trial to need a set writes it, the others
read it. Without one they live in memory for the trial (``--config`` re-runs, benchmarks).

Only for plain decoder stacks (``models.SHARED_TRUNK_TYPES``) without dropout in the base
model, single-process (no DDP), and sets whose states fit ``MAX_BYTES``; ``FrozenStates.make``
returns None otherwise and the caller keeps the ordinary forward.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from trainables.tensors import adapter_layers, adapters_off, pad_states, stack

CHUNK = 64  # examples per canonical forward: fixed, so the states do not depend on who made them
MAX_BYTES = 1 << 30  # states of one example set above this: keep the ordinary forward
# The most a sweep's cache folder may hold on disk; past it a trial keeps the states it computes
# in memory and writes nothing. The engine sets it from --state-cache-gb; one SmolLM2 training
# set (204 pairs + 1 renamed copy, ~24 K tokens, hidden 576) is ~56 MB per stored layer.
DEFAULT_CACHE_GB = 8.0
ANCHOR_CHUNK = 256  # anchor pool rows per stored set: a trial reads only the chunks its steps use
FORMAT = 2  # of the stored files (one flat tensor + lengths per part); part of their names


def _fingerprint(model, name: str | None) -> str:
    """Identifies the frozen weights: the model's name or path, its config and, for a local
    folder, its weight files' sizes and modification times."""
    parts = [str(name), model.config.to_json_string(use_diff=False)]
    if name and Path(name).is_dir():
        parts += [f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sorted(Path(name).iterdir())
                  if p.suffix in (".safetensors", ".bin", ".pt")]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _save_atomic(states: list, path: Path) -> None:
    """Write one part (:func:`_flat`) to a temporary file and rename: a concurrent trial reads
    the whole file or none."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(_flat(states), tmp)  # on the CPU: any GPU of any node can read them
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def cache_limit_bytes(limit_gb: float | None) -> int:
    """The disk budget of a cache folder (``--state-cache-gb``; None: the default; 0 = write nothing)."""
    gb = DEFAULT_CACHE_GB if limit_gb is None else float(limit_gb)
    return int(max(0.0, gb) * (1 << 30))


def folder_bytes(folder: Path) -> int:
    """Bytes of the files directly in ``folder`` (the cache is flat)."""
    try:
        return sum(e.stat().st_size for e in os.scandir(folder) if e.is_file())
    except FileNotFoundError:
        return 0


def states_bytes(states: list) -> int:
    return sum(t.numel() * t.element_size() for t in states)


_warned_full: set[str] = set()


def _within_budget(folder: Path, extra: int, limit: int) -> bool:
    """May ``extra`` more bytes be written to ``folder``? Says so once per folder when not.
    Concurrent trials may overshoot by what they write at the same moment (one set each)."""
    used = folder_bytes(folder)
    if used + extra <= limit:
        return True
    if str(folder) not in _warned_full:
        _warned_full.add(str(folder))
        print(f"frozen-state cache {folder} holds {used / 2**30:.2f} GB of its {limit / 2**30:.2f} GB limit "
              f"(--state-cache-gb): states that do not fit stay in this trial's memory", flush=True)
    return False


def describe_estimate(model_path: str, dataset: str | None, trials: int, max_epochs: int, limit_gb: float) -> str:
    """One line for the sweep driver: how large the frozen-state cache can grow, and its limit.

    Counted with the model's own ``tokenizer.json`` (no torch in the driver): every stored part
    holds ``tokens x hidden x 4`` bytes. Each epoch's training set (renamed copies make each
    epoch a new set) is stored whole, every layer's input and the final state, when that fits
    ``MAX_BYTES`` (so that trials with another layer range find theirs), else h_k and the final
    state only; the evaluation sequences store h_k. Empty when the model's files are not local."""
    folder = Path(model_path)
    try:
        cfg = json.loads((folder / "config.json").read_text())
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    except Exception:  # noqa: BLE001 - a hub id or an unusual layout: no estimate
        return ""
    from trainables.data import load_locality, load_migrations, load_training_pairs

    hidden = int(cfg.get("hidden_size") or cfg.get("n_embd") or 0)
    layers = int(cfg.get("num_hidden_layers") or cfg.get("n_layer") or 0)
    if not hidden or not layers:
        return ""

    def tokens(texts) -> int:
        return sum(len(e.ids) for e in tok.encode_batch(list(texts), add_special_tokens=False))

    train = tokens(p.prompt + p.new for p in load_training_pairs(dataset))
    ctxs = [c for m in load_migrations() for c in m.train_contexts + m.probe_contexts]
    evals = tokens([c.prompt + c.new for c in ctxs] + [c.prompt + c.old for c in ctxs]
                   + [s.prompt + s.completion for s in load_locality()])
    mb = hidden * 4 / 2**20

    def set_mb(tokens: int) -> float:  # one training set, stored whole where it fits
        return tokens * mb * (layers if tokens * hidden * 4 * layers <= MAX_BYTES else 2)

    # up to 2 renamed copies per pair: sets of 1x, 2x or 3x the pairs' tokens, one per epoch
    per_trial = max_epochs * max(set_mb(k * train) for k in (1, 2, 3)) + evals * mb
    # anchor rows (up to 4 per batch of >= 8 examples) are stored per ANCHOR_CHUNK rows of at most
    # 128 tokens, every layer's input where a chunk fits
    n_pairs = len(load_training_pairs(dataset))
    rows = max_epochs * -(-3 * n_pairs // 8) * 4
    per_trial += -(-rows // ANCHOR_CHUNK) * set_mb(ANCHOR_CHUNK * 128)
    total_gb = per_trial * trials / 1024
    return (f"frozen-state cache: {set_mb(train):.0f} MB per training set without renamed copies, {evals * mb:.0f} MB "
            f"per layer of the evaluation sequences; up to {per_trial:.0f} MB a trial, {total_gb:.1f} GB for {trials} "
            f"trials without sharing; limit {limit_gb:g} GB (--state-cache-gb), removed when the sweep ends")


def _load(path: Path, device) -> list:
    """The per-example tensors of one stored part (views into one flat tensor)."""
    import torch

    obj = torch.load(path, map_location="cpu", weights_only=True)
    return list(torch.split(obj["data"].to(device), obj["lengths"].tolist()))


def _flat(states: list) -> dict:
    """One stored part: the examples' ``[len_i, H]`` states as one flat tensor and the lengths
    (one tensor to unpickle instead of one per example: ~10x faster to read)."""
    import torch

    return {"data": torch.cat([t.cpu() for t in states]), "lengths": torch.tensor([t.shape[0] for t in states])}


def _set_key(seqs) -> tuple:
    """In-memory identity of a set of token sequences (which set a trial has loaded)."""
    return len(seqs), hash(tuple(tuple(ids) for ids in seqs))


def _fits(examples, hidden_size: int, parts: int) -> bool:
    """Do ``parts`` float32 states of every token of ``examples`` fit ``MAX_BYTES``?"""
    return sum(len(ids) for ids, _ in examples) * hidden_size * 4 * parts <= MAX_BYTES


class FrozenStates:
    """``h_k`` (when ``k > 0``) and ``final`` (when ``want_final``) per example of the current set."""

    def __init__(self, peft_model, k: int, want_final: bool, cache_dir: str | None, fingerprint: str,
                 limit_gb: float | None = None):
        self.model = peft_model
        self.limit_bytes = cache_limit_bytes(limit_gb)
        inner = peft_model.get_base_model()
        self.decoder = inner.get_decoder()
        self.layers = list(self.decoder.layers)
        self.head = inner.get_output_embeddings()
        self.hidden_size = inner.config.hidden_size
        self.k, self.want_final = k, want_final
        self.tuner_layers = adapter_layers(peft_model)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.fingerprint = fingerprint
        self.hk = self.final = None  # lists of [len_i, H] tensors, one per example
        self.key = None
        self._anchors: dict[int, dict[str, list]] = {}  # anchor pool chunk -> its states
        self._sequences: dict = {}  # the last evaluation set's states

    @classmethod
    def make(cls, peft_model, k: int, want_final: bool, cache_dir: str | None = None, model_name: str | None = None,
             examples=None, limit_gb: float | None = None):
        """A ``FrozenStates`` when it applies (see the module docstring; ``examples``: a set
        whose states must fit ``MAX_BYTES``), else None."""
        import torch

        from trainables.models import SHARED_TRUNK_TYPES

        inner = peft_model.get_base_model()
        cfg = inner.config
        if (k == 0 and not want_final) or cfg.model_type not in SHARED_TRUNK_TYPES:
            return None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return None
        if any(float(getattr(cfg, a, 0.0) or 0.0) > 0 for a in ("attention_dropout", "hidden_dropout", "dropout")):
            return None
        if examples is not None and not _fits(examples, cfg.hidden_size, (k > 0) + want_final):
            return None
        return cls(peft_model, k, want_final, cache_dir, _fingerprint(inner, model_name), limit_gb)

    # ------------------------------------------------------------------ one example set
    def _paths(self, parts: list[str], examples) -> dict[str, Path | None]:
        """The file of each part, ``h{i}`` (the base input to layer i) or ``final``, of this set."""
        if self.cache_dir is None:
            return dict.fromkeys(parts)
        digest = hashlib.sha256(json.dumps([FORMAT, self.fingerprint, CHUNK, [ids for ids, _ in examples]]).encode()).hexdigest()
        return {part: self.cache_dir / f"{part}-{hashlib.sha256(f'{part}:{digest}'.encode()).hexdigest()[:24]}.pt"
                for part in parts}

    def states(self, examples: list[tuple[list[int], int]], pad_id: int, parts: list[str]) -> dict[str, list]:
        """``parts`` of the states of ``examples`` (one ``[len_i, H]`` tensor per example),
        read from the cache or computed (and then written to it).

        A set computed for the cache is computed whole, every layer's input and the final
        state in one pass (when that fits ``MAX_BYTES``): trials with another ``layer_start``
        then find theirs too."""
        n_layers = len(self.layers)
        paths = self._paths([f"h{i}" for i in range(1, n_layers)] + ["final"], examples)
        got: dict[str, list] = {}
        for part in parts:
            path = paths[part]
            if path is not None and path.is_file():
                try:
                    got[part] = _load(path, next(self.model.parameters()).device)
                except Exception as e:  # noqa: BLE001 - a torn or foreign file: compute afresh
                    print(f"frozen states {path.name} unreadable ({type(e).__name__}); recomputing", flush=True)
        if any(part not in got for part in parts):
            whole = self.cache_dir is not None and _fits(examples, self.hidden_size, n_layers)
            made = self._compute(examples, pad_id, list(paths) if whole else parts)
            for part, states in made.items():
                path = paths[part]
                if path is not None and not path.is_file() and _within_budget(path.parent, states_bytes(states),
                                                                                    self.limit_bytes):
                    _save_atomic(states, path)
            got.update({part: made[part] for part in parts if part not in got})
        return got

    def _mine(self) -> list[str]:
        return ([f"h{self.k}"] if self.k > 0 else []) + (["final"] if self.want_final else [])

    def prepare(self, examples: list[tuple[list[int], int]], pad_id: int) -> None:
        """Load or compute the states of ``examples`` (this epoch's set), indexed like it."""
        key = _set_key([ids for ids, _ in examples])
        if key == self.key:
            return
        got = self.states(examples, pad_id, self._mine())
        self.hk, self.final, self.key = got.get(f"h{self.k}"), got.get("final"), key

    def _compute(self, examples, pad_id: int, parts: list[str]) -> dict[str, list]:
        """``parts`` of the states of ``examples``: one base forward (adapters off) per fixed
        chunk of examples (right padding), each layer's input kept by a forward pre-hook."""
        import torch

        from trainables.tensors import pad_batch

        device = next(self.model.parameters()).device
        out: dict[str, list] = {part: [] for part in parts}
        kept: dict[str, object] = {}

        def keeper(part):
            def keep(module, args, kwargs):
                kept[part] = args[0] if args else kwargs["hidden_states"]
            return keep

        hooks = [self.layers[int(part[1:])].register_forward_pre_hook(keeper(part), with_kwargs=True)
                 for part in parts if part != "final"]
        try:
            with torch.no_grad(), adapters_off(self.tuner_layers):
                for s in range(0, len(examples), CHUNK):
                    chunk = examples[s : s + CHUNK]
                    ids, mask, _ = pad_batch(chunk, pad_id)
                    kept.clear()
                    kept["final"] = self.decoder(input_ids=ids.to(device), attention_mask=mask.to(device),
                                                 use_cache=False).last_hidden_state
                    for part in parts:
                        out[part] += [kept[part][row, : len(c)].clone() for row, (c, _) in enumerate(chunk)]
        finally:
            for hook in hooks:
                hook.remove()
        return out

    def batch(self, idx: list[int], width: int, extra=None):
        """(h_k, final) for examples ``idx`` padded with zeros to ``width`` (padding is never
        attended to or scored), with ``extra`` = (h_k, final) of further rows appended."""
        import torch

        def pad(rows, more):
            if rows is None:
                return None
            out = pad_states([rows[i] for i in idx], width)
            return out if more is None else torch.cat([out, more], 0)

        ehk, efin = extra if extra is not None else (None, None)
        return pad(self.hk, ehk), pad(self.final, efin)

    # ------------------------------------------------------------------ anchor rows
    def anchor_batch(self, pool: list[list[int]], rows: list[int], width: int, pad_id: int):
        """(h_k, final) of anchor rows ``pool[i][:width]`` for ``i`` in ``rows``, padded to
        ``width``. The pool's states are stored per ``ANCHOR_CHUNK`` rows at full length and cut:
        in a causal model with right padding, a row's first ``width`` states are those of its
        first ``width`` tokens."""
        for c in sorted({i // ANCHOR_CHUNK for i in rows} - set(self._anchors)):
            chunk = pool[c * ANCHOR_CHUNK : (c + 1) * ANCHOR_CHUNK]
            self._anchors[c] = self.states([(ids, len(ids)) for ids in chunk], pad_id, self._mine())

        def pad(part):
            if part not in self._anchors[rows[0] // ANCHOR_CHUNK]:
                return None
            return pad_states([self._anchors[i // ANCHOR_CHUNK][part][i % ANCHOR_CHUNK][:width] for i in rows], width)

        return pad(f"h{self.k}"), pad("final")

    # ------------------------------------------------------------------ evaluation
    def sequence_states(self, seqs: list[list[int]], pad_id: int):
        """(k, the base model's input to layer k for each token sequence), for an evaluation
        that starts its (merged) model at layer k: its layers below k are the base's. None
        when there is nothing to skip (k = 0) or the set's states would not fit."""
        if self.k == 0:
            return None
        examples = [(ids, len(ids)) for ids in seqs]
        key = _set_key(seqs)
        if key not in self._sequences:
            if not _fits(examples, self.hidden_size, 1):
                return None
            self._sequences = {key: self.states(examples, pad_id, [f"h{self.k}"])[f"h{self.k}"]}
        return self.k, self._sequences[key]

    # ------------------------------------------------------------------ the adapted forward
    def forward(self, train_model, ids, mask, labels, hk):
        """The adapted model's output on a batch, starting at layer ``k`` from ``h_k``."""
        if self.k == 0:
            return train_model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
        with stack(self.decoder, self.layers[self.k :]):
            return train_model(inputs_embeds=hk, attention_mask=mask, labels=labels, use_cache=False)

    def base_logits(self, final):
        import torch

        with torch.no_grad():
            return self.head(final)
