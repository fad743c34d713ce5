"""Deleting a job's objects on request, and ageing every job's out (KIQ_RETENTION_DAYS).

`delete_outputs` removes a finished job's outputs (`<KIQ_S3_PREFIX><id>/`: images, a sweep's frames and
animation) and the inputs it uploaded (`<KIQ_S3_INPUT_PREFIX><owner>/<id>/`), then leaves a tombstone: the job's
status and outputs answer OutputsDeleted (410) from then on. S3 first, tombstone last, so a delete that fails half
way can simply be repeated. Retention: where the store allows it the API sets one lifecycle rule per prefix at
start (`apply_lifecycle`); elsewhere `kiq gc`, run from cron, deletes objects older than the retention.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from kiq.errors import JobNotFinished, UnknownJob
from kiq.names import deleted_key, events_key, frames_key, jobs_index_key
from kiq.s3 import error_code, input_prefix
from kiq.settings import Settings

log = logging.getLogger(__name__)
RULE_IDS = ("kiq-outputs", "kiq-inputs")
DELETE_BATCH = 1000  # DeleteObjects takes at most this many keys


class Deleted(BaseModel):
    id: str
    objects: int  # S3 objects removed: outputs and uploaded inputs


def delete_outputs(client: Any, s3: Any, settings: Settings, job_id: str) -> Deleted:
    """Delete a finished job's objects and leave its tombstone. UnknownJob, OutputsDeleted (deleted already) or
    JobNotFinished (queued or running: cancel it first, so no upload lands after the delete)."""
    current = client.status(job_id)  # raises OutputsDeleted after an earlier delete
    record = client.record(job_id)
    if record is None:
        raise UnknownJob(f"no job with id {job_id!r} (never submitted, or expired)")
    if not current.done:
        raise JobNotFinished(f"job {job_id} is {current.state}: cancel it first, then delete its outputs")
    bucket, owner = settings.s3_bucket, record.get("owner", "")
    keys = [
        *listed(s3, bucket, f"{settings.s3_prefix}{job_id}/"),
        *listed(s3, bucket, input_prefix(settings, owner, job_id)),
    ]
    remove(s3, bucket, keys)
    tombstone(client, settings, job_id, owner)
    log.info("deleted the %d objects of job %s", len(keys), job_id)
    return Deleted(id=job_id, objects=len(keys))


def tombstone(client: Any, settings: Settings, job_id: str, owner: str) -> None:
    """The job's deletion mark (kept as long as results are), and its stored results and events dropped: they
    held the deleted objects' URLs. The record stays, so another tenant still gets 404, the owner 410."""
    meta = client.app.backend.get_key_for_task(job_id)
    with client.redis.pipeline() as pipe:
        pipe.set(deleted_key(job_id), json.dumps({"deleted_at": time.time()}), ex=settings.result_ttl_s)
        pipe.delete(meta, frames_key(job_id), events_key(job_id))
        pipe.zrem(jobs_index_key(owner), job_id)
        pipe.execute()


def listed(s3: Any, bucket: str, prefix: str) -> list[str]:
    return [item["Key"] for item in _objects(s3, bucket, prefix)]


def _objects(s3: Any, bucket: str, prefix: str) -> Iterator[dict[str, Any]]:
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        yield from page.get("Contents", [])


def remove(s3: Any, bucket: str, keys: list[str]) -> None:
    for start in range(0, len(keys), DELETE_BATCH):
        batch = [{"Key": k} for k in keys[start : start + DELETE_BATCH]]
        answer = s3.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
        if answer.get("Errors"):
            first = answer["Errors"][0]
            raise OSError(f"S3 refused to delete {len(answer['Errors'])} object(s), e.g. {first.get('Key')}: "
                          f"{first.get('Code')}")  # fmt: skip


@dataclass
class Collected:
    """What `gc` found older than the retention (and deleted, unless a dry run)."""

    keys: list[str] = field(default_factory=list)
    jobs: set[str] = field(default_factory=set)  # jobs whose outputs aged out: they get a tombstone


def gc(client: Any, s3: Any, settings: Settings, days: float, dry_run: bool = False,
       now: float | None = None) -> Collected:  # fmt: skip
    """Delete outputs and inputs last written more than `days` ago, and tombstone the jobs whose outputs went."""
    cutoff = (time.time() if now is None else now) - days * 86400
    found = Collected()
    for prefix, job_part in ((settings.s3_prefix, 0), (settings.s3_input_prefix, 1)):
        for item in _objects(s3, settings.s3_bucket, prefix):
            if item["LastModified"].timestamp() < cutoff:
                found.keys.append(item["Key"])
                parts = item["Key"][len(prefix) :].split("/")
                if job_part == 0 and len(parts) > 1:
                    found.jobs.add(parts[0])
    if dry_run:
        return found
    remove(s3, settings.s3_bucket, found.keys)
    for job_id in sorted(found.jobs):
        record = client.record(job_id)
        if record is not None:
            tombstone(client, settings, job_id, record.get("owner", ""))
    return found


def lifecycle_rules(settings: Settings) -> list[dict[str, Any]]:
    days = settings.retention_days
    return [
        {"ID": rule, "Filter": {"Prefix": prefix}, "Status": "Enabled", "Expiration": {"Days": days}}
        for rule, prefix in zip(RULE_IDS, (settings.s3_prefix, settings.s3_input_prefix), strict=True)
    ]


def apply_lifecycle(s3: Any, settings: Settings) -> bool:
    """Put kiq's two expiration rules on the bucket, keeping every other rule it has (a put replaces them all).
    False, with a warning to run `kiq gc`, where the store refuses lifecycle configuration."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket = settings.s3_bucket
    try:
        try:
            existing = s3.get_bucket_lifecycle_configuration(Bucket=bucket).get("Rules", [])
        except ClientError as exc:
            if error_code(exc) != "NoSuchLifecycleConfiguration":
                raise
            existing = []
        rules = [r for r in existing if r.get("ID") not in RULE_IDS] + lifecycle_rules(settings)
        s3.put_bucket_lifecycle_configuration(Bucket=bucket, LifecycleConfiguration={"Rules": rules})
    except (ClientError, BotoCoreError) as exc:
        log.warning("could not set the S3 lifecycle rules on %s (%s): run `kiq gc` daily instead", bucket, exc)
        return False
    log.info("S3 lifecycle: objects under %s and %s expire after %d days", settings.s3_prefix,
             settings.s3_input_prefix, settings.retention_days)  # fmt: skip
    return True
