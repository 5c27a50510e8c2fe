"""Membership with incarnations (issue 20), on the controller with scripted agents in this process:
each registration's incarnation grows; what an earlier incarnation sends after it was declared dead
(acks, tokens, chunk reports, heartbeats) is fenced off and reaches no request, no subscriber and
no state; a new process registering as a silent live node is let in after a probe, as one proving
the secret may be; the pure rules (suspect, dead, backoff, what a node keeps) as the simulator
uses them too."""

from __future__ import annotations

import asyncio

import pytest

from lambdascale.membership import (
    FaultKind,
    MemberState,
    next_incarnation,
    respawn_delay_s,
    state_for_silence,
    tiers_kept,
)
from lambdascale.runtime.cluster import Cluster, NodeLostError
from lambdascale.runtime.messages import (
    ChunkHeld,
    GetStatus,
    Heartbeat,
    Ping,
    Register,
    Reply,
    Welcome,
    read_msg,
    write_msg,
)
from lambdascale.runtime.settings import RuntimeSettings
from lambdascale.transfer.auth import Channel, client_handshake
from lambdascale.transfer.base import PeerInfo
from tests.runtime.conftest import run_async


class FakeAgent:
    """One control session of a scripted agent: handshake, Register, Welcome; then what the test writes."""

    def __init__(self, c: Cluster, node: int) -> None:
        self.c, self.node = c, node
        self.reader: asyncio.StreamReader
        self.writer: asyncio.StreamWriter
        self.incarnation = 0

    async def register(self, claimed: int = 0) -> "FakeAgent":
        self.reader, self.writer = await asyncio.open_connection(*self.c.address)
        await client_handshake(self.reader, self.writer, self.c.secret, Channel.CONTROL, 5.0, "the controller")
        peer = PeerInfo(node=self.node, backend="tcp", host="127.0.0.1", port=9)
        await write_msg(self.writer, Register(node=self.node, pid=4242, peer=peer, incarnation=claimed))
        welcome = await asyncio.wait_for(read_msg(self.reader), 5)
        assert isinstance(welcome, Welcome), welcome
        self.incarnation = welcome.incarnation
        return self

    async def next_request(self):
        return await asyncio.wait_for(read_msg(self.reader), 5)

    async def send(self, msg) -> None:
        await write_msg(self.writer, msg)


async def until(cond, timeout: float = 5.0) -> None:
    async def poll() -> None:
        while not cond():
            await asyncio.sleep(0.01)  # polling a condition of the controller's state
    await asyncio.wait_for(poll(), timeout)


def test_late_messages_of_an_earlier_incarnation_are_fenced_off() -> None:
    async def main() -> None:
        c = Cluster(RuntimeSettings(heartbeat_s=5.0))
        await c.start()
        delivered: list[tuple[int, int, str, float]] = []
        c.message_hooks.append(lambda node, inc, msg: delivered.append(
            (node, inc, type(msg).__name__, asyncio.get_running_loop().time())))
        old = await FakeAgent(c, 3).register()
        assert old.incarnation == 1 and c.alive() == []  # rejoining until its peers know it
        set_peers = await old.next_request()  # the admission tells every member its address
        await old.send(Reply(req=set_peers.req, inc=1))
        await until(lambda: c.alive() == [3])
        with c.subscribe() as events:
            pending = asyncio.ensure_future(c.request(3, GetStatus(req=0)))
            asked = await old.next_request()  # incarnation 1 was asked; it is paused and never answers
            # the same process dials again (it names its incarnation): incarnation 1 is dead, 2 takes over
            new = await FakeAgent(c, 3).register(claimed=1)
            assert new.incarnation == 2 and c.incarnation(3) == 2
            with pytest.raises(NodeLostError):
                await pending  # failed at once, not answered by what comes below
            sp = await new.next_request()
            # late messages of incarnation 1, on the new channel: the ack of the old request, a token
            # reply, a chunk report, a heartbeat; and one on the old channel, which the controller closed
            await new.send(Reply(req=asked.req, inc=1, data={"tokens": [7]}))
            await new.send(ChunkHeld(node=3, model="m", chunk=0, src=1, inc=1))
            await new.send(Heartbeat(node=3, inc=1))
            await old.send(ChunkHeld(node=3, model="m", chunk=1, src=1, inc=1))
            await new.send(Reply(req=sp.req, inc=2))  # the new incarnation's answer is taken
            await until(lambda: c.fenced.get(3, 0) >= 3 and c.alive() == [3])
            # the new incarnation's own messages get through
            got = asyncio.ensure_future(c.request(3, Ping(req=0)))
            ping = await new.next_request()
            await new.send(Reply(req=ping.req, inc=2))
            assert await got == {}
            seen = [events.get_nowait() for _ in range(events.qsize())]
            assert [type(e).__name__ for e in seen] == ["NodeLost"], seen  # no chunk report of incarnation 1
        assert c.fenced[3] == 3
        dead_at = c.agents[3].joined_at  # incarnation 1 died as 2 registered
        assert [d[2] for d in delivered if d[1] == 1] == ["Reply"]  # its answer to the admission, nothing else
        assert all(t <= dead_at for _, inc, _, t in delivered if inc == 1), delivered
        # history: joined as 1, dead, rejoined as 2
        states = [(e.incarnation, e.state) for e in c.history if e.node == 3]
        assert (1, MemberState.DEAD) in states and (2, MemberState.ALIVE) in states
        await c.close()

    run_async(main(), timeout=30)


