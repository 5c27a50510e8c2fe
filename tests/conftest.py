"""Shared test fixtures: paths to ../shared (traces, calibration), skipping clearly when absent."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# ../shared next to the repository; LAMBDASCALE_SHARED points elsewhere (a worktree outside the workplace)
SHARED = Path(os.environ.get("LAMBDASCALE_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def traces_dir() -> Path:
    """``../shared/traces``; tests that need real traces skip when it is absent."""
    d = SHARED / "traces"
    if not d.is_dir():
        pytest.skip(f"real traces not found at {d} (they live in the workplace's shared/ folder, not in the repo)")
    return d


@pytest.fixture(scope="session")
def calibration_dir() -> Path:
    """``../shared/calibration``; tests that need measured GPU figures skip when it is absent."""
    d = SHARED / "calibration"
    if not d.is_dir():
        pytest.skip(f"calibration data not found at {d}")
    return d


@pytest.fixture(scope="session")
def demo_model_dir() -> Path:
    """A models directory holding ``smollm2-135m`` in our block format (imported once, cached).

    The cache lives in ``~/.cache/lambdascale/test-models/v<format version>-<schema digest>``
    (override the base with ``LAMBDASCALE_TEST_MODELS``): the digest is of the manifest's JSON
    schema, so a checkout whose manifest reads other fields (another branch, a new field) gets a
    cache of its own instead of rewriting one another checkout reads. A file lock makes concurrent
    test sessions import it only once. Returns the models directory (use
    ``find_model(demo_model_dir, "smollm2-135m")``).
    """
    import hashlib
    import json
    import os

    from lambdascale.model.importers import DEMO_MODEL, import_model
    from lambdascale.model.manifest import FORMAT_VERSION, Manifest

    base = Path(os.environ.get("LAMBDASCALE_TEST_MODELS", Path.home() / ".cache" / "lambdascale" / "test-models"))
    schema = hashlib.sha256(json.dumps(Manifest.model_json_schema(), sort_keys=True).encode()).hexdigest()[:10]
    d = base / f"v{FORMAT_VERSION}-{schema}"
    d.mkdir(parents=True, exist_ok=True)
    with open(d / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            import_model(DEMO_MODEL, d)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return d
