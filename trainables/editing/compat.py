"""Run easyeditor's own ROME and MEMIT under transformers 5 on a CPU-only torch.

easyeditor's only PyPI release (0.0.1.dev0, 2023; install with ``pip install --no-deps``) was
written for torch 2.0 / transformers 4.30 on CUDA. Nothing of it is copied here and no installed
file is edited; this module works around each break at import or call time. The breaks, each
pinned against the installed package by ``tests/test_editing.py`` (``BREAKS`` below), so a
release that fixes one is noticed and its shim can go:

1. ``import easyeditor`` runs ``from .editors import *`` / ``from .trainer import *`` and
   ``easyeditor/models/__init__`` imports every method, which pulls in BLIP2 / MiniGPT-4 code
   (timm, torchvision, opencv, ...; under transformers 5 it fails on the removed
   ``apply_chunking_to_forward``). -> :func:`load` registers bare package objects for
   ``easyeditor`` and ``easyeditor.models`` (their ``__path__`` only) and imports the ROME and
   MEMIT submodules through them; the ``util`` and ``models.rome|memit`` packages import as shipped.
2. 20 call sites hard-code ``f"cuda:{hparams.device}"``: "Torch not compiled with CUDA
   enabled" on a CPU-only torch. -> :func:`device_redirect` maps those strings to the model's
   device in ``Tensor.to``, ``BatchEncoding.to``, ``torch.zeros`` and ``torch.tensor`` for the
   duration of an edit call only (no-op when the model is on a CUDA device).
3. transformers 5 decoder layers return a tensor, not a ``(hidden, ...)`` tuple; MEMIT's
   ``compute_z`` indexes ``cur_out[0][i, idx, :]`` (IndexError: too many indices) and reads
   ``tr[layer].output[0]`` (silently the first batch row). -> :class:`_TupleTraceDict` hands that
   code a one-element tuple and unwraps what it returns; installed as ``compute_z.nethook``.
4. The tokenizer: ``BaseEditor`` loads ``LlamaTokenizer`` for a path containing "llama" (mangles
   a byte-level BPE); the algorithms assume right padding (``ex_len - len(target)`` indexing) and a
   tokenizer that adds BOS like Llama's (they strip it from targets). -> we never use
   ``BaseEditor``; :func:`edit_tokenizer` gives the algorithms a copy of the project's
   tokenizer that pads on the right and prepends BOS, as the model was trained.
5. ``layer_stats`` downloads ``wikipedia 20200501.en`` for the key covariance (ROME's
   ``mom2_adjustment``, MEMIT's ``mom2_update_weight`` term); impossible offline. ->
   :func:`local_layer_stats` computes the same second moment (easyeditor's own ``SecondMoment``
   over the rewrite module's inputs at every non-pad token) from a local corpus (the project's
   old-API contexts and locality snippets), installed as ``layer_stats`` in both algorithms.
6. ``get_context_templates`` samples prefixes with ``generate_fast`` from English starters
   ("The", "Because", ...), meaningless for a code model and a cost per process. -> the template
   caches are preset to code-comment prefixes (:data:`CONTEXT_PREFIXES`).
7. Mixed precision: with the model in bf16 or fp16 (``--dtype``) the representations
   ``repr_tools`` reads off the model come in that dtype while the covariance statistics, their
   inverse and the optimised ``delta`` are fp32: ROME's ``compute_u`` multiplies the fp32 inverse
   covariance by a bf16 key (``expected m1 and m2 to have the same dtype``) and ``compute_v``
   takes ``torch.dot`` of a bf16 key and the fp32 left vector. -> :func:`_fp32_repr_tools` hands
   the algorithms fp32 copies of every representation, so the statistics, the left vector, the
   right vector and MEMIT's (float64) solve all run at full precision whatever the model's
   dtype; the update is added into the weights in place, so they stay in the model's dtype
   (a no-op for an fp32 model).
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.util
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

# Code prefixes the edit prompt is also written after, so the new object is learnt as a fact
# about the subject rather than about one exact line (ROME s3.1 uses ~10 sampled prefixes).
CONTEXT_PREFIXES = ("{}", "import os\n{}", "x = 1\n{}", "# utils\n{}", "def f():\n    pass\n{}")


@dataclass(frozen=True)
class Break:
    """One known incompatibility of the installed easyeditor and how to check it still holds."""

    name: str
    module: str  # easyeditor submodule whose source shows it
    evidence: str  # text that must still be in that source while the break exists


BREAKS = (
    Break("multimodal imports in the package init", "easyeditor", "from .editors import *"),
    Break("multimodal imports in models/__init__", "easyeditor.models", "from .mend import *"),
    Break("hard-coded CUDA device (ROME v)", "easyeditor.models.rome.compute_v", 'f"cuda:{hparams.device}"'),
    Break("hard-coded CUDA device (ROME u)", "easyeditor.models.rome.compute_u", 'f"cuda:{hparams.device}"'),
    Break("hard-coded CUDA device (MEMIT)", "easyeditor.models.memit.memit_main", 'f"cuda:{hparams.device}"'),
    Break("tuple decoder-layer outputs (MEMIT z)", "easyeditor.models.memit.compute_z", "cur_out[0][i, idx, :]"),
    Break("tuple decoder-layer outputs (MEMIT loss)", "easyeditor.models.memit.compute_z", ".output[0][\n"),
    Break("covariance from the Wikipedia download", "easyeditor.models.rome.layer_stats", "wikipedia="),
    Break("right padding assumed", "easyeditor.models.rome.compute_v", "ex_len - len(target_ids)"),
    Break("model-dtype keys times the fp32 inverse covariance (ROME u)", "easyeditor.models.rome.compute_u",
          "@ u.unsqueeze(1)"),
    Break("model-dtype key dotted with the fp32 left vector (ROME v)", "easyeditor.models.rome.compute_v",
          "torch.dot(cur_input, left_vector)"),
)


def package_dir() -> Path:
    spec = importlib.util.find_spec("easyeditor")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("easyeditor is not installed: pip install --no-deps easyeditor==0.0.1.dev0 "
                          "(the editing sweeps' --backend easyeditor needs it)")
    return Path(list(spec.submodule_search_locations)[0])


def source_of(module: str) -> str:
    """Installed source text of an easyeditor (sub)module, without importing it."""
    rel = module.split(".")[1:]
    base = package_dir().joinpath(*rel)
    path = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
    return path.read_text()


def still_broken() -> dict[str, bool]:
    """Break name -> whether the installed easyeditor still shows it."""
    return {b.name: b.evidence in source_of(b.module) for b in BREAKS}


@dataclass
class EasyEdit:
    """The pieces of easyeditor the project drives."""

    rome_main: types.ModuleType
    memit_main: types.ModuleType
    ROMEHyperParams: type
    MEMITHyperParams: type
    nethook: types.ModuleType
    runningstats: types.ModuleType


_LOADED: EasyEdit | None = None


def _bare_package(name: str, path: Path) -> None:
    """Register ``name`` as a package whose __init__ is never run (break 1)."""
    if name in sys.modules and getattr(sys.modules[name], "__apiupdate_bare__", False):
        return
    mod = types.ModuleType(name)
    mod.__path__ = [str(path)]
    mod.__apiupdate_bare__ = True
    mod.__spec__ = importlib.util.spec_from_loader(name, loader=None, is_package=True)
    mod.__spec__.submodule_search_locations = [str(path)]
    sys.modules[name] = mod


def load() -> EasyEdit:
    """Import easyeditor's ROME and MEMIT without its multimodal package init."""
    global _LOADED
    if _LOADED is not None:
        return _LOADED
    root = package_dir()
    if "easyeditor" in sys.modules and not getattr(sys.modules["easyeditor"], "__apiupdate_bare__", False):
        pass  # the real package was imported elsewhere (it can be, with all its deps): use it
    else:
        _bare_package("easyeditor", root)
        _bare_package("easyeditor.models", root / "models")
    imp = importlib.import_module
    rome_main = imp("easyeditor.models.rome.rome_main")
    memit_main = imp("easyeditor.models.memit.memit_main")
    _LOADED = EasyEdit(
        rome_main=rome_main,
        memit_main=memit_main,
        ROMEHyperParams=imp("easyeditor.models.rome.rome_hparams").ROMEHyperParams,
        MEMITHyperParams=imp("easyeditor.models.memit.memit_hparams").MEMITHyperParams,
        nethook=imp("easyeditor.util.nethook"),
        runningstats=imp("easyeditor.util.runningstats"),
    )
    return _LOADED


