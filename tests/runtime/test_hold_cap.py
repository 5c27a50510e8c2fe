"""HoldModel's ``ssd_cap``: the agent's store read is paced by the SSD bucket unless the caller opts out."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from lambdascale.model.manifest import read_manifest
from lambdascale.runtime.agent import NodeAgent
from lambdascale.runtime.settings import RuntimeSettings
from lambdascale.transfer.settings import TransferSettings


class _CountingBucket:
    """Stands in for the agent's SSD token bucket: records what was asked of it."""

    def __init__(self) -> None:
        self.bytes = 0

    async def acquire_async(self, n: int) -> None:
        self.bytes += n


@pytest.mark.parametrize("capped", [True, False])
def test_store_read_is_paced_only_when_capped(tiny_model: Path, capped: bool) -> None:
    agent = NodeAgent(0, ("127.0.0.1", 9), TransferSettings(ssd_gbps=0.001), RuntimeSettings())
    bucket = _CountingBucket()
    agent.buffers.ssd_bucket = bucket  # type: ignore[assignment]
    m = read_manifest(tiny_model)
    st = asyncio.run(agent.buffers.read_blocks(m, tiny_model, capped))
    assert st.held == set(range(m.n_chunks))  # every chunk read and verified either way
    assert bucket.bytes == (m.total_bytes if capped else 0)
