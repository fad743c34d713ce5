"""A live worker's heartbeat in Redis: device, current job, jobs done and failed, start time.

Celery's inspect cannot serve this: a solo-pool worker answers control commands only between jobs, and a
job can take minutes. A daemon thread refreshes the hash every few seconds; it expires when the worker is
gone, so `kiq fleet` lists live workers only.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from kiq.names import FLEET_INDEX_KEY, fleet_key
from kiq.version import __version__

log = logging.getLogger(__name__)
INTERVAL_S = 5
INDEX_KEEP_S = 60  # index entries of workers gone this long are removed


class Heartbeat:
    def __init__(self, redis: Any, hostname: str, device: str, queues: list[str]) -> None:
        # Keyed by process too: two workers that share a Celery nodename must not overwrite each other's beat.
        self.redis, self.key = redis, fleet_key(f"{hostname}:{os.getpid()}")
        self.fields: dict[str, str | int | float] = {
            "hostname": hostname, "device": device, "queues": ",".join(queues), "started_at": time.time(),
            "pid": os.getpid(), "version": __version__,
            "current_job": "", "done": 0, "failed": 0,
        }  # fmt: skip
        self._stop = threading.Event()
        self._lock = threading.Lock()  # snapshot + write as one step: a stale periodic beat must not land last

    def start(self) -> None:
        self._beat()
        threading.Thread(target=self._loop, name="kiq-heartbeat", daemon=True).start()

    def job_started(self, job_id: str) -> None:
        self._beat(current_job=job_id)

    def job_finished(self, ok: bool) -> None:
        counter = "done" if ok else "failed"
        self._beat(current_job="", **{counter: int(self.fields[counter]) + 1})

    def stop(self) -> None:
        self._stop.set()
        self.redis.delete(self.key)
        self.redis.zrem(FLEET_INDEX_KEY, self.key)

    def _loop(self) -> None:
        while not self._stop.wait(INTERVAL_S):
            self._beat()

    def _beat(self, **changes: str | int) -> None:
        with self._lock:
            self.fields.update(changes)
            try:
                self.redis.hset(self.key, mapping={**self.fields, "seen_at": time.time()})
                self.redis.expire(self.key, INTERVAL_S * 3)
                # The index lets a metrics scrape find live workers in one command; dead entries age out here.
                now = time.time()
                self.redis.zadd(FLEET_INDEX_KEY, {self.key: now})
                self.redis.zremrangebyscore(FLEET_INDEX_KEY, "-inf", now - INDEX_KEEP_S)
            except Exception as exc:  # noqa: BLE001 - a Redis blip must not disturb the job
                log.warning("heartbeat failed: %s", exc)
