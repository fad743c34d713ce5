"""The event-stream merge of producer/events.py: backlog, then live events newer than the last, heartbeats,
and a re-read after the hub reconnected (a fake hub; the real one is in tests/integration/test_api.py)."""

import asyncio

from kiq.events import event_order
from producer.events import RESYNC, job_events


class FakeHub:
    def __init__(self, stream):
        self.stream, self.queue, self.forgotten = stream, asyncio.Queue(), False
        self.redis, self.later = self, []  # written after the first read, published while the hub was down

    async def listen(self, job_id):
        return self.queue

    def forget(self, job_id, queue):
        self.forgotten = True

    async def xrange(self, key, min="-"):
        after = event_order(min[1:]) if min.startswith("(") else (0, 0)
        found = [(i.encode(), {b"meta": m}) for i, m in self.stream if event_order(i) > after]
        self.stream += self.later
        self.later = []
        return found


async def collect(hub, after, n, heartbeat_s=0.05):
    got, events = [], job_events(hub, "j", after, heartbeat_s)
    async for event in events:
        got.append(event)
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


def test_event_ids_order_numerically():
    assert event_order("9-1") < event_order("10-0") < event_order("10-2")
