"""`kiq`: submit, status, wait, download, cancel; plus `worker`, `make-tiny-models` and `demo`, which load the
worker side lazily so that the producer commands never import MindSpore.

Exit codes: 0 success, 1 the job failed or was cancelled, 2 bad input or settings (or an unconfirmed purge),
3 wait timed out, 4 unknown job id (or tenant, or worker). `purge` and `fleet drain`: producer/admin.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from typing import Any

from kiq.errors import (
    JobInvalid,
    KiqError,
    NotConfirmed,
    SettingsError,
    UnknownJob,
    UnknownTenant,
    UnknownWorker,
    WaitTimeout,
)
from kiq.settings import Settings
from kiq.status import JobStatus
from kiq.version import __version__
from producer import admin

EXIT_FAILED, EXIT_INVALID, EXIT_TIMEOUT, EXIT_UNKNOWN = 1, 2, 3, 4
EXPORTER_PORT = 9808
# A command whose optional dependencies are missing names the extra that brings them (top-level module -> extra).
EXTRAS = {
    **dict.fromkeys(("fastapi", "uvicorn", "starlette", "multipart", "python_multipart"), "api"),
    **dict.fromkeys(("mindspore", "mindone", "transformers", "numpy", "PIL", "prometheus_client"), "worker"),
    **dict.fromkeys(("torch", "diffusers"), "cuda"),
}


def main(argv: Sequence[str] | None = None) -> int:
    args, extra = build_parser().parse_known_args(argv)
    if extra and args.command not in ("worker", "webhook-worker"):
        build_parser().error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.handler(args, extra) or 0)
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").partition(".")[0]
        if missing not in EXTRAS:
            raise
        wanted = EXTRAS[missing]
        hint = " (or 'kiq[cuda]' for the diffusers backend)" if wanted == "worker" else ""
        return _fail(f"`kiq {args.command}` needs the {wanted!r} extra (no module {missing!r}): "
                     f"pip install 'kiq[{wanted}]'{hint}", EXIT_INVALID)  # fmt: skip
    except (JobInvalid, SettingsError, NotConfirmed) as exc:
        return _fail(str(exc), EXIT_INVALID)
    except (UnknownJob, UnknownTenant, UnknownWorker) as exc:
        return _fail(str(exc), EXIT_UNKNOWN)
    except WaitTimeout as exc:
        return _fail(str(exc), EXIT_TIMEOUT)
    except KiqError as exc:
        return _fail(str(exc), EXIT_FAILED)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kiq", description="Kandinsky 2.2 interpolation queue")
    parser.add_argument("--version", action="version", version=f"kiq {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    submit = sub.add_parser("submit", help="validate and enqueue a job; prints its id")
    submit.add_argument("job", help="job JSON file, or - for stdin")
    submit.add_argument("--wait", action="store_true", help="wait for the job and print its final status")
    submit.add_argument("--timeout", type=float, default=None, help="seconds to wait (with --wait)")
    submit.set_defaults(handler=cmd_submit)
    for name, handler in (("status", cmd_status), ("cancel", cmd_cancel)):
        p = sub.add_parser(name, help=f"{name} a job by id")
        p.add_argument("id")
        p.set_defaults(handler=handler)
    wait = sub.add_parser("wait", help="wait for a job to end; prints its final status")
    wait.add_argument("id")
    wait.add_argument("--timeout", type=float, default=None)
    wait.set_defaults(handler=cmd_wait)
    download = sub.add_parser("download", help="wait for a job, then save its images (a sweep's frames and "
                              "animation) in DIR; prints the paths")  # fmt: skip
    download.add_argument("id")
    download.add_argument("dir", nargs="?", default=".", help="where to save them (default: here)")
    download.add_argument("--timeout", type=float, default=None)
    download.set_defaults(handler=cmd_download)
    worker = sub.add_parser("worker", help="run a worker on KIQ_DEVICE_TARGET/KIQ_DEVICE_ID (extra args go to celery)")
    worker.add_argument("--devices", help="supervise one worker per device: 0-7, 0,2,5 …")
    worker.set_defaults(handler=cmd_worker)
    fleet = sub.add_parser("fleet", help="list live workers: device, current job, jobs done and failed, uptime")
    fleet.add_argument("--json", action="store_true", help="print JSON instead of a table")
    fleet.set_defaults(handler=cmd_fleet)
    admin.add_commands(sub, fleet)
    api = sub.add_parser("api", help="serve the HTTP API and the playground on KIQ_API_HOST:KIQ_API_PORT")
    api.add_argument("--host", help="listen on this address (overrides KIQ_API_HOST)")
    api.add_argument("--port", type=int, help="listen on this port (overrides KIQ_API_PORT)")
    api.set_defaults(handler=cmd_api)
    exporter = sub.add_parser("exporter", help="serve the queue metrics (as the API's /metrics) for Prometheus")
    exporter.add_argument("--host", default="0.0.0.0", help="listen on this address (default: all)")
    exporter.add_argument(
        "--port", type=int, help=f"listen on this port (default: KIQ_METRICS_PORT, else {EXPORTER_PORT})"
    )
    exporter.set_defaults(handler=cmd_exporter)
    hooks = sub.add_parser("webhook-worker", help="deliver webhooks (a light Celery worker, threads pool)")
    hooks.set_defaults(handler=cmd_webhook_worker)
    tiny = sub.add_parser("make-tiny-models", help="write random-weight pipelines to DIR/prior and DIR/decoder")
    tiny.add_argument("dir")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(handler=cmd_make_tiny_models)
    demo = sub.add_parser("demo", help="bring up what is missing, run the example job, save the image")
    demo.add_argument("--out", default=None, help="where to save the image (kiq-demo.png; kiq-demo.gif with --sweep)")
    demo.add_argument("--sweep", action="store_true", help="a morph over the three conditions, saved as a GIF")
    demo.set_defaults(handler=cmd_demo)
    return parser


def _client() -> Any:
    from producer.client import Client

    return Client(Settings.from_env())


def cmd_submit(args: argparse.Namespace, _: list[str]) -> int:
    job = read_job(args.job)
    client = _client()
    job_id = client.submit(job)
    print(job_id, flush=True)
    return wait_and_print(client, job_id, args.timeout) if args.wait else 0


def cmd_status(args: argparse.Namespace, _: list[str]) -> int:
    print_status(_client().status(args.id))
    return 0


def cmd_wait(args: argparse.Namespace, _: list[str]) -> int:
    return wait_and_print(_client(), args.id, args.timeout)


def cmd_download(args: argparse.Namespace, _: list[str]) -> int:
    from producer.progress import ProgressBar

    bar = ProgressBar()
    try:
        final, paths = _client().download(args.id, args.dir, timeout=args.timeout, on_progress=bar)
    finally:
        bar.close()
    for path in paths:
        print(path, flush=True)
    if final.state != "SUCCESS":
        print_status(final)
        return EXIT_FAILED
    return 0


def cmd_cancel(args: argparse.Namespace, _: list[str]) -> int:
    print_status(_client().cancel(args.id))
    return 0


def cmd_worker(args: argparse.Namespace, extra: list[str]) -> int:
    if args.devices:
        from worker.supervisor import supervise

        return supervise(Settings.from_env(), args.devices, extra)
    from worker.main import run_worker

    run_worker(extra)
    return 0


def cmd_api(args: argparse.Namespace, _: list[str]) -> int:
    from kiq import logs, tracing
    from producer.api import run_api

    settings = Settings.from_env()
    logs.setup(settings, "api")
    tracing.setup(settings, "api")
    overrides = {k: v for k, v in (("api_host", args.host), ("api_port", args.port)) if v is not None}
    run_api(dataclasses.replace(settings, **overrides))
    return 0


def cmd_exporter(args: argparse.Namespace, _: list[str]) -> int:
    from kiq import logs
    from producer.metrics import run_exporter
    from producer.tenants import Tenants

    settings = Settings.from_env()
    logs.setup(settings, "exporter")
    queues = {q for t in Tenants.from_settings(settings).by_key.values() for q in t.queues}
    run_exporter(settings, args.port or settings.metrics_port or EXPORTER_PORT, args.host, queues)
    return 0


def cmd_webhook_worker(_: argparse.Namespace, extra: list[str]) -> int:
    from producer.webhooks import run_webhook_worker

    run_webhook_worker(Settings.from_env(), extra)
    return 0


def cmd_fleet(args: argparse.Namespace, _: list[str]) -> int:
    from producer.fleet import render_fleet

    workers = _client().fleet()
    print(json.dumps(workers, indent=2) if args.json else render_fleet(workers))
    return 0


def cmd_make_tiny_models(args: argparse.Namespace, _: list[str]) -> int:
    from worker.pipelines.tiny import make_tiny_models

    prior, decoder = make_tiny_models(args.dir, seed=args.seed)
    print(f"{prior}\n{decoder}")
    return 0


def cmd_demo(args: argparse.Namespace, _: list[str]) -> int:
    from producer.demo import run_demo

    return run_demo(args.out, sweep=args.sweep)


def read_job(path: str) -> Any:
    try:
        text = sys.stdin.read() if path == "-" else open(path, encoding="utf-8").read()
    except OSError as exc:
        raise JobInvalid(f"cannot read job file: {exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise JobInvalid(f"job is not valid JSON: {exc}") from None


def wait_and_print(client: Any, job_id: str, timeout: float | None) -> int:
    from producer.progress import ProgressBar

    bar = ProgressBar()
    try:
        final = client.wait(job_id, timeout=timeout, on_progress=bar)
    finally:
        bar.close()
    print_status(final)
    return 0 if final.state == "SUCCESS" else EXIT_FAILED


def print_status(status: JobStatus) -> None:
    print(status.model_dump_json(indent=2, exclude_none=True), flush=True)


def _fail(message: str, code: int) -> int:
    print(f"kiq: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
