"""Optional mutual TLS (transfer.tls_cert / tls_key / tls_ca) on the tcp transport and the control
channel: bytes move under it; a peer without TLS, or with a certificate the cluster CA did not sign,
is refused before the secret's handshake, lands nothing, and the listener goes on serving."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from lambdascale.errors import LambdaScaleError, TransferError
from lambdascale.transfer.auth import new_secret
from lambdascale.transfer.conn import tls_contexts
from lambdascale.transfer.factory import make_transport
from lambdascale.transfer.settings import TransferSettings

SECRET = new_secret()


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(d: Path, name: str) -> dict[str, str]:
    """A CA and one node certificate it signed, as PEM files in ``d`` (the openssl CLI)."""
    d.mkdir(parents=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", f"/CN={name} CA", cwd=d)
    _openssl("req", *ec, "-keyout", "node.key", "-out", "node.csr", "-subj", f"/CN={name} node", cwd=d)
    _openssl("x509", "-req", "-in", "node.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "node.pem", "-days", "2", cwd=d)
    return {"tls_cert": str(d / "node.pem"), "tls_key": str(d / "node.key"), "tls_ca": str(d / "ca.pem")}


@pytest.fixture(scope="module")
def cas(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, str], dict[str, str]]:
    if shutil.which("openssl") is None:
        pytest.skip("the TLS tests make their certificates with the openssl command, which is not installed")
    root = tmp_path_factory.mktemp("tls")
    return make_ca(root / "cluster", "cluster"), make_ca(root / "stranger", "stranger")


def test_tls_settings_come_as_three_files_or_none(tmp_path: Path, cas) -> None:
    cluster, _ = cas
    assert tls_contexts(None, None, None) is None
    with pytest.raises(LambdaScaleError, match="missing: tls_ca"):
        tls_contexts(cluster["tls_cert"], cluster["tls_key"], None)
    with pytest.raises(LambdaScaleError, match=r"transfer.tls_ca: no such file"):
        tls_contexts(cluster["tls_cert"], cluster["tls_key"], str(tmp_path / "nope.pem"))
    with pytest.raises(LambdaScaleError, match="do not load"):
        tls_contexts(cluster["tls_ca"], cluster["tls_key"], cluster["tls_ca"])  # a cert with another's key


def test_transport_moves_bytes_under_tls_and_refuses_peers_outside_it(cas) -> None:
    cluster, stranger = cas

    async def main() -> None:
        tls = TransferSettings(connect_timeout_s=2.0, **cluster)
        a = make_transport("tcp", 0, tls, secret=SECRET)
        b = make_transport("tcp", 1, tls, secret=SECRET)
        plain = make_transport("tcp", 2, TransferSettings(connect_timeout_s=2.0), secret=SECRET)
        other = make_transport("tcp", 3, TransferSettings(connect_timeout_s=2.0, **stranger), secret=SECRET)
        ts = (a, b, plain, other)
        try:
            for t, fill in zip(ts, (1, 0, 7, 9)):
                await t.start()
                np.frombuffer(t.register("x", 1 << 20), dtype=np.uint8)[:] = fill
            for t in (a, plain, other):
                t.add_peer(b.info())
            await a.send(1, "x", 0, 1 << 20, "ok")  # a megabyte: many TLS records
            assert (await asyncio.wait_for(b.arrivals.get(), 5)).tag == "ok"
            assert bytes(b.buffer("x")) == b"\x01" * (1 << 20)
            await a.fetch(1, "x", 0, 4096)
            # the right secret but no TLS, or TLS from another CA: nothing lands
            with pytest.raises((TransferError, ConnectionError, OSError)):
                await plain.send(1, "x", 0, 4096, "plain")
            with pytest.raises((TransferError, ConnectionError, OSError)):
                await other.send(1, "x", 0, 4096, "stranger")
            assert b.arrivals.empty() and bytes(b.buffer("x")) == b"\x01" * (1 << 20)
            await a.send(1, "x", 0, 8, "still")  # the listener goes on serving
            assert (await asyncio.wait_for(b.arrivals.get(), 5)).tag == "still"
        finally:
            for t in ts:
                await t.close()

    asyncio.run(main())


def test_a_cluster_under_tls_multicasts(tmp_path: Path, cas) -> None:
    """Control channel and transport both under TLS: agents register, a multicast lands the model."""
    from lambdascale.model.importers import import_model
    from lambdascale.runtime.launcher import LocalCluster
    from lambdascale.runtime.messages import HoldModel
    from lambdascale.runtime.multicast import prepare_receivers, run_multicast
    from lambdascale.runtime.settings import RuntimeSettings

    cluster, _ = cas
    ck = import_model("synthetic:tiny-llama", tmp_path, n_blocks=2, chunks_per_block=2)

    async def main() -> None:
        async with LocalCluster(3, TransferSettings(**cluster), RuntimeSettings(heartbeat_s=0.2)) as lc:
            assert lc.cluster.tls is not None
            await lc.cluster.request(0, HoldModel(req=0, model_dir=str(ck.dir)))
            await prepare_receivers(lc.cluster, ck.manifest, [1, 2])
            res = await run_multicast(lc.cluster, ck.manifest, [0], [1, 2], timeout_s=30)
            assert set(res.node_full_s) == {1, 2} and res.corrupt == 0
            # a client without TLS reaches the port and gets no byte of the protocol
            host, port = lc.cluster.address
            r, w = await asyncio.open_connection(host, port)
            w.write(b"LSAH" + bytes(34))
            assert await asyncio.wait_for(r.read(100), 10) == b""
            w.close()

    asyncio.run(main())
