"""No single Redis to lose: the primary is SIGKILLed mid-stream, Sentinel promotes the replica, and every job
submitted before and after ends SUCCESS once with its one object. kiq runs on its defaults; only the broker URL
(Sentinels) and the queue are set."""

import os
import signal
import threading
import time
import uuid

import httpx
import pytest
import redis

from kiq.errors import SubmitNotReplicated
from kiq.settings import Settings
from producer import devstack
from producer.client import Client
from tests.helpers import count_in_logs, objects_of, wait_for_step
from tests.integration.jobs import tiny_job
from tests.sentinel import RedisHA


@pytest.fixture
def redis_ha(tmp_path):
    ha = RedisHA(tmp_path)
    try:  # its five servers go even when one of them never came up
        yield ha.start()
    finally:
        ha.close()


def unconfirmed(caplog) -> int:
    """Submits that warned that their job was not confirmed on a replica (the client logs it)."""
    found = sum("replicas after" in r.getMessage() for r in caplog.records)
    caplog.clear()
    return found


def test_primary_killed_mid_stream_fails_over_without_losing_or_repeating_a_job(
    env, redis_ha, spawn_worker, s3, settings, caplog
):
    caplog.set_level("WARNING", logger="producer.client")
    overrides = {"KIQ_BROKER_URL": redis_ha.url, "KIQ_QUEUE": f"kiq-ha-{uuid.uuid4().hex[:8]}"}
    worker_settings = Settings.from_env({**env, **overrides})
    assert worker_settings.broker_server.sentinel and worker_settings.sentinel_master == "kiq"  # the default name
    client = Client(worker_settings)
    _, log = spawn_worker("sentinel", **overrides)

    before = [client.submit(tiny_job(decoder_steps=6, seed=n)) for n in range(3)]
    assert unconfirmed(caplog) == 0  # each submit returned once its job was on the replica (WAIT)
    wait_for_step(client, before[0], step=2)
    replica = redis_ha.ports["replica"]
    promoted: list[float] = []

    def watch() -> None:
        while redis_ha.master_port() != replica:
            time.sleep(0.05)
        promoted.append(time.monotonic())

    killed_at = redis_ha.kill_primary()  # one job running, two queued
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    after, submit_s = [], []
    for n in range(3):  # the first of these waits through the failover
        started = time.monotonic()
        after.append(client.submit(tiny_job(seed=10 + n)))
        submit_s.append(time.monotonic() - started)
    watcher.join(60)
    assert promoted, "Sentinel never promoted the replica"
    assert unconfirmed(caplog) == 3  # no replica left: the jobs stand on the new master, each submit says so
    redis_ha.restart_old_primary()  # it rejoins as the new master's replica
    after.append(client.submit(tiny_job(seed=20)))
    assert unconfirmed(caplog) == 0
    print(f"\nfailover: replica promoted {promoted[0] - killed_at:.1f} s after SIGKILL of the primary; "
          f"submits across it took {', '.join(f'{s:.1f}' for s in submit_s)} s")  # fmt: skip

    for job_id in before + after:
        final = client.wait(job_id, timeout=150)
        assert final.state == "SUCCESS", (job_id, final.error)
        assert objects_of(s3, settings, job_id) == [f"jobs/{job_id}/0.png"]
        assert count_in_logs([log], f"[{job_id}] succeeded") == 1, job_id
    assert redis_ha.master_port() == replica


def queued_copies(port: int, job_id: str) -> int:
    """Messages of `job_id` in any list on the Redis at `port` (the queues, with no worker to take them)."""
    server = redis.Redis(port=port)
    lists = [k for k in server.scan_iter(count=1000) if server.type(k) == b"list"]
    return sum(job_id.encode() in item for key in lists for item in server.lrange(key, 0, -1))


def test_submit_not_on_a_replica_answers_503_and_the_retry_with_its_key_confirms_the_one_job(
    env, redis_ha, logs, tmp_path
):
    overrides = {"KIQ_BROKER_URL": redis_ha.url, "KIQ_QUEUE": f"kiq-ha-{uuid.uuid4().hex[:8]}",
                 "KIQ_SUBMIT_REPLICA_TIMEOUT_MS": "300", "KIQ_API_PORT": str(devstack.free_port()),
                 "KIQ_API_KEYS": "", "KIQ_API_TENANTS": ""}  # fmt: skip
    api_env = {**env, **overrides}
    base = f"http://127.0.0.1:{api_env['KIQ_API_PORT']}"
    replica = redis_ha.procs["replica"]
    key = {"Idempotency-Key": str(uuid.uuid4())}
    with devstack.Stack() as stack, httpx.Client(base_url=base, timeout=60) as api:
        proc = stack.spawn([*devstack.kiq_command(), "api"], logs / "api-ha.log", api_env)
        devstack.wait_until(lambda: devstack.http_up(base + "/healthz"), 60, "kiq api", proc, logs / "api-ha.log")
        os.kill(replica.pid, signal.SIGSTOP)  # the replica cannot acknowledge: WAIT times out
        try:
            refused = api.post("/v1/jobs", json=tiny_job(seed=7), headers=key)
        finally:
            os.kill(replica.pid, signal.SIGCONT)
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
        detail = refused.json()["detail"]
        assert detail["type"] == "SubmitNotReplicated" and "same Idempotency-Key" in detail["msg"]
        devstack.wait_until(lambda: redis_ha._linked(redis_ha.ports["replica"]), 30, "replica back in sync")
        retried = api.post("/v1/jobs", json=tiny_job(seed=7), headers=key)
        assert retried.status_code == 202, retried.text
        assert retried.json()["id"] == detail["job_id"]
        assert api.post("/v1/jobs", json=tiny_job(seed=7), headers=key).json()["id"] == detail["job_id"]
    job_id = detail["job_id"]
    assert queued_copies(redis_ha.ports["primary"], job_id) == 1  # enqueued once, on the master...
    assert queued_copies(redis_ha.ports["replica"], job_id) == 1  # ...and on the replica a failover would promote
    client = Client(Settings.from_env(api_env))
    assert client.record(job_id) is not None
    os.kill(replica.pid, signal.SIGSTOP)  # the Python client: a warning by default, the typed error on request
    try:
        with pytest.raises(SubmitNotReplicated) as raised:
            client.submit(tiny_job(seed=8), require_replicas=True)
        warned = client.submit(tiny_job(seed=9))
    finally:
        os.kill(replica.pid, signal.SIGCONT)
    assert queued_copies(redis_ha.ports["primary"], raised.value.job_id) == 1
    assert queued_copies(redis_ha.ports["primary"], warned) == 1
