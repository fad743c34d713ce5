"""The webhook receiver on the root side of the bridge: records every delivery, its id and whether its signature
verifies, and answers 200 (or, for a seeded share of first tries, 500: the webhook worker must retry)."""

from __future__ import annotations

import json
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from kiq.webhooks import DELIVERY_HEADER, JOB_HEADER, InvalidSignature, verify
from tests.chaos.history import History

MAX_BODY = 1024 * 1024


class Receiver:
    def __init__(self, host: str, secret: str, history: History, seed: int) -> None:
        self.history, self.secret = history, secret
        self.rng, self.lock = random.Random(seed), threading.Lock()
        self.seen: set[str] = set()
        self.server = ThreadingHTTPServer((host, 0), self._handler())
        self.server.daemon_threads = True

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}/hook"

    def start(self) -> None:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _answer(self, headers: dict[str, str], body: bytes) -> int:
        try:
            verify(self.secret, headers, body)
            valid = True
        except InvalidSignature:
            valid = False
        try:
            state = json.loads(body).get("state")
        except (json.JSONDecodeError, AttributeError):
            state = None
        delivery = headers.get(DELIVERY_HEADER, "")
        with self.lock:
            fail = delivery not in self.seen and self.rng.random() < 0.2
            self.seen.add(delivery)
        self.history.add("webhook", job=headers.get(JOB_HEADER, ""), delivery=delivery, valid=valid, state=state,
                         answered=500 if fail else 200)  # fmt: skip
        return 500 if fail else 200

    def _handler(self) -> Any:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = min(int(self.headers.get("Content-Length") or 0), MAX_BODY)
                body = self.rfile.read(length)
                code = receiver._answer(dict(self.headers.items()), body)
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        return Handler
