"""Celery configuration both sides share, as plain data (no Celery import here)."""

from __future__ import annotations

import math
from typing import Any

from kiq import redisconn
from kiq.names import GENERATE_TASK, unacked_keys
from kiq.settings import Settings

PRIORITY_STEPS = (0, 3, 6, 9)
# The Celery `amqp` class of kiq's consumers (job and webhook workers): kombu's Redis transport with leases on
# Redis's clock that a reconnect never hands back while the worker still holds them (kiq/transport.py).
WORKER_AMQP = "kiq.transport:AMQP"
# kiq's producers: kombu's Redis transport whose publish of a job can commit its Idempotency-Key in the same
# script (kiq/publish.py). The broker URL and the wire format are kombu's, for any plain Celery client too.
PRODUCER_AMQP = "kiq.publish:AMQP"
# kombu's Redis separator (its `sep` transport option, left at kombu's default): it names the priority lists and
# joins binding members, so every Celery client must use the same one, and plain Celery apps and Flower use this.
KOMBU_SEP = "\x06\x16"
# The separator kiq used up to issue 20 (`sep: ":"`); kiq.brokerformat moves what it left in Redis.
OLD_SEP = ":"


def priority_lists(queue: str, sep: str = KOMBU_SEP) -> list[str]:
    """kombu's Redis list for each priority step of `queue`, in PRIORITY_STEPS order: `kiq`, `kiq\\x06\\x163` …"""
    return [f"{queue}{sep}{step}" if step else queue for step in PRIORITY_STEPS]


def restore_interval_s(visibility_timeout_s: float) -> int:
    """How often a worker sweeps an unacked index: a tenth of its timeout, at least every 10 s, at most every 1 s."""
    return max(1, min(10, int(visibility_timeout_s / 10)))


def renew_interval_s(visibility_timeout_s: float) -> float:
    """How often leases are renewed: a sixth of the timeout, so a few missed renewals (a Redis blip) are fine."""
    return max(0.5, visibility_timeout_s / 6)


def worker_socket_timeout_s(visibility_timeout_s: float) -> float:
    """A worker's Redis socket timeout (leases, per-step checks, result writes): a new connection (connect, then
    one reply) fails within two thirds of a renewal interval instead of blocking in TCP retransmits (~15 min)."""
    return max(0.5, min(5.0, renew_interval_s(visibility_timeout_s) / 3))


def unacked_mutex_expire_s(visibility_timeout_s: float) -> int:
    """How long a sweeper that died mid-sweep blocks an index's sweeps: three sweep intervals, not kombu's 300 s.
    A lock that lapses during a long sweep is harmless: each restore is a transaction on the unacked hash."""
    return max(5, 3 * restore_interval_s(visibility_timeout_s))


def broker_transport_options(settings: Settings) -> dict[str, Any]:
    # kombu sweeps for unacked jobs of dead workers every interval x throttle seconds (default 100 s):
    # sweep every tenth of the visibility timeout, at most every 10 s, one cheap ZRANGE each time.
    return {
        **redisconn.transport_options(settings, settings.broker_server),
        "visibility_timeout": settings.visibility_timeout_s,
        **unacked_keys(settings.visibility_timeout_s),
        "unacked_restore_interval": restore_interval_s(settings.visibility_timeout_s),
        "unacked_restore_throttle": 1,
        "unacked_mutex_expire": unacked_mutex_expire_s(settings.visibility_timeout_s),
        # Priorities on Redis: one list per step (`priority_lists`); kombu serves 0 first. A job's priority p
        # (9 most urgent) is sent as 9 - p: classes 7-9, 4-6, 1-3 and 0. No `sep`: a plain Celery app must name
        # the same lists and bindings, so kiq keeps kombu's default (KOMBU_SEP).
        "priority_steps": list(PRIORITY_STEPS),
        "queue_order_strategy": "priority",
    }


NO_RETRY = {"max_retries": 0}


def worker_config(settings: Settings) -> dict[str, Any]:
    """What job and webhook workers add to `common_config`: every Redis write fails fast on a cut-off connection,
    so a run whose leases lapsed meets its self-fencing check within a step instead of blocking in a write until
    the partition heals (kiq/events.py stops the retries then). Not for producers: `Client.events` blocks in XREAD
    on the result backend's client for seconds, longer than these timeouts."""
    timeout_s = worker_socket_timeout_s(settings.visibility_timeout_s)
    sleep_s = renew_interval_s(settings.visibility_timeout_s)
    sockets = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s, "socket_keepalive": True}
    common = common_config(settings)
    return {
        "redis_socket_timeout": timeout_s,
        "redis_socket_connect_timeout": timeout_s,
        # One round trip per attempt (redis-py would retry a timeout at once), and no inner retries in the
        # backend's `ensure` (20 of 1 s each): Celery's store_result loop is the one retry, and it checks the leases.
        "redis_retry_on_timeout": False,
        "result_backend_transport_options": {**common["result_backend_transport_options"], "retry_policy": NO_RETRY},
        # Its waits (full jitter) stay under a renewal interval, so a run whose leases lapse mid-wait still stops
        # in time; enough of them to span KIQ_REDIS_RETRY_S on average (a failover, a restart).
        "result_backend_max_sleep_between_retries_ms": int(sleep_s * 1000),
        "result_backend_max_retries": max(30, math.ceil(settings.redis_retry_s * 2 / sleep_s)),
        # The broker's publishes (webhooks, task events) too: kombu's BRPOP runs in the event loop, where no
        # socket timeout applies (kombu's own health check drops a silent one), so this bounds only the blocking calls.
        "broker_transport_options": {**common["broker_transport_options"], **sockets},
    }


def events_backend(settings: Settings) -> str:
    """The result backend class (kiq/events.py): Celery's Redis or Sentinel backend, with event streams."""
    kind = "SentinelEventsBackend" if settings.results_server.sentinel else "EventsBackend"
    return f"kiq.events:{kind}"


def common_config(settings: Settings) -> dict[str, Any]:
    return {
        "broker_url": settings.broker_server.celery_url(),
        # Celery's Redis backend plus a per-job event stream (kiq/events.py); the URL is Celery's "class+url" form.
        "result_backend": f"{events_backend(settings)}+{settings.results_server.celery_url()}",
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "result_expires": settings.result_ttl_s,
        # Not extended: Celery would copy the job's args (prompts, image references) into every result write.
        "result_extended": False,
        "task_default_queue": settings.queue,
        "task_routes": {GENERATE_TASK: {"queue": settings.queue}},
        # Redis redelivers an unacked job after this unless its lease is renewed (kiq/leases.py): live workers
        # renew theirs, so only a dead worker's jobs come back. Celery reads it in three places; all get one value.
        "broker_transport_options": broker_transport_options(settings),
        "result_backend_transport_options": {
            **redisconn.transport_options(settings, settings.results_server),
            "visibility_timeout": settings.visibility_timeout_s,
        },
        "visibility_timeout": settings.visibility_timeout_s,
        # Redis restarts and Sentinel failovers: reconnect forever (broker), retry result writes (backend) and
        # publishes (for KIQ_REDIS_RETRY_S).
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "result_backend_always_retry": True,
        "result_backend_max_retries": 30,
        "redis_retry_on_timeout": True,
        "redis_socket_keepalive": True,
        "task_publish_retry": True,
        "task_publish_retry_policy": redisconn.publish_retry_policy(settings.redis_retry_s),
        "enable_utc": True,
    }
