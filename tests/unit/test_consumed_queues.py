"""Each worker consumes only its own queues, also after it has published to another queue.

Celery adds every queue an app publishes to (and the default queue it looks up on every publish) to the app's
queues; a worker that never selected its queues consumes all of them from its next broker (re)connection. The
chaos campaign found it (scripts/chaos --seed 1): after a Redis failover the webhook worker took `kiq.generate`
jobs from `kiq` and failed them NotRegistered, and job workers took `kiq.webhook` tasks, so webhooks were lost.
"""

from kiq.names import WEBHOOK_QUEUE
from kiq.settings import Settings
from producer.webhooks import create_webhook_app
from worker.app import create_app
from worker.runner import Runner


def published_to(app, queue: str) -> None:
    """What Celery's publish path does to the app's queues: the default queue's lookup, the route's queue."""
    app.amqp.queues[app.conf.task_default_queue]
    app.amqp.queues[queue]


def test_the_webhook_worker_consumes_only_the_webhook_queue_after_publishing():
    app = create_webhook_app(Settings(webhook_secret="s3cret"))
    published_to(app, WEBHOOK_QUEUE)  # a retry re-publishes the webhook task
    assert sorted(app.amqp.queues.consume_from) == [WEBHOOK_QUEUE]


def test_a_job_worker_consumes_only_its_queues_after_queueing_a_webhook():
    settings = Settings(device_target="CPU", worker_queues="kiq,kiq-large")
    app = create_app(settings, runner=Runner(settings))
    published_to(app, WEBHOOK_QUEUE)  # each job's webhook is sent to the webhook queue
    assert sorted(app.amqp.queues.consume_from) == ["kiq", "kiq-large"]
