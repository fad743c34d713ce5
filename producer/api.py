"""`kiq api`: the HTTP face of kiq (FastAPI). Stateless: it talks only to Redis and S3, so any number of
replicas can sit behind a load balancer. See docs/api/index.md for curl examples."""

import hashlib
import ipaddress
import json
import logging
import threading
import uuid
from collections.abc import Iterator
from contextlib import aclosing, contextmanager, nullcontext
from importlib import resources
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from redis.exceptions import RedisError

from kiq import logs, publish, redisconn, tracing
from kiq.contract import Job, validation_errors
from kiq.errors import (
    InvalidEventId,
    JobNotFinished,
    JobTooLong,
    OutputsDeleted,
    QuotaExceeded,
    SettingsError,
    StorageError,
    SubmitAbandoned,
    SubmitNotReplicated,
    UnknownJob,
)
from kiq.event_reads import parse_event_id
from kiq.names import events_key, idempotency_key
from kiq.s3 import input_prefix, presign, put, s3_client
from kiq.settings import Settings
from kiq.status import JobList, JobStatus, State
from kiq.version import __version__
from producer import admin_api, metrics, retention
from producer.bodylimit import BodyLimit
from producer.client import Client, not_replicated
from producer.events import EventHub, job_events
from producer.quotas import rate_limit_headers
from producer.tenants import Tenant, Tenants

log = logging.getLogger("kiq.api")
UPLOAD_SCHEME = "upload:"
MAX_UPLOADS = 16
HEARTBEAT_S = 15.0  # an SSE comment this often keeps proxies (nginx: 60 s) from closing idle streams


def _unavailable_errors() -> tuple[type[BaseException], ...]:
    """What a failed submit raises when Redis or S3 is down: answered 503, retryable."""
    from kombu.exceptions import OperationalError
    from redis.exceptions import RedisError

    return StorageError, RedisError, OperationalError, OSError


_UNAVAILABLE = _unavailable_errors()


class Submitted(BaseModel):
    id: str
    status_url: str


class Fleet(BaseModel):
    workers: list[dict[str, str]]  # one heartbeat each: hostname, device, current_job, done, failed, queues …
    queues: dict[str, dict[str, int]]  # queue -> job priority class ("7-9", "4-6", "1-3", "0") -> jobs waiting


class Rejected(Exception):
    def __init__(self, status: int, detail: Any, headers: dict[str, str] | None = None) -> None:
        self.status, self.detail, self.headers = status, detail, headers


