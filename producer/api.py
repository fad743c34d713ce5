"""`kiq api`: the HTTP face of kiq (FastAPI). Stateless: it talks only to Redis and S3, so any number of
replicas can sit behind a load balancer. See the README's "HTTP API" section for curl examples."""

import hashlib
import hmac
import json
import logging
import uuid
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, RedirectResponse
from pydantic import BaseModel, ValidationError

from kiq.contract import Job, validation_errors
from kiq.errors import UnknownJob
from kiq.names import idempotency_key
from kiq.s3 import presign, s3_client
from kiq.settings import Settings
from kiq.status import JobStatus
from producer.bodylimit import BodyLimit
from producer.client import Client

log = logging.getLogger("kiq.api")
UPLOAD_SCHEME = "upload:"
MAX_UPLOADS = 16


class Submitted(BaseModel):
    id: str
    status_url: str


class Rejected(Exception):
    def __init__(self, status: int, detail: Any) -> None:
        self.status, self.detail = status, detail


def create_api(settings: Settings, client: Client | None = None, s3: Any = None) -> FastAPI:
    client = client or Client(settings)
    s3 = s3 or s3_client(settings)
    keys = settings.api_key_list
    if not keys:
        log.warning("KIQ_API_KEYS is empty: the API is open to anyone who can reach it")
    app = FastAPI(title="kiq", version="0.1.0", summary="Kandinsky 2.2 interpolation queue")
    app.state.api_keys = keys
    app.add_middleware(BodyLimit, max_bytes=settings.api_max_body_bytes)

    @app.exception_handler(Rejected)
    async def rejected(_: Request, exc: Rejected) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status)

    def owned(job_id: str, who: str) -> dict[str, str]:
        record = client.record(job_id)
        if record is None or record.get("owner") != who:
            raise HTTPException(404, f"no job {job_id}")
        return record

    @app.post("/v1/jobs", status_code=202, response_model=Submitted, openapi_extra=SUBMIT_BODY,
              responses={409: {"description": "Idempotency-Key reused with another body"},
                         413: {"description": "body too large"}, 422: {"description": "invalid job"}})  # fmt: skip
    async def submit(request: Request, who: Owner,
                     idempotency: Annotated[str | None, Header(alias="Idempotency-Key", max_length=255)] = None,
                     ) -> Submitted:  # fmt: skip
        job_id = str(uuid.uuid4())
        job, digest, uploads = await read_job(request, job_id, settings.s3_bucket)
        if idempotency:
            replay = claim(client, settings, who, idempotency, digest, job_id)
            if replay is not None:
                return Submitted(id=replay, status_url=f"/v1/jobs/{replay}")
        for key, data, content_type in uploads:
            await run_in_threadpool(s3.put_object, Bucket=settings.s3_bucket, Key=key, Body=data,
                                    ContentType=content_type)  # fmt: skip
        await run_in_threadpool(client.submit, job, who, job_id)
        return Submitted(id=job_id, status_url=f"/v1/jobs/{job_id}")

    @app.get("/v1/jobs/{job_id}", response_model=JobStatus, response_model_exclude_none=True,
             responses={404: {"description": "unknown job, or another key's"}})  # fmt: skip
    def status(job_id: str, who: Owner) -> JobStatus:
        owned(job_id, who)
        try:
            return client.status(job_id)
        except UnknownJob:
            raise HTTPException(404, f"no job {job_id}") from None

    @app.delete("/v1/jobs/{job_id}", status_code=202, response_model=JobStatus, response_model_exclude_none=True,
                responses={404: {"description": "unknown job, or another key's"}})  # fmt: skip
    def cancel(job_id: str, who: Owner) -> JobStatus:
        owned(job_id, who)
        return client.cancel(job_id)

    image_errors = {404: {"description": "no such job or image"}, 409: {"description": "job not finished"}}

    @app.get("/v1/jobs/{job_id}/images/{n}", status_code=307, response_class=RedirectResponse, responses=image_errors)
    def image(job_id: str, n: int, who: Owner) -> RedirectResponse:
        owned(job_id, who)
        current = client.status(job_id)
        if current.result is None:
            raise HTTPException(409, f"job {job_id} is {current.state}, not SUCCESS")
        if not 0 <= n < len(current.result.images):
            raise HTTPException(404, f"job {job_id} has {len(current.result.images)} image(s)")
        bucket, key = current.result.images[n].uri.removeprefix("s3://").split("/", 1)
        return RedirectResponse(presign(s3, bucket, key, settings.presign_ttl_s), status_code=307)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"description": "Redis or S3 unreachable"}})
    def readyz() -> JSONResponse:
        checks = {"redis": _check(lambda: client.redis.ping()),
                  "s3": _check(lambda: s3.head_bucket(Bucket=settings.s3_bucket))}  # fmt: skip
        ok = all(v == "ok" for v in checks.values())
        return JSONResponse({"status": "ok" if ok else "unavailable", **checks}, status_code=200 if ok else 503)

    app.openapi = lambda: openapi_with_job_schema(app)  # type: ignore[method-assign]
    return app


