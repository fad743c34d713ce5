"""The one place that turns kiq's Redis URLs into clients and Celery configuration.

Two kinds of URL:
- `redis://[user:password@]host:port/db` (or `rediss://`): one Redis;
- `sentinel://[user:password@]host:port;sentinel://host:port/db` (kombu's form): Redis Sentinels, which name the
  current master of the group `KIQ_SENTINEL_MASTER`. Clients ask them for the master on every (re)connect, so
  they follow a failover. The password is the master's (and replicas'); the Sentinels' own is
  `KIQ_SENTINEL_PASSWORD`.

Celery (broker and result backend) gets the same URL rewritten with the database and credentials in every
part, since kombu reads them from the first part and Celery's backend from the first that has them.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from kiq.redisurl import RedisURL

if TYPE_CHECKING:
    from kiq.settings import Settings

T = TypeVar("T")
log = logging.getLogger(__name__)

REDIS_ERRORS: tuple[type[BaseException], ...] = (OSError,)
try:  # redis-py's errors do not derive from OSError
    from redis.exceptions import RedisError

    REDIS_ERRORS = (OSError, RedisError)
except ImportError:  # pragma: no cover
    pass


def transport_options(settings: Settings, url: RedisURL) -> dict[str, Any]:
    """kombu's and Celery's Sentinel options (nothing for a plain Redis)."""
    if not url.sentinel:
        return {}
    options: dict[str, Any] = {"master_name": settings.sentinel_master}
    if auth := _sentinel_auth(settings):
        options["sentinel_kwargs"] = auth
    return options


def _sentinel_auth(settings: Settings) -> dict[str, Any]:
    """The Sentinels' own connection options: their password, if they have one."""
    return {"password": settings.sentinel_password} if settings.sentinel_password else {}


def connect(url: RedisURL, settings: Settings, **kwargs: Any) -> Any:
    """A redis-py client for `url`; with Sentinels, one that follows the current master through failovers."""
    import redis
    from redis.sentinel import Sentinel

    if not url.sentinel:
        return redis.Redis.from_url(url.raw, **kwargs)
    sockets = {k: v for k, v in kwargs.items() if k.startswith("socket_")}  # redis-py's own rule
    sentinels = Sentinel(list(url.hosts), sentinel_kwargs={**sockets, **_sentinel_auth(settings)}, **kwargs)
    return sentinels.master_for(settings.sentinel_master, db=url.db, **url.credentials)


def connect_async(url: RedisURL, settings: Settings, max_connections: int = 32) -> Any:
    """A redis.asyncio client for `url`; a plain Redis's pool is bounded and blocking (callers wait for a
    connection instead of failing), a Sentinel master's follows failovers."""
    from redis.asyncio import BlockingConnectionPool, Redis
    from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool

    class BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
        """The master's pool, waiting for a free connection like the plain one instead of failing."""

    if not url.sentinel:
        pool = BlockingConnectionPool.from_url(url.raw, max_connections=max_connections, timeout=30)
        return Redis(connection_pool=pool)
    sentinels = Sentinel(list(url.hosts), sentinel_kwargs=_sentinel_auth(settings))
    return sentinels.master_for(settings.sentinel_master, connection_pool_class=BlockingSentinelPool, db=url.db,
                                max_connections=max_connections, timeout=30, **url.credentials)  # fmt: skip


def retrying(call: Callable[[], T], within_s: float, what: str, give_up: Callable[[], bool] | None = None) -> T:
    """Call `call`, retrying Redis errors with backoff and jitter for up to `within_s` (a restart, a failover), or
    until `give_up()` says to stop."""
    deadline, delay = time.monotonic() + within_s, 0.2
    while True:
        try:
            return call()
        except REDIS_ERRORS as exc:
            if time.monotonic() + delay > deadline or (give_up is not None and give_up()):
                raise
            log.warning("%s: Redis unavailable (%s); retrying in %.1f s", what, exc, delay)
            time.sleep(delay * (0.5 + random.random() / 2))
            delay = min(delay * 2, 5.0)


def publish_retry_policy(within_s: float) -> dict[str, float]:
    """kombu's publish retry policy, spanning about `within_s`: waits of 0.2, 0.7, 1.2 … then 3 s each."""
    start, step, cap = 0.2, 0.5, 3.0
    waits, total = 0, 0.0
    while total < within_s:
        total += min(cap, start + step * waits)
        waits += 1
    return {"max_retries": max(1, waits), "interval_start": start, "interval_step": step, "interval_max": cap}


def wait_for_replicas(client: Any, touch: Callable[[Any], None], replicas: int, timeout_ms: int) -> int:
    """Make one write on a single connection (`touch` adds it to a pipeline), then WAIT until `replicas`
    replicas have everything the master had written by then (Redis replicates one ordered stream, so that covers
    earlier writes of other connections too). Returns how many acknowledged within `timeout_ms`."""
    pipe = client.pipeline(transaction=False)
    touch(pipe)
    pipe.execute_command("WAIT", replicas, timeout_ms)
    return int(pipe.execute()[-1])
