"""Progress coalescing through the worker's real records path, on real Redis: what clients and event streams
get (Celery PUBLISHes every state write)."""

from dataclasses import replace

import pytest
from celery import Celery

from kiq.celeryconf import common_config
from worker.records import JobRecords


@pytest.mark.parametrize("interval_ms", [0, 500])
def test_records_write_what_the_throttle_allows_to_real_redis(settings, interval_ms):
    settings = replace(settings, progress_interval_ms=interval_ms)
    app = Celery("throttle-test", set_as_current=False)
    app.conf.update(common_config(settings))
    pubsub = app.backend.client.pubsub()
    job_id = f"throttle-{interval_ms}"
    pubsub.subscribe(app.backend.get_key_for_task(job_id))
    ctx = JobRecords(app.backend, app, settings).context(job_id, limit_s=60)
    for step in range(1, 11):  # ten steps in well under 500 ms
        ctx.progress("decoder", step, 10)
    messages = []
    while (message := pubsub.get_message(timeout=0.5)) is not None:
        if message["type"] == "message":
            messages.append(message)
    assert len(messages) == (10 if interval_ms == 0 else 2)  # the first and the last step
    assert app.backend.get_task_meta(job_id)["result"]["step"] == 10