def caller(request: Request, authorization: Annotated[str | None, Header()] = None) -> str:
    return authenticate(request.app.state.api_keys, authorization)


Owner = Annotated[str, Depends(caller)]


def authenticate(keys: list[str], authorization: str | None) -> str:
    """The caller's tenant: a digest of its API key ("public" when no keys are configured)."""
    if not keys:
        return "public"
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise HTTPException(401, "missing bearer API key", headers={"WWW-Authenticate": "Bearer"})
    for key in keys:
        if hmac.compare_digest(token.strip().encode(), key.encode()):
            return hashlib.sha256(key.encode()).hexdigest()[:16]
    raise HTTPException(401, "unknown API key", headers={"WWW-Authenticate": "Bearer"})


async def read_job(request: Request, job_id: str, bucket: str) -> tuple[Job, str, list[tuple[str, bytes, str]]]:
    """The job from a JSON or multipart body: (validated job, digest of the request, uploads to store)."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        return await read_multipart(request, job_id, bucket)
    if content_type and not content_type.startswith("application/json"):
        raise Rejected(415, "send application/json or multipart/form-data")
    raw = await request.body()
    return validate(parse_json(raw)), hashlib.sha256(raw).hexdigest(), []


async def read_multipart(request: Request, job_id: str, bucket: str) -> tuple[Job, str, list[tuple[str, bytes, str]]]:
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
    uploads = rewrite_uploads(data, files, f"inputs/{job_id}", bucket)
    return validate(data), digest.hexdigest(), uploads


def rewrite_uploads(data: Any, files: dict[str, tuple[bytes, str]], prefix: str,
                    bucket: str) -> list[tuple[str, bytes, str]]:  # fmt: skip
    """Turn each `upload:<part>` image reference into the s3:// URI the part will be stored at."""
    uploads, inputs = [], data.get("inputs") if isinstance(data, dict) else None
    for i, item in enumerate(inputs if isinstance(inputs, list) else []):
        ref = item.get("image") if isinstance(item, dict) else None
        if isinstance(ref, str) and ref.startswith(UPLOAD_SCHEME):
            name = ref.removeprefix(UPLOAD_SCHEME)
            if name not in files:
                raise Rejected(422, [{"loc": ["body", "inputs", i, "image"], "msg": f"no file part named {name!r}"}])
            key = f"{prefix}/{uuid.uuid5(uuid.NAMESPACE_URL, name).hex}"
            item["image"] = f"s3://{bucket}/{key}"
            uploads.append((key, *files[name]))
    return uploads


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


def claim(client: Client, settings: Settings, who: str, key: str, digest: str, job_id: str) -> str | None:
    """First use of the key: record it, return None. Same key and body again: the first job's id. Other body: 409."""
    redis_key = idempotency_key(who, hashlib.sha256(key.encode()).hexdigest())
    value = json.dumps({"digest": digest, "id": job_id})
    if client.redis.set(redis_key, value, nx=True, ex=settings.idempotency_ttl_s):
        return None
    existing = json.loads(client.redis.get(redis_key) or value)
    if existing["digest"] != digest:
        raise Rejected(409, "Idempotency-Key was already used with a different request body")
    return str(existing["id"])


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


def run_api(settings: Settings) -> None:
    import uvicorn

    uvicorn.run(create_api(settings), host=settings.api_host, port=settings.api_port, log_level="info")
