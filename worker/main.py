"""`kiq worker`: one Celery worker process pinned to one device, named after host and device."""

from __future__ import annotations

import socket

# No gossip or mingle: kiq keeps its own cancel flags and fleet heartbeats, and with gossip every worker would
# receive every other worker's events, a fleet's traffic growing with the square of its size.
WORKER_FLAGS = ("--without-gossip", "--without-mingle")


def run_worker(extra_args: list[str]) -> None:
    from worker import tenantqueues
    from worker.celery import app, settings

    hostname = f"kiq@{socket.gethostname()}-{settings.device_target.lower()}{settings.device_id}"
    argv = ["worker", f"--hostname={hostname}", "--loglevel=INFO", *WORKER_FLAGS]
    app.worker_main([*argv, *extra_args])
    if tenantqueues.drained():  # Celery's worker_main drops the exit code its shutdown carried
        raise SystemExit(tenantqueues.DRAINED_EXIT)
