"""Helper parameters that a search space samples only to derive config fields, both ways.

Two config fields are not sampled directly. ``max_grad_norm`` can be ``None`` (no clipping), so
a space samples ``clip`` and then either ``max_grad_norm`` or the constant ``None``
(:func:`suggest_clip`, :func:`clipping`). ``layer_end`` would need a range that depends on
``layer_start``, where Optuna's multivariate TPE falls back to independent sampling, so a space
samples ``layer_start`` and ``layer_span`` on fixed ranges and derives ``layer_end``
(:func:`layer_range`). :func:`search_params` maps a trial config back (``--start-from``), and a
method's config class skips :data:`SEARCH_ONLY` when it is built from a trial's config.

Nothing here imports Ray (the driver's input checks call :func:`start_params`); Optuna is
imported where it is used.
"""
from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trainables.sweep.methods import Method

CLIP = "clip"
LAYER_SPAN = "layer_span"
# In a trial's config, not in the method's config: their effect is in max_grad_norm / layer_end.
SEARCH_ONLY: tuple[str, ...] = (CLIP, LAYER_SPAN)


# ------------------------------------------------------------------ forward: sampled -> config
def suggest_clip(trial) -> bool:
    """Whether this trial clips gradients; pass the answer to :func:`clipping` at the end of the
    space (the order of the suggest calls decides which trials a seed gives)."""
    return trial.suggest_categorical(CLIP, [True, False])


def clipping(trial, clip: bool) -> dict:
    """``max_grad_norm`` on a log range when ``clip``, else the constant ``max_grad_norm = None``
    (returned as a fixed config value, as a space returns its constants)."""
    if clip:
        trial.suggest_float("max_grad_norm", 0.1, 10.0, log=True)
        return {}
    return {"max_grad_norm": None}


def layer_range(trial, n_layers: int, max_span: int) -> dict:
    """``layer_start`` and ``layer_span`` on fixed ranges (a span of at most ``max_span``
    layers), and the derived ``layer_end``, capped at the model's last layer + 1."""
    start = trial.suggest_int("layer_start", 0, n_layers - 1)
    span = trial.suggest_int(LAYER_SPAN, 1, max(1, max_span))
    return {"layer_end": min(start + span, n_layers)}


# ------------------------------------------------------------------ inverse: config -> sampled
def search_params(config: dict, sampled: Collection[str]) -> dict:
    """``config`` with its derived values written as the helpers a space samples (``sampled``,
    the names it can sample): ``layer_end`` -> ``layer_span``, ``max_grad_norm`` -> ``clip``.
    Without clipping, ``max_grad_norm`` is dropped: the space does not sample it then."""
    config = dict(config)
    if LAYER_SPAN in sampled and LAYER_SPAN not in config and {"layer_start", "layer_end"} <= set(config):
        config[LAYER_SPAN] = int(config["layer_end"]) - int(config["layer_start"])
    if CLIP in sampled and CLIP not in config and "max_grad_norm" in config:
        config[CLIP] = config["max_grad_norm"] is not None
    if config.get(CLIP) is False or config.get("max_grad_norm", 0) is None:
        config.pop("max_grad_norm", None)
    return config


def unsampled(params: dict) -> set[str]:
    """The parameters a space does not sample given these helper values (no clipping: no
    ``max_grad_norm``)."""
    return {"max_grad_norm"} if params.get(CLIP) is False else set()


# ------------------------------------------------------------------ what a space samples
def space_distributions(method: Method, n_layers: int, max_epochs: int, draws: int = 64) -> dict:
    """Every parameter the space can sample, with its Optuna distribution: the union over
    ``draws`` random asks of a throwaway study (a conditional parameter such as max_grad_norm
    appears on one branch only)."""
    import optuna

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    out: dict = {}
    for _ in range(draws):
        t = study.ask()
        method.space(t, n_layers=n_layers, max_epochs=max_epochs)
        out.update(t.distributions)
        study.tell(t, state=optuna.trial.TrialState.FAIL)
    return out


def start_params(config: dict, method: Method, n_layers: int, max_epochs: int) -> tuple[dict, list[str]]:
    """The search parameters a trial config fixes (an export_best.py YAML's ``config``, or one
    written by hand), for a first trial that starts the search there, and the parameters left to
    the sampler. Derived values map back to the helpers (:func:`search_params`). Raises
    ValueError naming the first value this space cannot sample."""
    dists = space_distributions(method, n_layers, max_epochs)
    config = search_params(config, dists)
    params = {}
    for name, dist in dists.items():
        if name not in config:
            continue
        value = config[name]
        try:
            ok = dist._contains(dist.to_internal_repr(value))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            choices = getattr(dist, "choices", None)
            where = (f"one of {list(choices)}" if choices is not None
                     else f"in [{dist.low:g}, {dist.high:g}]" if hasattr(dist, "low") else str(dist))
            raise ValueError(f"{name}={value!r} is not one this search samples ({where}, {n_layers} layers, "
                             f"--max-epochs {max_epochs})")
        params[name] = dist.to_external_repr(dist.to_internal_repr(value))  # 8 -> the choice 8.0
    needed = unsampled(params)
    left = sorted(n for n in dists if n not in params and n not in needed)
    return params, left