def create_api(settings: Settings, client: Client | None = None, s3: Any = None) -> FastAPI:
    s3 = s3 or s3_client(settings)
    client = client or Client(settings, s3_client=s3)
    tenants = Tenants.from_settings(settings)
    if tenants.open:
        log.warning("KIQ_API_KEYS and KIQ_API_TENANTS are empty: the API is open to anyone who can reach it")
    app = FastAPI(title="kiq", version=__version__, summary="Kandinsky 2.2 interpolation queue")
    app.state.tenants = tenants
    app.state.heartbeat_s = HEARTBEAT_S
    hubs: list[EventHub] = []  # made on first use, inside the server's event loop

    def hub() -> EventHub:
        if not hubs:
            # Bounded: streams opening at once wait for a connection (their one XRANGE) instead of failing.
            hubs.append(EventHub(redisconn.connect_async(settings.results_server, settings)))
        return hubs[0]

    @app.on_event("shutdown")
    async def close_hub() -> None:
        if hubs:
            await hubs[0].close()

    app.add_middleware(BodyLimit, max_bytes=settings.api_max_body_bytes)
    tracing.instrument(app)
    metrics.install(app, settings, client, {q for t in tenants.by_key.values() for q in t.queues})

    @app.exception_handler(Rejected)
    async def rejected(_: Request, exc: Rejected) -> JSONResponse:
        headers = {"Retry-After": "1"} if exc.status == 503 else exc.headers
        return JSONResponse({"detail": exc.detail}, status_code=exc.status, headers=headers)

    @app.exception_handler(RedisError)
    async def redis_down(_: Request, exc: RedisError) -> JSONResponse:
        # Redis or Sentinel unreachable (a partition, a failover): a retryable 503, not an unhandled 500
        detail = {"msg": f"Redis unavailable ({type(exc).__name__}): retry", "type": "Unavailable"}
        return JSONResponse({"detail": detail}, status_code=503, headers={"Retry-After": "1"})

    @app.exception_handler(OutputsDeleted)
    async def gone(_: Request, exc: OutputsDeleted) -> JSONResponse:
        return JSONResponse({"detail": {"msg": str(exc), "type": "OutputsDeleted"}}, status_code=410)

    @app.exception_handler(JobNotFinished)
    async def not_finished(_: Request, exc: JobNotFinished) -> JSONResponse:
        return JSONResponse({"detail": {"msg": str(exc), "type": "JobNotFinished"}}, status_code=409)

    if settings.retention_days and settings.s3_lifecycle:
        retention.apply_lifecycle(s3, settings)  # or say to run `kiq gc` where the store refuses

    def owned(job_id: str, who: str) -> dict[str, str]:
        record = client.record(job_id)
        if record is None or record.get("owner") != who:
            raise HTTPException(404, f"no job {job_id}")
        client.check_not_deleted(job_id)  # OutputsDeleted: 410, to its own tenant only
        return record

    def accept(tenant: Tenant, job: Job, digest: str, uploads: list[Upload], job_id: str,
               idempotency: str | None) -> Submitted:  # fmt: skip
        """Everything that talks to Redis and S3, in a worker thread: authorise, claim the key, store, enqueue."""
        problems = tenant.problems(job, settings)
        if problems:
            raise Rejected(403, problems)
        claim = IdempotencyClaim(client.redis, settings, tenant.owner, idempotency, digest) if idempotency else None
        admission = None
        try:
            replay = claim.acquire(job_id) if claim else None
            if replay is not None:  # the earlier try may have answered 503: the job must be replicated now too
                client.keep_record(replay, job, tenant.owner)  # its publish ran, then failed: it forgot the record
                return confirmed(replay)
            client.check_feasible(job)  # before the uploads: a job no worker could finish stores nothing
            admission = client.admit(job, tenant.owner, job_id, tenant.quotas)  # so is one over a quota
            with claim.kept() if claim else nullcontext():
                for key, data, content_type in uploads:
                    put(s3, settings.s3_bucket, key, data, content_type)
                client.submit(job, tenant.owner, job_id, before_publish=claim.confirm if claim else None, feasible=True,
                              weight=tenant.weight, quotas=tenant.quotas, admission=admission,
                              require_replicas=None if claim else False)  # fmt: skip
                if claim is not None:
                    claim.commit()
        except Rejected:
            raise
        except Exception as exc:
            if claim is not None:
                claim.release()
            if admission is not None:
                release_quietly(admission)
            if isinstance(exc, QuotaExceeded):
                raise Rejected(429, [over_quota(exc)], rate_limit_headers(exc)) from None
            if isinstance(exc, JobTooLong):
                raise Rejected(422, [too_long(exc)]) from None
            if isinstance(exc, SubmitAbandoned):
                log.warning("submit abandoned, nothing enqueued: %s", exc)
                raise Rejected(503, f"{exc}: retry, with the same Idempotency-Key") from None
            if isinstance(exc, _UNAVAILABLE):
                log.warning("submit failed, nothing enqueued: %s: %s", type(exc).__name__, exc)
                raise Rejected(503, f"storage or queue unavailable ({type(exc).__name__}); nothing was enqueued: "
                                    "retry, with the same Idempotency-Key if you sent one") from None  # fmt: skip
            raise
        return confirmed(job_id) if claim else Submitted(id=job_id, status_url=f"/v1/jobs/{job_id}")

    def confirmed(job_id: str) -> Submitted:
        """With an Idempotency-Key, 202 only once the job and its committed mark are on KIQ_SUBMIT_REPLICAS
        replicas (one WAIT covers both); else 503 SubmitNotReplicated: a retry with the key finds the job (and
        WAITs again) or, if a failover lost job and mark together, creates it anew. Either way one job."""
        if not client.replicated(job_id):
            exc = SubmitNotReplicated(not_replicated(job_id, settings), job_id)
            raise Rejected(503, {"msg": str(exc), "type": "SubmitNotReplicated", "job_id": job_id})
        return Submitted(id=job_id, status_url=f"/v1/jobs/{job_id}")

    @app.post("/v1/jobs", status_code=202, response_model=Submitted, openapi_extra=SUBMIT_BODY,
              responses={403: {"description": "a queue, priority or s3:// object this key may not use"},
                         409: {"description": "Idempotency-Key reused with another body, or still in flight"},
                         413: {"description": "body too large"},
                         429: {"description": "over one of the key's quotas (type QuotaExceeded, `quota` names it): "
                                              "nothing enqueued; Retry-After and the IETF RateLimit-Policy and "
                                              "RateLimit fields (none for the job_size quota: retrying cannot help)"},
                         422: {"description": "invalid job, or one no live worker of its queue could finish within "
                                              "the time-limit cap (type JobTooLong)"},
                         503: {"description": "Redis or S3 unavailable: nothing enqueued, retry; or, with an "
                                              "Idempotency-Key, the job is not yet on KIQ_SUBMIT_REPLICAS replicas "
                                              "(type SubmitNotReplicated): it may or may not exist, retry with the "
                                              "same key"}})  # fmt: skip
    async def submit(request: Request, tenant: Caller,
                     idempotency: Annotated[str | None, Header(alias="Idempotency-Key", max_length=255)] = None,
                     ) -> Submitted:  # fmt: skip
        job_id = str(uuid.uuid4())
        job, digest, uploads = await read_job(request, job_id, settings, tenant.owner)
        return await run_in_threadpool(accept, tenant, job, digest, uploads, job_id, idempotency)

    @app.get("/v1/jobs", response_model=JobList, response_model_exclude_none=True)
    def jobs(tenant: Caller, limit: Annotated[int, Query(ge=1, le=100)] = 20, state: State | None = None,
             cursor: Annotated[str | None, Query(pattern=r"^[0-9]{1,12}(\.[0-9]{1,9})?$")] = None,
             ) -> JobList:  # fmt: skip
        """The caller's jobs, newest first; follow `next_cursor` for older ones."""
        return client.jobs(tenant.owner, limit, state, cursor)

    @app.get("/v1/fleet", response_model=Fleet)
    def fleet(tenant: Caller) -> Fleet:
        """Live workers (device, current job, counters) and the jobs waiting per queue and priority class. A
        worker busy with another tenant's job shows `current_job` "busy": job ids stay with their owners."""
        workers = client.fleet()
        for worker in workers:
            job_id = worker.get("current_job")
            if job_id and (client.record(job_id) or {}).get("owner") != tenant.owner:
                worker["current_job"] = "busy"
        queues = {settings.queue, *([settings.large_queue] if settings.large_queue else [])}
        for worker in workers:
            queues.update(q for q in worker.get("queues", "").split(",") if q)
        return Fleet(workers=workers, queues=client.queue_depths(sorted(queues)))

    @app.get("/v1/jobs/{job_id}", response_model=JobStatus, response_model_exclude_none=True,
             responses={404: {"description": "unknown job, or another key's"},
                        410: {"description": "its outputs were deleted (type OutputsDeleted)"}})  # fmt: skip
    def status(job_id: str, tenant: Caller) -> JobStatus:
        owned(job_id, tenant.owner)
        try:
            return client.status(job_id)
        except UnknownJob:
            raise HTTPException(404, f"no job {job_id}") from None

    @app.delete("/v1/jobs/{job_id}", status_code=202, response_model=JobStatus, response_model_exclude_none=True,
                responses={404: {"description": "unknown job, or another key's"}})  # fmt: skip
    def cancel(job_id: str, tenant: Caller) -> JobStatus:
        owned(job_id, tenant.owner)
        return client.cancel(job_id)

    @app.delete("/v1/jobs/{job_id}/outputs", response_model=retention.Deleted,
                responses={404: {"description": "unknown job, or another key's"},
                           409: {"description": "the job is still queued or running (type JobNotFinished): cancel it "
                                                "first"},
                           410: {"description": "its outputs were deleted already (type OutputsDeleted)"}})  # fmt: skip
    def delete_outputs(job_id: str, tenant: Caller) -> retention.Deleted:
        """Delete the job's images (a sweep's frames and animation) and the inputs it uploaded; its status and
        outputs answer 410 Gone from then on."""
        owned(job_id, tenant.owner)
        return retention.delete_outputs(client, s3, settings, job_id)

    @app.get("/v1/jobs/{job_id}/events", response_class=StreamingResponse,
             responses={200: {"content": {"text/event-stream": {}}, "description": EVENTS_DOC},
                        204: {"description": "resumed after the final event: nothing more will come"},
                        404: {"description": "unknown job, or another key's"},
                        503: {"description": "Redis unavailable (type Unavailable): retry"}})  # fmt: skip
    async def events(job_id: str, tenant: Caller,
                     last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
                     ) -> Response:  # fmt: skip
        await run_in_threadpool(owned, job_id, tenant.owner)
        try:
            after = parse_event_id(last_event_id) if last_event_id else None
        except InvalidEventId as exc:
            raise HTTPException(400, str(exc)) from None
        first = await run_in_threadpool(first_status, job_id)  # None while the job has an event stream
        if first is not None:
            after = None  # no stream: no event the client could have seen; it gets everything from the start
        elif after and await run_in_threadpool(resumed_at_the_end, job_id, after):
            return Response(status_code=204)  # SSE's "stop": an EventSource would reconnect after the last event
        stream = sse(hub(), job_id, after, first, app.state.heartbeat_s)
        return StreamingResponse(stream, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})  # fmt: skip

    def first_status(job_id: str) -> JobStatus | None:
        """The current status when the job has no event stream: none written yet (queued), or a finished job's
        expired (kiq.events.DONE_STREAM_TTL_S) — then that final status is the whole stream, also on a resume."""
        return None if client.redis.exists(events_key(job_id)) else client.status(job_id)

    def resumed_at_the_end(job_id: str, last_event_id: str) -> bool:
        """The job has ended and the client already has its last event. An id ahead of the stream is not that:
        that client gets the current state (here the final status) as a snapshot, like one that fell behind."""
        newest = client.redis.xrevrange(events_key(job_id), count=1)
        return bool(newest) and newest[0][0].decode() == last_event_id and client.status(job_id).done

    async def sse(hub: EventHub, job_id: str, after: str | None, first: JobStatus | None,
                  heartbeat_s: float) -> Any:  # fmt: skip
        yield "retry: 2000\n\n"
        if first is not None:
            yield _sse_event("", first)
            if first.done:
                return
        # aclosing: the subscription is let go on every way out, a client that left included
        try:
            async with aclosing(job_events(hub, job_id, after, heartbeat_s)) as events:
                async for event in events:
                    if event is None:
                        yield ": heartbeat\n\n"
                        continue
                    current = client.decode_event(job_id, event.meta, frames=event.frames)
                    yield _sse_event(event.id, current)
                    if current.done:
                        return
        except RedisError as exc:  # the stream ends; the client reconnects (retry: 2000) with its Last-Event-ID
            log.warning("job %s: event stream ended, Redis unavailable: %s", job_id, exc)

    image_errors = {404: {"description": "no such job or image"}, 409: {"description": "job not finished"}}

    @app.get("/v1/jobs/{job_id}/images/{n}", status_code=307, response_class=RedirectResponse, responses=image_errors)
    def image(job_id: str, n: int, tenant: Caller) -> RedirectResponse:
        owned(job_id, tenant.owner)
        current = client.status(job_id)
        if current.result is None:
            raise HTTPException(409, f"job {job_id} is {current.state}, not SUCCESS")
        if not 0 <= n < len(current.result.images):
            raise HTTPException(404, f"job {job_id} has {len(current.result.images)} image(s)")
        bucket, key = current.result.images[n].uri.removeprefix("s3://").split("/", 1)
        return RedirectResponse(presign(s3, bucket, key, settings.presign_ttl_s), status_code=307)

    @app.get("/v1/jobs/{job_id}/animation", status_code=307, response_class=RedirectResponse,
             responses=image_errors)  # fmt: skip
    def animation(job_id: str, tenant: Caller) -> RedirectResponse:
        """A sweep's animation (GIF, WebP or MP4), once the job has succeeded."""
        owned(job_id, tenant.owner)
        current = client.status(job_id)
        if current.result is None:
            raise HTTPException(409, f"job {job_id} is {current.state}, not SUCCESS")
        if current.result.animation is None:
            raise HTTPException(404, f"job {job_id} has no animation")
        bucket, key = current.result.animation.uri.removeprefix("s3://").split("/", 1)
        return RedirectResponse(presign(s3, bucket, key, settings.presign_ttl_s), status_code=307)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def playground() -> HTMLResponse:
        """The playground: one static page that uses the API below with the visitor's key."""
        return HTMLResponse(PLAYGROUND, headers={"Cache-Control": "no-cache"})

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"description": "Redis or S3 unreachable"}})
    def readyz() -> JSONResponse:
        checks = {"redis": _check(lambda: client.redis.ping()),
                  "s3": _check(lambda: s3.head_bucket(Bucket=settings.s3_bucket))}  # fmt: skip
        ok = all(v == "ok" for v in checks.values())
        return JSONResponse({"status": "ok" if ok else "unavailable", **checks}, status_code=200 if ok else 503)

    admin_api.install(app, client, tenants, caller)
    app.openapi = lambda: openapi_with_job_schema(app)  # type: ignore[method-assign]
    return app


