"""`KIQ_LOG_FORMAT=json`: one JSON object per line from every kiq process, with the job's ids where known.

Each line has time, level, logger, process (api, worker, webhook-worker, supervisor, exporter), pid and message,
plus job_id, tenant, device, stage and trace_id while a job (or a request) sets them (`context`). Everything
else a process writes to its stdout and stderr (Celery's banner, warnings, C++ framework logs, progress bars)
goes through a pipe and comes out as JSON lines too. Known secrets (API and tenant keys, the webhook secret,
Redis and Sentinel passwords, AWS secrets), presigned URLs' signatures and base64 runs (image bytes) are scrubbed
from every line. Text mode (the default) changes nothing.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from kiq.settings import Settings

FORMATS = ("text", "json")
MAX_MESSAGE = 16 * 1024  # characters of one line's message; the rest is cut
_CONTEXT: ContextVar[dict[str, str]] = ContextVar("kiq_log_context", default={})  # noqa: B039 - never mutated
_DATA_URI = re.compile(r"(data:[\w/+.-]+;base64,)[A-Za-z0-9+/=\s]+")
_BASE64_RUN = re.compile(r"[A-Za-z0-9+/]{200,}={0,2}")
_SIGNATURE = re.compile(r"((?:X-Amz-Signature|Signature|X-Amz-Security-Token)=)[^&\s'\"]+")
_URL_PASSWORD = re.compile(r"(\w+://[^/:@\s]*:)[^@/\s]+@")
_TENANT_KEY = re.compile(r'"key"\s*:\s*"([^"]+)"')
trace_ids: Callable[[], dict[str, str]] | None = None  # set by kiq.tracing when tracing is on


@contextmanager
def context(**fields: str | None) -> Iterator[None]:
    """Add fields (job_id, tenant, device, stage …) to every line logged inside the block."""
    token = _CONTEXT.set({**_CONTEXT.get(), **{k: str(v) for k, v in fields.items() if v}})
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def current() -> dict[str, str]:
    return dict(_CONTEXT.get())


class Redactor:
    def __init__(self, secrets: Iterable[str]) -> None:
        # longest first: a secret containing another is replaced whole
        self.secrets = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        text = _DATA_URI.sub(lambda m: f"{m.group(1)}<{len(m.group(0)) - len(m.group(1))} chars>", text)
        text = _BASE64_RUN.sub(lambda m: f"<{len(m.group(0))} base64 chars>", text)
        text = _SIGNATURE.sub(r"\1***", text)
        text = _URL_PASSWORD.sub(r"\1***@", text)
        return text if len(text) <= MAX_MESSAGE else text[:MAX_MESSAGE] + f"… ({len(text)} chars)"

    @classmethod
    def from_settings(cls, settings: Settings, environ: dict[str, str] | None = None) -> Redactor:
        env = os.environ if environ is None else environ
        secrets = [*settings.api_key_list, settings.webhook_secret, settings.sentinel_password]
        secrets += [settings.broker_server.password or "", settings.results_server.password or ""]
        secrets += [env.get(name, "") for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")]
        secrets += _tenant_keys(settings.api_tenants)
        return cls(secrets)


def _tenant_keys(raw: str) -> list[str]:
    text = raw.strip()
    if text and not text.startswith("{"):
        try:
            text = Path(text).read_text(encoding="utf-8")
        except OSError:
            return []
    return _TENANT_KEY.findall(text)


class _Out:
    """One file descriptor every JSON line goes to, a whole line per write."""

    def __init__(self, fd: int) -> None:
        self.fd, self.lock = fd, threading.Lock()

    def write(self, line: str) -> None:
        data = (line + "\n").encode("utf-8", "replace")
        with self.lock:
            while data:
                data = data[os.write(self.fd, data) :]


class JsonFormatter(logging.Formatter):
    def __init__(self, process: str, redact: Redactor) -> None:
        super().__init__()
        self.process, self.redact = process, redact

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname, "logger": record.name, "process": self.process, "pid": record.process,
            "message": self.redact(record.getMessage()),
        }  # fmt: skip
        entry.update(_CONTEXT.get())
        if trace_ids is not None:
            entry.update(trace_ids())
        if record.exc_info:
            entry["exception"] = self.redact(self.formatException(record.exc_info))
        return json.dumps(entry, ensure_ascii=False)

    def raw(self, line: str, stream: str = "output") -> str:
        """A line some library wrote to stdout/stderr; a JSON object passes as one line, redacted like every other."""
        if line.startswith("{"):
            try:
                parsed = json.loads(line)
            except ValueError:
                parsed = None
            if isinstance(parsed, dict):
                return json.dumps(_redacted(parsed, self.redact), ensure_ascii=False)
        record = logging.LogRecord(stream, logging.INFO, "", 0, line.rstrip("\r"), None, None)
        return self.format(record)


def _redacted(value: Any, redact: Redactor) -> Any:
    """Every string inside a JSON value redacted (its keys too): the value stays JSON whatever the redaction does."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {redact(str(k)): _redacted(v, redact) for k, v in value.items()}
    if isinstance(value, list):
        return [_redacted(v, redact) for v in value]
    return value


