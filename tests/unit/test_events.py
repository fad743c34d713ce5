"""The event-stream merge of producer/events.py: backlog, then live events newer than the last, heartbeats,
and a re-read after the hub reconnected (a fake hub; the real one is in
tests/integration/test_api.py and test_event_streams.py)."""

import asyncio

import pytest

from kiq.errors import InvalidEventId
from kiq.event_reads import PAGE, Page, parse_event_id, parse_page
from kiq.events import event_order
from kiq.status import ImageRef, Progress
from producer.events import RESYNC, job_events


class FakeHub:
    def __init__(self, stream):
        self.stream, self.queue, self.forgotten = stream, asyncio.Queue(), False
        self.later = []  # written after the first read, published while the hub was down
        self.ready = asyncio.Event()
        self.ready.set()

    def register(self, job_id):
        return self.queue

    def live(self, job_id):
        return self.ready

    def forget(self, job_id, queue):
        self.forgotten = True

    async def read_page(self, job_id, after):
        start = event_order(after) if after else (0, 0)
        found = [(i, m) for i, m in self.stream if event_order(i) > start][:PAGE]
        if len(found) < PAGE:
            self.stream += self.later
            self.later = []
        return Page(found)


async def collect(hub, after, n, heartbeat_s=0.05):
    got, events = [], job_events(hub, "j", after, heartbeat_s)
    async for event in events:
        got.append(event if event is None else (event.id, event.meta))
        if len(got) == n:
            break
    await events.aclose()
    return got


def test_backlog_then_live_without_repeats_and_heartbeats():
    hub = FakeHub([("1-0", b"a"), ("2-0", b"b")])
    for item in [("2-0", b"b"), ("3-0", b"c")]:  # 2-0 was published while the backlog was read: not twice
        hub.queue.put_nowait(item)
    got = asyncio.run(collect(hub, None, 4))
    assert got == [("1-0", b"a"), ("2-0", b"b"), ("3-0", b"c"), None] and hub.forgotten


def test_resume_after_an_id_and_resync_reads_what_the_lost_connection_missed():
    hub = FakeHub([("1-0", b"a"), ("2-0", b"b"), ("10-0", b"c")])
    hub.later = [("11-0", b"d")]
    hub.queue.put_nowait(RESYNC)
    hub.queue.put_nowait(("11-0", b"d"))  # the publish arrives too, after the re-read: not twice
    got = asyncio.run(collect(hub, "1-0", 4))
    assert got == [("2-0", b"b"), ("10-0", b"c"), ("11-0", b"d"), None]  # ids compare as numbers


def test_a_long_backlog_is_read_in_pages():
    hub = FakeHub([(f"{n}-0", b"x") for n in range(1, 2 * PAGE + 6)])
    got = asyncio.run(collect(hub, None, 2 * PAGE + 5))
    assert [i for i, _ in got] == [f"{n}-0" for n in range(1, 2 * PAGE + 6)]


def test_a_stream_waits_for_its_subscription_with_heartbeats():
    hub = FakeHub([("1-0", b"a")])
    hub.ready = asyncio.Event()  # never confirmed: heartbeats, so that a client that left is noticed
    assert asyncio.run(collect(hub, None, 2)) == [None, None] and hub.forgotten


def test_event_ids_order_numerically():
    assert event_order("9-1") < event_order("10-0") < event_order("10-2")


@pytest.mark.parametrize("bad", ["x", "1", "1-", "-1", "1-2-3", "99999999999999999999-0", "0-18446744073709551616",
                                 "１-0"])  # fmt: skip
def test_event_ids_redis_would_refuse_are_a_typed_error(bad):
    with pytest.raises(InvalidEventId, match="Last-Event-ID"):
        parse_event_id(bad)
    assert parse_event_id("18446744073709551615-18446744073709551615") == "18446744073709551615-18446744073709551615"


def reply(length, added, first, last, ids=()):
    return [length, added, first.encode(), last.encode(), [[i.encode(), [b"meta", b"m"]] for i in ids]]


def test_a_page_says_when_the_reader_must_start_from_a_snapshot():
    untrimmed, trimmed = reply(3, 3, "5-0", "7-0", ["6-0", "7-0"]), reply(1000, 1500, "5-0", "7-0", ["6-0"])
    assert parse_page(untrimmed, "5-0") == Page([("6-0", b"m"), ("7-0", b"m")], last_id="7-0")
    assert parse_page(untrimmed, None).entries[0] == ("6-0", b"m")  # nothing trimmed: from the start
    assert parse_page(trimmed, None).snapshot  # trimmed: the start is gone
    assert parse_page(trimmed, "4-9").snapshot  # older than the oldest entry kept
    assert not parse_page(trimmed, "5-0").snapshot  # the oldest kept: what follows is all there
    assert parse_page(untrimmed, "7-1").snapshot  # ahead of the stream
    assert parse_page(None, "7-0").gone
    assert parse_page(reply(1000, -1, "5-0", "7-0"), None).snapshot  # Redis 6: as long as the cap, maybe trimmed


def frame(n):
    return ImageRef(uri=f"s3://b/j/{n}.png", url="u", width=8, height=8, format="png")


def test_frames_are_rebuilt_from_new_frames_and_snapshots():
    step = Progress(stage="decoder", step=1, total=9)
    assert step.frames_after([frame(0)]) == [frame(0)]
    two = Progress(stage="decoder", step=2, total=9, frames_done=2, new_frames=[frame(1)])
    assert two.frames_after([frame(0)]) == [frame(0), frame(1)]
    snapshot = Progress(stage="decoder", step=2, total=9, frames_done=2, frames=[frame(0), frame(1)])
    assert snapshot.frames_after([]) == [frame(0), frame(1)]
    restarted = Progress(stage="decoder", step=2, total=9, frames_done=1, new_frames=[frame(0)])
    assert restarted.frames_after([frame(0), frame(1), frame(2)]) == [frame(0)]  # a redelivered sweep
