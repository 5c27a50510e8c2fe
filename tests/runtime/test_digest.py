"""``transfer.digest``: receivers check each chunk's SHA-256/BLAKE3 digest from the controller
beside its xxh64, so bytes that pass the xxh64 but are not the model's are never held or forwarded."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from lambdascale.errors import LambdaScaleError, TransferError
from lambdascale.model.digests import chunk_digests
from lambdascale.model.manifest import read_manifest
from lambdascale.runtime.launcher import LocalCluster
from lambdascale.runtime.messages import GetStatus, HoldModel, PrepareReceive
from lambdascale.runtime.multicast import prepare_receivers, run_multicast
from lambdascale.runtime.settings import RuntimeSettings
from lambdascale.transfer.settings import TransferSettings
from tests.runtime.conftest import run_async
from tests.runtime.test_multicast import _assert_full

FAST_HB = RuntimeSettings(heartbeat_s=0.2)


@pytest.fixture
def model(tmp_path: Path) -> Path:
    from lambdascale.model.importers import import_model

    return import_model("synthetic:tiny-llama", tmp_path, n_blocks=4, chunks_per_block=4).dir


@pytest.mark.parametrize("algo", ["sha256", "blake3"])
def test_digests_are_the_chunks_and_cached(model: Path, algo: str) -> None:
    m = read_manifest(model)
    got = chunk_digests(model, m, algo)
    stream = b"".join((model / b.file).read_bytes() for b in m.blocks)
    if algo == "sha256":
        assert got == [hashlib.sha256(stream[c.offset:c.end]).hexdigest() for c in m.chunks]
    assert (model / f"chunk-digests.{algo}.json").is_file()
    assert chunk_digests(model, m, algo) == got  # from the cache


def test_a_multicast_with_digests_lands_the_model(model: Path) -> None:
    async def main() -> None:
        async with LocalCluster(3, TransferSettings(digest="sha256"), FAST_HB) as lc:
            m = read_manifest(model)
            await lc.cluster.request(0, HoldModel(req=0, model_dir=str(model)))
            with pytest.raises(LambdaScaleError, match="needs the directory"):
                await prepare_receivers(lc.cluster, m, [1, 2])
            await prepare_receivers(lc.cluster, m, [1, 2], model)
            res = await run_multicast(lc.cluster, m, [0], [1, 2], timeout_s=30)
            assert set(res.node_full_s) == {1, 2} and res.corrupt == 0
            await _assert_full(lc, model, [1, 2])

    run_async(main())


def test_bytes_that_are_not_the_models_are_refused_and_not_forwarded(model: Path) -> None:
    """The receiver is told a digest for chunk 3 that its bytes do not have (what a tampered chunk
    with a matching xxh64 looks like to it): chunk 3 is reported corrupt every time, never held,
    so never forwarded; every other chunk lands. A receiver without digests refuses to prepare."""
    async def main() -> None:
        async with LocalCluster(3, TransferSettings(digest="sha256"), FAST_HB) as lc:
            m = read_manifest(model)
            await lc.cluster.request(0, HoldModel(req=0, model_dir=str(model)))
            with pytest.raises(Exception, match="sent no digests"):
                await lc.cluster.request(1, PrepareReceive(req=0, manifest=m.model_dump(mode="json")))
            wrong = chunk_digests(model, m, "sha256")
            wrong[3] = hashlib.sha256(b"not the model").hexdigest()
            await lc.cluster.request(1, PrepareReceive(req=0, manifest=m.model_dump(mode="json"), digests=wrong))
            await lc.cluster.broadcast_peers()  # what prepare_receivers does after preparing
            with pytest.raises(TransferError) as e:
                await run_multicast(lc.cluster, m, [0], [1], timeout_s=8)
            assert "chunks missing per node: {1: 1}" in str(e.value)
            st = await lc.cluster.request(1, GetStatus(req=0))
            assert st["models"][m.name] == [c for c in range(m.n_chunks) if c != 3]

    run_async(main())
