"""Real parts on loopback: the machine's Redis (a test DB), moto's S3 server process, tiny models on disk,
and one `kiq worker` process (CPU, solo pool) shared by the session."""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import boto3
import pytest
import redis

from kiq.settings import Settings
from producer import devstack
from producer.client import Client
from tests.helpers import ALLOWED_HOST, Receiver, redis_databases

# A distinctive secret, so tests can prove it never leaks into results, errors, logs or metadata.
SECRET = "kiq-test-SECRET-7c1e9a0b4d"
os.environ["AWS_ACCESS_KEY_ID"] = "kiq-test-key-id"
os.environ["AWS_SECRET_ACCESS_KEY"] = SECRET

REDIS_URL, SPARE_REDIS_URL = redis_databases()

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def logs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def stack():
    with devstack.Stack() as stack:
        yield stack


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> tuple[Path, Path]:
    return devstack.make_tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def env(stack, logs, tiny_models) -> dict[str, str]:
    devstack.ensure_redis(stack, REDIS_URL, logs)
    redis.Redis.from_url(REDIS_URL).flushdb()
    endpoint = devstack.start_s3_server(stack, logs)
    prior, decoder = tiny_models
    env = {
        **os.environ,
        "KIQ_BROKER_URL": REDIS_URL,
        "KIQ_S3_ENDPOINT_URL": endpoint,
        "KIQ_S3_BUCKET": "kiq-test",
        "KIQ_PRIOR_MODEL": str(prior),
        "KIQ_DECODER_MODEL": str(decoder),
        "KIQ_DEVICE_TARGET": "CPU",
        "KIQ_QUEUE": f"kiq-test-{uuid.uuid4().hex[:8]}",
        "KIQ_FETCH_ALLOW": ALLOWED_HOST,
        "KIQ_FETCH_TIMEOUT_S": "2",
        "KIQ_FETCH_RETRIES": "1",
        "KIQ_SPEED_PROBE_S": "1",  # the warm-up probe at 64x64 only: a second per worker start
    }
    devstack.ensure_bucket(endpoint, "kiq-test", "us-east-1")
    return env


@pytest.fixture(scope="session")
def settings(env) -> Settings:
    return Settings.from_env(env)


@pytest.fixture(scope="session")
def worker(stack, env, logs):
    return devstack.start_worker(stack, env, logs / "worker.log")


@pytest.fixture(scope="session")
def client(settings) -> Client:
    return Client(settings)


@pytest.fixture(scope="session")
def s3(settings):
    return boto3.client("s3", endpoint_url=settings.s3_endpoint_url, region_name=settings.s3_region)


@pytest.fixture(scope="session")
def redis_client(settings):
    return redis.Redis.from_url(settings.broker_url)


@pytest.fixture
def spawn_worker(env, logs):
    """Start extra workers with their own settings (queue, Redis, S3 endpoint…); stopped after the test."""
    with devstack.Stack() as extra:

        def spawn(name: str, **overrides: str):
            worker_env = {**env, **overrides}
            log = logs / f"{name}-{uuid.uuid4().hex[:6]}.log"
            return devstack.start_worker(extra, worker_env, log), log

        yield spawn


@pytest.fixture
def webhooks(env, logs):
    """A `kiq webhook-worker` process and a receiver; yields (receiver, secret)."""
    secret = f"secret-{uuid.uuid4().hex}"
    log = logs / f"webhooks-{uuid.uuid4().hex[:6]}.log"
    with Receiver() as receiver, devstack.Stack() as stack:
        proc = stack.spawn([*devstack.kiq_command(), "webhook-worker"], log, {**env, "KIQ_WEBHOOK_SECRET": secret})
        devstack.wait_until(lambda: log.exists() and " ready." in log.read_text(errors="replace"), 60, "webhooks",
                            proc)  # fmt: skip
        yield receiver, secret


@pytest.fixture
def own_redis(tmp_path):
    """A redis-server of the test's own (append-only, fsync always); yields (url, processes, start)."""
    port = devstack.free_port()
    argv = ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--dir", str(tmp_path), "--save", "",
            "--appendonly", "yes", "--appendfsync", "always"]  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    procs = []

    def start():
        procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL))
        devstack.wait_until(lambda: devstack.redis_ping(url), 20, "redis-server", procs[-1])

    try:
        start()
        yield url, procs, start
    finally:
        for proc in procs:
            devstack.stop(proc)
