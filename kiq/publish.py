"""The producer's broker transport: a job's publish and its Idempotency-Key's commit in one Redis script.

The API used to publish the job (kombu's LPUSH), then point the key at it (a second write). Between the two the
key stayed "pending": a commit that failed for KIQ_REDIS_RETRY_S let the mark lapse, and the client's retry then
made a second job; a publish whose reply was lost (the connection dropped after Redis ran it) answered 503 and
released the mark, and the retry made a second job; and after a failover the retried commit could land on a
promoted replica that never had the message (202 for a dropped job). Here, when the broker and the results share
one Redis (the default), the message and the commit are one script: Redis runs and replicates it whole, so a key
is committed exactly when its job is on the list. The script also refuses a mark that is no longer the submit's
own (`SubmitAbandoned`, nothing enqueued), and a retried publish whose first try ran finds the key committed to its
job and pushes nothing again.

The API arms a `Commit` right before its publish (`arm`, one-shot, for that job id only); kombu's Redis channel
`_put` (the LPUSH of one message; kiq/library_internals.py) is overridden to run the script when the message is
that job's. Everything else, and any other Celery client, publishes as kombu does; the wire format is kombu's own.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from celery.app.amqp import AMQP as CeleryAMQP
from kombu import Connection as KombuConnection
from kombu.connection import ConnectionPool, PooledConnection
from kombu.transport import redis
from kombu.utils.collections import HashedSeq
from kombu.utils.json import dumps

from kiq import library_internals as internals
from kiq.errors import SubmitAbandoned
from kiq.settings import Settings

# KEYS: the priority list, the Idempotency-Key's mark. ARGV: the message, the pending value (ours), the committed
# value, its ttl in seconds. 1: pushed and committed; 2: committed to this job already (a retried publish whose
# first try ran): nothing pushed; 0: the mark is not ours any more: nothing pushed.
_PUBLISH_AND_COMMIT = """
local mark = redis.call('GET', KEYS[2])
if mark == ARGV[3] then return 2 end
if mark ~= ARGV[2] then return 0 end
redis.call('LPUSH', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], ARGV[3], 'EX', tonumber(ARGV[4]))
return 1
"""

_armed = threading.local()


@dataclass
class Commit:
    """What one job's publish commits: its Idempotency-Key's mark from `pending` to `committed`."""

    job_id: str
    key: str
    pending: str
    committed: str
    ttl_s: int
    done: bool = False  # set once the script ran (pushed now, or found committed by a try before)


def shares_redis(settings: Settings) -> bool:
    """Whether the broker's lists and the results' keys are on one Redis database (one script reaches both)."""
    broker, results = settings.broker_server, settings.results_server  # and one user: its ACL must reach both
    same = ("scheme", "hosts", "db", "username", "password")
    return all(getattr(broker, field) == getattr(results, field) for field in same)


def arm(commit: Commit) -> None:
    """Make this thread's next publish of `commit.job_id` commit it too."""
    _armed.commit = commit


def disarm() -> Commit | None:
    """Take back what `arm` set (the publish is over); its `done` says whether the script committed it."""
    commit = getattr(_armed, "commit", None)
    _armed.commit = None
    return commit


def _armed_for(message: Any) -> Commit | None:
    commit = getattr(_armed, "commit", None)
    headers = message.get("headers") or {} if isinstance(message, dict) else {}
    return commit if commit is not None and headers.get("id") == commit.job_id else None


class _CommittingPut(internals.PutHook):
    """kombu's Redis `_put`, running the publish-and-commit script for an armed job's message."""

    def put(self, queue: str, message: Any, **kwargs: Any) -> None:
        commit = _armed_for(message)
        key = None if commit is None else internals.single_push_list(self, queue, message, kwargs)
        if commit is None or key is None:
            return super().put(queue, message, **kwargs)
        with self.conn_or_acquire() as client:  # EVAL's keys are not prefixed by kombu's client: `key` is
            done = client.eval(_PUBLISH_AND_COMMIT, 2, key, commit.key, dumps(message), commit.pending,
                               commit.committed, commit.ttl_s)  # fmt: skip
        if int(done) == 0:
            raise SubmitAbandoned(
                "the submit outlived its Idempotency-Key's pending mark (it lapsed, or another request holds the "
                "key); nothing was enqueued"
            )
        commit.done = True


class Channel(_CommittingPut, redis.Channel):
    pass


class Transport(redis.Transport):
    Channel = Channel


class SentinelChannel(_CommittingPut, redis.SentinelChannel):
    pass


class SentinelTransport(redis.SentinelTransport):
    Channel = SentinelChannel


_OURS: dict[type, type] = {redis.Transport: Transport, redis.SentinelTransport: SentinelTransport}


class Connection(KombuConnection):
    """A kombu Connection with kiq's producer transports; the URL's scheme still picks one (and TLS)."""

    def get_transport_cls(self) -> type:
        cls = super().get_transport_cls()
        return _OURS.get(cls, cls)

    def __eqhash__(self) -> HashedSeq:
        """kombu keys its process-wide pools by this, not by class: a plain Celery app's pool for the same broker
        would otherwise be shared, and the publish would not commit (kiq's transport never ran)."""
        return HashedSeq("kiq.publish", *super().__eqhash__())

    def Pool(self, limit: int | None = None, **kwargs: Any) -> ConnectionPool:
        return _Pool(self, limit=limit, **kwargs)  # Celery publishes through the pool: its connections too


class _PooledConnection(PooledConnection):
    def get_transport_cls(self) -> type:
        cls = super().get_transport_cls()
        return _OURS.get(cls, cls)


class _Pool(ConnectionPool):
    """kombu 5.7's ConnectionPool, whose `new` makes kombu's own PooledConnection: here one with kiq's transports."""

    def new(self) -> _PooledConnection:
        return _PooledConnection(self, **internals.connection_args(self))


class AMQP(CeleryAMQP):
    """Celery's broker glue for kiq's producers: `Celery(..., amqp="kiq.publish:AMQP")`."""

    Connection = Connection
    BrokerConnection = Connection
