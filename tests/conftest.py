"""Shared fixtures: a 4-migration fixture dataset and a small testbed built from it.

Every test runs against ``tests/fixtures`` (APIUPDATE_DATA_DIR) and a 4-layer testbed
(APIUPDATE_TESTBED) so that whole sweeps finish in seconds; the cache lives in
APIUPDATE_CACHE (CI keeps it in the clone's .cache/) or a per-session temp folder.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
# The tests' world keeps the testbed's earlier corpus (no renamed or tagged probe copies): its
# base figures are what the tests pin, and 150 steps are enough for it.
SMALL_TESTBED = {"steps": 150, "num_layers": 4, "hidden_size": 64, "intermediate_size": 172, "vocab_size": 512,
                 "renamed_copies": 0, "tagged_new_copies": 1, "tagged_new_probes": False, "specificity_copies": 0}

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def small_env(cache: Path) -> dict[str, str]:
    return {
        "APIUPDATE_CACHE": str(cache),
        "APIUPDATE_DATA_DIR": str(FIXTURES),
        "APIUPDATE_TESTBED": json.dumps(SMALL_TESTBED),
        "RAY_AUTH_MODE": "disabled",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": str(ROOT),
        # fault injection and the concurrency barrier (tests/faults.py), off unless a test sets
        # APIUPDATE_FAULT or APIUPDATE_BARRIER
        "APIUPDATE_TEST_HOOK": "tests.faults:hook",
    }


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    if os.environ.get("APIUPDATE_CACHE"):
        return Path(os.environ["APIUPDATE_CACHE"])
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session", autouse=True)
def _small_world(cache_dir):
    """Point the whole session (and the Ray workers it starts) at the fixture data + small testbed."""
    os.environ.update(small_env(cache_dir))


@pytest.fixture(scope="session")
def small_testbed(_small_world) -> Path:
    from trainables.testbed import ensure_testbed

    return ensure_testbed()


@pytest.fixture(scope="session")
def fixture_data(_small_world):
    from trainables.data import load_locality, load_migrations

    return load_migrations(FIXTURES / "migrations.jsonl"), load_locality(FIXTURES / "locality.jsonl")
