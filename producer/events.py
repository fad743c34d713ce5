"""The API's event hub: one Redis pub/sub connection per API process, shared by every open event stream.

Each stream subscribes (refcounted) to its job's channel on that one connection; an event published by a
worker reaches every stream of that job with no Redis read at all. A stream reads the job's Redis Stream once
when it opens (after subscribing, so nothing falls between), in pages, and again only if the pub/sub connection
had to reconnect or the stream fell LISTENER_QUEUE_MAX events behind. So 1,000 open streams cost no more Redis
reads than one.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from kiq.event_reads import PAGE_SCRIPT, Page, page_args, parse_page, parse_snapshot
from kiq.events import event_order
from kiq.names import events_channel, events_key, frames_key

log = logging.getLogger("kiq.api.events")
RESYNC = ("", b"")  # told to a listener after a reconnect or at its bound: read the stream again from its last id
# Events a stream's queue holds for a client that reads slower than the job writes; past it, the queue is emptied
# and the stream re-reads the job's Redis Stream (where every event is) from its last id: nothing is lost.
LISTENER_QUEUE_MAX = 256


class EventHub:
    """Only the reader task touches the pub/sub connection (redis-py's asyncio PubSub is not safe for a command
    sent while another coroutine reads): streams ask for (un)subscriptions, the reader sends them between reads."""

    def __init__(self, redis: Any) -> None:
        self.redis = redis  # a redis.asyncio client (its pool also serves the streams' page reads)
        self.listeners: dict[str, set[asyncio.Queue[tuple[str, bytes]]]] = defaultdict(set)
        self.subscribed: dict[str, asyncio.Event] = {}  # wanted channels; set once Redis confirmed
        self.to_add: set[str] = set()
        self.to_remove: set[str] = set()
        self.task: asyncio.Task[None] | None = None
        self.page_script = redis.register_script(PAGE_SCRIPT)

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
        await self.redis.aclose()

    def register(self, job_id: str) -> asyncio.Queue[tuple[str, bytes]]:
        """A bounded queue of (event id, meta) for the job; live once `live(job_id)` is set. The caller must
        `forget` it, on every way out."""
        queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(LISTENER_QUEUE_MAX)
        channel = events_channel(job_id)
        self.listeners[channel].add(queue)
        if channel not in self.subscribed:
            self.subscribed[channel] = asyncio.Event()
            self.to_add.add(channel)
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._run())
        return queue

    def live(self, job_id: str) -> asyncio.Event:
        return self.subscribed[events_channel(job_id)]

    async def listen(self, job_id: str) -> asyncio.Queue[tuple[str, bytes]]:
        """`register`, then wait until the subscription is live; forgotten if that wait is cancelled."""
        queue = self.register(job_id)
        try:
            await self.live(job_id).wait()
        except BaseException:
            self.forget(job_id, queue)
            raise
        return queue

    def forget(self, job_id: str, queue: asyncio.Queue[tuple[str, bytes]]) -> None:
        channel = events_channel(job_id)
        self.listeners[channel].discard(queue)
        if not self.listeners[channel]:
            del self.listeners[channel]
            self.subscribed.pop(channel, None)
            self.to_add.discard(channel)
            self.to_remove.add(channel)

    async def read_page(self, job_id: str, after: str | None) -> Page:
        reply = await self.page_script(keys=[events_key(job_id)], args=page_args(after))
        return parse_page(reply, after)

    async def read_snapshot(self, job_id: str) -> tuple[str, bytes, bytes | None] | None:
        """The stream's newest entry and the job's frames record, in one MULTI."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xrevrange(events_key(job_id), count=1).get(frames_key(job_id))
            return parse_snapshot(await pipe.execute())

    async def _run(self) -> None:
        while True:
            pubsub = self.redis.pubsub()
            try:
                await self._read(pubsub)
            except asyncio.CancelledError:
                await pubsub.aclose()
                raise
            except Exception as exc:  # noqa: BLE001 - Redis went away: reconnect, resubscribe, resync
                log.warning("event hub lost Redis (%s: %s); reconnecting", type(exc).__name__, exc)
                await pubsub.aclose()
                await asyncio.sleep(0.5)
                self.to_add, self.to_remove = set(self.subscribed), set()
                for queues in self.listeners.values():
                    for queue in queues:
                        _resync(queue)

    async def _read(self, pubsub: Any) -> None:
        while True:
            remove, self.to_remove = self.to_remove - set(self.subscribed), set()
            add, self.to_add = self.to_add, set()
            if remove and pubsub.connection is not None:
                await pubsub.unsubscribe(*remove)
            if add:
                await pubsub.subscribe(*add)
            if pubsub.connection is None:  # nothing subscribed yet
                await asyncio.sleep(0.05)
                continue
            # Returns as soon as a message is there; the timeout only bounds how long a new subscription waits.
            message = await pubsub.get_message(timeout=0.05)
            if message is None:
                continue
            channel = message["channel"].decode()
            if message["type"] == "subscribe":
                if channel in self.subscribed:
                    self.subscribed[channel].set()
                else:  # forgotten while its subscription was on the way: drop it now
                    self.to_remove.add(channel)
                continue
            if message["type"] != "message":
                continue
            event_id, _, meta = message["data"].partition(b" ")
            for queue in self.listeners.get(channel, ()):
                _deliver(queue, (event_id.decode(), meta))


