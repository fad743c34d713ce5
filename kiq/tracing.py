"""OpenTelemetry tracing (KIQ_TRACING, the `otel` extra): one trace per job across the API, the worker and the
webhook worker. Off by default, and free when off: nothing here imports OpenTelemetry until `setup` turns it on.

The W3C trace context (`traceparent`, `tracestate`) of the HTTP request, or of the Python client's caller,
rides in the Celery message headers. The worker's spans: `queue wait` (from the submit time to the start),
`job`, and one per stage (`fetch` with a `fetch input` per image, `prior`, `decoder`, `encode`, `upload`); in a
decoder batch the leader's job holds the `decoder` span and each mate's `decoder` span links to it. Messages
without trace headers (older clients, plain Celery) start a trace of their own.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from kiq import logs
from kiq.errors import SettingsError
from kiq.settings import Settings

HEADERS = ("traceparent", "tracestate")
MAX_OPEN_JOBS = 1024  # job contexts kept while their jobs run (a bound: a worker runs a batch at a time)
_tracer: Any = None
_provider: Any = None
_jobs: dict[str, Any] = {}  # job id -> the OpenTelemetry context of its `job` span, while it runs
_lock = threading.Lock()
_ID = re.compile(r"/[0-9a-f]{8}-[0-9a-f-]{27,}")  # job ids in paths: span names stay few


def enabled() -> bool:
    return _tracer is not None


def setup(settings: Settings, service: str) -> bool:
    """Turn tracing on for this process (once) if KIQ_TRACING asks; False when off."""
    global _tracer, _provider
    if not settings.tracing or _tracer is not None:
        return _tracer is not None
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    except ModuleNotFoundError:
        raise SettingsError("KIQ_TRACING needs the 'otel' extra: pip install 'kiq[otel]'") from None
    provider = TracerProvider(resource=Resource.create({"service.name": f"kiq-{service}"}))
    if settings.tracing.startswith("file:"):
        provider.add_span_processor(SimpleSpanProcessor(FileExporter(settings.tracing.removeprefix("file:"))))
    else:
        provider.add_span_processor(BatchSpanProcessor(_otlp_exporter()))
    _provider, _tracer = provider, provider.get_tracer("kiq")
    logs.trace_ids = _trace_ids
    import atexit

    atexit.register(provider.shutdown)
    return True


def _otlp_exporter() -> Any:
    try:  # endpoint, headers and protocol from the standard OTEL_EXPORTER_OTLP_* variables
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ModuleNotFoundError:
        raise SettingsError("KIQ_TRACING=otlp needs the 'otel' extra: pip install 'kiq[otel]'") from None
    return OTLPSpanExporter()


@contextmanager
def span(name: str, attributes: Mapping[str, Any] | None = None, **options: Any) -> Iterator[Any]:
    """A span under the current one; nothing at all when tracing is off."""
    if _tracer is None:
        yield None
        return
    with _tracer.start_as_current_span(name, attributes=dict(attributes or {}), **options) as current:
        yield current


@contextmanager
def stage(name: str) -> Iterator[None]:
    """A job stage: its span, and its name on every log line inside."""
    with logs.context(stage=name), span(name):
        yield


def inject(headers: dict[str, Any]) -> dict[str, Any]:
    """`headers` plus the current trace context: ours when on, else the caller's own OpenTelemetry's, if it has
    one loaded (a Python client inside a traced application); never imports OpenTelemetry itself."""
    if _tracer is not None or "opentelemetry.propagate" in sys.modules:
        from opentelemetry import propagate

        propagate.inject(headers)
    return headers


def extract(carrier: Mapping[str, Any]) -> Any:
    from opentelemetry import propagate

    return propagate.extract({k: str(v) for k, v in carrier.items() if k in HEADERS and v})


def message_headers(request: Any) -> dict[str, Any]:
    """The trace headers of a Celery task request (or a reserved Request), where it has them."""
    found = {name: getattr(request, name, None) for name in HEADERS}
    raw = getattr(request, "request_dict", None)
    if isinstance(raw, dict):
        found.update({name: raw.get(name) for name in HEADERS if raw.get(name)})
    return {k: v for k, v in found.items() if v}


@contextmanager
def job(job_id: str, headers: Mapping[str, Any], submitted_at: Any = None, name: str = "job") -> Iterator[None]:
    """The job's span, current inside (child of the submitter's context), after its `queue wait` span."""
    if _tracer is None:
        yield
        return
    current = begin(job_id, headers, submitted_at, name)
    try:
        with _activated(current):
            yield
    finally:
        if not end(job_id):
            current.end()  # the registry was full: it never held this span


def begin(job_id: str, headers: Mapping[str, Any], submitted_at: Any = None, name: str = "job") -> Any:
    """Start the job's span without making it current (a batch mate's); `end` ends it. None when off."""
    if _tracer is None:
        return None
    from opentelemetry import trace

    parent = extract(headers)
    if isinstance(submitted_at, int | float) and 0 <= time.time() - submitted_at < 30 * 24 * 3600:
        wait = _tracer.start_span("queue wait", context=parent, start_time=int(submitted_at * 1e9),
                                  attributes={"kiq.job_id": job_id})  # fmt: skip
        wait.end()
    current = _tracer.start_span(name, context=parent, kind=trace.SpanKind.CONSUMER,
                                 attributes={"kiq.job_id": job_id})  # fmt: skip
    with _lock:
        if len(_jobs) < MAX_OPEN_JOBS:
            _jobs[job_id] = (current, trace.set_span_in_context(current))
    return current


def end(job_id: str) -> bool:
    """End the job's span (from `begin`); False if it has none."""
    with _lock:
        entry = _jobs.pop(job_id, None)
    if entry is not None:
        entry[0].end()
    return entry is not None


