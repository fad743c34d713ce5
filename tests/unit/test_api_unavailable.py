"""The API with its Redis unreachable (a partition, a failover in progress): a typed, retryable 503, never an
unhandled 500. Found by the nemesis campaign (issue 20): the event stream answered 500 while Redis was away."""

import socket

from fastapi.testclient import TestClient

from kiq.settings import Settings
from producer.api import create_api


def closed_port() -> int:
    with socket.socket() as s:  # bound, never listening: connections are refused at once
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_event_stream_and_status_answer_503_with_retry_after_while_redis_is_unreachable():
    url = f"redis://127.0.0.1:{closed_port()}/0"
    settings = Settings.from_env({"KIQ_BROKER_URL": url, "KIQ_REDIS_RETRY_S": "0.1"})
    with TestClient(create_api(settings), raise_server_exceptions=False) as api:
        for path in (
            "/v1/jobs/0b7e2f8c-0000-4000-8000-000000000000/events",
            "/v1/jobs/0b7e2f8c-0000-4000-8000-000000000000",
        ):
            response = api.get(path)
            assert response.status_code == 503, (path, response.status_code, response.text)
            assert response.headers["Retry-After"] == "1"
            assert response.json()["detail"]["type"] == "Unavailable"