def test_a_new_process_for_a_silent_live_node_is_let_in_after_a_probe() -> None:
    async def main() -> None:
        c = Cluster(RuntimeSettings(heartbeat_s=0.2, heartbeat_misses=50))  # dead only after 10 s of silence
        await c.start()
        try:
            old = await FakeAgent(c, 0).register()
            sp = await old.next_request()
            await old.send(Reply(req=sp.req, inc=old.incarnation))
            await until(lambda: c.alive() == [0])
            # a restarted process (it knows no incarnation) while the old one is hung: the probe gets
            # no answer within two heartbeat periods, so the old incarnation is dead and the new one in
            new = await FakeAgent(c, 0).register(claimed=0)
            assert new.incarnation == 2
            assert any(e.incarnation == 1 and e.state is MemberState.DEAD and "probe" in e.reason for e in c.history)
        finally:
            await c.close()

    run_async(main(), timeout=30)


def test_membership_rules() -> None:
    # memberlist-style: suspect after half the misses, dead after all of them
    assert state_for_silence(0.5, 1.0, 5) is MemberState.ALIVE
    assert state_for_silence(2.5, 1.0, 5) is MemberState.SUSPECT
    assert state_for_silence(5.5, 1.0, 5) is MemberState.DEAD
    assert state_for_silence(1.5, 1.0, 1) is MemberState.DEAD
    assert next_incarnation(3, 0) == 4 and next_incarnation(3, 7) == 8  # only ever grows
    assert [respawn_delay_s(k, 0.5, 4.0) for k in range(6)] == [0.0, 0.5, 1.0, 2.0, 4.0, 4.0]
    assert tiers_kept(FaultKind.PAUSE) == {"gpu", "host", "ssd"} and tiers_kept(FaultKind.CRASH) == {"ssd"}


def test_a_restarted_agent_reports_its_verified_ssd_copy_and_is_a_warm_start(tiny_model, tmp_path) -> None:
    """kill -9 two agents holding SSD copies, one of them damaged: the supervisor restarts both, each
    registers with its SSD files checked against their checksums (the damaged copy is dropped, not
    reported) and the serving core's snapshot shows the good one as that node's SSD-tier holding."""
    from lambdascale.config import load_config
    from lambdascale.control.spec import Tier
    from lambdascale.core.core import ServingCore
    from lambdascale.model.manifest import read_manifest
    from lambdascale.runtime.launcher import LocalCluster
    from lambdascale.runtime.messages import HoldModel

    manifest = read_manifest(tiny_model)
    rt = RuntimeSettings(heartbeat_s=0.2, agent_ssd_dir=str(tmp_path / "ssd"))

    async def main() -> None:
        async with LocalCluster(2, runtime=rt) as lc:
            c = lc.cluster
            core = ServingCore(c, load_config(None, {}))
            for n in (0, 1):
                await c.request(n, HoldModel(req=0, model_dir=str(tiny_model)))
                await c.copy_back(n, manifest.name, "ssd")
            async def ssd_done(n: int) -> bool:
                rep = await c.holdings(n)
                return any(h.tier == "ssd" and h.blocks is None and not h.in_use for h in rep.holdings)
            for n in (0, 1):
                for _ in range(200):
                    if await ssd_done(n):
                        break
                    await asyncio.sleep(0.02)  # polling the agent's report until its copy-back is done
                assert await ssd_done(n)
            blk = tmp_path / "ssd" / "node0" / manifest.name / manifest.blocks[2].file
            data = bytearray(blk.read_bytes())
            data[7] ^= 0xFF
            blk.write_bytes(bytes(data))  # node 0's copy is damaged on disk
            incs = {n: c.incarnation(n) for n in (0, 1)}
            lc.launcher.kill(0)
            lc.launcher.kill(1)
            await until(lambda: all(c.incarnation(n) > incs[n] and n in c.alive() for n in (0, 1)), 60)
            assert lc.launcher.restarts() == {0: 1, 1: 1}
            tiers = {n: {h.tier for h in c.join_reports[n].holdings if h.model == manifest.name} for n in (0, 1)}
            assert tiers == {0: set(), 1: {"ssd"}}, tiers  # a restart keeps disk, loses memory; bad files dropped
            assert not blk.parent.exists()
            snap = core.snapshot()
            held = {n.id: {(h.model, h.tier) for h in n.holdings} for n in snap.nodes}
            assert held[1] == {(manifest.name, Tier.SSD)} and held[0] == set()

    run_async(main(), timeout=120)
