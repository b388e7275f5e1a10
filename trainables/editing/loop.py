"""ROME and MEMIT knowledge edits of the migrations: one loop, two configs.

Each migration becomes one edit request (``trainables/editing/requests.py``: subject = what the
API is for, old object = the deprecated name, new object = its replacement), on the testbed
built for editing (``model_path``). The requests are applied in ``phases`` chunks
through easyeditor's own ``apply_rome_to_model`` / ``apply_memit_to_model`` (made to run under
transformers 5 on the CPU by ``trainables/editing/compat.py``); after each chunk the trial
reports, with a checkpoint of the edited ``down_proj`` weights, so ASHA can stop a bad trial
early and a resumed trial continues after its last finished chunk.

Metrics (reported each phase; the last report also runs the full shared evaluation):

- ``edit_efficacy``: edited requests whose new object is more likely than the old one after the
  edit prompt (ROME's "efficacy score", mean token log-probability for multi-token objects, as
  ROME's own evaluation code averages the NLL over the object's tokens);
  ``edit_magnitude``: mean P(new) - P(old) there (ROME's "efficacy magnitude"), with per-token
  (geometric-mean) probabilities;
- ``edit_generalization``: the same on the paraphrase prompts ("paraphrase success");
- ``edit_neighborhood``: each library's stable-API prompt still prefers its own name over the
  edits' new objects ("neighborhood success"); ``delta_norm``: Frobenius norm of the total
  weight change;
- ``efficacy``, ``generalization``, ``locality``, ``old_api_rate``, ``api_correct``: the shared
  code evaluation (``trainables/evaluation/``), so rows compare with LoRA's;
- ``objective``: the shared formula (``trainables.objective.objective``) with the edit's paraphrase
  success as its generalization and the shared locality as its locality: an edit must carry
  over to paraphrases without changing unrelated code completions.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import ClassVar

from trainables.common import RunSettings, config_from_dict

BACKENDS = ("easyeditor",)  # a native implementation would go here; easyeditor runs on CPU and GPU
FACT_TOKENS = ("subject_last", "subject_first", "subject_first_after_last", "last")


@dataclass
class _EditBase(RunSettings):
    """What ROME and MEMIT share. Defaults: EasyEdit's hparams for LLaMA / GPT-J, which follow
    the papers (ROME: Meng et al. 2022, Table/App. B; MEMIT: Meng et al. 2023, App. B)."""

    ALG: ClassVar[str] = ""

    algorithm: str = ""
    model: str = "testbed"
    dataset: str | None = None  # migrations JSONL (data/README.md format); None = data/
    backend: str = "easyeditor"
    v_lr: float = 0.5  # Adam lr of the value vector v* (ROME/MEMIT: 5e-1)
    v_num_grad_steps: int = 20  # optimisation steps for v* (ROME: 20; MEMIT: 25)
    v_loss_layer: int | None = None  # layer whose output the loss reads; None = the last layer
    v_weight_decay: float = 0.5  # L2 on v* relative to its initial norm (ROME/MEMIT: 0.5)
    clamp_norm_factor: float = 4.0  # |delta| <= factor * |v_init| (ROME: 4; MEMIT: 0.75)
    kl_factor: float = 0.0625  # essence-drift KL weight (both papers: 0.0625)
    mom2_adjustment: bool = True  # use the key covariance C^-1 (ROME s3.1)
    mom2_n_samples: int = 100_000  # corpus texts for C (papers: 100k Wikipedia texts; capped by the corpus)
    fact_token: str = "subject_last"  # where the fact is looked up: the subject's last token (ROME s2)
    phases: int = 4  # the requests are applied in this many chunks, one report each

    def _check_common(self) -> None:
        from trainables.models import check_dtype

        check_dtype(self.dtype)
        if self.algorithm and self.algorithm != self.ALG:
            raise ValueError(f"algorithm {self.algorithm!r} given to the {self.ALG} config")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if not self.v_lr > 0:
            raise ValueError(f"v_lr must be > 0, got {self.v_lr}")
        if self.v_num_grad_steps < 1 or self.phases < 1:
            raise ValueError("v_num_grad_steps and phases must be >= 1")
        if not self.clamp_norm_factor > 0:
            raise ValueError(f"clamp_norm_factor must be > 0, got {self.clamp_norm_factor}")
        if self.kl_factor < 0 or self.v_weight_decay < 0:
            raise ValueError("kl_factor and v_weight_decay must be >= 0")
        if self.fact_token not in FACT_TOKENS:
            raise ValueError(f"fact_token must be one of {', '.join(FACT_TOKENS)}, got {self.fact_token!r}")
        if self.workers != 1:
            raise ValueError("editing trials run in one process: use --workers-per-trial 1")


@dataclass
class RomeConfig(_EditBase):
    """ROME: one rank-one update of one layer's MLP down-projection per request, applied in
    sequence (easyeditor's ROME takes one request per call)."""

    ALG: ClassVar[str] = "rome"
    layer: int | None = None  # edited layer; None = a third of the depth (GPT-2 XL: 17 of 48)

    def __post_init__(self) -> None:
        self._check_common()

    def layer_range(self, n_layers: int) -> tuple[int, int]:
        layer = n_layers // 3 if self.layer is None else self.layer
        if not 0 <= layer < n_layers:
            raise ValueError(f"layer {layer} is outside the model's {n_layers} layers: use 0 <= layer < {n_layers}")
        return layer, layer + 1

    def mode_name(self) -> str:
        return "sequential"


@dataclass
class MemitConfig(_EditBase):
    """MEMIT: the update spread over the down-projections of layers [layer_start, layer_end)."""

    ALG: ClassVar[str] = "memit"
    clamp_norm_factor: float = 0.75  # MEMIT App. B (GPT-J)
    v_num_grad_steps: int = 25
    layer_start: int = 0  # None-free: the engine searches it; GPT-J used 3..8 of 28
    layer_end: int | None = None  # None = layer_start + 5 capped at the model (GPT-J: 5-6 layers)
    mom2_update_weight: float = 15000.0  # lambda weighing C against the new keys (MEMIT eq. 14)
    mode: str = "batch"  # batch: a phase's requests in one MEMIT call; sequential: one call each

    def __post_init__(self) -> None:
        self._check_common()
        if self.mode not in ("batch", "sequential"):
            raise ValueError(f"mode must be batch or sequential, got {self.mode!r}")
        if not self.mom2_update_weight > 0:
            raise ValueError(f"mom2_update_weight must be > 0, got {self.mom2_update_weight}")

    def layer_range(self, n_layers: int) -> tuple[int, int]:
        end = min(self.layer_start + 5, n_layers) if self.layer_end is None else self.layer_end
        if not 0 <= self.layer_start < end <= n_layers:
            raise ValueError(f"layer range [{self.layer_start}, {end}) is outside the model's {n_layers} layers: "
                             f"use 0 <= layer_start < layer_end <= {n_layers}")
        return self.layer_start, end

    def mode_name(self) -> str:
        return self.mode


CONFIGS = {"rome": RomeConfig, "memit": MemitConfig}


# --------------------------------------------------------------------------- EasyEdit hparams
def easyedit_hparams(cfg: _EditBase, model_config, model_name: str) -> dict:
    """The trial as EasyEdit's hparams dict (its YAML format: ``hparams/ROME/*.yaml``)."""
    from trainables.models import arch_facts

    facts = arch_facts(model_config)
    n = int(model_config.num_hidden_layers)
    start, end = cfg.layer_range(n)
    layers = facts.layers + ".{}"
    # Tied embeddings: the head's weight is registered once, as the input embedding.
    head = facts.embed if getattr(model_config, "tie_word_embeddings", False) else "lm_head"
    hp = {
        "alg_name": cfg.ALG.upper(), "model_name": model_name, "device": 0,
        "layers": list(range(start, end)), "fact_token": cfg.fact_token,
        "v_num_grad_steps": cfg.v_num_grad_steps, "v_lr": cfg.v_lr,
        "v_loss_layer": n - 1 if cfg.v_loss_layer is None else cfg.v_loss_layer,
        "v_weight_decay": cfg.v_weight_decay, "clamp_norm_factor": cfg.clamp_norm_factor,
        "kl_factor": cfg.kl_factor, "mom2_adjustment": cfg.mom2_adjustment,
        "rewrite_module_tmp": facts.mlp_down, "layer_module_tmp": layers,
        "mlp_module_tmp": f"{layers}.{facts.mlp_block}", "attn_module_tmp": f"{layers}.{facts.attn_block}",
        "ln_f_module": facts.final_norm, "lm_head_module": head,
        "mom2_dataset": "local", "mom2_n_samples": cfg.mom2_n_samples, "mom2_dtype": "float32",
        "stats_dir": "./data/stats",  # unused: statistics come from the local corpus (compat break 5)
    }
    if cfg.ALG == "rome":
        hp["context_template_length_params"] = [[5, 10], [10, 10]]
    else:
        hp.update(layer_selection="all", mom2_update_weight=cfg.mom2_update_weight)
    return hp


def write_easyedit_yaml(cfg: _EditBase, model_config, model_name: str, path: str | Path) -> None:
    import yaml

    Path(path).write_text(yaml.safe_dump(easyedit_hparams(cfg, model_config, model_name), sort_keys=False))


def config_from_easyedit_yaml(path: str | Path, **overrides) -> _EditBase:
    """A trial config from an EasyEdit hparams YAML (the keys both formats share)."""
    import yaml

    doc = yaml.safe_load(Path(path).read_text())
    alg = str(doc.get("alg_name", "")).lower()
    if alg not in CONFIGS:
        raise ValueError(f"{path}: alg_name must be ROME or MEMIT, got {doc.get('alg_name')!r}")
    cls = CONFIGS[alg]
    names = {f.name for f in fields(cls)}
    kw = {k: doc[k] for k in ("v_lr", "v_num_grad_steps", "v_loss_layer", "v_weight_decay", "clamp_norm_factor",
                              "kl_factor", "mom2_adjustment", "mom2_n_samples", "fact_token",
                              "mom2_update_weight") if k in doc and k in names}
    for k in ("v_lr", "v_weight_decay", "clamp_norm_factor", "kl_factor", "mom2_update_weight"):
        if k in kw:
            kw[k] = float(kw[k])  # EasyEdit's YAMLs write 5e-1, which PyYAML reads as a string
    layers = sorted(int(x) for x in doc["layers"])
    if alg == "rome":
        kw["layer"] = layers[0]
    else:
        if layers != list(range(layers[0], layers[-1] + 1)):
            raise ValueError(f"{path}: MEMIT layers must be contiguous here, got {layers}")
        kw.update(layer_start=layers[0], layer_end=layers[-1] + 1)
    return cls(algorithm=alg, **{**kw, **overrides})


# --------------------------------------------------------------------------- scoring
def target_logprobs(model, tokenizer, prompts: list[str], targets: list[str]) -> list[tuple[float, float]]:
    """(mean token log-prob, sum log-prob) of ``" " + target`` and the end of the statement
    (EOS, as the testbed learnt them) after bos + prompt, batched.

    The end is part of the object: 13 of the 68 pairs are one name extending the other
    (``sparse`` -> ``sparse_output``, ``predict_classes`` -> ``predict``). Without it P(" sparse")
    ~ 1 makes the old object's mean the larger one whatever the model writes after it: a model
    that writes ``sparse_output`` still scored as keeping ``sparse``."""
    import torch

    from trainables.tokens import start_ids

    device = next(model.parameters()).device
    end = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    rows = []
    for p, t in zip(prompts, targets):
        pid = start_ids(tokenizer) + tokenizer(p, add_special_tokens=False)["input_ids"]
        tid = tokenizer(" " + t, add_special_tokens=False)["input_ids"] + end
        rows.append((pid, tid))
    width = max(len(a) + len(b) for a, b in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (a, b) in enumerate(rows):
        ids[i, : len(a) + len(b)] = torch.tensor(a + b)
        mask[i, : len(a) + len(b)] = 1
    with torch.inference_mode():
        logp = torch.log_softmax(model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float(), -1)
    out = []
    for i, (a, b) in enumerate(rows):
        pos = torch.arange(len(a) - 1, len(a) + len(b) - 1)
        lp = logp[i, pos, torch.tensor(b)].cpu()
        out.append((float(lp.mean()), float(lp.sum())))
    return out


def edit_scores(model, tokenizer, requests, edited: int) -> dict:
    """The editing papers' metrics over the first ``edited`` requests (neighbourhood: all)."""
    done = requests[:edited]
    m: dict = {}
    if done:
        prompts = [r.prompt for r in done]
        new = target_logprobs(model, tokenizer, prompts, [r.target_new for r in done])
        old = target_logprobs(model, tokenizer, prompts, [r.target_old for r in done])
        m["edit_efficacy"] = sum(n[0] > o[0] for n, o in zip(new, old)) / len(done)
        # Per-token (geometric-mean) probabilities: whole-sequence P of an 8-token object is
        # ~1e-9 on the testbed, which made the difference read 0.000 for every trial.
        m["edit_magnitude"] = sum(math.exp(n[0]) - math.exp(o[0]) for n, o in zip(new, old)) / len(done)
        para = [(p, r) for r in done for p in r.paraphrases]
        pn = target_logprobs(model, tokenizer, [p for p, _ in para], [r.target_new for _, r in para])
        po = target_logprobs(model, tokenizer, [p for p, _ in para], [r.target_old for _, r in para])
        m["edit_generalization"] = sum(n[0] > o[0] for n, o in zip(pn, po)) / len(para)
    else:
        m.update(edit_efficacy=0.0, edit_magnitude=0.0, edit_generalization=0.0)
    # Neighbourhood: a library's stable API keeps its name against every edit's new object.
    pairs = [(r.neighbour_prompt, r.neighbour_target, r.target_new) for r in requests]
    keep = target_logprobs(model, tokenizer, [p for p, _, _ in pairs], [k for _, k, _ in pairs])
    new = target_logprobs(model, tokenizer, [p for p, _, _ in pairs], [n for _, _, n in pairs])
    m["edit_neighborhood"] = sum(k[0] > n[0] for k, n in zip(keep, new)) / len(pairs)
    return m


# --------------------------------------------------------------------------- the loop
def local_corpus(migrations, locality) -> list[str]:
    """Texts for the key covariance: the code the model was trained on (old-API contexts and
    locality snippets), in place of the papers' Wikipedia sample."""
    texts = [ctx.prompt + ctx.old for m in migrations for ctx in m.train_contexts + m.probe_contexts]
    return texts + [s.prompt + s.completion for s in locality]


def _rewrite_weights(model, cfg: _EditBase) -> dict:
    from trainables.models import arch_facts, num_layers

    facts = arch_facts(model.config)
    start, end = cfg.layer_range(num_layers(model))
    params = dict(model.named_parameters())
    return {f"{facts.mlp_down.format(i)}.weight": params[f"{facts.mlp_down.format(i)}.weight"]
            for i in range(start, end)}


def apply_edits(cfg: _EditBase, ee, model, etok, hp, batch: list[dict]) -> None:
    """Apply ``batch``: one request at a time (ROME, sequential MEMIT) or as one MEMIT batch.
    Prints progress about ten times a phase: on SmolLM2 on one core a ROME edit takes seconds,
    so a phase of 68 takes minutes."""
    t0 = time.time()
    quiet = io.StringIO()  # easyeditor prints every optimisation step: ~100 lines per edit
    if cfg.ALG == "rome" or (isinstance(cfg, MemitConfig) and cfg.mode == "sequential"):
        apply = ee.rome_main.apply_rome_to_model if cfg.ALG == "rome" else ee.memit_main.apply_memit_to_model
        every = max(1, -(-len(batch) // 10))  # ceil: at most 10 lines
        for i, req in enumerate(batch, 1):
            with contextlib.redirect_stdout(quiet):
                apply(model, etok, [req], hp)
            quiet.seek(0)
            quiet.truncate()
            if i % every == 0 or i == len(batch):
                print(f"edited {i}/{len(batch)} in {time.time() - t0:.0f}s", flush=True)
    else:
        with contextlib.redirect_stdout(quiet):
            ee.memit_main.apply_memit_to_model(model, etok, batch, hp)
        print(f"edited {len(batch)} as one batch in {time.time() - t0:.0f}s", flush=True)


def model_path(name: str) -> str:
    """What an edit trial loads: ``testbed`` is the testbed with the task-keyed statements
    (``testbed.edit_config``: without them there is no fact to edit); anything else as given.
    The sweep driver calls it once before Ray starts (``Method.prepare``), so the trials find
    the testbed built."""
    from trainables.models import TESTBED, resolve
    from trainables.testbed import edit_config, ensure_testbed

    return str(ensure_testbed(edit_config())) if name == TESTBED else resolve(name)


class EditRun:
    """One editing trial's state: the model, its requests in ``phases`` chunks, easyeditor's
    hyperparameters and the rewritten weights with their originals."""

    def __init__(self, cfg: _EditBase, session):
        from trainables.data import load_locality, load_migrations
        from trainables.editing import compat as editing_compat
        from trainables.editing.requests import requests_for
        from trainables.models import load_model, num_layers

        self.cfg = cfg
        path = model_path(cfg.model)
        session.model_name = path  # the references of the build this trial edits
        self.model, self.tokenizer = load_model(path, device=session.device, dtype=cfg.dtype)
        cfg.layer_range(num_layers(self.model))
        migrations = load_migrations(cfg.dataset) if cfg.dataset else load_migrations()
        self.requests = requests_for(migrations)
        self.corpus = local_corpus(migrations, load_locality())
        self.hp_dict = easyedit_hparams(cfg, self.model.config, path)
        self.weights = _rewrite_weights(self.model, cfg)
        self.original = {k: v.detach().clone() for k, v in self.weights.items()}
        self.chunks = [self.requests[i * len(self.requests) // cfg.phases:(i + 1) * len(self.requests) // cfg.phases]
                       for i in range(cfg.phases)]
        self.ee = editing_compat.load()
        self.hp = (self.ee.ROMEHyperParams if cfg.ALG == "rome" else self.ee.MEMITHyperParams)(**self.hp_dict)
        self.etok = editing_compat.edit_tokenizer(self.tokenizer)
        self.phase0 = self.restore(session.restore())
        self.edit_seconds = 0.0
        session.common.update(trainable_params=sum(v.numel() for v in self.weights.values()),  # what edits may change
                              n_requests=len(self.requests), backend=cfg.backend, edit_mode=cfg.mode_name())

    def restore(self, restored: str | None) -> int:
        """The phases a restored checkpoint had finished (its weights copied in), else 0."""
        import torch

        if not (restored and Path(restored, "edit_state.pt").is_file()):
            return 0
        state = torch.load(Path(restored, "edit_state.pt"), weights_only=True)
        with torch.no_grad():
            for k, v in state["weights"].items():
                self.weights[k].copy_(v)
        print(f"resumed after phase {int(state['phase'])}", flush=True)
        return int(state["phase"])

    def edit_phase(self, phase: int) -> float:
        """Apply phase ``phase``'s requests; returns the norm of the total weight change."""
        import torch

        from trainables.common import Diverged

        t0 = time.time()
        apply_edits(self.cfg, self.ee, self.model, self.etok, self.hp, [r.easyedit() for r in self.chunks[phase]])
        self.edit_seconds += time.time() - t0
        if not all(torch.isfinite(w).all() for w in self.weights.values()):
            raise Diverged("non-finite edited weights")
        return math.sqrt(sum(float((self.weights[k] - self.original[k]).float().pow(2).sum()) for k in self.weights))

    def state(self, phase: int) -> dict:
        """The edited weights after ``phase`` phases, as a checkpoint and ``weights_out`` hold them."""
        return {"phase": phase, "weights": {k: v.detach().cpu() for k, v in self.weights.items()}}

    def save(self, phase: int):
        """A checkpoint writer for the session: :meth:`state` in ``edit_state.pt``."""
        import torch

        state = self.state(phase)
        return lambda path: torch.save(state, Path(path, "edit_state.pt"))

    def score(self, edited: int):
        """The edit's own figures and the objective they give with the shared locality."""
        from trainables.objective import objective

        def add(metrics: dict) -> dict:
            out = edit_scores(self.model, self.tokenizer, self.requests, edited)
            out["objective"] = objective({"generalization": out["edit_generalization"],
                                          "locality": metrics["locality"], "specificity": metrics.get("specificity"),
                                          "over_application": metrics.get("over_application")})
            out["progress"] = out["objective"]  # ASHA ranks edits by their own objective
            return out

        return add


def fit(cfg: _EditBase, session) -> dict:
    """Apply the edit requests phase by phase, handing each phase's end to the session."""
    from trainables.editing import compat as editing_compat

    run = EditRun(cfg, session)
    with editing_compat.patched(run.corpus, session.device):
        for phase in range(run.phase0, cfg.phases):
            delta = run.edit_phase(phase)
            edited = sum(len(c) for c in run.chunks[: phase + 1])
            final = phase == cfg.phases - 1
            session.end_epoch(phase + 1, final, run.model, run.tokenizer, save=run.save(phase + 1),
                              score=run.score(edited), files={"easyedit_hparams.json": json.dumps(run.hp_dict)},
                              extra={"edited": edited, "delta_norm": delta, "edit_seconds": run.edit_seconds})
    if session.weights_out:
        import torch

        torch.save(run.state(cfg.phases), session.weights_out)
    return session.last


def config_for(config: dict) -> _EditBase:
    """The ROME or MEMIT config a dict names with ``algorithm``."""
    alg = config.get("algorithm")
    if alg not in CONFIGS:
        raise ValueError(f"algorithm must be one of {', '.join(CONFIGS)}, got {alg!r}")
    return config_from_dict(CONFIGS[alg], config)


# --------------------------------------------------------------------------- EasyEdit YAML CLI
def main(argv: list[str] | None = None) -> int:
    """Convert between an exported trial (export_best.py YAML) and EasyEdit's hparams YAML.

        python -m trainables.editing --hparams-out rome.yaml best.yaml   # trial -> EasyEdit
        python -m trainables.editing --from-hparams ROME/llama-7b.yaml --out best.yaml
        python sweeps/rome.py --config best.yaml                          # run it once
    """
    import argparse
    import sys

    import yaml

    p = argparse.ArgumentParser(prog="python -m trainables.editing", description=main.__doc__.splitlines()[0])
    p.add_argument("config", nargs="?", help="export_best.py YAML of a rome / memit trial")
    p.add_argument("--hparams-out", help="write the trial as an EasyEdit hparams YAML")
    p.add_argument("--from-hparams", help="read an EasyEdit ROME / MEMIT hparams YAML ...")
    p.add_argument("--out", help="... and write it as a --config YAML for sweeps/<method>.py")
    p.add_argument("--model", help="model whose module names / layer count to use (default: the trial's)")
    args = p.parse_args(argv)
    try:
        if args.from_hparams:
            if not args.out:
                raise ValueError("--from-hparams needs --out")
            cfg = config_from_easyedit_yaml(args.from_hparams, **({"model": args.model} if args.model else {}))
            config = {k: v for k, v in asdict(cfg).items() if k not in ("threads", "workers", "use_gpu")}
            Path(args.out).write_text(yaml.safe_dump({"method": cfg.ALG, "config": config,
                                                       "provenance": {"from_hparams": args.from_hparams}},
                                                      sort_keys=False))
            print(f"wrote {args.out}: run it with  python sweeps/{cfg.ALG}.py --config {args.out}")
            return 0
        if not (args.config and args.hparams_out):
            raise ValueError("give a trial YAML and --hparams-out, or --from-hparams and --out")
        doc = yaml.safe_load(Path(args.config).read_text())
        cfg = config_for({**doc["config"], **({"model": args.model} if args.model else {})})
        from transformers import AutoConfig

        path = model_path(cfg.model)  # the editing testbed for `testbed`, as the trials load
        write_easyedit_yaml(cfg, AutoConfig.from_pretrained(path), path, args.hparams_out)
        print(f"wrote {args.hparams_out} (EasyEdit {cfg.ALG.upper()} hparams)")
        return 0
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