def caller(request: Request, authorization: Annotated[str | None, Header()] = None) -> Tenant:
    return authenticate(request.app.state.tenants, authorization)


Caller = Annotated[Tenant, Depends(caller)]
Upload = tuple[str, bytes, str]  # S3 key, bytes, content type


def authenticate(tenants: Tenants, authorization: str | None) -> Tenant:
    """The caller's tenant ("public" with its defaults when no keys are configured)."""
    if tenants.open:
        return tenants.public
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise HTTPException(401, "missing bearer API key", headers={"WWW-Authenticate": "Bearer"})
    tenant = tenants.find(token.strip())
    if tenant is None:
        raise HTTPException(401, "unknown API key", headers={"WWW-Authenticate": "Bearer"})
    return tenant


async def read_job(request: Request, job_id: str, settings: Settings, owner: str) -> tuple[Job, str, list[Upload]]:
    """The job from a JSON or multipart body: (validated job, digest of the request, uploads to store)."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        return await read_multipart(request, input_prefix(settings, owner, job_id), settings.s3_bucket)
    if content_type and not content_type.startswith("application/json"):
        raise Rejected(415, "send application/json or multipart/form-data")
    raw = await request.body()
    # Up to 16 inline images of 4 MiB to decode and check: off the event loop.
    job = await run_in_threadpool(lambda: validate(parse_json(raw)))
    return job, hashlib.sha256(raw).hexdigest(), []


async def read_multipart(request: Request, prefix: str, bucket: str) -> tuple[Job, str, list[Upload]]:
    form = await request.form(max_files=MAX_UPLOADS, max_fields=MAX_UPLOADS + 1)
    text = form.get("job")
    if not isinstance(text, str):
        raise Rejected(422, [{"loc": ["body", "job"], "msg": "a 'job' field with the job JSON is required"}])
    digest = hashlib.sha256(text.encode())
    files: dict[str, tuple[bytes, str]] = {}
    for name, value in form.multi_items():
        if name != "job" and not isinstance(value, str):
            data = await value.read()
            files[name] = (data, value.content_type or "application/octet-stream")
            digest.update(name.encode() + hashlib.sha256(data).digest())
    data = parse_json(text.encode())
    uploads = rewrite_uploads(data, files, prefix, bucket)
    return validate(data), digest.hexdigest(), uploads


def rewrite_uploads(data: Any, files: dict[str, tuple[bytes, str]], prefix: str, bucket: str) -> list[Upload]:
    """Turn each `upload:<part>` image reference into the s3:// URI the part will be stored at."""
    uploads, inputs = [], data.get("inputs") if isinstance(data, dict) else None
    for i, item in enumerate(inputs if isinstance(inputs, list) else []):
        ref = item.get("image") if isinstance(item, dict) else None
        if isinstance(ref, str) and ref.startswith(UPLOAD_SCHEME):
            name = ref.removeprefix(UPLOAD_SCHEME)
            if name not in files:
                raise Rejected(422, [{"loc": ["body", "inputs", i, "image"], "msg": f"no file part named {name!r}"}])
            key = f"{prefix}upload-{uuid.uuid5(uuid.NAMESPACE_URL, name).hex}"
            item["image"] = f"s3://{bucket}/{key}"
            uploads.append((key, *files[name]))
    return uploads


