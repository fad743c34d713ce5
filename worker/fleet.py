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
from collections.abc import Callable, Mapping
from typing import Any

from kiq.names import FLEET_INDEX, fleet_key
from kiq.version import __version__

log = logging.getLogger(__name__)
INTERVAL_S = 5
INDEX_TTL_S = 24 * 3600  # the index outlives its last worker by a day; dead entries are pruned by readers


class Heartbeat:
    def __init__(self, redis: Any, hostname: str, device: str, queues: list[str],
                 extra: Callable[[], Mapping[str, str | int | float]] = dict) -> None:  # fmt: skip
        # Keyed by process too: two workers that share a Celery nodename must not overwrite each other's beat.
        self.redis, self.key = redis, fleet_key(f"{hostname}:{os.getpid()}")
        self.fields: dict[str, str | int | float] = {
            "hostname": hostname, "device": device, "queues": ",".join(queues), "started_at": time.time(),
            "pid": os.getpid(), "version": __version__,
            "current_job": "", "done": 0, "failed": 0,
        }  # fmt: skip
        self.extra = extra  # read at every beat: fields that change on their own (the measured speed)
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
        self.redis.zrem(FLEET_INDEX, self.key)

    def _loop(self) -> None:
        while not self._stop.wait(INTERVAL_S):
            self._beat()

    def _beat(self, **changes: str | int) -> None:
        with self._lock:
            self.fields.update(changes)
            try:
                now = time.time()
                self.redis.hset(self.key, mapping={**self.fields, **self.extra(), "seen_at": now})
                self.redis.expire(self.key, INTERVAL_S * 3)
                # Readers list live workers from this index, never by SCAN (a submit reads it: kiq/limits.py).
                self.redis.zadd(FLEET_INDEX, {self.key: now})
                self.redis.expire(FLEET_INDEX, INDEX_TTL_S)
            except Exception as exc:  # noqa: BLE001 - a Redis blip must not disturb the job
                log.warning("heartbeat failed: %s", exc)