class _Handler(logging.Handler):
    def __init__(self, out: _Out, formatter: JsonFormatter) -> None:
        super().__init__()
        self.out = out
        self.setFormatter(formatter)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.out.write(self.format(record))
        except Exception:  # noqa: BLE001 - logging must never raise into the caller
            self.handleError(record)


_installed: list[JsonFormatter] = []


def setup(settings: Settings, process: str) -> bool:
    """Configure JSON logging for this process (once); False in text mode, where nothing changes."""
    if settings.log_format != "json":
        return False
    if _installed:
        return True
    formatter = JsonFormatter(process, Redactor.from_settings(settings))
    out = _Out(_capture_output(formatter))
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(_Handler(out, formatter))
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    _installed.append(formatter)
    return True


def setup_celery(settings: Settings, process: str) -> None:
    """JSON logging for a Celery worker: with a `setup_logging` receiver Celery leaves logging to us."""
    if not setup(settings, process):
        return
    from celery.signals import setup_logging

    setup_logging.connect(_keep_ours, weak=False)


def _keep_ours(**_: Any) -> None:
    """Celery's worker start would configure its own handlers; ours are already in place."""


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """uvicorn.run arguments: in JSON mode uvicorn's loggers go to ours instead of its own config."""
    return {"log_config": None} if settings.log_format == "json" else {}


def _capture_output(formatter: JsonFormatter) -> int:
    """Send fds 1 and 2 through a pipe whose lines become JSON lines; return a copy of the real stderr."""
    sys.stdout.flush()
    sys.stderr.flush()
    real = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 1)
    os.dup2(write_end, 2)
    os.close(write_end)
    out = _Out(real)
    pump = threading.Thread(target=_pump, args=(read_end, out, formatter), name="kiq-log-pump", daemon=True)
    pump.start()
    import atexit

    atexit.register(_drain, real, pump)
    return real


def _pump(fd: int, out: _Out, formatter: JsonFormatter) -> None:
    pending = b""
    while chunk := os.read(fd, 65536):
        pending += chunk
        *lines, pending = pending.split(b"\n")
        if len(pending) > MAX_MESSAGE:  # a runaway line without newlines: flush it in pieces
            lines, pending = [*lines, pending], b""
        for line in lines:
            if line.strip():
                out.write(formatter.raw(line.decode("utf-8", "replace")))
    if pending.strip():
        out.write(formatter.raw(pending.decode("utf-8", "replace")))


def _drain(real: int, pump: threading.Thread) -> None:
    """At exit: close our ends of the pipe so the pump reads its last lines and stops."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(real, 1)
    os.dup2(real, 2)
    pump.join(timeout=2)
