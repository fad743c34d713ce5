"""Webhook signing, verification and queueing, shared by the worker, the client and the webhook worker.

A webhook carries `X-Kiq-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256>` over `"<t>.<delivery id>.<body>"`
(Stripe's scheme plus the delivery id): a receiver checks the HMAC, refuses a timestamp outside its tolerance
(default 300 s) and dedupes on `X-Kiq-Delivery`, so a captured request cannot be replayed later or as another
delivery. Each job gets at most one webhook: whoever ends the job first queues it (a Redis SET NX decides).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
import uuid
from collections.abc import Mapping
from typing import Any

from kiq import claim, fencing, tracing
from kiq.names import WEBHOOK_QUEUE, WEBHOOK_TASK, webhook_queued_key

log = logging.getLogger(__name__)
SIGNATURE_HEADER = "X-Kiq-Signature"
DELIVERY_HEADER = "X-Kiq-Delivery"
JOB_HEADER = "X-Kiq-Job-Id"
DEFAULT_TOLERANCE_S = 300
_NAMESPACE = uuid.UUID("6f1c2a9e-4b7d-4c55-9a3e-2d8f0b1e7c44")


class InvalidSignature(Exception):
    """The webhook's signature is missing, malformed, wrong or outside the replay window."""


def delivery_id(job_id: str) -> str:
    """The webhook task's id, sent as X-Kiq-Delivery: one per job, the same on every retry."""
    return str(uuid.uuid5(_NAMESPACE, job_id))


def sign(secret: str, body: bytes, delivery: str, timestamp: int | None = None) -> str:
    stamp = int(time.time()) if timestamp is None else timestamp
    return f"t={stamp},v1={_mac(secret, stamp, delivery, body)}"


def verify(secret: str, headers: Mapping[str, str], body: bytes, tolerance_s: float = DEFAULT_TOLERANCE_S,
           now: float | None = None) -> None:  # fmt: skip
    """Raise InvalidSignature unless the request is a genuine, fresh kiq webhook (for receivers)."""
    lower = {k.lower(): v for k, v in headers.items()}
    delivery = lower.get(DELIVERY_HEADER.lower(), "")
    parts = dict(p.split("=", 1) for p in lower.get(SIGNATURE_HEADER.lower(), "").split(",") if "=" in p)
    if not delivery or not parts.get("t", "").isdigit() or "v1" not in parts:
        raise InvalidSignature("missing or malformed X-Kiq-Signature / X-Kiq-Delivery")
    stamp = int(parts["t"])
    if abs((time.time() if now is None else now) - stamp) > tolerance_s:
        raise InvalidSignature(f"timestamp {stamp} is outside the {tolerance_s:g} s tolerance")
    if not hmac.compare_digest(parts["v1"], _mac(secret, stamp, delivery, body)):
        raise InvalidSignature("signature does not match")


def _mac(secret: str, stamp: int, delivery: str, body: bytes) -> str:
    return hmac.new(secret.encode(), f"{stamp}.{delivery}.".encode() + body, hashlib.sha256).hexdigest()


def queue_webhook(app: Any, redis: Any, job_id: str, url: str | None, ttl_s: int, token: int | None = None) -> bool:
    """Queue the job's one webhook unless someone already has, or the run holding fencing `token` is stale (its
    early webhook would wait for a final state that the newer run may take longer than its retries to write);
    never raises (a webhook never fails its job)."""
    if not url:
        return False
    try:
        if not fencing.set_if_current(redis, job_id, token, webhook_queued_key(job_id), "1", ttl_s, nx=True):
            return False
    except Exception as exc:  # noqa: BLE001 - Redis down: fall through and send; the receiver dedupes
        log.warning("could not mark the webhook of %s as queued: %s", job_id, exc)
    try:
        app.send_task(WEBHOOK_TASK, args=[job_id, url], queue=WEBHOOK_QUEUE, task_id=delivery_id(job_id),
                      headers=tracing.inject({"kiq_submitted_at": time.time()}))  # fmt: skip
    except Exception as exc:  # noqa: BLE001
        log.error("could not queue the webhook of %s: %s", job_id, exc)
        try:
            redis.delete(webhook_queued_key(job_id))
        except Exception:  # noqa: BLE001 - best effort
            pass
        return False
    claim.ring_after_publish(app, redis, WEBHOOK_QUEUE)  # on the results' Redis: the broker's unless set apart
    return True
