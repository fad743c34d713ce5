"""The workload, from a seed: small jobs over HTTP (with Idempotency-Keys, retried with the same key as a real
client would) and through the Python client, some with webhooks, some cancelled, a few sweeps, mixed priorities
and tenants; and the observers that record every state seen (polls of every job, SSE streams of some)."""

from __future__ import annotations

import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import httpx

from kiq.errors import SubmitNotReplicated
from kiq.settings import Settings
from producer.client import Client
from producer.tenants import Tenants
from tests.chaos.history import History
from tests.chaos.services import TENANTS, Cluster

SUBMIT_PATIENCE_S = 180.0
RETRYABLE = (409, 429, 500, 502, 503, 504)


@dataclass(frozen=True)
class Spec:
    n: int
    at_s: float
    via: str  # http or client
    tenant: str
    priority: int
    steps: int
    webhook: bool
    cancel_after_s: float | None
    sweep: bool
    sse: bool

    def body(self, seed: int, webhook_url: str) -> dict[str, Any]:
        job: dict[str, Any] = {"inputs": [{"text": "a red cube", "weight": 1.0}], "height": 64, "width": 64,
                               "prior_steps": 2, "decoder_steps": self.steps, "seed": (seed * 10_000 + self.n) % 2**32,
                               "priority": self.priority}  # fmt: skip
        if self.sweep:
            job["inputs"].append({"text": "a blue sphere", "weight": 0.0})
            job.update(sweep={"to": [0.0, 1.0], "frames": 3}, animation={"format": "gif"}, decoder_steps=2)
        if self.webhook:
            job["webhook_url"] = webhook_url
        return job


def plan(seed: int, minutes: float, jobs_per_minute: float, steps: tuple[int, int] = (3, 8)) -> list[Spec]:
    rng = random.Random(seed ^ 0x5EED)
    specs, at = [], 0.0
    while at < minutes * 60:
        via, tenant = rng.choice(("http", "http", "client")), rng.choice(tuple(TENANTS))
        top = TENANTS[tenant].get("max_priority", 5)
        cancel = rng.uniform(0.2, 5.0) if rng.random() < 0.1 else None
        specs.append(
            Spec(
                len(specs),
                round(at, 2),
                via,
                tenant,
                rng.randint(0, int(top)),
                rng.randint(*steps),
                rng.random() < 0.3,
                cancel,
                rng.random() < 0.05,
                via == "http" and rng.random() < 0.3,
            )
        )
        at += rng.expovariate(jobs_per_minute / 60)  # fmt: skip
    return specs


