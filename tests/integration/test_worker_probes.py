"""Worker probes (KIQ_HEALTH_PORT) on a real `kiq worker` whose broker connection goes through a proxy the test
cuts: ready once it consumes with its device answering, unready (still live) while the broker is gone, ready
again after it reconnects, and ready while a job runs."""

import time
import uuid
from urllib.parse import urlsplit

import httpx

from kiq.settings import Settings
from producer import devstack
from producer.client import Client
from tests.integration.jobs import tiny_job
from tests.proxy import Proxy


def probe(base, path):
    response = httpx.get(base + path, timeout=15)
    return response.status_code, response.json()


def wait_for(base, path, code, timeout=90):
    deadline = time.monotonic() + timeout
    while True:
        got = probe(base, path)
        if got[0] == code or time.monotonic() > deadline:
            return got
        time.sleep(0.5)


def test_worker_probes_follow_the_consumer_and_its_broker(env, spawn_worker):
    broker = urlsplit(env["KIQ_BROKER_URL"])
    proxy = Proxy(broker.port or 6379)
    proxy.start()
    port = devstack.free_port()
    overrides = {"KIQ_HEALTH_PORT": str(port), "KIQ_QUEUE": f"kiq-probes-{uuid.uuid4().hex[:6]}",
                 "KIQ_RESULT_BACKEND": env["KIQ_BROKER_URL"],
                 "KIQ_BROKER_URL": f"redis://127.0.0.1:{proxy.port}{broker.path}"}  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        spawn_worker("probes", **overrides)
        code, ready = wait_for(base, "/readyz", 200)
        assert code == 200 and ready == {"status": "ok", "models": "loaded", "consumer": "ok", "broker": "ok",
                                         "device": "ok"}, ready  # fmt: skip
        assert probe(base, "/healthz")[0] == 200

        client = Client(Settings.from_env({**env, **overrides}))
        job_id = client.submit(tiny_job(decoder_steps=30))
        deadline = time.monotonic() + 60
        while client.status(job_id).state not in ("STARTED", "PROGRESS") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert probe(base, "/readyz")[0] == 200, "a running job leaves the worker ready"
        assert client.wait(job_id, timeout=180).state == "SUCCESS"

        time.sleep(2)  # its ack lands first
        proxy.stop()
        code, unready = wait_for(base, "/readyz", 503)
        assert code == 503 and unready["status"] == "unavailable", unready
        assert probe(base, "/healthz")[0] == 200, "a broker outage is not a reason to restart the worker"
        proxy.start()
        code, ready = wait_for(base, "/readyz", 200, timeout=120)
        assert code == 200, ready
    finally:
        proxy.stop()
