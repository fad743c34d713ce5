"""The stack test's client: from the host, as another app would, against the compose stack's published ports.

Run by scripts/stack-test after `compose up` (not collected by pytest). Exits non-zero on the first failed check.
"""

from __future__ import annotations

import argparse
import http.server
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any
from urllib.parse import urlsplit

import httpx
from PIL import Image

from kiq.webhooks import verify

TERMINAL = {"SUCCESS", "FAILURE", "REVOKED", "EXPIRED"}


def tiny_job(**extra: Any) -> dict[str, Any]:
    job = {"inputs": [{"text": "a cat", "weight": 1.0}], "height": 64, "width": 64, "prior_steps": 3,
           "decoder_steps": 4, "seed": 7}  # fmt: skip
    return {**job, **extra}


class Receiver(http.server.ThreadingHTTPServer):
    """Webhooks on a host port; each body kept with whether its signature verified."""

    def __init__(self, port: int, secret: str) -> None:
        self.secret, self.hooks, self.lock = secret, [], threading.Lock()
        super().__init__(("0.0.0.0", port), _Hook)  # the containers reach the host over the bridge
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def for_job(self, job_id: str) -> list[dict[str, Any]]:
        with self.lock:
            return [h for h in self.hooks if h["body"].get("id") == job_id]


