"""Node agents on real processes: registration, requests, loss detection, no orphans."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lambdascale.runtime.cluster import AgentRequestError, NodeLost, NodeLostError
from lambdascale.runtime.launcher import LocalCluster
from lambdascale.runtime.messages import GetStatus, HoldModel, SendChunks
from lambdascale.runtime.settings import RuntimeSettings
from tests.runtime.conftest import run_async


def _gone(pid: int) -> bool:
    """True when ``pid`` no longer runs (absent, or a zombie waiting for its reaper)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def test_agents_register_answer_and_report_loss(tiny_model: Path) -> None:
    async def main() -> None:
        async with LocalCluster(2, runtime=RuntimeSettings(heartbeat_s=0.2, respawn=False)) as lc:
            c = lc.cluster
            assert c.alive() == [0, 1]
            st = await c.request(1, GetStatus(req=0))
            assert st["node"] == 1 and st["pid"] == lc.launcher.pids()[1]
            # runtime.agent_switch_interval_ms, not CPython's 5 ms (the engine thread and the sends share the lock)
            assert st["switch_interval_ms"] == pytest.approx(1.0)
            data = await c.request(0, HoldModel(req=0, model_dir=str(tiny_model)))
            assert data["held"] == list(range(16))
            assert data["peer"]["backend"] == "tcp" and data["peer"]["port"] > 0
            with pytest.raises(AgentRequestError, match=r"node 1: .*no manifest"):
                await c.request(1, HoldModel(req=0, model_dir=str(tiny_model.parent / "nope")))
            with pytest.raises(AgentRequestError, match=r"node 1 holds no model 'ghost'"):
                await c.request(1, SendChunks(req=0, model="ghost", epoch=0, sends=[(0, 0)]))
            with c.subscribe() as events, c.subscribe() as other:
                lc.launcher.kill(1)
                ev = await events.get()
                assert isinstance(ev, NodeLost) and ev.node == 1
                assert await other.get() == ev  # every open queue gets every event
            assert c.alive() == [0] and not c._subscribers
            with pytest.raises(NodeLostError, match="node 1 is not up"):
                await c.request(1, GetStatus(req=0))
        assert all(_gone(p) for p in lc.launcher.pids().values())

    run_async(main())


def test_agents_take_the_configured_switch_interval() -> None:
    async def main() -> None:
        async with LocalCluster(1, runtime=RuntimeSettings(heartbeat_s=0.5, agent_switch_interval_ms=0.25)) as lc:
            assert (await lc.cluster.request(0, GetStatus(req=0)))["switch_interval_ms"] == pytest.approx(0.25)

    run_async(main())


def test_register_timeout_names_missing_agents() -> None:
    from lambdascale.runtime.cluster import Cluster

    async def main() -> None:
        c = Cluster(RuntimeSettings())
        await c.start()
        try:
            with pytest.raises(NodeLostError, match=r"agents \[0, 1\] did not register within 0.2s"):
                await c.wait_for_agents([0, 1], timeout=0.2)
        finally:
            await c.close()

    run_async(main())


_CONTROLLER = r"""
import asyncio, json, sys
from lambdascale.runtime.launcher import LocalCluster
async def main():
    async with LocalCluster(2) as lc:
        print(json.dumps(list(lc.launcher.pids().values())), flush=True)
        await asyncio.sleep(3600)
asyncio.run(main())
"""


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_agents_die_with_their_controller(sig: int, tmp_path: Path) -> None:
    err = open(tmp_path / "controller.err", "w+")
    # A terminal's Ctrl-C reaches a foreground process whose SIGINT is at its default. A test run
    # started in the background of a non-interactive shell inherits SIGINT ignored (POSIX), which
    # Python keeps, so the controller would never see the signal: restore the default for it.
    ctl = subprocess.Popen([sys.executable, "-c", _CONTROLLER], stdout=subprocess.PIPE, stderr=err, text=True,
                           cwd=Path(__file__).resolve().parents[2],
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    pids: list[int] = []
    try:
        line = ctl.stdout.readline()
        assert line, "controller printed no agent pids"
        pids = json.loads(line)
        assert len(pids) == 2 and not any(_gone(p) for p in pids)
        ctl.send_signal(sig)
        try:  # a clean stop takes at most the launcher's 3 s grace; 30 s leaves room for a loaded box
            ctl.wait(timeout=30)
        except subprocess.TimeoutExpired:
            err.seek(0)
            pytest.fail(f"controller still running 30 s after {signal.Signals(sig).name}; its stderr:\n{err.read()[-4000:]}")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not all(_gone(p) for p in pids):
            time.sleep(0.05)
        assert all(_gone(p) for p in pids), f"orphan agents left: {[p for p in pids if not _gone(p)]}"
    finally:
        if ctl.poll() is None:
            ctl.kill()
            ctl.wait()
        err.close()
        for p in pids:
            if not _gone(p):
                os.kill(p, signal.SIGKILL)


def test_agent_keeps_heartbeating_while_it_makes_large_buffers_resident(tiny_model: Path) -> None:
    """Preparing ~1.5 GB of receive buffers takes far longer than the heartbeat limit here; the
    agent must make them resident off its event loop, so the controller never declares it lost."""
    from lambdascale.model.checkpoint import read_manifest
    from lambdascale.runtime.messages import PrepareReceive

    manifest = read_manifest(tiny_model)
    big = 192 * 2**20  # per block; 8 blocks
    blocks, chunks = [], []
    for blk in manifest.blocks:
        chunks.append(manifest.chunks[0].model_copy(update={"index": blk.index, "offset": blk.index * big, "length": big}))
        blocks.append(blk.model_copy(update={"offset": blk.index * big, "nbytes": big, "tensors": ()}))
    data = manifest.model_dump(mode="json")
    data.update(name="huge", blocks=[b.model_dump(mode="json") for b in blocks],
                chunks=[c.model_dump(mode="json") for c in chunks])
    huge = type(manifest).model_validate(data)  # a valid (v2) manifest: one stream buffer of 1.5 GB

    async def main() -> None:
        rt = RuntimeSettings(heartbeat_s=0.05, heartbeat_misses=3)  # lost after 0.15 s of silence
        async with LocalCluster(1, runtime=rt) as lc:
            c = lc.cluster
            with c.subscribe() as events:
                t0 = time.monotonic()
                await c.request(0, PrepareReceive(req=0, manifest=huge.model_dump(mode="json")))
                took = time.monotonic() - t0
                lost = [ev for ev in _drain(events) if isinstance(ev, NodeLost)]
            assert lost == [], f"agent declared lost while preparing buffers ({took:.2f}s): {lost}"
            assert c.alive() == [0]

    run_async(main())


def _drain(queue) -> list:
    out = []
    while not queue.empty():
        out.append(queue.get_nowait())
    return out
