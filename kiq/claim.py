"""Claiming a message and its unacked entry in one step, instead of kombu's BRPOP.

kombu's Redis transport pops with BRPOP, and only once the client has read the reply does `QoS.append` write the
unacked entry the visibility-timeout sweep hands back. A connection lost between the server's pop and the client's
read (packet loss past the socket timeout, CLIENT KILL, a NAT reset) loses the message with no entry: an accepted
job vanishes (kombu#305, celery#4354). Here a Lua script pops the first non-empty list and, for a queue whose
consumer acks, writes that entry (scored by Redis's clock) in the same step: a lost reply leaves the entry, nobody
renews its lease (kiq/leases.py renews only what this process holds), and the sweep hands the message back.

Lua cannot block, so an idle channel waits in a BLPOP on its queues' doorbells (`doorbell_key`, rung by kiq's
producer after each publish, kept short and expiring) for at most a second, pipelined before the claim; a message
published without a doorbell (a plain Celery client) is claimed within that second. After a claim that found a
message, the next one goes without the wait, so a backlog drains at full speed.
"""

from __future__ import annotations

import logging
from queue import Empty
from typing import Any

from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError as RedisResponseError

from kiq import library_internals as internals
from kiq.names import doorbell_key

log = logging.getLogger(__name__)

WAIT_CAP_S = 1  # the longest an idle channel waits on its doorbells before it claims anyway
REPLY_WAIT_S = 10  # the claim's reply follows the doorbell's at once; a connection silent this long is dropped
DOORBELL_TOKENS = 16  # a doorbell holds at most this many wake-ups
DOORBELL_TTL_S = 60

# KEYS: the unacked hash, its index, then the lists in claim order. ARGV[i]: '1' where the consumer of KEYS[i + 2]
# acks. Pops the first non-empty list; returns {list, payload} or nil. The entry is kombu's own: the payload as
# popped, its exchange and routing key (kombu's `restore_by_tag` reads it); without a delivery tag, none is written.
CLAIM = """
for i = 3, #KEYS do
  local raw = redis.call('RPOP', KEYS[i])
  if raw then
    if ARGV[i - 2] == '1' then
      local ok, message = pcall(cjson.decode, raw)
      local props = ok and type(message) == 'table' and message.properties
      local info = type(props) == 'table' and props.delivery_info
      local tag = type(info) == 'table' and props.delivery_tag
      if type(tag) == 'string' and type(info.exchange) == 'string' and type(info.routing_key) == 'string' then
        local now = redis.call('TIME')
        redis.call('HSET', KEYS[1], tag,
          '[' .. raw .. ',' .. cjson.encode(info.exchange) .. ',' .. cjson.encode(info.routing_key) .. ']')
        redis.call('ZADD', KEYS[2], now[1] .. '.' .. string.format('%06d', tonumber(now[2])), tag)
      end
    end
    return {KEYS[i], raw}
  end
end
return false
"""


def claim_command(prefix: str, unacked: str, index: str, lists: list[tuple[str, bool]]) -> tuple[Any, ...]:
    """The EVAL that claims from `lists` ((list key, consumer acks) in claim order), every key given `prefix`."""
    keys = [prefix + unacked, prefix + index, *(prefix + key for key, _ in lists)]
    return ("EVAL", CLAIM, len(keys), *keys, *("1" if acks else "0" for _, acks in lists))


def ring(pipe: Any, queue: str, prefix: str = "") -> None:
    """Queue a wake-up for a channel waiting on `queue` on a Redis pipeline: after a publish to `queue`."""
    key = prefix + doorbell_key(queue)
    pipe.lpush(key, 1).ltrim(key, 0, DOORBELL_TOKENS - 1).expire(key, DOORBELL_TTL_S)


def ring_after_publish(app: Any, redis: Any, queue: str) -> None:
    """Wake an idle consumer of `queue` at once after a publish to it (without, one claims within `WAIT_CAP_S`),
    on `redis` with the broker's key prefix; never raises: a doorbell is only a wake-up."""
    try:
        prefix = (app.conf.broker_transport_options or {}).get("global_keyprefix", "")
        with redis.pipeline(transaction=False) as pipe:
            ring(pipe, queue, prefix)
            pipe.execute()
    except Exception as exc:  # noqa: BLE001
        log.debug("could not ring the doorbell of %s (a consumer claims within %d s): %s", queue, WAIT_CAP_S, exc)


