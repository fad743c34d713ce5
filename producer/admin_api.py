"""`/v1/admin`: purge, drain and per-tenant queue counts over HTTP, for keys with `"admin": true` only (403,
type AdminOnly, for every other key, and always on an API without keys). See producer/admin.py."""

from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from kiq.errors import UnknownTenant, UnknownWorker
from kiq.names import QUEUE_NAME
from producer import admin
from producer.client import Client
from producer.tenants import Tenant, Tenants

QueueName = Annotated[str, Field(pattern=f"^{QUEUE_NAME.pattern}$")]


class PurgeRequest(BaseModel):
    queue: QueueName
    tenant: str | None = Field(None, description="only this tenant's jobs: its name in the tenants file")
    confirm: str = Field(description="the queue's name again: a purge cannot be undone")


class Purged(BaseModel):
    queue: str
    tenant: str | None = None
    purged: int  # jobs now REVOKED


class Draining(BaseModel):
    worker: str
    processes: int  # live worker processes of that name asked to drain


ADMIN_ONLY = {403: {"description": "the key has no admin scope (type AdminOnly)"}}
PURGE_ERRORS = {**ADMIN_ONLY, 404: {"description": "unknown tenant"},
                422: {"description": "bad queue, or `confirm` is not the queue name (type NotConfirmed)"}}  # fmt: skip
DRAIN_ERRORS = {**ADMIN_ONLY, 404: {"description": "no live worker of that name (UnknownWorker)"}}


def install(app: FastAPI, client: Client, tenants: Tenants, caller: Any) -> None:
    """Add the admin routes; `caller` is the API's dependency that authenticates the bearer key."""

    def admin_key(tenant: Annotated[Tenant, Depends(caller)]) -> Tenant:
        if not tenant.admin:
            detail = [{"loc": ["header", "authorization"], "msg": "this API key has no admin scope",
                       "type": "AdminOnly"}]  # fmt: skip
            raise HTTPException(403, detail)
        return tenant

    Admin = Annotated[Tenant, Depends(admin_key)]

    @app.post("/v1/admin/purge", response_model=Purged, responses=PURGE_ERRORS)
    async def purge(body: PurgeRequest, _: Admin) -> Purged:
        """Revoke the queued jobs of a queue and its tenant queues, or only one tenant's: each ends REVOKED
        with its webhook; running jobs are left alone."""
        if body.confirm != body.queue:
            detail = [{"loc": ["body", "confirm"], "msg": "must repeat the queue's name", "type": "NotConfirmed"}]
            raise HTTPException(422, detail)
        owner = None
        if body.tenant is not None:
            owner = next((t.owner for t in tenants.by_key.values() if body.tenant == t.name), None)
            if owner is None:
                raise HTTPException(404, str(UnknownTenant(f"no tenant named {body.tenant!r}")))
        purged = await run_in_threadpool(admin.purge, client, body.queue, owner)
        return Purged(queue=body.queue, tenant=body.tenant, purged=purged)

    @app.post("/v1/admin/fleet/{worker}/drain", status_code=202, response_model=Draining, responses=DRAIN_ERRORS)
    def drain(worker: str, _: Admin) -> Draining:
        """The worker (its `hostname` in /v1/fleet) takes no more jobs, finishes its current one, then exits."""
        try:
            found = admin.drain(client, worker)
        except UnknownWorker as exc:
            raise HTTPException(404, str(exc)) from None
        return Draining(worker=worker, processes=len(found))

    @app.get("/v1/admin/queues/{queue}", response_model=dict[str, int], responses=ADMIN_ONLY)
    def queues(queue: str, _: Admin) -> dict[str, int]:
        """Jobs waiting per tenant queue of `queue` (`<queue>.t.<owner>`; the queue itself: foreign clients')."""
        if not QUEUE_NAME.fullmatch(queue):
            raise HTTPException(422, f"{queue!r} is not a queue name")
        return admin.queued(client, queue)
