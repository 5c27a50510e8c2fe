"""Fixtures for runtime tests: a tiny synthetic model on disk, and a helper to run async bodies."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``synthetic:tiny-llama`` (8 layers, ~1.3 MB float32) in 8 blocks x 2 chunks; returns its dir."""
    from lambdascale.model.importers import import_model

    d = tmp_path_factory.mktemp("models")
    ck = import_model("synthetic:tiny-llama", d, n_blocks=8, chunks_per_block=2)
    return ck.dir


def run_async(coro, timeout: float = 60.0):
    """Run ``coro`` with a hard bound so a bug shows up as a failure, not a hung test run."""
    return asyncio.run(asyncio.wait_for(coro, timeout))