class Claiming(internals.ConsumeHooks):
    """Mixed in before kombu's Redis Channel (or SentinelChannel): consume by `CLAIM` (see the module's doc)."""

    _claim_found = True  # the last claim found a message (the first claim goes at once)
    _claim_waits = False  # the claim in flight follows a doorbell wait (two replies to read)
    _get_acks = False  # inside basic_get(no_ack=False): `_get` writes the unacked entry
    _kombu_pop = False  # the read in flight is kombu's BRPOP (a channel whose queues are all consumed without acks)

    def basic_consume(self, queue: str, *args: Any, **kwargs: Any) -> Any:
        no_ack = kwargs["no_ack"] if "no_ack" in kwargs else bool(args and args[0])  # kombu: (queue, no_ack, …)
        self.__dict__.setdefault("_no_ack_queues", {})[queue] = bool(no_ack)
        return super().basic_consume(queue, *args, **kwargs)

    def basic_get(self, queue: str, no_ack: bool = False, **kwargs: Any) -> Any:
        self._get_acks = not no_ack
        try:
            return super().basic_get(queue, no_ack, **kwargs)
        finally:
            self._get_acks = False

    def _acks(self, queue: str) -> bool:
        return not self.__dict__.get("_no_ack_queues", {}).get(queue, False)

    def _claim(self, queues: list[str], acks: Any) -> tuple[Any, ...]:
        lists = [(internals.priority_list(self, q, pri), acks(q)) for pri in self.priority_steps for q in queues]
        return claim_command(self.global_keyprefix, self.unacked_key, self.unacked_index_key, lists)

    def start_claim(self, timeout: Any = None) -> None:
        if timeout is None:
            timeout = self.brpop_timeout
        queues = internals.consume_order(self)
        if not queues:
            return
        # Reply queues (`celery inspect`, control) ack nothing, so there is no lease to lose, and nobody rings their
        # doorbells: kombu's BRPOP delivers a reply at once, where a doorbell wait would outlast a 1 s inspect.
        self._kombu_pop = not any(self._acks(q) for q in queues)
        if self._kombu_pop:
            return super().start_claim(timeout)
        commands = [self._claim(queues, self._acks)]
        self._claim_waits = not self._claim_found
        if self._claim_waits:
            wait = min(timeout or WAIT_CAP_S, WAIT_CAP_S)
            commands.insert(0, ("BLPOP", *(self.global_keyprefix + doorbell_key(q) for q in queues), wait))
        connection = self.client.connection
        internals.poll_sent(self, connection)
        connection.send_packed_command(connection.pack_commands(commands))

    def read_claim(self, **options: Any) -> bool:
        if self._kombu_pop:
            return super().read_claim(**options)
        connection = self.client.connection
        try:
            try:
                if self._claim_waits:
                    self._claim_waits = False
                    self._read_doorbell(connection, **options)
                    if not connection.can_read(timeout=REPLY_WAIT_S):
                        raise RedisConnectionError("no reply to the claim after the doorbell's")
                reply = self.client.parse_response(connection, "EVAL", **options)
            except Exception:
                connection.disconnect()  # the next poll reconnects; a reply left unread is never taken for the next
                raise
            self._claim_found = bool(reply)
            if not reply:
                raise Empty()
            key, payload = reply
            dest = bytes_to_str(key)[len(self.global_keyprefix) :].rsplit(self.sep, 1)[0]
            internals.deliver(self, loads(bytes_to_str(payload)), dest)
            return True
        finally:
            internals.poll_done(self)

    def _read_doorbell(self, connection: Any, **options: Any) -> None:
        """The doorbell wait's reply. An error reply (a doorbell key of another type, an ACL refusing BLPOP) is read
        whole, so the claim's reply after it is still in step: read and deliver that, or its message (popped and
        recorded by then) would be dropped here and handed back by every sweep, never run."""
        try:
            self.client.parse_response(connection, "BLPOP", **options)
        except RedisResponseError as exc:
            log.warning("the doorbell wait failed (%s); claiming without it", exc)

    def poll_error(self, type: str, **options: Any) -> Any:
        """kombu reads one reply on a poll error; a claim may have two in flight: drop the connection instead (an
        unread claim's message keeps its entry, and a sweep hands it back)."""
        if type != "BRPOP" or self._kombu_pop:
            return super().poll_error(type, **options)
        self._claim_waits = False
        try:
            self.client.connection.disconnect()
        finally:
            internals.poll_done(self)
        return None

    def get_claimed(self, queue: str) -> Any:
        with self.conn_or_acquire() as client:
            command = self._claim([queue], lambda _: self._get_acks)
            reply = client.execute_command(*command)
            internals.refresh_queue_expiry(self, client, queue)
            if not reply:
                raise Empty()
            return loads(bytes_to_str(reply[1]))
