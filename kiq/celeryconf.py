"""Celery configuration both sides share, as plain data (no Celery import here)."""

from __future__ import annotations

from typing import Any

from kiq.names import GENERATE_TASK
from kiq.settings import Settings

# Above the longest job we expect on one NPU; a job is redelivered only after this (Redis broker).
VISIBILITY_TIMEOUT_S = 4 * 3600


def common_config(settings: Settings) -> dict[str, Any]:
    return {
        "broker_url": settings.broker_url,
        "result_backend": settings.backend_url,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "result_expires": settings.result_ttl_s,
        "result_extended": True,
        "task_default_queue": settings.queue,
        "task_routes": {GENERATE_TASK: {"queue": settings.queue}},
        "broker_transport_options": {"visibility_timeout": VISIBILITY_TIMEOUT_S},
        "broker_connection_retry_on_startup": True,
        "enable_utc": True,
    }
