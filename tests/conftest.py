"""Shared test fixtures: paths to ../shared (traces, calibration), skipping clearly when absent."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


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