def over_quota(exc: QuotaExceeded) -> dict[str, Any]:
    """A refused submit's 429 detail: which quota, its limit, and when a retry may pass (only the caller's own)."""
    return {"loc": ["body"], "msg": str(exc), "type": "QuotaExceeded", "quota": exc.quota, "limit": exc.limit,
            "retry_after_s": exc.retry_after_s}  # fmt: skip


def release_quietly(admission: Any) -> None:
    try:
        admission.release()
    except Exception as exc:  # noqa: BLE001 - Redis is likely what failed; the pending entry lapses by itself
        log.warning("could not release a quota admission: %s", exc)


def too_long(exc: JobTooLong) -> dict[str, Any]:
    """A refused job's 422 detail: the validation errors' shape, with the estimate that refused it."""
    return {"loc": ["body"], "msg": str(exc), "type": "JobTooLong", "expected_s": round(exc.expected_s, 1),
            "limit_s": exc.limit_s, "queue": exc.queue, "live_workers": exc.workers}  # fmt: skip


def parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise Rejected(422, [{"loc": ["body"], "msg": f"body is not valid JSON: {exc}"}]) from None


def validate(data: Any) -> Job:
    try:
        return Job.model_validate(data)
    except ValidationError as exc:
        raise Rejected(422, [{**err, "loc": ["body", *err["loc"]]} for err in validation_errors(exc)]) from None


