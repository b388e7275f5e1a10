"""The one test hook in the trial code.

``APIUPDATE_TEST_HOOK=module:function`` names a function that a trial calls at a few named
points with keyword details: ``fire("trial_start")`` before it trains, ``fire("epoch_end",
epoch=k)`` after each reported epoch (an editing phase counts as one), ``fire("report")``
before each report through Ray Tune. The tests' fault injection and concurrency barrier live in
``tests/faults.py`` and are reached only through it; unset, a call costs one dictionary lookup.
The sweep engine forwards the variable to Ray's workers.
"""
from __future__ import annotations

import importlib
import os

ENV = "APIUPDATE_TEST_HOOK"
_loaded: dict[str, object] = {}


def fire(point: str, **info) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    fn = _loaded.get(spec)
    if fn is None:
        module, _, name = spec.partition(":")
        fn = _loaded[spec] = getattr(importlib.import_module(module), name)
    fn(point, **info)