class _Hook(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        server: Receiver = self.server  # type: ignore[assignment]
        verify(server.secret, dict(self.headers), body)  # raises (500 to the sender) on a bad signature
        with server.lock:
            server.hooks.append({"body": json.loads(body), "at": time.monotonic()})
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def check(ok: bool, what: str) -> None:
    print(f"stack-test: {'ok  ' if ok else 'FAIL'} {what}", flush=True)
    if not ok:
        sys.exit(1)


def wait_state(api: httpx.Client, job_id: str, timeout: float, states: set[str] = TERMINAL) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = api.get(f"/v1/jobs/{job_id}").json()
        if status["state"] in states:
            return status
        time.sleep(0.5)
    raise SystemExit(f"stack-test: FAIL job {job_id} not in {states} after {timeout:g} s")


def submit(api: httpx.Client, job: dict[str, Any]) -> str:
    answer = api.post("/v1/jobs", json=job)
    check(answer.status_code == 202, f"submit: {answer.status_code} {answer.text[:300]}")
    return answer.json()["id"]


def follow_events(api: httpx.Client, job_id: str, timeout: float) -> list[str]:
    states = []
    with api.stream("GET", f"/v1/jobs/{job_id}/events", timeout=timeout) as stream:
        for line in stream.iter_lines():
            if line.startswith("data:"):
                state = json.loads(line[5:])["state"]  # each data is the status JSON
                if not states or states[-1] != state:
                    states.append(state)
                if state in TERMINAL:
                    break
    return states


def download(api: httpx.Client, path: str, s3_port: int) -> Image.Image:
    redirect = api.get(path)
    check(redirect.status_code == 307, f"GET {path} -> 307 to the presigned URL")
    # The URL names the S3 endpoint as the containers know it (minio:9000); the host reaches the same server on
    # its published port, and sends the signed Host header unchanged.
    url = urlsplit(redirect.headers["location"])
    got = httpx.get(f"http://127.0.0.1:{s3_port}{url.path}?{url.query}", headers={"Host": url.netloc})
    check(got.status_code == 200, f"presigned download {got.status_code}")
    return Image.open(io.BytesIO(got.content))


def crash(engine: str, container: str) -> None:
    """SIGKILL the container's main process from the host, as the OOM killer would: to the engine this is a crash,
    and the restart policy applies (`kill` through the engine counts as stopped by the user: no restart)."""
    pid = int(subprocess.check_output([engine, "inspect", "-f", "{{.State.Pid}}", container], text=True))
    os.kill(pid, signal.SIGKILL)
    print(f"stack-test: SIGKILLed {container}'s main process (pid {pid}) mid-job", flush=True)


def main() -> int:
    args = parse_args()
    api = httpx.Client(base_url=args.api, headers={"Authorization": f"Bearer {args.key}"}, timeout=30)
    check(httpx.get(f"{args.api}/v1/jobs").status_code == 401, "no key -> 401")
    receiver = Receiver(args.hook_port, args.secret)
    hook_url = f"http://{args.hook_host}:{args.hook_port}/hook"

    started = time.monotonic()
    first = submit(api, tiny_job(webhook_url=hook_url))
    others = [submit(api, tiny_job(seed=s)) for s in (1, 2)]
    states = follow_events(api, first, args.job_timeout)
    check(states[-1] == "SUCCESS", f"event stream of {first}: {' -> '.join(states)}")
    for job_id in others:
        check(wait_state(api, job_id, args.job_timeout)["state"] == "SUCCESS", f"job {job_id} SUCCESS")
    print(f"stack-test: first jobs done in {time.monotonic() - started:.1f} s", flush=True)
    deadline = time.monotonic() + 60
    while not receiver.for_job(first) and time.monotonic() < deadline:
        time.sleep(0.5)
    hooks = receiver.for_job(first)
    check(len(hooks) == 1 and hooks[0]["body"]["state"] == "SUCCESS", f"one signed webhook for {first}")
    image = download(api, f"/v1/jobs/{first}/images/0", args.s3_port)
    check(image.size == (64, 64), f"image through the 307: {image.format} {image.size}")

    killed = submit(api, tiny_job(decoder_steps=args.kill_steps, webhook_url=hook_url))
    wait_state(api, killed, args.job_timeout, {"STARTED", "PROGRESS", *TERMINAL})
    check(api.get(f"/v1/jobs/{killed}").json()["state"] not in TERMINAL, f"job {killed} running when killed")
    crash(args.engine, args.worker_container)
    done = wait_state(api, killed, args.job_timeout + args.restart_timeout)
    check(done["state"] == "SUCCESS", f"killed job {killed} finished after the restart: {done['state']}")
    time.sleep(5)  # a second (duplicate) finish would send a second webhook
    check(len(receiver.for_job(killed)) == 1, f"job {killed} finished once (webhooks: {len(receiver.for_job(killed))})")

    sweep = tiny_job(prior_steps=2, decoder_steps=2, sweep={"to": [0.0, 1.0], "frames": 3},
                     inputs=[{"text": "a cat", "weight": 1.0}, {"text": "a dog", "weight": 0.0}],
                     animation={"format": "gif", "fps": 4})  # fmt: skip
    sweep_id = submit(api, sweep)
    status = wait_state(api, sweep_id, args.job_timeout)
    check(status["state"] == "SUCCESS" and len(status["result"]["images"]) == 3, f"sweep {sweep_id}: 3 frames")
    gif = download(api, f"/v1/jobs/{sweep_id}/animation", args.s3_port)
    check((gif.format, gif.n_frames) == ("GIF", 3), "the sweep's GIF through the 307")
    receiver.shutdown()
    return 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--api", default="http://127.0.0.1:8000")
    parser.add_argument("--key", required=True)
    parser.add_argument("--secret", required=True)
    parser.add_argument("--hook-host", required=True, help="the host's address as the containers see it")
    parser.add_argument("--hook-port", type=int, default=8765)
    parser.add_argument("--s3-port", type=int, default=9000)
    parser.add_argument("--worker-container", required=True)
    parser.add_argument("--engine", default="podman", help="podman or docker: to find the container's pid")
    parser.add_argument("--kill-steps", type=int, default=40)  # long enough to be mid-job when killed
    parser.add_argument("--job-timeout", type=float, default=300)
    parser.add_argument("--restart-timeout", type=float, default=300)
    return parser.parse_args()


if __name__ == "__main__":
    sys.exit(main())
