"""`kiq worker`: one Celery worker process pinned to one device, named after host and device."""

from __future__ import annotations

import socket


def run_worker(extra_args: list[str]) -> None:
    from worker.celery import app, settings

    hostname = f"kiq@{socket.gethostname()}-{settings.device_target.lower()}{settings.device_id}"
    app.worker_main(["worker", f"--hostname={hostname}", "--loglevel=INFO", *extra_args])