class IdempotencyClaim:
    """An Idempotency-Key points at a job only once that job is enqueued.

    `acquire` records the key as pending or answers for an earlier request: its job id if that request enqueued,
    409 if it is still in flight or had another body. The pending mark lives KIQ_IDEMPOTENCY_PENDING_S and is
    renewed (compare-and-set) while the submit works (`kept`), however long its uploads and retries take; right
    before the publish `confirm` renews it once more, and abandons the submit (SubmitAbandoned, nothing enqueued)
    if the mark is no longer ours: it lapsed while Redis was out of reach, and a retry may hold the key now. So a
    retry never creates a second job while the first submit is in flight, nor after it enqueued its job. A failed
    submit `release`s the key, so the client's retry creates the job; if even that fails (Redis down), or the API
    process dies, the pending mark expires by itself.
    """

    def __init__(self, redis: Any, settings: Settings, owner: str, key: str, digest: str) -> None:
        # A committed key never outlives its job's record: a replay could not tell a job whose record expired from
        # one whose first try removed it (`keep_record`).
        self.redis, self.ttl_s, self.digest = redis, min(settings.idempotency_ttl_s, settings.result_ttl_s), digest
        self.pending_ms, self.retry_s = int(settings.idempotency_pending_s * 1000), settings.redis_retry_s
        self.key = idempotency_key(owner, hashlib.sha256(key.encode()).hexdigest())
        self.job_id, self.value = "", ""
        self.atomic = publish.shares_redis(settings)  # the publish commits the key itself (kiq/publish.py)
        self.published: publish.Commit | None = None

    def acquire(self, job_id: str) -> str | None:
        self.job_id, self.value = job_id, json.dumps({"digest": self.digest, "id": job_id, "state": "pending"})
        if self.redis.set(self.key, self.value, nx=True, px=self.pending_ms):
            return None
        raw = self.redis.get(self.key)
        existing = json.loads(raw) if raw else {"digest": self.digest, "state": "pending"}
        self.value = ""  # not ours: never release or commit it
        if existing["digest"] != self.digest:
            raise Rejected(409, "Idempotency-Key was already used with a different request body")
        if existing.get("state") != "enqueued":
            raise Rejected(409, "a request with this Idempotency-Key is still in progress; retry shortly")
        return str(existing["id"])

    @contextmanager
    def kept(self) -> Iterator[None]:
        """Renew the pending mark every quarter of its lifetime while the block runs."""
        stop = threading.Event()
        if self.value:
            threading.Thread(target=self._keep, args=(stop,), name="kiq-idempotency", daemon=True).start()
        try:
            yield
        finally:
            stop.set()

    def _keep(self, stop: threading.Event) -> None:
        while not stop.wait(self.pending_ms / 4000):
            try:
                if not self._renew():
                    return  # not ours any more (committed, released, or lapsed: then `confirm` abandons)
            except Exception as exc:  # noqa: BLE001 - Redis unreachable: try again; `confirm` decides
                log.warning("could not renew an Idempotency-Key's pending mark: %s", exc)

    def _renew(self) -> bool:
        return bool(self.redis.eval(_PEXPIRE_IF_EQUAL, 1, self.key, self.value, self.pending_ms))

    def confirm(self) -> None:
        """Right before the publish: the pending mark must still be ours, renewed for a whole lifetime. Then the
        publish itself commits the key, in the script that pushes the message (where broker and results share one
        Redis): the key points at the job exactly when the job is queued, whatever fails after."""
        if self.value and not self._renew():
            raise SubmitAbandoned(
                "the submit outlived its Idempotency-Key's pending mark (Redis out of reach for "
                f"{self.pending_ms / 1000:g} s or more); nothing was enqueued"
            )
        if self.value and self.atomic:
            self.published = publish.Commit(self.job_id, self.key, self.value, self._committed(), self.ttl_s)
            publish.arm(self.published)

    def _committed(self) -> str:
        return json.dumps({"digest": self.digest, "id": self.job_id, "state": "enqueued"})

    def committed_by_publish(self) -> bool:
        """Whether the publish ran the commit (then `commit` has nothing left to do); disarms it either way."""
        publish.disarm()
        return self.published is not None and self.published.done

    def commit(self) -> None:
        """Point the key at the enqueued job, only if it still holds our pending mark (kept alive until now):
        done by the publish itself where broker and results share one Redis. Otherwise retried for
        KIQ_REDIS_RETRY_S, and never raises: the job is enqueued (a commit that still fails leaves the mark to
        expire, after which a retry would make a second job: the window one shared Redis closes)."""
        if not self.value or self.committed_by_publish():
            return
        if self.atomic:
            log.warning("job %s: its publish did not commit its Idempotency-Key (not kiq's producer transport?); "
                        "committing it separately", self.job_id)  # fmt: skip
        enqueued = self._committed()
        try:
            redisconn.retrying(
                lambda: self.redis.eval(_SET_IF_EQUAL, 1, self.key, self.value, enqueued, self.ttl_s),
                self.retry_s, "idempotency commit",
            )  # fmt: skip
        except Exception as exc:  # noqa: BLE001
            log.error("job %s is enqueued but its idempotency key could not be committed: %s", self.job_id, exc)

    def release(self) -> None:
        """A failed submit frees the key for the retry, unless its publish committed it (the reply was lost)."""
        if not self.value or self.committed_by_publish():
            return
        try:
            self.redis.eval(_DELETE_IF_EQUAL, 1, self.key, self.value)
        except Exception as exc:  # noqa: BLE001 - Redis is likely what failed; the pending mark expires
            log.warning("could not release an idempotency key: %s", exc)


