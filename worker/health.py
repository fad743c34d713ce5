"""Worker probes for Kubernetes on KIQ_HEALTH_PORT (0: off; the supervisor gives device N port + N).

`GET /readyz` (readiness): 200 once the models are loaded, the consumer runs and its event loop turns (or it is
running a job: the solo pool runs jobs inside that loop), the broker answers a PING, and the device answers a
probe within `PROBE_TIMEOUT_S` (CUDA: a synchronize; MindSpore: a runtime memory query).
`GET /healthz` (liveness): 200 unless the consumer has stopped, or its loop has not turned for `STALL_S` with no
job running while the broker answers (a wedged consumer), or the device failed `DEVICE_FAILURES` probes in a
row: what a restart can fix. A broker outage alone never fails it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger(__name__)
PROBE_TIMEOUT_S = 5.0
PROBE_EVERY_S = 5.0  # a device probe's answer is reused this long: probes cost the device nothing noticeable
DEVICE_FAILURES = 3
STALL_S = 300.0
BUSY_S = 30.0  # an idle loop turns every second or so; one quiet this long is not consuming


_turns = [0.0]  # monotonic time of the consumer loop's last turn (0: not started)


def _turn() -> None:
    _turns[0] = time.monotonic()


def install(app: Any) -> None:
    """A consumer bootstep that marks each turn of the consumer's own loop, every second. Registered again at every
    consumer (re)start: a broker reconnect clears the loop's timers, and a probe reading a stale mark would call
    every idle worker wedged after a Redis failover."""
    from celery import bootsteps

    class Turns(bootsteps.StartStopStep):
        requires = ("celery.worker.consumer.tasks:Tasks",)

        def __init__(self, c: Any, **kwargs: Any) -> None:
            super().__init__(c, **kwargs)
            self.tref: Any = None

        def start(self, c: Any) -> None:
            self.stop(c)
            _turn()
            self.tref = c.timer.call_repeatedly(1.0, _turn)

        def stop(self, c: Any) -> None:
            if self.tref is not None:
                self.tref.cancel()
                self.tref = None

    app.steps["consumer"].add(Turns)


class Health:
    def __init__(self, runner: Any, worker: Any, broker: Any) -> None:
        self.runner, self.worker, self.broker = runner, worker, broker  # broker: a Redis client with short timeouts
        self._lock = threading.Lock()
        self._device: tuple[float, str] = (0.0, "not probed")
        self._probing = False
        self.failures = 0

    @property
    def turned_at(self) -> float:
        return _turns[0]

    def live(self) -> tuple[bool, dict[str, str]]:
        consumer = self._consumer() or "starting"
        quiet = time.monotonic() - self.turned_at if self.turned_at else 0.0
        wedged = consumer == "ok" and quiet > STALL_S and not _running() and self._broker() == "ok"
        checks = {"consumer": "wedged" if wedged else consumer, "device_failures": str(self.failures)}
        return consumer != "stopped" and not wedged and self.failures < DEVICE_FAILURES, checks

    def ready(self) -> tuple[bool, dict[str, str]]:
        checks = {
            "models": "loaded" if getattr(self.runner, "pipelines", None) is not None else "loading",
            "consumer": self._consumer() or "starting",
            "broker": self._broker(),
            "device": self.device(),
        }
        if checks["consumer"] == "ok" and self.turned_at and time.monotonic() - self.turned_at > BUSY_S:
            checks["consumer"] = "ok" if _running() else f"its loop has not turned for {BUSY_S:g} s"
        ok = checks["models"] == "loaded" and all(checks[k] == "ok" for k in ("consumer", "broker", "device"))
        return ok, checks

    def _consumer(self) -> str | None:
        from celery import bootsteps

        consumer = getattr(self.worker, "consumer", None)
        blueprint = getattr(consumer, "blueprint", None)
        if blueprint is None:
            return None
        if blueprint.state == bootsteps.RUN:
            return "ok"
        return "stopped" if blueprint.state in (bootsteps.CLOSE, bootsteps.TERMINATE) else "starting"

    def _broker(self) -> str:
        try:
            self.broker.ping()
            return "ok"
        except Exception as exc:  # noqa: BLE001 - any failure: the broker does not answer
            return f"unavailable: {type(exc).__name__}"

    def device(self) -> str:
        """The device's last answer, probing again (in the background, one probe at a time) when it is old."""
        with self._lock:
            at, answer = self._device
            start = not self._probing and time.monotonic() - at > PROBE_EVERY_S
            if start:
                self._probing = True
        if start:
            done = threading.Event()
            threading.Thread(target=self._probe, args=(done,), name="kiq-device-probe", daemon=True).start()
            if not done.wait(PROBE_TIMEOUT_S):
                return f"unavailable: no answer within {PROBE_TIMEOUT_S:g} s"
            with self._lock:
                answer = self._device[1]
        return answer

    def _probe(self, done: threading.Event) -> None:
        pipelines = getattr(self.runner, "pipelines", None)
        try:
            if pipelines is None:
                answer = "not loaded"
            else:
                getattr(pipelines, "probe", pipelines.memory_bytes)()
                answer = "ok"
        except Exception as exc:  # noqa: BLE001 - any framework error means the device did not answer
            answer = f"unavailable: {type(exc).__name__}: {exc}"[:200]
        with self._lock:
            self._device, self._probing = (time.monotonic(), answer), False
            self.failures = 0 if answer in ("ok", "not loaded") else self.failures + 1
        done.set()


def broker_client(settings: Any) -> Any:
    from kiq import redisconn

    return redisconn.connect(settings.broker_server, settings, socket_timeout=2, socket_connect_timeout=2)


def _running() -> bool:
    from kiq import library_internals

    return library_internals.any_active()


def serve(port: int, health: Health) -> ThreadingHTTPServer | None:
    if not port:
        return None

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            probe = {"/healthz": health.live, "/readyz": health.ready}.get(self.path)
            if probe is None:
                self.send_error(404)
                return
            ok, checks = probe()
            body = json.dumps({"status": "ok" if ok else "unavailable", **checks}).encode()
            self.send_response(200 if ok else 503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass  # probes every few seconds would flood the log

    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)  # the kubelet probes from outside
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="kiq-health", daemon=True).start()
    log.info("worker probes on :%d/healthz and /readyz", port)
    return server
