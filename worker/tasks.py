"""The one Celery task, thin: each delivery of a job message goes to a `JobDelivery` (worker/execution.py)."""

from __future__ import annotations

from typing import Any

from celery import Celery, Task
from celery.signals import task_postrun

from kiq import fencing
from kiq.names import GENERATE_TASK
from kiq.settings import Settings
from worker import fencing as stale_runs
from worker.execution import JobDelivery, Observers
from worker.runner import Runner

__all__ = ["Observers", "register"]


def register(app: Celery, runner: Runner, settings: Settings, observers: Observers) -> Task:
    @app.task(name=GENERATE_TASK, bind=True)
    def generate(self: Task, job: dict[str, Any]) -> dict[str, Any]:
        return JobDelivery(self, runner, settings, observers).run(job)

    def release(task_id: str | None = None, **_: Any) -> None:
        if task_id is not None:
            fencing.release(task_id)  # after Celery stored the outcome: that was the run's last fenced write

    task_postrun.connect(release, sender=generate, weak=False)
    stale_runs.install()
    return generate
