"""A job whose outputs were deleted is final to the worker: a redelivery (its worker died after storing SUCCESS,
before the ack; the delete dropped that result) must not run it again and upload the deleted images anew."""

import uuid

import redis
from celery import Celery

from kiq.names import deleted_key
from kiq.settings import Settings
from tests.helpers import redis_databases
from worker.records import JobRecords

REDIS_URL, _ = redis_databases()


def test_a_tombstoned_job_is_final_though_its_result_is_gone():
    client = redis.Redis.from_url(REDIS_URL)
    app = Celery("tombstone-test", broker=REDIS_URL, backend=REDIS_URL)
    records = JobRecords(app.backend, app, Settings())
    job_id = str(uuid.uuid4())
    try:
        assert not records.final(job_id)  # no result, no tombstone: a queued job
        client.set(deleted_key(job_id), "1", ex=60)  # what DELETE /v1/jobs/{id}/outputs leaves
        assert records.final(job_id)
    finally:
        client.delete(deleted_key(job_id))
