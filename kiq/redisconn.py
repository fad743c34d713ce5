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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote, unquote, urlsplit

from kiq.errors import SettingsError

if TYPE_CHECKING:
    from kiq.settings import Settings

T = TypeVar("T")
log = logging.getLogger(__name__)
SENTINEL_DEFAULT_PORT = 26379

REDIS_ERRORS: tuple[type[BaseException], ...] = (OSError,)
try:  # redis-py's errors do not derive from OSError
    from redis.exceptions import RedisError

    REDIS_ERRORS = (OSError, RedisError)
except ImportError:  # pragma: no cover
    pass


@dataclass(frozen=True)
class RedisURL:
    raw: str  # as configured
    scheme: str  # redis, rediss or sentinel
    hosts: tuple[tuple[str, int], ...]  # the server, or every Sentinel
    db: int = 0
    username: str = ""
    password: str = ""

    @property
    def sentinel(self) -> bool:
        return self.scheme == "sentinel"

    @property
    def credentials(self) -> dict[str, str | None]:
        """The master's username and password, as redis-py takes them."""
        return {"username": self.username or None, "password": self.password or None}

    def celery_url(self) -> str:
        """The URL for kombu and Celery: database and credentials repeated in every Sentinel's part."""
        if not self.sentinel:
            return self.raw
        auth = ""
        if self.username or self.password:
            auth = f"{quote(self.username, safe='')}:{quote(self.password, safe='')}@"  # kombu and Celery unquote
        return ";".join(f"{self.scheme}://{auth}{host}:{port}/{self.db}" for host, port in self.hosts)


def redact(url: str) -> str:
    """`url` fit to print: in each `;`-separated part, whatever could be a password is `***` — the userinfo after
    its first ':' (all of it without one), up to the part's last '@', so that malformed URLs (an unescaped '/' or
    '@' in the password) are masked too. Every URL kiq shows in an error or a log goes through here."""
    return ";".join(_redact_part(part) for part in url.split(";"))


def _redact_part(part: str) -> str:
    start = part.find("://") + 3 if "://" in part else 0
    at = part.rfind("@")
    if at < start:
        return part
    user, colon, _ = part[start:at].partition(":")
    return f"{part[:start]}{user + colon if colon else ''}***{part[at:]}"


def parse(url: str, variable: str) -> RedisURL:
    """Parse and check a kiq Redis URL; a malformed one raises SettingsError naming `variable`."""
    chunks = [c.strip() for c in url.split(";") if c.strip()]
    parts = []
    for chunk in chunks:
        try:
            split = urlsplit(chunk)
            port = split.port
        except ValueError:
            raise SettingsError(f"{variable}: {redact(chunk)!r} has a malformed host or port") from None
        parts.append((split, port))
    schemes = {split.scheme for split, _ in parts}
    if not parts or len(schemes) != 1 or not schemes <= {"redis", "rediss", "sentinel"}:
        raise SettingsError(
            f"{variable} must be a redis://, rediss:// or sentinel://host:port;sentinel://host:port/db URL, "
            f"got {redact(url)!r}"
        )
    scheme = schemes.pop()
    if scheme != "sentinel" and len(parts) > 1:
        raise SettingsError(
            f"{variable}: only sentinel:// URLs list several servers (separated by ';'), got {redact(url)!r}"
        )
    if any(not split.hostname for split, _ in parts):
        raise SettingsError(f"{variable} must name a host in every part, got {redact(url)!r}")
    dbs = {_db(split.path, variable) for split, _ in parts if split.path.strip("/")}
    if len(dbs) > 1:
        raise SettingsError(f"{variable}: its parts name different databases {sorted(dbs)}")
    users = {(unquote(s.username or ""), unquote(s.password or "")) for s, _ in parts if s.username or s.password}
    if len(users) > 1:
        raise SettingsError(f"{variable}: its parts carry different credentials")
    username, password = users.pop() if users else ("", "")
    default_port = SENTINEL_DEFAULT_PORT if scheme == "sentinel" else 6379
    hosts = tuple((split.hostname or "", port or default_port) for split, port in parts)
    return RedisURL(url, scheme, hosts, dbs.pop() if dbs else 0, username, password)


def _db(path: str, variable: str) -> int:
    raw = path.strip("/")
    if not raw.isdigit():
        raise SettingsError(f"{variable}: the database must be a number, got {raw!r}")
    return int(raw)


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


def retrying(call: Callable[[], T], within_s: float, what: str) -> T:
    """Call `call`, retrying Redis errors with backoff and jitter for up to `within_s` (a restart, a failover)."""
    deadline, delay = time.monotonic() + within_s, 0.2
    while True:
        try:
            return call()
        except REDIS_ERRORS as exc:
            if time.monotonic() + delay > deadline:
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
