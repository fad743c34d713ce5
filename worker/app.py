"""Build the worker's Celery app: one solo-pool process per device, the models loaded before it consumes."""

from __future__ import annotations

import sys
from typing import Any

from celery import Celery
from celery.signals import worker_init, worker_shutdown
from kombu import Exchange, Queue

from kiq import brokerformat, fairshare, leases
from kiq.celeryconf import WORKER_AMQP, common_config, worker_config
from kiq.errors import SettingsError
from kiq.settings import Settings
from worker import health, metrics, tasks, tenantqueues
from worker.fleet import Heartbeat
from worker.limits import SpeedMeter
from worker.runner import Runner


def create_app(settings: Settings, runner: Runner | None = None) -> Celery:
    # kiq's Redis transport (kiq/transport.py): leases on Redis's clock, none handed back on a reconnect.
    app = Celery("kiq-worker", amqp=WORKER_AMQP)
    app.conf.update(common_config(settings), **worker_config(settings))
    # Tenants take turns within a priority (kiq/fairshare.py); their queues are added as they appear.
    options = app.conf.broker_transport_options
    app.conf.broker_transport_options = {**options, "queue_order_strategy": fairshare.STRATEGY}
    app.conf.task_queues = [Queue(name, Exchange(name), routing_key=name) for name in settings.consumed_queues]
    app.conf.update(
        # The model lives in this process; never fork an accelerator context. Solo runs one job at a time inside
        # the consumer; decoder batching needs the consumer to keep receiving: one pool thread, prefetch N.
        worker_pool="solo" if settings.decoder_batch < 2 else "threads",
        worker_concurrency=1,
        worker_prefetch_multiplier=settings.decoder_batch,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_track_started=False,  # the task reports STARTED itself, after checking for a finished redelivery
        worker_send_task_events=True,
        task_send_sent_event=True,
    )
    # Only these, even without -Q: Celery adds every queue the app publishes to (each job's webhook) to its queues,
    # and an unselected worker consumes them all from its next broker reconnection.
    app.amqp.queues.select(settings.consumed_queues)
    runner = runner or Runner(settings)
    observers = tasks.Observers(speed=SpeedMeter(settings))
    tasks.register(app, runner, settings, observers)
    # Short visibility timeout, renewed leases: a dead worker's jobs come back in about a minute, a live one's never.
    leases.install(app, lambda: leases.broker_redis(settings), settings.visibility_timeout_s)
    brokerformat.install(
        app, lambda: leases.broker_redis(settings), settings.consumed_queues, settings.visibility_timeout_s
    )
    health.install(app)  # the probes' proof that the consumer's loop turns
    tenantqueues.install(app, settings)

    def start(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is not app:
            return
        _setup_or_exit(runner)
        metrics.MODEL_LOAD.set(runner.load_seconds)
        assert runner.pipelines is not None
        observers.speed.probe(runner.pipelines)  # before the first beat: submits read the speed from it
        metrics.serve(settings.metrics_port)
        health.serve(settings.health_port, health.Health(runner, sender, health.broker_client(settings)))
        observers.heartbeat = Heartbeat(
            app.backend.client, sender.hostname, runner.device.name, settings.consumed_queues, observers.speed.fields
        )
        observers.heartbeat.start()

    def stop(sender: Any = None, **_: Any) -> None:
        if observers.heartbeat is not None:
            observers.heartbeat.stop()

    worker_init.connect(start, weak=False)
    worker_shutdown.connect(stop, weak=False)
    return app


def _setup_or_exit(runner: Runner) -> None:
    """A worker that cannot load its models must not start consuming (Celery would swallow the error)."""
    try:
        runner.setup()
    except SettingsError as exc:
        print(f"kiq worker: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except Exception as exc:  # noqa: BLE001 - device or framework failure: same outcome, different code
        print(f"kiq worker: model setup failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