@contextmanager
def within(job_id: str) -> Iterator[None]:
    """Make the job's own span current (a batch runs each job's stages under its own trace)."""
    with _lock:
        entry = _jobs.get(job_id) if _tracer is not None else None
    if entry is None:
        yield
        return
    from opentelemetry import context

    token = context.attach(entry[1])
    try:
        yield
    finally:
        context.detach(token)


@contextmanager
def _activated(current: Any) -> Iterator[None]:
    from opentelemetry import trace

    with trace.use_span(current, end_on_exit=False, record_exception=False, set_status_on_exception=False):
        yield


@contextmanager
def decoder_batch(job_ids: Sequence[str]) -> Iterator[None]:
    """One decoder call for several jobs: the leader's `decoder` span, and in each mate's trace a `decoder` span
    linked to it."""
    if _tracer is None or not job_ids:
        yield
        return
    from opentelemetry import trace

    with within(job_ids[0]), stage("decoder"):
        leader = trace.get_current_span()
        leader.set_attribute("kiq.batch_size", len(job_ids))
        link = trace.Link(leader.get_span_context())
        mates = []
        for mate in job_ids[1:]:
            with within(mate):
                mates.append(_tracer.start_span("decoder", links=[link], attributes={"kiq.batch_leader": job_ids[0]}))
        try:
            yield
        finally:
            for mate_span in mates:
                mate_span.end()


def instrument(app: Any) -> None:
    """A server span per HTTP request of a FastAPI app, child of the request's `traceparent`; nothing when off."""
    if _tracer is not None:
        app.add_middleware(_HttpSpans)


class _HttpSpans:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or _tracer is None:
            await self.app(scope, receive, send)
            return
        from opentelemetry import trace

        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        name = f"{scope['method']} {_ID.sub('/{id}', scope['path'])}"
        attributes = {"http.method": scope["method"], "http.target": scope["path"]}
        with _tracer.start_as_current_span(name, context=extract(headers), kind=trace.SpanKind.SERVER,
                                           attributes=attributes):  # fmt: skip
            await self.app(scope, receive, send)


def _trace_ids() -> dict[str, str]:
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return {}
    return {"trace_id": f"{context.trace_id:032x}", "span_id": f"{context.span_id:016x}"}


class FileExporter:
    """Finished spans as JSON lines appended to a file (KIQ_TRACING=file:PATH): for tests and debugging."""

    def __init__(self, path: str) -> None:
        self.path = path

    def export(self, spans: Sequence[Any]) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            for s in spans:
                os.write(fd, (json.dumps(_span_dict(s)) + "\n").encode())  # one write per line: whole lines
        finally:
            os.close(fd)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def _span_dict(s: Any) -> dict[str, Any]:
    return {
        "name": s.name, "service": s.resource.attributes.get("service.name"), "pid": os.getpid(),
        "trace_id": f"{s.context.trace_id:032x}", "span_id": f"{s.context.span_id:016x}",
        "parent_id": f"{s.parent.span_id:016x}" if s.parent else None,
        "links": [{"trace_id": f"{lk.context.trace_id:032x}", "span_id": f"{lk.context.span_id:016x}"}
                  for lk in s.links],
        "start": s.start_time, "end": s.end_time, "attributes": dict(s.attributes or {}),
        "status": s.status.status_code.name,
    }  # fmt: skip
