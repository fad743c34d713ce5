"""What a worker does once a run of its own is found stale (kiq/fencing.py): let go of the job's message.

A message handed out again keeps its delivery tag, so the newer delivery's lease lives under the same tag in
kombu's unacked hash and index. Acknowledging (or rejecting) the stale copy would delete that lease, and a crash
of the newer run would then lose the job. So the stale copy is settled in this process only: dropped from the
channel's delivered map (no renewal, no restore at shutdown) and marked acknowledged for Celery, which then sends
no ack. Uses Celery's `Request.acknowledged`/`.message`, and Celery's requests and kombu's delivered map through
kiq/library_internals.py (tests/unit/test_fencing.py and test_library_internals.py check them on the pinned versions).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Any

from kiq import fencing, leases, transport
from kiq import library_internals as internals

log = logging.getLogger(__name__)
_LET_GO_MAX = 1024  # reserved (prefetched) jobs let go of before their turn; their turn removes them
_let_go: OrderedDict[str, None] = OrderedDict()


def let_go(job_id: str) -> None:
    """Settle this process's copies of the job's message without telling the broker."""
    active = internals.active_requests()
    for request in [*active, *internals.reserved_requests()]:
        if request.id != job_id or request.acknowledged:
            continue
        _settle_locally(request.message)
        request.acknowledged = True  # Celery acks only requests not acknowledged yet
        # A batch mate still waiting for its turn: that turn must not run it. Not the running request (Celery lists
        # it as reserved too): marking it would make every later delivery of the job be let go of in turn, forever.
        if request not in active and internals.is_reserved(request):
            _mark(job_id)


def _mark(job_id: str) -> None:
    """Its turn, if one comes, must not run it."""
    _let_go[job_id] = None
    while len(_let_go) > _LET_GO_MAX:
        _let_go.popitem(last=False)


def let_go_reserved() -> None:
    """Let go of every job this process holds but has not started (prefetched, batch mates): once its leases
    lapsed, another worker may take each of them, and a copy run here later would take a newer fencing token and
    fence out that worker's run. Their turns, if Celery keeps them, are skipped; the sweep hands the jobs back."""
    active = {request.id for request in internals.active_requests()}
    for request in internals.reserved_requests():
        if request.id not in active and not request.acknowledged:
            let_go(request.id)
            log.warning("let go of reserved job %s at %.3f: this worker's leases lapsed", request.id, time.time())
    # Held across a reconnect: Celery cleared its reserved requests, but the threads pool may still run them.
    for message in transport.kept_messages():
        job_id = (getattr(message, "headers", None) or {}).get("id")
        if job_id is None or job_id in active:
            continue
        _settle_locally(message)
        _mark(job_id)
        log.warning("let go of job %s kept across a reconnect at %.3f: this worker's leases lapsed", job_id,
                    time.time())  # fmt: skip


def was_let_go(job_id: str) -> bool:
    """True once, on the turn of a reserved job whose message was let go of."""
    return _let_go.pop(job_id, False) is None


def _settle_locally(message: Any) -> None:
    transport.forget(getattr(message, "delivery_tag", None))  # kept across a reconnect: its lease must lapse too
    try:
        # What kombu's acknowledgement does in this process, without its Redis calls: the tag leaves the channel's
        # delivered map, so neither the lease keeper nor the restore at shutdown touches the newer delivery's lease.
        internals.settle_locally(message)
    except Exception as exc:  # noqa: BLE001 - a channel closed by a reconnect: nothing left to settle
        log.warning("could not let go of message %s locally: %s", getattr(message, "delivery_tag", "?"), exc)


def install() -> None:
    """A write refused for a stale run lets go of the job's message (before Celery would ack it); the lease keeper,
    once this process's leases lapsed, lets go of every job held but not started (even with no run to notice)."""
    fencing.on_refused = let_go
    leases.on_lapse = let_go_reserved