def _deliver(queue: asyncio.Queue[tuple[str, bytes]], item: tuple[str, bytes]) -> None:
    """At the bound, the stream is behind (a slow client): its queue is emptied and told to resync, so the
    stream reads what it missed from the job's Redis Stream (in pages) instead of the hub holding it."""
    try:
        queue.put_nowait(item)
    except asyncio.QueueFull:
        _resync(queue)


def _resync(queue: asyncio.Queue[tuple[str, bytes]]) -> None:
    while not queue.empty():
        queue.get_nowait()
    queue.put_nowait(RESYNC)


@dataclass(frozen=True)
class StreamEvent:
    """An event for a stream: its id and meta; `frames` (the job's frames record) makes it a snapshot."""

    id: str
    meta: bytes
    frames: bytes | None = None


async def job_events(hub: EventHub, job_id: str, after: str | None, heartbeat_s: float,
                     ) -> AsyncIterator[StreamEvent | None]:  # fmt: skip
    """Events in stream order from after `after`, live; None when a heartbeat is due (also while the
    subscription is pending, so a client that left is noticed). The caller stops at the final status.
    Subscribe, then read the stream in pages, then take live events newer than the last."""
    queue = hub.register(job_id)
    try:
        while not hub.live(job_id).is_set():
            try:
                await asyncio.wait_for(hub.live(job_id).wait(), heartbeat_s)
            except TimeoutError:
                yield None
        last = event_order(after) if after else (0, 0)
        backlog = True
        while True:
            if backlog:
                backlog = False
                async for event in _backlog(hub, job_id, after):
                    after, last = event.id, event_order(event.id)
                    yield event
            try:
                event_id, meta = await asyncio.wait_for(queue.get(), heartbeat_s)
            except TimeoutError:
                yield None
                continue
            if (event_id, meta) == RESYNC:
                backlog = True
            elif event_order(event_id) > last:
                after, last = event_id, event_order(event_id)
                yield StreamEvent(event_id, meta)
    finally:
        hub.forget(job_id, queue)


async def _backlog(hub: EventHub, job_id: str, after: str | None) -> AsyncIterator[StreamEvent]:
    """The stream after `after`, a page at a time; a snapshot first where it cannot continue from `after`."""
    while True:
        page = await hub.read_page(job_id, after)
        if page.snapshot:
            newest = await hub.read_snapshot(job_id)
            if newest is None:
                return
            after = newest[0]
            yield StreamEvent(*newest[:2], frames=newest[2] or b"[]")
            continue
        for after, meta in page.entries:
            yield StreamEvent(after, meta)
        if not page.full:
            return
