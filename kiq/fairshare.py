"""Fair share: among jobs of one priority, tenants take turns, in proportion to their weights.

A tenant's jobs wait in a Celery queue of their own beside the routed one (`<queue>.t.<owner>`, kiq/names.py),
recorded at submit in a hash per routed queue (queue -> weight). Workers consume the routed queue and each of its
tenant queues. kombu's Redis transport BRPOPs over all of a consumer's queues with the keys ordered
priority-major (every queue's most urgent list first), in the order its queue cycle gives; `FairCycle` is that
cycle (the `queue_order_strategy` transport option of kiq's workers): after each delivery the delivering queue
moves to the end of its routed queue's group once it has had `weight` deliveries in a row. So a more urgent job
still goes first across tenants, and within one priority each tenant waits for one turn of the others, not for
their backlogs. The routed queue itself is one more member (jobs sent by name from plain Celery clients, and
from the Python client without an owner: the default tenant, weight 1).

Stdlib only: kombu imports it by name (`kiq.fairshare:FairCycle`) in every process that opens a channel.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping

from kiq.names import tenant_queue, tenant_queues_key, tenant_queues_version_key

STRATEGY = "kiq.fairshare:FairCycle"
MAX_WEIGHT = 100

# A tenant queue's routed queue and weight, as the worker last read them from Redis (shared by every channel).
_groups: dict[str, str] = {}
_weights: dict[str, int] = {}
_lock = threading.Lock()

# KEYS: the routed queue's hash, its version. ARGV: tenant queue, weight, the most tenant queues. The version
# changes only when an entry does, so workers re-read the hash only then. 1: recorded, 0: full.
REGISTER = """
local old = redis.call('HGET', KEYS[1], ARGV[1])
if old == ARGV[2] then return 1 end
if old or redis.call('HLEN', KEYS[1]) < tonumber(ARGV[3]) then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  redis.call('INCR', KEYS[2])
  return 1
end
return 0
"""


def learn(base: str, queues: Mapping[str, int]) -> None:
    """Record the tenant queues of `base` and their weights, for every channel's cycle."""
    with _lock:
        for queue, weight in queues.items():
            _groups[queue] = base
            _weights[queue] = max(1, min(MAX_WEIGHT, weight))


def base_of(queue: str) -> str:
    """The routed queue a tenant queue belongs to (a queue not known as a tenant queue is its own)."""
    return _groups.get(queue, queue)


def weight_of(queue: str) -> int:
    return _weights.get(queue, 1)


def register(pipe: object, base: str, owner: str, weight: int, most: int) -> str:
    """Queue the registration of the tenant's queue on a Redis pipeline; returns the tenant queue's name."""
    queue = tenant_queue(base, owner)
    keys = tenant_queues_key(base), tenant_queues_version_key(base)
    pipe.eval(REGISTER, 2, *keys, queue, weight, most)  # type: ignore[attr-defined]
    return queue


def parse_registry(raw: Mapping[bytes, bytes]) -> dict[str, int]:
    """A routed queue's hash as read by HGETALL: tenant queue -> weight (unreadable weights count as 1)."""
    found = {}
    for queue, weight in raw.items():
        try:
            found[queue.decode()] = int(weight)
        except ValueError:
            found[queue.decode()] = 1
    return found


class FairCycle:
    """kombu's queue cycle (`round_robin_cycle`'s interface: update, consume, rotate), grouped by routed queue:
    groups keep the order their queues were first consumed in (a worker's KIQ_WORKER_QUEUES order, as kiq's
    "priority" strategy did), and within a group a queue moves to the end after `weight` deliveries in a row."""

    def __init__(self, it: Iterable[str] | None = None) -> None:
        self.items: list[str] = []
        self._rank: dict[str, int] = {}  # routed queue -> its group's place
        self._served: dict[str, int] = {}  # deliveries in a row of a queue since it last moved to the end
        self.update(it or [])

    def update(self, it: Iterable[str]) -> None:
        """kombu calls this at every consume and cancel: each queue keeps its place, and a new one goes first in
        its group (it has had no turn yet: at the end, a tenant arriving behind a backlog would wait a round)."""
        wanted = list(dict.fromkeys(it))
        self.items[:] = [q for q in wanted if q not in self.items] + [q for q in self.items if q in wanted]
        for queue in self.items:
            self._rank.setdefault(base_of(queue), len(self._rank))

    def consume(self, n: int) -> list[str]:
        ranks = {q: self._rank.setdefault(base_of(q), len(self._rank)) for q in self.items}
        return sorted(self.items, key=ranks.__getitem__)[:n]  # stable: within a group, the rotation's order

    def rotate(self, last_used: str) -> str:
        served = self._served.get(last_used, 0) + 1
        if served < weight_of(last_used):
            self._served[last_used] = served
            return last_used
        self._served.pop(last_used, None)
        if last_used in self.items:
            self.items.remove(last_used)
            self.items.append(last_used)
        return last_used

    def close(self) -> None:
        """kombu's cycles have one; nothing to release."""
