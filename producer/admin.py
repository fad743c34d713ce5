"""Admin actions, for the CLI (whoever reaches Redis) and for admin API keys (`"admin": true` in KIQ_API_TENANTS):
purge queued jobs (a routed queue with its tenant queues, or one tenant's), and drain a worker.

A purged job ends REVOKED as a cancelled one does: its cancel flag is set and its final state and webhook
written before its message leaves the queue, so a worker that takes it meanwhile does not run it either. Jobs
already running, and messages of jobs already final (a redelivery), are left alone and uncounted."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from kiq import quota_counts
from kiq.celeryconf import priority_lists
from kiq.errors import NotConfirmed, UnknownTenant, UnknownWorker
from kiq.names import TERMINAL_STATES, cancel_key, drain_key, tenant_queue, tenant_queues_key
from kiq.settings import Settings

if TYPE_CHECKING:  # the CLI imports this module for its parsers: Celery only when a command runs
    from producer.client import Client

PAGE = 200  # messages read per LRANGE while purging
DRAIN_TTL_S = 30  # a drain request outlives the workers' next reads (3 polls at least), not their restart


def purge(client: Client, queue: str, owner: str | None = None) -> int:
    """Revoke the queued jobs of `queue` and of its tenant queues (only `owner`'s, if given); returns how many."""
    purged = 0
    for name in _lists(client, queue, owner):
        purged += _purge_list(client, name, owner)
    return purged


def queued(client: Client, queue: str) -> dict[str, int]:
    """Jobs waiting in `queue` per tenant queue (the routed queue itself included): for admins only."""
    names = [queue, *sorted(k.decode() for k in client.redis.hkeys(tenant_queues_key(queue)))]
    with client.broker_redis.pipeline(transaction=False) as pipe:
        for name in names:
            for key in priority_lists(name):
                pipe.llen(key)
        lengths = iter(pipe.execute())
    return {name: sum(next(lengths) for _ in priority_lists(name)) for name in names}


def _lists(client: Client, queue: str, owner: str | None) -> list[str]:
    if owner is not None:  # its own queue, and the routed one for its jobs sent while fair share was off
        names = [tenant_queue(queue, owner), queue]
    else:
        names = [queue, *sorted(k.decode() for k in client.redis.hkeys(tenant_queues_key(queue)))]
    return [key for name in names for key in priority_lists(name)]


def _purge_list(client: Client, key: str, owner: str | None) -> int:
    broker, purged, start = client.broker_redis, 0, 0
    while True:
        page = broker.lrange(key, start, start + PAGE - 1)
        if not page:
            return purged
        taken = [(raw, message) for raw, message in _parsed(page) if owner is None or _owner(message) == owner]
        for _, message in taken:
            purged += _revoke(client, message)
        with broker.pipeline(transaction=False) as pipe:
            for raw, _ in taken:
                pipe.lrem(key, 1, raw)
            removed = sum(pipe.execute())
        start += len(page) - removed


def _parsed(page: list[bytes]) -> Iterator[tuple[bytes, dict[str, Any]]]:
    for raw in page:
        try:
            message = json.loads(raw)
        except ValueError:
            continue  # not a kombu message: not ours to remove
        if isinstance(message, dict):
            yield raw, message


def _owner(message: dict[str, Any]) -> str:
    return str((message.get("headers") or {}).get("kiq_owner") or "")


def _revoke(client: Client, message: dict[str, Any]) -> int:
    """Mark the message's job REVOKED (flag, state, webhook) unless it has ended; 1 if it was marked."""
    headers = message.get("headers") or {}
    job_id = headers.get("id")
    if not isinstance(job_id, str) or not job_id:
        return 0
    if client.app.backend.get_task_meta(job_id)["status"] in TERMINAL_STATES:
        return 0
    client.redis.set(cancel_key(job_id), "1", ex=client.settings.result_ttl_s)
    client.app.backend.mark_as_revoked(job_id, reason="purged")
    if headers.get(quota_counts.HEADER):  # it counted against its tenant's queued quota: not any more
        quota_counts.ended(client.redis, _owner(message), job_id)
    client.notify(job_id)
    return 1


def drain(client: Client, hostname: str) -> list[dict[str, Any]]:
    """Ask the live workers named `hostname` to take no more jobs, finish the current one and exit."""
    workers = [w for w in client.fleet() if w.get("hostname") == hostname]
    if not workers:
        raise UnknownWorker(f"no live worker named {hostname!r} (see `kiq fleet`)")
    ttl = max(DRAIN_TTL_S, math.ceil(3 * client.settings.fair_share_poll_s))
    client.redis.set(drain_key(hostname), "1", ex=ttl)
    return workers


# The CLI: `kiq purge QUEUE --yes-i-mean-it QUEUE [--tenant NAME]` and `kiq fleet drain WORKER`.


def add_commands(sub: Any, fleet: argparse.ArgumentParser) -> None:
    purge_cmd = sub.add_parser("purge", help="revoke the queued jobs of a queue (or of one tenant in it)")
    purge_cmd.add_argument("queue", help="the routed queue (KIQ_QUEUE or a worker queue); its tenant queues too")
    purge_cmd.add_argument("--tenant", help="only this tenant's jobs: its name in KIQ_API_TENANTS, or its owner id")
    purge_cmd.add_argument("--yes-i-mean-it", dest="confirm", metavar="QUEUE", default="",
                           help="the queue's name again: the purge cannot be undone")  # fmt: skip
    purge_cmd.set_defaults(handler=cmd_purge)
    actions = fleet.add_subparsers(dest="fleet_command")
    drain_cmd = actions.add_parser("drain", help="the worker takes no more jobs, finishes its current one, exits")
    drain_cmd.add_argument("worker", help="its HOSTNAME in `kiq fleet`")
    drain_cmd.set_defaults(handler=cmd_drain)


def cmd_purge(args: argparse.Namespace, _: list[str]) -> int:
    if args.confirm != args.queue:
        raise NotConfirmed(f"purging cannot be undone: repeat the queue's name, --yes-i-mean-it {args.queue}")
    settings = Settings.from_env()
    owner = owner_of(settings, args.tenant) if args.tenant else None
    purged = purge(_client(settings), args.queue, owner)
    print(json.dumps({"queue": args.queue, "tenant": args.tenant, "purged": purged}))
    return 0


def cmd_drain(args: argparse.Namespace, _: list[str]) -> int:
    workers = drain(_client(Settings.from_env()), args.worker)
    print(f"draining {len(workers)} worker process(es) named {args.worker}")
    return 0


def _client(settings: Settings) -> Client:
    from producer.client import Client

    return Client(settings)


def owner_of(settings: Settings, tenant: str) -> str:
    """A tenant's owner id from its name in the tenants file, or the owner id itself."""
    from producer.tenants import Tenants

    for found in Tenants.from_settings(settings).by_key.values():
        if tenant in (found.name, found.owner):
            return found.owner
    if len(tenant) == 16 and all(c in "0123456789abcdef" for c in tenant):
        return tenant
    raise UnknownTenant(f"no tenant named {tenant!r} in KIQ_API_TENANTS (or give its 16-hex owner id)")