_DELETE_IF_EQUAL = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
_PEXPIRE_IF_EQUAL = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
)
_SET_IF_EQUAL = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('set', KEYS[1], ARGV[2], 'EX', ARGV[3]) end "
    "return 0"
)


PLAYGROUND = (resources.files("producer") / "static" / "playground.html").read_text(encoding="utf-8")
EVENTS_DOC = (
    "Server-Sent Events: `state` (PENDING, STARTED), `progress` (one per step) and `done` (the final status, "
    "then the stream ends); each `data` is the status JSON and each `id` the job's event id (resume with "
    "Last-Event-ID: nothing lost, nothing repeated; 400 for an id that is not a stream id). A sweep's progress "
    "event lists only its new frames (`progress.new_frames`, the last of them frame `progress.frames_done` - 1). "
    "Where the stream cannot continue from Last-Event-ID (the stream is capped and trimmed past it, or the id is "
    "ahead of it), or a new stream's job has a trimmed stream, the first event is the current status with all "
    "frames so far in `progress.frames`. A `: heartbeat` comment every 15 s."
)


def _sse_event(event_id: str, current: JobStatus) -> str:
    kind = "done" if current.done else "progress" if current.state == "PROGRESS" else "state"
    head = f"id: {event_id}\n" if event_id else ""
    return f"{head}event: {kind}\ndata: {current.model_dump_json(exclude_none=True)}\n\n"