class Workload:
    def __init__(self, cluster: Cluster, history: History, webhook_url: str, seed: int, specs: list[Spec],
                 max_open: int) -> None:  # fmt: skip
        self.cluster, self.history, self.webhook_url, self.seed, self.specs = cluster, history, webhook_url, seed, specs
        self.max_open = max_open  # submits pause while this many acknowledged jobs are unfinished: a bounded queue
        self.settings = Settings.from_env(cluster.kiq_env())
        self.tenants = Tenants.from_settings(self.settings)
        self.jobs: dict[str, Spec] = {}
        self.final: dict[str, str] = {}
        self.lock = threading.Lock()
        self.stopping = threading.Event()  # everything stops
        self.no_more = threading.Event()  # no new submits
        self.busy = 0  # submits (with their cancels and streams) not finished
        self.local = threading.local()
        self.pool = ThreadPoolExecutor(48, thread_name_prefix="chaos-submit")
        self.threads: list[threading.Thread] = []

    def owner(self, tenant: str) -> str:
        found = self.tenants.find(TENANTS[tenant]["key"])
        assert found is not None
        return found.owner

    def _client(self) -> Client:
        if not hasattr(self.local, "client"):
            self.local.client = Client(self.settings)
        return self.local.client

    def _http(self) -> httpx.Client:
        if not hasattr(self.local, "http"):
            self.local.http = httpx.Client(base_url=self.cluster.api_url, timeout=httpx.Timeout(30, connect=5))
        return self.local.http

    def start(self) -> None:
        for target in (self._schedule, self._poll):
            thread = threading.Thread(target=target, daemon=True, name=f"chaos-{target.__name__}")
            thread.start()
            self.threads.append(thread)

    def open_jobs(self) -> int:
        with self.lock:
            return len(self.jobs) - len(self.final)

    def _schedule(self) -> None:
        started = time.monotonic()
        for spec in self.specs:
            while not self.no_more.is_set() and not self._due(spec, started):
                time.sleep(0.1)
            if self.no_more.is_set():
                return
            with self.lock:
                self.busy += 1
            self.pool.submit(self._submit, spec)

    def _due(self, spec: Spec, started: float) -> bool:
        return time.monotonic() - started >= spec.at_s and self.open_jobs() < self.max_open

    def _submit(self, spec: Spec) -> None:
        try:
            self._submit_and_follow(spec)
        finally:
            with self.lock:
                self.busy -= 1

    def _submit_and_follow(self, spec: Spec) -> None:
        try:
            job_id = self._submit_http(spec) if spec.via == "http" else self._submit_client(spec)
        except Exception as exc:  # noqa: BLE001 - recorded; a campaign never stops on one submit
            self.history.add("submit_gave_up", n=spec.n, error=f"{type(exc).__name__}: {exc}")
            return
        if job_id is None:
            return
        with self.lock:
            self.jobs[job_id] = spec
        self.history.add("submit", job=job_id, **asdict(spec))
        if spec.cancel_after_s is not None:
            time.sleep(spec.cancel_after_s)
            self._cancel(job_id, spec)
        if spec.sse:
            self._follow(job_id, spec)

    def _auth(self, spec: Spec) -> dict[str, str]:
        return {"Authorization": f"Bearer {TENANTS[spec.tenant]['key']}"}

    def _submit_http(self, spec: Spec) -> str | None:
        key, body = f"chaos-{self.seed}-{spec.n}", spec.body(self.seed, self.webhook_url)
        deadline, attempt = time.monotonic() + SUBMIT_PATIENCE_S, 0
        while True:
            attempt += 1
            try:
                reply = self._http().post("/v1/jobs", json=body, headers={**self._auth(spec), "Idempotency-Key": key})
                if reply.status_code == 202:
                    return str(reply.json()["id"])
                self.history.add("submit_error", n=spec.n, attempt=attempt, status=reply.status_code,
                                 detail=reply.text[:300])  # fmt: skip
                if reply.status_code not in RETRYABLE:
                    return None
            except httpx.HTTPError as exc:
                self.history.add("submit_error", n=spec.n, attempt=attempt, error=f"{type(exc).__name__}: {exc}")
            if time.monotonic() > deadline:
                self.history.add("submit_gave_up", n=spec.n, attempts=attempt)
                return None
            time.sleep(min(5.0, 0.3 * 2**attempt) * random.uniform(0.5, 1.0))

    def _submit_client(self, spec: Spec) -> str | None:
        """The Python client has no idempotency key: a failed submit is retried as a new job (up to 3 times).

        With `require_replicas=True`, as the README says a client must submit to be safe from a failover: a job not
        on a replica in time is not acknowledged (it may still run: the checker holds it to nothing)."""
        for attempt in range(1, 4):
            try:
                return self._client().submit(spec.body(self.seed, self.webhook_url), owner=self.owner(spec.tenant),
                                             require_replicas=True)  # fmt: skip
            except SubmitNotReplicated as exc:
                self.history.add("submit_unconfirmed", n=spec.n, job=exc.job_id, error=str(exc))
                return None
            except Exception as exc:  # noqa: BLE001 - Redis or S3 errors: a new try
                self.history.add("submit_error", n=spec.n, attempt=attempt, error=f"{type(exc).__name__}: {exc}")
                time.sleep(2.0 * attempt)
        self.history.add("submit_gave_up", n=spec.n, attempts=3)
        return None

    def _cancel(self, job_id: str, spec: Spec) -> None:
        for attempt in range(1, 11):
            try:
                if spec.via == "http":
                    reply = self._http().delete(f"/v1/jobs/{job_id}", headers=self._auth(spec))
                    reply.raise_for_status()
                    state = reply.json()["state"]
                else:
                    state = self._client().cancel(job_id).state
                self.history.add("cancel", job=job_id, state=state, attempt=attempt)
                return
            except Exception as exc:  # noqa: BLE001
                self.history.add("cancel_error", job=job_id, attempt=attempt, error=f"{type(exc).__name__}: {exc}")
                time.sleep(1.0 * attempt)

    def _follow(self, job_id: str, spec: Spec) -> None:
        """The job's SSE stream through the API, resumed with Last-Event-ID after any error, until `done`."""
        last: str | None = None
        while not self.stopping.is_set():
            headers = {**self._auth(spec), **({"Last-Event-ID": last} if last else {})}
            try:
                with self._http().stream("GET", f"/v1/jobs/{job_id}/events", headers=headers,
                                         timeout=httpx.Timeout(40, connect=5)) as reply:  # fmt: skip
                    if reply.status_code == 204:
                        return
                    reply.raise_for_status()
                    event: dict[str, str] = {}
                    for line in reply.iter_lines():
                        if line:
                            name, _, value = line.partition(": ")
                            event[name] = value
                            continue
                        if "data" in event:
                            last = event.get("id") or last
                            if self._seen(job_id, json.loads(event["data"]), "sse", event.get("id", "")):
                                return
                        event = {}
            except (httpx.HTTPError, json.JSONDecodeError) as exc:
                self.history.add("sse_error", job=job_id, error=f"{type(exc).__name__}: {exc}")
                time.sleep(1.0)

    def _seen(self, job_id: str, status: dict[str, Any], via: str, event_id: str = "") -> bool:
        """Record a state seen; True if it is final."""
        state = status.get("state")
        extra: dict[str, Any] = {}
        result = status.get("result") or {}
        if state == "SUCCESS":
            extra["uris"] = [i["uri"] for i in result.get("images", [])]
            if result.get("animation"):
                extra["uris"].append(result["animation"]["uri"])
        if status.get("error"):
            extra["error"] = status["error"].get("type")
        if status.get("progress"):
            extra["step"] = [status["progress"].get("stage"), status["progress"].get("step")]
        self.history.add("state", job=job_id, state=state, via=via, event=event_id, **extra)
        final = state in ("SUCCESS", "FAILURE", "REVOKED", "EXPIRED")
        if final and via == "poll":
            with self.lock:
                self.final.setdefault(job_id, state)
        return final

    def _poll(self) -> None:
        """Every job's status each second (finished ones every fifth round), recording each change."""
        client, last, rounds = Client(self.settings), {}, 0
        while not self.stopping.is_set():
            rounds += 1
            self.poll_round(client, last, every=rounds % 5 == 0)
            time.sleep(1.0)

    def poll_round(self, client: Client, last: dict[str, Any], every: bool = True) -> None:
        with self.lock:
            ids = [j for j in self.jobs if every or j not in self.final]
        for job_id in ids:
            try:
                status = client.status(job_id).model_dump(mode="json", exclude_none=True)
            except Exception as exc:  # noqa: BLE001 - Redis down or partitioned: the next round sees it
                self.history.add("poll_error", job=job_id, error=type(exc).__name__)
                continue
            seen = (status.get("state"), json.dumps(status.get("progress"), sort_keys=True))
            if last.get(job_id) != seen:
                last[job_id] = seen
                self._seen(job_id, status, "poll")

    def drain(self, timeout_s: float) -> bool:
        """Stop submitting; wait until every acknowledged job is seen final and every submit, cancel and stream
        has finished (True), or `timeout_s` passes (False)."""
        self.no_more.set()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                busy = self.busy
            if busy == 0 and self.open_jobs() == 0:
                return True
            time.sleep(1.0)
        return False

    def stop(self) -> None:
        self.no_more.set()
        self.stopping.set()
        self.pool.shutdown(wait=False, cancel_futures=True)
