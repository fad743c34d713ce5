"""What a worker reads from Redis every KIQ_FAIR_SHARE_POLL_S: the tenant queues of the queues it consumes (fair
share, kiq/fairshare.py), which it starts consuming on the consumer's own loop, and a drain request (`kiq fleet
drain`), after which it takes no more jobs, finishes the one it runs and exits with DRAINED_EXIT.

Not Celery's remote control: a solo-pool worker reads control messages only between jobs, and may take the next
job before it reads one. Here the wish is recorded at once and applied between jobs, before the next fetch
(kiq/intake.py). A supervisor (`kiq worker --devices`) leaves a drained worker down.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from kiq import fairshare, library_internals
from kiq.intake import Intake
from kiq.names import drain_key, tenant_queues_key, tenant_queues_version_key
from kiq.redisconn import REDIS_ERRORS
from kiq.settings import Settings

log = logging.getLogger(__name__)
DRAINED_EXIT = 78  # EX_CONFIG in sysexits: "do not restart me"; not a code Celery exits with otherwise


class Watcher:
    def __init__(self, consumer: Any, redis: Any, settings: Settings) -> None:
        self.consumer, self.redis, self.settings = consumer, redis, settings
        self.bases = settings.consumed_queues
        self.known: set[str] = set()  # tenant queues handed to the intake
        self.versions: dict[str, bytes | None] = {}  # routed queue -> the version of its tenant queues last read
        self.draining = False
        self._stop = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._loop, name="kiq-tenant-queues", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while True:
            try:
                self.poll()
            except REDIS_ERRORS as exc:  # a Redis blip: the next round reads again
                log.warning("could not read tenant queues or drain requests: %s", exc)
            if self._stop.wait(self.settings.fair_share_poll_s):
                return

    def poll(self) -> None:
        """One round trip, and a second only when a routed queue's tenant queues changed."""
        with self.redis.pipeline(transaction=False) as pipe:
            for base in self.bases:
                pipe.get(tenant_queues_version_key(base))
            pipe.exists(drain_key(self.consumer.hostname))
            *versions, drain = pipe.execute()
        changed = [(base, v) for base, v in zip(self.bases, versions, strict=True) if v != self.versions.get(base)]
        if changed:
            with self.redis.pipeline(transaction=False) as pipe:
                for base, _ in changed:
                    pipe.hgetall(tenant_queues_key(base))
                registries = pipe.execute()
            for (base, version), raw in zip(changed, registries, strict=True):
                self._learn(base, fairshare.parse_registry(raw))
                self.versions[base] = version
        if drain and not self.draining:
            self.draining = True
            log.warning("drain requested: this worker takes no more jobs, finishes its current one and exits")
            Intake.of(self.consumer).pause("drain")
            self.consumer.call_soon(_exit_drained)

    def _learn(self, base: str, queues: dict[str, int]) -> None:
        fairshare.learn(base, queues)
        for queue in sorted(set(queues) - self.known):
            self.known.add(queue)
            Intake.of(self.consumer).add(_queue(queue))


def _queue(name: str) -> Any:
    from kombu import Exchange, Queue

    return Queue(name, Exchange(name), routing_key=name)  # as worker/app.py declares the routed queues


_drained: list[bool] = []  # set once this process is shutting down drained


def _exit_drained() -> None:
    """On the consumer's loop, between jobs: Celery's warm shutdown (as SIGTERM does it)."""
    _drained.append(True)
    library_internals.stop_worker_warm(DRAINED_EXIT)


def drained() -> bool:
    """Whether this process stopped because it was drained (`kiq worker` then exits with DRAINED_EXIT)."""
    return bool(_drained)


def install(app: Any, settings: Settings) -> None:
    """A consumer bootstep that starts the watcher once (a reconnect keeps the queues it added: they are selected)."""
    from celery import bootsteps

    class TenantQueues(bootsteps.StartStopStep):
        requires = ("celery.worker.consumer.tasks:Tasks",)

        def __init__(self, c: Any, **kwargs: Any) -> None:
            super().__init__(c, **kwargs)
            self.watcher: Watcher | None = None

        def start(self, c: Any) -> None:
            if self.watcher is None:
                self.watcher = Watcher(c, app.backend.client, settings)
                self.watcher.start()

        def shutdown(self, c: Any) -> None:
            if self.watcher is not None:
                self.watcher.stop()

    app.steps["consumer"].add(TenantQueues)