def version() -> str:
    from importlib.metadata import version as v

    return v("easyeditor")


# --------------------------------------------------------------------------- break 2: devices
@contextlib.contextmanager
def device_redirect(device):
    """While active, ``cuda:N`` device arguments mean ``device`` (when that is not CUDA)."""
    import torch
    from transformers import BatchEncoding

    device = torch.device(device)
    if device.type == "cuda":
        yield
        return

    def fix(d):
        if isinstance(d, str) and d.startswith("cuda"):
            return device
        if isinstance(d, torch.device) and d.type == "cuda":
            return device
        return d

    orig = {"to": torch.Tensor.to, "be_to": BatchEncoding.to, "zeros": torch.zeros, "tensor": torch.tensor}

    def tensor_to(self, *args, **kwargs):
        args = tuple(fix(a) for a in args)
        if "device" in kwargs:
            kwargs["device"] = fix(kwargs["device"])
        return orig["to"](self, *args, **kwargs)

    def be_to(self, dev, *args, **kwargs):
        return orig["be_to"](self, fix(dev), *args, **kwargs)

    def zeros(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = fix(kwargs["device"])
        return orig["zeros"](*args, **kwargs)

    def tensor(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = fix(kwargs["device"])
        return orig["tensor"](*args, **kwargs)

    torch.Tensor.to, BatchEncoding.to, torch.zeros, torch.tensor = tensor_to, be_to, zeros, tensor
    try:
        yield
    finally:
        torch.Tensor.to, BatchEncoding.to = orig["to"], orig["be_to"]
        torch.zeros, torch.tensor = orig["zeros"], orig["tensor"]


# --------------------------------------------------------------------------- break 3: layer outputs
class _TupleView:
    """A retained Trace whose tensor output is presented as ``(output,)``."""

    def __init__(self, trace):
        self._trace = trace

    def __getattr__(self, name):
        value = getattr(self._trace, name)
        if name == "output" and not isinstance(value, tuple):
            return (value,)
        return value


def _tuple_nethook(nethook: types.ModuleType) -> types.ModuleType:
    """A copy of easyeditor's nethook whose TraceDict shows tensor layer outputs as 1-tuples."""
    import torch

    class _TupleTraceDict(nethook.TraceDict):
        def __init__(self, module, layers=None, *args, edit_output=None, **kwargs):
            if edit_output is not None:
                user_fn = edit_output

                def edit_output(output, layer):  # noqa: F811 - wraps the caller's function
                    if isinstance(output, torch.Tensor):
                        return nethook.invoke_with_optional_args(user_fn, output=(output,), layer=layer)[0]
                    return nethook.invoke_with_optional_args(user_fn, output=output, layer=layer)

            super().__init__(module, layers, *args, edit_output=edit_output, **kwargs)

        def __getitem__(self, key):
            return _TupleView(super().__getitem__(key))

    shim = types.ModuleType(nethook.__name__ + "_tuple_outputs")
    shim.__dict__.update({k: v for k, v in vars(nethook).items() if not k.startswith("__")})
    shim.TraceDict = _TupleTraceDict
    return shim


# --------------------------------------------------------------------------- break 4: tokenizer
def edit_tokenizer(tokenizer):
    """Copy of ``tokenizer`` that pads on the right and prepends BOS where the shared evaluation
    does (``models.start_ids``: the testbed's BOS is not in its tokenizer's template; a model
    without one, such as Qwen2 or SmolLM2, gets none)."""
    from tokenizers import processors

    from trainables.tokens import start_ids

    tok = copy.deepcopy(tokenizer)
    tok.padding_side = "right"
    if start_ids(tokenizer) and hasattr(tok, "_tokenizer"):
        probe = tok("x")["input_ids"]
        if not probe or probe[0] != tok.bos_token_id:
            tok._tokenizer.post_processor = processors.TemplateProcessing(
                single=f"{tok.bos_token} $A", pair=f"{tok.bos_token} $A $B",
                special_tokens=[(tok.bos_token, tok.bos_token_id)])
    return tok


# --------------------------------------------------------------------------- break 7: precision
def _fp32_repr_tools(repr_tools: types.ModuleType) -> types.ModuleType:
    """A copy of easyeditor's ``repr_tools`` whose representations come back in fp32 whatever the
    model's dtype (the same tensors for an fp32 model)."""

    def fp32(fn):
        def reprs(*args, **kwargs):
            out = fn(*args, **kwargs)
            return tuple(t.float() for t in out) if isinstance(out, tuple) else out.float()

        return reprs

    shim = types.ModuleType(repr_tools.__name__ + "_fp32")
    shim.__dict__.update({k: v for k, v in vars(repr_tools).items() if not k.startswith("__")})
    shim.get_reprs_at_idxs = fp32(repr_tools.get_reprs_at_idxs)
    shim.get_reprs_at_word_tokens = fp32(repr_tools.get_reprs_at_word_tokens)
    return shim


# --------------------------------------------------------------------------- break 5: covariance
def local_layer_stats(corpus: list[str], batch_size: int = 32):
    """A drop-in for easyeditor's ``layer_stats`` over ``corpus`` (no download).

    Same statistic as the original: easyeditor's ``SecondMoment`` of the inputs of
    ``layer_name`` at every attended token; ``sample_size`` caps the number of texts."""
    ee = load()

    def layer_stats(model, tokenizer, layer_name, stats_dir, ds_name, to_collect, model_name=None,
                    sample_size=None, precision=None, batch_tokens=None, download=True, progress=None,
                    force_recompute=False, hparams=None):
        import torch

        if list(to_collect) != ["mom2"]:
            raise ValueError(f"local_layer_stats collects mom2 only, asked for {to_collect}")
        dtype = getattr(torch, precision or "float64")
        texts = corpus[: int(sample_size)] if sample_size else corpus
        device = next(model.parameters()).device
        stat = ee.runningstats.CombinedStat(mom2=ee.runningstats.SecondMoment())
        with torch.no_grad():
            for i in range(0, len(texts), batch_size):
                batch = tokenizer(texts[i : i + batch_size], return_tensors="pt", padding=True,
                                  truncation=True, max_length=128).to(device)
                with ee.nethook.Trace(model, layer_name, retain_input=True, retain_output=False, stop=True) as tr:
                    model(**batch)
                feats = tr.input.reshape(-1, tr.input.size(-1))[batch["attention_mask"].reshape(-1).nonzero()[:, 0]]
                stat.add(feats.to(dtype))
        return stat

    return layer_stats


# --------------------------------------------------------------------------- all together
@contextlib.contextmanager
def patched(corpus: list[str], device) -> Iterable[EasyEdit]:
    """Everything above, active for one edit call; restores easyeditor's module globals after."""
    ee = load()
    rome_u = sys.modules["easyeditor.models.rome.compute_u"]
    z_mod = sys.modules["easyeditor.models.memit.compute_z"]
    stats = local_layer_stats(corpus)
    saved: list[tuple[Any, str, Any]] = []

    def put(obj, name, value):
        saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    put(rome_u, "layer_stats", stats)
    put(ee.memit_main, "layer_stats", stats)
    put(z_mod, "nethook", _tuple_nethook(ee.nethook))
    reprs = _fp32_repr_tools(importlib.import_module("easyeditor.models.rome.repr_tools"))
    for mod in (rome_u, sys.modules["easyeditor.models.rome.compute_v"], z_mod):
        put(mod, "repr_tools", reprs)
    put(ee.rome_main, "CONTEXT_TEMPLATES_CACHE", list(CONTEXT_PREFIXES))
    put(ee.memit_main, "CONTEXT_TEMPLATES_CACHE", [[CONTEXT_PREFIXES[0]], list(CONTEXT_PREFIXES[1:])])
    # The covariance caches are keyed by (model name, layer): clear them, a new corpus or model
    # under the same name must not reuse another's statistics.
    rome_u.inv_mom2_cache.clear()
    ee.memit_main.COV_CACHE.clear()
    try:
        with device_redirect(device):
            yield ee
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)
