"""The one Celery task: deserialize, call the runner, serialize. Nothing else lives here."""

from __future__ import annotations

from typing import Any

from celery import Celery, Task
from celery.exceptions import Ignore

from kiq.contract import parse_job
from kiq.names import GENERATE_TASK, PROGRESS, cancel_key
from kiq.status import Progress
from worker.runner import JobCancelled, JobContext, Runner


def register(app: Celery, runner: Runner) -> Task:
    @app.task(name=GENERATE_TASK, bind=True)
    def generate(self: Task, job: dict[str, Any]) -> dict[str, Any]:
        ctx = job_context(self)
        try:
            if ctx.cancelled():
                raise JobCancelled(ctx.job_id)
            return runner.run(parse_job(job), ctx).model_dump(mode="json")
        except JobCancelled:
            self.backend.mark_as_revoked(ctx.job_id, reason="cancelled", request=self.request)
            raise Ignore() from None

    return generate


def job_context(task: Task) -> JobContext:
    job_id: str = task.request.id

    def report(progress: Progress) -> None:
        task.update_state(state=PROGRESS, meta=progress.model_dump())

    def cancelled() -> bool:
        return bool(task.backend.client.exists(cancel_key(job_id)))

    return JobContext(job_id=job_id, report=report, cancelled=cancelled)
