"""Moves what kiq left in the broker while it set kombu's `sep` to ':' (up to issue 20) to kombu's default.

Two things were named with the old separator: the priority lists of each queue (`kiq:3`, `kiq:6`, `kiq:9`) and
the members of kombu's binding tables (`_kombu.binding.<exchange>` sets, `routing_key:pattern:queue`). A worker
now reads `kiq\\x06\\x163` …, and one old member in a table makes every publish that names that exchange (control
replies: `celery inspect`, Flower) raise ValueError. So each worker, on each broker connection before it consumes,
rewrites old members in place and moves the messages of old lists onto the new ones, oldest served first, ahead
of newer messages; then it rechecks its queues' old lists as often as the unacked sweep (old producers in a
rolling upgrade). Each script is atomic and every step idempotent: workers starting together, or one dying
midway, lose and duplicate nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from kiq.celeryconf import KOMBU_SEP, OLD_SEP, PRIORITY_STEPS, priority_lists, restore_interval_s
from kiq.redisconn import REDIS_ERRORS

log = logging.getLogger(__name__)

BINDING_PATTERNS = ("_kombu.binding.*", "_kombu.binding_permanent.*")  # kombu's tables (sets), by exchange
MOVE_BATCH = 1000  # messages one script call moves: a long old list never blocks Redis for long

# KEYS: one binding set. ARGV: old sep, new sep. Members without the new sep are old: rewritten when they have
# three fields (kombu's own format), dropped otherwise (kombu could not parse them either). Returns {rewritten,
# dropped}.
_REWRITE_BINDINGS = """
local rewritten, dropped = 0, 0
for _, member in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if not string.find(member, ARGV[2], 1, true) then
    local parts, start = {}, 1
    while true do
      local at = string.find(member, ARGV[1], start, true)
      if not at then table.insert(parts, string.sub(member, start)); break end
      table.insert(parts, string.sub(member, start, at - 1))
      start = at + #ARGV[1]
    end
    redis.call('SREM', KEYS[1], member)
    if #parts == 3 then
      redis.call('SADD', KEYS[1], table.concat(parts, ARGV[2]))
      rewritten = rewritten + 1
    else
      dropped = dropped + 1
    end
  end
end
return {rewritten, dropped}
"""

# KEYS: old list, new list. ARGV: batch size. An old list alone is renamed (TTL kept); otherwise its messages go,
# newest first, onto the consuming end of the new one (kombu LPUSHes and BRPOPs): old ones are served first, in
# their order. Returns how many moved; a full batch means call again.
_MOVE_LIST = """
local n = redis.call('LLEN', KEYS[1])
if n == 0 then return 0 end
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('RENAME', KEYS[1], KEYS[2])
  return n
end
local moved = 0
while moved < tonumber(ARGV[1]) do
  local message = redis.call('LPOP', KEYS[1])
  if not message then break end
  redis.call('RPUSH', KEYS[2], message)
  moved = moved + 1
end
return moved
"""


@dataclass
class Migrated:
    bindings_rewritten: int = 0
    bindings_dropped: int = 0
    messages_moved: int = 0

    def __bool__(self) -> bool:
        return bool(self.bindings_rewritten or self.bindings_dropped or self.messages_moved)


def migrate(redis: Any, queues: Iterable[str] = ()) -> Migrated:
    """Rewrite old binding members, then move the old priority lists of `queues` and of every bound queue."""
    done = Migrated()
    rewrite = redis.register_script(_REWRITE_BINDINGS)
    bound: set[str] = set(queues)
    for key in _binding_keys(redis):
        rewritten, dropped = rewrite(keys=[key], args=[OLD_SEP, KOMBU_SEP])
        done.bindings_rewritten += int(rewritten)
        done.bindings_dropped += int(dropped)
        bound.update(_queue_of(member) for member in redis.smembers(key))
    done.messages_moved = move_lists(redis, bound)
    if done:
        log.warning("moved kiq's old broker names to kombu's defaults: %s", done)
    return done


def move_lists(redis: Any, queues: Iterable[str]) -> int:
    """Move the messages of each queue's old priority lists onto its lists; returns how many moved."""
    move, moved = redis.register_script(_MOVE_LIST), 0
    for queue in sorted(q for q in set(queues) if q):
        old, new = priority_lists(queue, OLD_SEP), priority_lists(queue, KOMBU_SEP)
        for step, old_list, new_list in zip(PRIORITY_STEPS, old, new, strict=True):
            if step:  # step 0 is the queue's own name in both
                moved += _move_all(move, old_list, new_list)
    return moved


def _binding_keys(redis: Any) -> list[bytes]:
    return sorted({key for pattern in BINDING_PATTERNS for key in redis.scan_iter(match=pattern, count=1000,
                                                                                   _type="set")})  # fmt: skip


def _queue_of(member: bytes | str) -> str:
    text = member.decode(errors="replace") if isinstance(member, bytes) else member
    parts = text.split(KOMBU_SEP)
    return parts[2] if len(parts) == 3 else ""


def _move_all(move: Any, old_list: str, new_list: str) -> int:
    total = 0
    while True:
        moved = int(move(keys=[old_list, new_list], args=[MOVE_BATCH]))
        total += moved
        if moved < MOVE_BATCH:
            return total


def install(app: Any, redis_factory: Callable[[], Any], queues: Iterable[str], visibility_timeout_s: float) -> None:
    """Add a consumer bootstep that migrates on every broker (re)connection, before the consumer's loop runs
    (a worker that starts while Redis is down migrates once it is up), then, as often as the unacked sweep, moves
    what an old release's producer or worker, still running in a rolling upgrade, put on its queues' old lists."""
    from celery import bootsteps

    consumed, interval_s = list(queues), restore_interval_s(visibility_timeout_s)

    class BrokerFormat(bootsteps.StartStopStep):
        requires = ("celery.worker.consumer.connection:Connection",)

        def __init__(self, c: Any, **kwargs: Any) -> None:
            super().__init__(c, **kwargs)
            self.redis: Any = None
            self.tref: Any = None

        def start(self, c: Any) -> None:
            self._run(lambda redis: migrate(redis, consumed))
            self._cancel()  # a reconnect clears the event loop's timers: register again each time
            self.tref = c.timer.call_repeatedly(interval_s, self._run, (self._recheck,))

        def _recheck(self, redis: Any) -> None:
            if moved := move_lists(redis, consumed):
                log.warning("moved %d message(s) from the old priority lists of %s", moved, consumed)

        def _run(self, step: Callable[[Any], Any]) -> None:
            try:
                if self.redis is None:
                    self.redis = redis_factory()
                step(self.redis)
            except REDIS_ERRORS as exc:  # Redis went away: the next connection or recheck tries again
                log.warning("could not check the broker for kiq's old names: %s", exc)

        def stop(self, c: Any) -> None:
            self._cancel()

        def _cancel(self) -> None:
            if self.tref is not None:
                self.tref.cancel()
                self.tref = None

        def shutdown(self, c: Any) -> None:
            self._cancel()
            if self.redis is not None:
                self.redis.close()
                self.redis = None

    app.steps["consumer"].add(BrokerFormat)