def _check(probe: Any) -> str:
    try:
        probe()
        return "ok"
    except Exception as exc:  # noqa: BLE001 - any failure means not ready
        return f"unavailable: {type(exc).__name__}"


SUBMIT_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/Job"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["job"],
                    "properties": {
                        "job": {"type": "string", "description": "the job JSON; images may be upload:<part name>"},
                    },
                    "additionalProperties": {"type": "string", "format": "binary"},
                }
            },
        },
    }
}


def openapi_with_job_schema(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
    job = Job.model_json_schema(ref_template="#/components/schemas/{model}")
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.update(job.pop("$defs", {}))
    components["Job"] = job
    app.openapi_schema = schema
    return schema


def check_exposure(settings: Settings) -> None:
    """Refuse an API without keys on an address others can reach, unless KIQ_API_OPEN says it is meant."""
    if settings.api_open or not Tenants.from_settings(settings).open or _is_loopback(settings.api_host):
        return
    raise SettingsError(
        f"KIQ_API_HOST={settings.api_host} listens beyond loopback and KIQ_API_KEYS and KIQ_API_TENANTS are empty: "
        "anyone who reaches it could submit jobs. Set KIQ_API_KEYS (or KIQ_API_TENANTS), or KIQ_API_OPEN=1 to "
        "serve it open on purpose"
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve to any interface


def run_api(settings: Settings) -> None:
    import uvicorn

    check_exposure(settings)
    uvicorn.run(create_api(settings), host=settings.api_host, port=settings.api_port, log_level="info",
                **logs.uvicorn_options(settings))  # fmt: skip
