"""Scale events are logged as timelines, and streamed text never shows a stop string or a broken character."""

from __future__ import annotations

import logging

from fastapi.testclient import TestClient

from lambdascale.control.timeline import ScaleTimeline
from lambdascale.serve.fake import FakeCodec
from lambdascale.serve.textstream import TextStream
from lambdascale.serve.timeline_log import TimelineLogger, format_timeline

from .conftest import MODEL


def test_each_milestone_is_logged_once_in_time_order(caplog) -> None:
    caplog.set_level(logging.INFO, logger="lambdascale.serve.scale")
    tl = ScaleTimeline(event_id=7, model="m", decided_at=10.0, targets=(2, 3))
    logger = TimelineLogger()
    assert logger.observe([tl]) == 1  # the decision
    tl.mark_first_chunk(10.012)
    tl.mark_first_pipeline(10.05)
    tl.mark_node_full(3, 10.2)
    assert logger.observe([tl]) == 3
    assert logger.observe([tl]) == 0  # nothing new
    tl.mark_node_full(2, 10.25)
    tl.mark_dissolved(10.26)
    assert logger.observe([tl]) == 2
    lines = [r.getMessage() for r in caplog.records]
    assert [ln.split(": ", 1)[1] for ln in lines] == [
        "decision at +0.000 s", "first chunk at +0.012 s", "first pipeline at +0.050 s",
        "node 3 full at +0.200 s", "node 2 full at +0.250 s", "pipelines dissolved at +0.260 s"]
    assert all(ln.startswith("scale event 7 model=m targets=[2, 3]") for ln in lines)
    assert format_timeline(tl) == ("#7 m -> [2, 3]: decision +0ms, first chunk +12ms, first pipeline +50ms, "
                                   "node 3 full +200ms, node 2 full +250ms, pipelines dissolved +260ms")


def test_gateway_logs_backend_timelines_and_shows_them_in_status(make_app, caplog) -> None:
    caplog.set_level(logging.INFO, logger="lambdascale.serve.scale")
    app, backend = make_app(timeline_poll_s=0.01)
    tl = ScaleTimeline(event_id=1, model=MODEL, decided_at=0.0, targets=(1,))
    tl.mark_first_chunk(0.1)
    backend.timelines.append(tl)
    with TestClient(app) as c:
        st = c.get("/admin/status").json()
        assert st["timeline"] == [f"#1 {MODEL} -> [1]: decision +0ms, first chunk +100ms"]
        assert st["scale_timelines"][0]["first_chunk_s"] == 0.1
        assert 'lambdascale_scale_events_total{direction="up"} 1.0' in c.get("/metrics").text
        for _ in range(200):  # the poller runs on the app's loop; wait for its log lines
            if len(caplog.records) >= 2:
                break
            c.get("/health")
    assert [r.getMessage().split(": ", 1)[1] for r in caplog.records][:2] == ["decision at +0.000 s", "first chunk at +0.100 s"]


def test_text_stream_holds_back_partial_stop_strings_and_split_characters() -> None:
    codec = FakeCodec()
    s = TextStream(codec, stops=["END"])
    out = [s.push(t) for t in b"abE"]
    assert out == ["a", "b", ""]          # "E" could start "END"
    assert s.push(ord("x")) == "Ex"       # it did not
    assert s.push(ord("E")) == "" and s.push(ord("N")) == "" and s.push(ord("D")) == ""
    assert s.stopped and s.text == "abEx"
    # A multi-byte character split over two tokens is only emitted whole.
    s = TextStream(codec)
    e_acute = "é".encode()
    assert s.push(e_acute[0]) == ""
    assert s.push(e_acute[1]) == "é"
    # At the end, held-back text that can no longer match is flushed.
    s = TextStream(codec, stops=["xyz"])
    assert s.push(ord("x")) == ""
    assert s.flush() == "x"
