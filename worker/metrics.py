"""Prometheus metrics of one worker process, served on KIQ_METRICS_PORT (0: off)."""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server

from kiq.errors import KiqError

log = logging.getLogger(__name__)
_SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600)

JOBS = Counter("kiq_jobs_total", "Jobs finished, by outcome", ["outcome"])
JOB_SECONDS = Histogram("kiq_job_duration_seconds", "Job run time in the worker", buckets=_SECONDS)
STAGE_SECONDS = Histogram("kiq_stage_duration_seconds", "Time per job stage", ["stage"], buckets=_SECONDS)
QUEUE_WAIT = Histogram("kiq_queue_wait_seconds", "From submit to the start of the job", buckets=_SECONDS)
MODEL_LOAD = Gauge("kiq_model_load_seconds", "Time the pipelines took to load in this process")
CACHE = Gauge("kiq_cache_lookups", "Embedding cache lookups since start", ["cache", "result"])
DEVICE_MEMORY = Gauge("kiq_device_memory_bytes", "Device memory allocated by the framework (where reported)")


FAILURES = Counter("kiq_job_failures_total", "Failed jobs by error type (kiq/errors.py)", ["type"])


class _LeaseRenewalFailures:
    """kiq/leases.py counts failed renewal rounds (Redis unreachable); a job's lease has slack for a few."""

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily

        from kiq import leases

        yield CounterMetricFamily("kiq_lease_renewal_failures", "Failed lease renewal rounds of this worker",
                                  value=leases.renewal_failures[0])  # fmt: skip


REGISTRY.register(_LeaseRenewalFailures())  # type: ignore[arg-type]


def serve(port: int) -> None:
    if port:
        start_http_server(port)
        log.info("Prometheus metrics on :%d/metrics", port)


def job_finished(outcome: str, seconds: float, timings: dict[str, float] | None,
                 error: BaseException | None = None) -> None:  # fmt: skip
    JOBS.labels(outcome).inc()
    if outcome == "failure":
        # kiq's own error types; anything else ends as the PipelineError the task reports (worker/execution.py)
        FAILURES.labels(type(error).__name__ if isinstance(error, KiqError) else "PipelineError").inc()
    JOB_SECONDS.observe(seconds)
    for stage, value in (timings or {}).items():
        STAGE_SECONDS.labels(stage).observe(value)


def job_expired() -> None:
    """An expired job never ran: counted, with no duration (it would skew the run-time histogram)."""
    JOBS.labels("expired").inc()


def observe_queue_wait(submitted_at: Any, now: float) -> None:
    if isinstance(submitted_at, int | float) and 0 <= now - submitted_at < 30 * 24 * 3600:
        QUEUE_WAIT.observe(now - submitted_at)


def observe_pipelines(caches: dict[str, Any], memory_bytes: float) -> None:
    """After each job: the backend's cache counters and its device memory."""
    DEVICE_MEMORY.set(memory_bytes)
    for name, cache in caches.items():
        CACHE.labels(name, "hit").set(cache.hits)
        CACHE.labels(name, "miss").set(cache.misses)
