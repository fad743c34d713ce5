"""Webhook delivery: `kiq webhook-worker`, a light Celery worker (threads, no model) on `kiq.webhooks`.

When a job ends, whoever decided its end first (the worker, or `cancel` for a queued job) queues
`kiq.webhook(job_id, url)` once (kiq/webhooks.py). Delivery POSTs the job's final status JSON, signed
`X-Kiq-Signature: t=<unix>,v1=<hex HMAC-SHA256(KIQ_WEBHOOK_SECRET, "<t>.<delivery id>.<body>")>`, with
`X-Kiq-Job-Id` and an `X-Kiq-Delivery` id that stays the same across retries (receivers dedupe on it and
refuse stale timestamps: `kiq.webhooks.verify`). Non-2xx answers and network failures are retried with
exponential backoff and jitter for up to KIQ_WEBHOOK_RETRY_S; a webhook never changes its job's outcome.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any

from celery import Celery, Task
from kombu import Exchange, Queue

from kiq import brokerformat, leases, logs, safe_http, tracing
from kiq.celeryconf import WORKER_AMQP, common_config, worker_config
from kiq.errors import FetchUnavailable, InputError, OutputsDeleted, SettingsError
from kiq.names import WEBHOOK_QUEUE, WEBHOOK_TASK
from kiq.settings import Settings
from kiq.webhooks import DELIVERY_HEADER, JOB_HEADER, SIGNATURE_HEADER, sign
from producer.client import Client

log = logging.getLogger(__name__)


def create_webhook_app(settings: Settings) -> Celery:
    if not settings.webhook_secret:
        raise SettingsError("KIQ_WEBHOOK_SECRET must be set: webhooks are signed with it")
    app = Celery("kiq-webhooks", set_as_current=False, amqp=WORKER_AMQP)  # leases as the job worker's
    app.conf.update(common_config(settings), **worker_config(settings))
    app.conf.update(task_queues=[Queue(WEBHOOK_QUEUE, Exchange(WEBHOOK_QUEUE), routing_key=WEBHOOK_QUEUE)],
                    task_acks_late=True, worker_prefetch_multiplier=4)  # fmt: skip
    app.amqp.queues.select([WEBHOOK_QUEUE])  # not the job queue its retries' publishes add (worker/app.py)
    client = Client(settings, app=app)
    # Retries wait as ETA messages this worker holds unacknowledged: keep their leases like the job worker does.
    leases.install(app, lambda: leases.broker_redis(settings), settings.visibility_timeout_s)
    brokerformat.install(app, lambda: leases.broker_redis(settings), [WEBHOOK_QUEUE], settings.visibility_timeout_s)
    limits = safe_http.HttpLimits(64 * 1024, settings.webhook_timeout_s, 0)
    policy = safe_http.AddressPolicy.parse(settings.fetch_allow)

    @app.task(name=WEBHOOK_TASK, bind=True, max_retries=None)
    def deliver(self: Task, job_id: str, url: str, first_try_at: float | None = None) -> dict[str, Any]:
        trace = tracing.message_headers(self.request)
        with logs.context(job_id=job_id), tracing.job(self.request.id, trace, name="webhook delivery"):
            return _deliver(self, job_id, url, first_try_at)

    def _deliver(self: Task, job_id: str, url: str, first_try_at: float | None) -> dict[str, Any]:
        first = first_try_at or time.time()
        try:
            status = client.status(job_id)
        except OutputsDeleted:  # deleted by its owner before the webhook went out: nothing left to send
            log.warning("webhook for %s not sent: the job's outputs were deleted", job_id)
            return {"delivered": False, "reason": "outputs deleted"}
        if not status.done:  # queued the moment the job ended; its result may land a moment later
            return _retry(self, job_id, url, first, settings, "status not final yet", delay=1.0)
        body = status.model_dump_json(exclude_none=True).encode()
        delivery = self.request.id
        headers = {"Content-Type": "application/json", SIGNATURE_HEADER: sign(settings.webhook_secret, body, delivery),
                   JOB_HEADER: job_id, DELIVERY_HEADER: delivery, **tracing.inject({})}  # fmt: skip
        try:
            code = safe_http.post(url, body, headers, limits, policy)
        except FetchUnavailable as exc:
            return _retry(self, job_id, url, first, settings, str(exc))
        except InputError as exc:  # blocked address, bad URL: retrying cannot help
            log.error("webhook for %s not sent: %s", job_id, exc)
            return {"delivered": False, "reason": str(exc)}
        if 200 <= code < 300:
            return {"delivered": True, "status": code, "attempts": self.request.retries + 1}
        return _retry(self, job_id, url, first, settings, f"HTTP {code}")

    return app


def _retry(task: Task, job_id: str, url: str, first: float, settings: Settings, why: str,
           delay: float | None = None) -> dict[str, Any]:  # fmt: skip
    if delay is None:
        delay = random.random() * min(60.0, 2.0**task.request.retries)
    if time.time() + delay - first > settings.webhook_retry_s:
        log.error("webhook for %s given up after %.0f s: %s", job_id, time.time() - first, why)
        return {"delivered": False, "reason": why}
    log.warning("webhook for %s failed (%s); retrying in %.1f s", job_id, why, delay)
    raise task.retry(countdown=delay, kwargs={"job_id": job_id, "url": url, "first_try_at": first}, args=())


def run_webhook_worker(settings: Settings, extra_args: list[str]) -> None:
    logs.setup_celery(settings, "webhook-worker")
    tracing.setup(settings, "webhook-worker")
    app = create_webhook_app(settings)
    app.worker_main(["worker", "--pool=threads", "--concurrency=8", "--hostname=kiq-webhooks@%h",
                     "--loglevel=INFO", *extra_args])  # fmt: skip
