"""The API's event hub: one Redis pub/sub connection per API process, shared by every open event stream.

Each stream subscribes (refcounted) to its job's channel on that one connection; an event published by a
worker reaches every stream of that job with no Redis read at all. A stream reads the job's Redis Stream once
when it opens (after subscribing, so nothing falls between) and again only if the pub/sub connection had to
reconnect. So 1,000 open streams cost no more Redis reads than one.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

from kiq.events import event_order, events_channel, events_key

log = logging.getLogger("kiq.api.events")
RESYNC = ("", b"")  # told to every listener after a reconnect: read the stream again, something may be missed


class EventHub:
    """Only the reader task touches the pub/sub connection (redis-py's asyncio PubSub is not safe for a command
    sent while another coroutine reads): streams ask for (un)subscriptions, the reader sends them between reads."""

    def __init__(self, redis: Any) -> None:
        self.redis = redis  # a redis.asyncio client (its pool also serves the streams' XRANGEs)
        self.listeners: dict[str, set[asyncio.Queue[tuple[str, bytes]]]] = defaultdict(set)
        self.subscribed: dict[str, asyncio.Event] = {}  # wanted channels; set once Redis confirmed
        self.to_add: set[str] = set()
        self.to_remove: set[str] = set()
        self.task: asyncio.Task[None] | None = None

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
        await self.redis.aclose()

    async def listen(self, job_id: str) -> asyncio.Queue[tuple[str, bytes]]:
        """A queue of (event id, meta) for the job, live once this returns."""
        queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        channel = events_channel(job_id)
        self.listeners[channel].add(queue)
        if channel not in self.subscribed:
            self.subscribed[channel] = asyncio.Event()
            self.to_add.add(channel)
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._run())
        await self.subscribed[channel].wait()
        return queue

    def forget(self, job_id: str, queue: asyncio.Queue[tuple[str, bytes]]) -> None:
        channel = events_channel(job_id)
        self.listeners[channel].discard(queue)
        if not self.listeners[channel]:
            del self.listeners[channel]
            self.subscribed.pop(channel, None)
            self.to_add.discard(channel)
            self.to_remove.add(channel)

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
                        queue.put_nowait(RESYNC)

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
                continue
            if message["type"] != "message":
                continue
            event_id, _, meta = message["data"].partition(b" ")
            for queue in self.listeners.get(channel, ()):
                queue.put_nowait((event_id.decode(), meta))


async def job_events(hub: EventHub, job_id: str, after: str | None, heartbeat_s: float,
                     ) -> AsyncIterator[tuple[str, bytes] | None]:  # fmt: skip
    """(event id, meta) in stream order from after `after`, live; None when a heartbeat is due. The caller
    stops at the final status. Subscribe, then read the stream, then take live events newer than the last."""
    queue = await hub.listen(job_id)
    last = event_order(after) if after else (0, 0)
    try:
        backlog = True
        while True:
            if backlog:
                backlog = False
                start = f"({after}" if after else "-"
                for raw_id, fields in await hub.redis.xrange(events_key(job_id), min=start):
                    after, last = raw_id.decode(), event_order(raw_id.decode())
                    yield after, fields[b"meta"]
            try:
                event_id, meta = await asyncio.wait_for(queue.get(), heartbeat_s)
            except TimeoutError:
                yield None
                continue
            if (event_id, meta) == RESYNC:
                backlog = True
            elif event_order(event_id) > last:
                after, last = event_id, event_order(event_id)
                yield event_id, meta
    finally:
        hub.forget(job_id, queue)
