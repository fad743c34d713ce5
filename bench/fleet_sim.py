"""How many devices can one Redis serve? A fleet simulation on one private Redis on loopback.

Simulated devices run kiq's real worker: a Celery app from `worker.app.create_app` with kiq's task, delivery
guard, records, leases and fleet heartbeat, and a Runner whose pipelines only sleep per prior and decoder step
(the step times of an Ascend 910B-class device, below) and return tiny images; inputs are read from the
in-memory storage, so no S3 is involved. Producers submit the seed's job with `Client.submit` and every job is
followed by a client polling `Client.status` at `Client.wait`'s interval, all against the same Redis.

How a simulated device maps to load. A real device is one solo-pool worker process. Here a worker process runs
Celery's threads pool with T threads, each thread one device running jobs one at a time, so every per-job Redis
call (message, STARTED, progress, cancel checks, delivery counters, result, task events, polls) is a real
device's. What a real worker does once per process is made per device: each process runs T fleet `Heartbeat`s
and T lease keepers (`kiq.leases.LeaseKeeper`, each renewing its own share of the held messages), so the
fleet heartbeats and lease renewals are those of T processes. Celery's own per-process timers (the worker's
heartbeat event every 2 s, the unacked sweep, BRPOP while idle, gossip) run once per simulated process: they
live in the consumer's event loop, which a busy solo-pool device does not run while its job runs, so a fully
loaded real fleet sends them only between jobs. They are measured with the fleet idle (`idle` row) and
reported apart.

    .venv/bin/python bench/fleet_sim.py [--devices 16 64 128 256] [--window-s 30]   # about 4 minutes here

Step times (`--prior-step-s`, `--decoder-step-s`) default to kiq's own assumption for a 768x768 step on the
device (KIQ_PRIOR_STEP_S 0.05 s, KIQ_DECODER_STEP_S 0.15 s). Larger values (`--slow K` multiplies both, and
the poll interval) run more simulated devices for the same Redis load; the table then converts to devices at
the stated step times.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SEED_JOB: dict[str, Any] = {
    "inputs": [
        {"text": "a cat", "weight": 0.3},
        {"image": "s3://kiq/inputs/sim/1.png", "weight": 0.3},
        {"image": "s3://kiq/inputs/sim/2.png", "weight": 0.4},
    ],
    "height": 768, "width": 768, "prior_steps": 25, "decoder_steps": 100,
}  # fmt: skip
SAMPLE_EVERY = 25  # one job in this many is followed closely (every 10 ms) to time progress-to-status delay
CLOSE_POLL_S = 0.01


# --- the simulated device ----------------------------------------------------------------------------------


class SleepPipelines:
    """The Pipelines interface with no model: each step sleeps, then reports; images are 8x8."""

    def __init__(self, prior_step_s: float, decoder_step_s: float, steplog: StepLog) -> None:
        self.prior_step_s, self.decoder_step_s, self.steplog = prior_step_s, decoder_step_s, steplog

    def interpolate(self, conditions: Sequence[Any], weights: Sequence[float], params: Any, generator: Any,
                    on_step: Any = None) -> tuple[Any, Any]:  # fmt: skip
        for step in range(1, params.steps + 1):
            time.sleep(self.prior_step_s)
            if on_step is not None:
                on_step(step, params.steps)
        return None, None

    def decode(self, embeds: Any, negative_embeds: Any, params: Any, generator: Any, on_step: Any) -> list[Any]:
        from PIL import Image

        for step in range(1, params.steps + 1):
            time.sleep(self.decoder_step_s)
            self.steplog.step(step)
            on_step(step, params.steps)
        return [Image.new("RGB", (8, 8), (1, 2, 3))]

    def decode_batch(self, rows: Any, params: Any, on_step: Any) -> dict[int, Any]:
        raise NotImplementedError("the simulation runs decoder batch 1")

    def caches(self) -> dict[str, Any]:
        return {}

    def memory_bytes(self) -> float:
        return float("nan")


class StepLog:
    """When each decoder step of a sampled job happened (its thread knows its job id from task_prerun)."""

    def __init__(self, path: Path) -> None:
        self.local, self.lock, self.out = threading.local(), threading.Lock(), path.open("a")

    def job(self, job_id: str) -> None:
        self.local.job_id = job_id

    def step(self, step: int) -> None:
        job_id = getattr(self.local, "job_id", "")
        if job_id.startswith("sample-"):
            with self.lock:
                self.out.write(f"{job_id} {step} {time.time():.6f}\n")
                self.out.flush()


def png(n: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (n, n, n)).save(buffer, format="PNG")
    return buffer.getvalue()


def worker_process(index: int, threads: int, env: dict[str, str], prior_s: float, decoder_s: float,
                   steplog_path: str) -> None:  # fmt: skip
    os.environ.update(env)
    from celery import bootsteps
    from celery.signals import task_prerun, worker_init, worker_shutdown

    from kiq import leases
    from kiq.settings import Settings
    from worker.app import create_app
    from worker.fleet import Heartbeat
    from worker.runner import Runner
    from worker.storage import MemoryStorage

    settings = Settings.from_env()
    storage = MemoryStorage(bucket=settings.s3_bucket, readable=tuple(settings.s3_read_prefixes))
    for n in (1, 2):
        storage.objects[(settings.s3_bucket, f"inputs/sim/{n}.png")] = (png(n), "image/png", {})
    steplog = StepLog(Path(steplog_path))
    runner = Runner(settings, storage=storage, pipelines=SleepPipelines(prior_s, decoder_s, steplog))
    app = create_app(settings, runner)
    # T devices in one process: each pool thread runs one job at a time, prefetching one (as solo does).
    app.conf.update(worker_pool="threads", worker_concurrency=threads, worker_prefetch_multiplier=1)
    hostname = f"sim{index}@{socket.gethostname()}"
    extra: list[Any] = []

    def more_heartbeats(**_: Any) -> None:  # the app's own Heartbeat is device 0 of this process
        for n in range(1, threads):
            beat = Heartbeat(app.backend.client, f"{hostname}-d{n}", f"sim:{n}", settings.consumed_queues)
            beat.start()
            extra.append(beat)

    class MoreLeases(bootsteps.StartStopStep):
        """Leases renewed per device: T-1 more keepers, each renewing its share of what the process holds."""

        requires = ("celery.worker.consumer.tasks:Tasks",)

        def start(self, c: Any) -> None:
            interval = leases.renew_interval_s(settings.visibility_timeout_s)
            for n in range(1, threads):
                share = lambda n=n: leases.held_by_consumer(c, settings.visibility_timeout_s)[n::threads]  # noqa: E731
                keeper = leases.LeaseKeeper(leases.broker_redis(settings), share, interval)
                time.sleep(random.random() * interval / threads)  # real devices do not renew in step
                keeper.start()
                extra.append(keeper)

    app.steps["consumer"].add(MoreLeases)
    worker_init.connect(more_heartbeats, weak=False)
    worker_shutdown.connect(lambda **_: [e.stop() for e in extra], weak=False)
    task_prerun.connect(lambda task_id=None, **_: steplog.job(task_id or ""), weak=False)
    from worker.main import WORKER_FLAGS

    app.worker_main(["worker", f"--hostname={hostname}", "--loglevel=WARNING", *WORKER_FLAGS])  # as `kiq worker`


# --- producers and pollers ---------------------------------------------------------------------------------


def client_process(index: int, env: dict[str, str], rate: float, run_s: float, window: tuple[float, float],
                   poll_s: float, out: Any) -> None:  # fmt: skip
    """Submit the seed's job open-loop at `rate` jobs/s; follow every job with a poll each `poll_s` (one in
    SAMPLE_EVERY every CLOSE_POLL_S); report submit latencies, completions and sampled first sightings."""
    os.environ.update(env)
    from kiq.settings import Settings
    from producer.client import Client

    client = Client(Settings.from_env())
    lock = threading.Lock()
    followed: dict[str, float] = {}  # job id -> next poll time
    latencies: list[float] = []
    done: list[float] = []
    seen: dict[str, dict[int, float]] = {}  # sampled job -> decoder step -> first time a status showed it
    stop_at = time.time() + run_s

    def submit_loop() -> None:
        n, start = 0, time.time()
        while time.time() < stop_at:
            due = start + n / rate
            time.sleep(max(0.0, due - time.time()))
            sample = n % SAMPLE_EVERY == 0
            job_id = f"{'sample' if sample else 'job'}-{index}-{n}-{uuid.uuid4().hex[:8]}"
            t0 = time.perf_counter()
            client.submit({**SEED_JOB, "seed": n}, job_id=job_id)
            took = time.perf_counter() - t0
            if window[0] <= time.time() <= window[1]:
                latencies.append(took)
            with lock:
                followed[job_id] = time.time() + (CLOSE_POLL_S if sample else poll_s)
            n += 1

    def poll_loop() -> None:
        while time.time() < stop_at:
            now = time.time()
            with lock:  # claim the due jobs, so the other poll thread does not poll (and count) them too
                due = [j for j, t in followed.items() if t <= now]
                followed.update(dict.fromkeys(due, float("inf")))
            for job_id in due:
                status = client.status(job_id)
                when = time.time()
                if status.done:
                    if window[0] <= when <= window[1]:
                        done.append(when)
                    with lock:
                        followed.pop(job_id, None)
                    continue
                sample = job_id.startswith("sample-")
                if sample and status.progress and status.progress.stage == "decoder":
                    seen.setdefault(job_id, {}).setdefault(status.progress.step, when)
                with lock:
                    followed[job_id] = when + (CLOSE_POLL_S if sample else poll_s)
            time.sleep(0.002)

    threads = [threading.Thread(target=submit_loop), *(threading.Thread(target=poll_loop) for _ in range(2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.put({"latencies": latencies, "done": len(done), "seen": seen})


# --- Redis and the measurement -----------------------------------------------------------------------------


class PrivateRedis:
    """A redis-server of our own, so its INFO figures are the simulation's alone."""

    def __init__(self, scratch: Path) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.proc = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
             "--dir", str(scratch)], stdout=subprocess.DEVNULL)  # fmt: skip
        import redis

        self.client = redis.Redis(port=self.port)
        for _ in range(100):
            try:
                self.client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)

    def snapshot(self) -> dict[str, Any]:
        info = self.client.info("all")
        stats = {k[len("cmdstat_") :]: v for k, v in info.items() if k.startswith("cmdstat_")}
        return {"t": time.time(), "cpu": info["used_cpu_user"] + info["used_cpu_sys"],
                "commands": info["total_commands_processed"], "cmd": stats}  # fmt: skip

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def delta(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    seconds = b["t"] - a["t"]
    per_cmd = {}
    for name, now in b["cmd"].items():
        before = a["cmd"].get(name, {"calls": 0, "usec": 0})
        calls = now["calls"] - before["calls"]
        if calls:
            per_cmd[name] = {"calls_s": calls / seconds, "usec_s": (now["usec"] - before["usec"]) / seconds}
    return {"seconds": seconds, "cpu_pct": 100 * (b["cpu"] - a["cpu"]) / seconds,
            "ops_s": (b["commands"] - a["commands"]) / seconds, "cmd": per_cmd}  # fmt: skip


def progress_delays(steplog_dir: Path, seen: dict[str, dict[int, float]]) -> list[float]:
    """For each decoder step of a sampled job: first time a status showed that step or a later one, minus the
    time the step happened. Coalesced steps count until a later one is written."""
    happened: dict[str, dict[int, float]] = {}
    for path in steplog_dir.glob("steps-*.log"):
        for line in path.read_text().splitlines():
            job_id, step, when = line.split()
            happened.setdefault(job_id, {})[int(step)] = float(when)
    delays = []
    for job_id, steps in seen.items():
        shown = sorted(steps.items())
        for step, when in happened.get(job_id, {}).items():
            later = [t for s, t in shown if s >= step]
            if later and step < max(s for s, _ in shown):  # the job's last steps may outlive the run
                delays.append(min(later) - when)
    return delays


def run_size(args: argparse.Namespace, devices: int, redis: PrivateRedis, scratch: Path) -> dict[str, Any]:
    redis_url = f"redis://127.0.0.1:{redis.port}/0"
    job_s = SEED_JOB["prior_steps"] * args.prior_step_s + SEED_JOB["decoder_steps"] * args.decoder_step_s
    job_s *= args.slow
    processes = min(args.processes, devices)
    threads = [devices // processes + (1 if n < devices % processes else 0) for n in range(processes)]
    env = {**os.environ, "KIQ_BROKER_URL": redis_url, "KIQ_QUEUE": f"sim-{uuid.uuid4().hex[:6]}",
           "KIQ_DEVICE_TARGET": "CPU", **dict(kv.split("=", 1) for kv in args.env)}  # fmt: skip
    steplogs = scratch / f"steps-{devices}"
    steplogs.mkdir()
    ctx = mp.get_context("spawn")
    workers = [ctx.Process(target=worker_process, args=(n, t, env, args.prior_step_s * args.slow,
                                                        args.decoder_step_s * args.slow,
                                                        str(steplogs / f"steps-{n}.log")))
               for n, t in enumerate(threads)]  # fmt: skip
    for w in workers:
        w.start()
    time.sleep(args.startup_s)
    idle = delta(redis.snapshot(), (time.sleep(args.idle_s), redis.snapshot())[1]) if args.idle_s else None
    ramp = job_s + 5  # open-loop arrivals: after one job time every device is busy, starts spread evenly
    start = time.time()
    window = (start + ramp, start + ramp + args.window_s)
    rate = args.load * devices / job_s
    queue = ctx.Queue()
    clients = [ctx.Process(target=client_process, args=(n, env, rate / args.clients, ramp + args.window_s,
                                                        window, args.poll_s * args.slow, queue))
               for n in range(args.clients)]  # fmt: skip
    for c in clients:
        c.start()
    time.sleep(max(0.0, window[0] - time.time()))
    before = redis.snapshot()
    time.sleep(max(0.0, window[1] - time.time()))
    during = delta(before, redis.snapshot())
    load = os.getloadavg()[0]
    results = [queue.get(timeout=120) for _ in clients]
    for c in clients:
        c.join(30)
    for w in workers:
        os.kill(w.pid, signal.SIGKILL)  # the simulation is over: no warm shutdown of jobs that only sleep
        w.join(10)
    latencies = sorted(x for r in results for x in r["latencies"])
    seen = {k: v for r in results for k, v in r["seen"].items()}
    delays = sorted(progress_delays(steplogs, seen))
    finished = sum(r["done"] for r in results)
    return {"devices": devices, "threads": threads, "job_s": job_s, "idle": idle, "during": during,
            "submit_ms": quantiles(latencies), "delay_ms": quantiles(delays),
            "jobs_s": finished / args.window_s, "ideal_jobs_s": devices / job_s, "load": load}  # fmt: skip


def quantiles(values: list[float]) -> dict[str, float]:
    if len(values) < 2:
        return {"p50": float("nan"), "p99": float("nan"), "n": len(values)}
    q = statistics.quantiles(values, n=100)
    return {"p50": 1000 * q[49], "p99": 1000 * q[98], "n": len(values)}


# --- what the traffic is made of ---------------------------------------------------------------------------

FAMILIES = {  # Redis commands by the kiq/Celery path that issues them in this simulation
    "progress, STARTED and result writes (GET, MULTI, SETEX, PUBLISH, EXEC)": ("get", "multi", "setex", "exec"),
    "cancel checks and delivery counters (EXISTS, HINCRBY, HGETALL, EXPIRE, DEL)": (
        "exists",
        "hincrby",
        "hgetall",
        "expire",
        "del",
    ),
    "fleet heartbeats (HSET)": ("hset",),
    "leases and unacked index (ZADD, ZREM, ZRANGE BYSCORE, HSET unacked)": ("zadd", "zrem", "zrange"),
    "events and result publishes (PUBLISH)": ("publish",),
    "broker (LPUSH, BRPOP, SET, pipelines)": ("lpush", "brpop", "set"),
}


def print_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(
        f"\nseed job: 25 prior steps x {args.prior_step_s * args.slow:g} s + 100 decoder steps x "
        f"{args.decoder_step_s * args.slow:g} s = {rows[0]['job_s']:.1f} s; one client polls each job every "
        f"{args.poll_s * args.slow:g} s; arrivals {args.load:g} x ideal; settings {' '.join(args.env) or 'defaults'}"
    )
    device_word = "devices" if args.slow == 1 else f"sim devices (= /{args.slow:g} at the stated step)"
    print(
        f"| {device_word} | Redis ops/s | Redis CPU % | ops/s per device | submit p50 / p99 ms | "
        f"progress→status p50 / p99 ms | jobs/s (ideal) | vs ideal | load avg |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        d, s, p = r["during"], r["submit_ms"], r["delay_ms"]
        print(
            f"| {r['devices']} | {d['ops_s']:.0f} | {d['cpu_pct']:.1f} | {d['ops_s'] / r['devices']:.1f} | "
            f"{s['p50']:.1f} / {s['p99']:.1f} | {p['p50']:.0f} / {p['p99']:.0f} | "
            f"{r['jobs_s']:.2f} ({r['ideal_jobs_s']:.2f}) | {r['jobs_s'] / r['ideal_jobs_s']:.2f} | "
            f"{r['load']:.1f} |"
        )
    idle = rows[0]["idle"]
    if idle:
        print(
            f"idle fleet of {rows[0]['devices']} devices in {len(rows[0]['threads'])} processes: "
            f"{idle['ops_s']:.0f} ops/s, Redis CPU {idle['cpu_pct']:.1f} %"
        )
    big = rows[-1]["during"]
    print(f"\nRedis commands at {rows[-1]['devices']} devices, per second (share of calls / of command time):")
    total_calls = sum(c["calls_s"] for c in big["cmd"].values())
    total_usec = sum(c["usec_s"] for c in big["cmd"].values()) or 1
    for name, c in sorted(big["cmd"].items(), key=lambda kv: -kv[1]["calls_s"]):
        print(
            f"  {name:18s} {c['calls_s']:9.1f}/s  {100 * c['calls_s'] / total_calls:5.1f} %  "
            f"{100 * c['usec_s'] / total_usec:5.1f} %"
        )
    per_device = [(r["during"]["cpu_pct"] / r["devices"], r["devices"]) for r in rows if r["devices"] >= 32]
    if per_device:
        cpu_per = max(c for c, _ in per_device)
        print(
            f"\nRedis CPU per device (largest of the sizes ≥ 32): {cpu_per:.3f} % → 80 % at about "
            f"{80 / cpu_per / args.slow:.0f} devices at the stated step times (linear extrapolation)"
        )
    knee = [r["devices"] for r in rows if r["submit_ms"]["p99"] > 25 or r["during"]["cpu_pct"] > 80]
    print("knee reached in this sweep at", knee[0] if knee else "none of the sizes", "devices")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[16, 64, 128, 256])  # ~4 min here
    parser.add_argument("--processes", type=int, default=6, help="worker processes (threads = devices / this)")
    parser.add_argument("--clients", type=int, default=2, help="producer + poller processes")
    parser.add_argument("--prior-step-s", type=float, default=0.05)
    parser.add_argument("--decoder-step-s", type=float, default=0.15)
    parser.add_argument("--slow", type=float, default=1.0, help="multiply step times and the poll interval")
    parser.add_argument("--poll-s", type=float, default=0.2, help="each job's client polls this often")
    parser.add_argument("--load", type=float, default=1.05, help="arrival rate as a multiple of the ideal")
    parser.add_argument("--window-s", type=float, default=30.0)
    parser.add_argument("--startup-s", type=float, default=8.0)
    parser.add_argument("--idle-s", type=float, default=0.0, help="measure the idle fleet first, per size")
    parser.add_argument("--env", nargs="*", default=[], help="KIQ_X=value settings for every process")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server is needed (apt-get install redis-server)")
    scratch = Path(tempfile.mkdtemp(prefix="kiq-fleet-"))
    redis = PrivateRedis(scratch)
    rows = []
    started = time.time()
    try:
        for devices in args.devices:
            redis.client.flushall()
            rows.append(run_size(args, devices, redis, scratch))
            r = rows[-1]
            print(f"{devices} devices: {r['during']['ops_s']:.0f} ops/s, Redis CPU {r['during']['cpu_pct']:.1f} %, "
                  f"submit p99 {r['submit_ms']['p99']:.1f} ms, {r['jobs_s']:.2f}/{r['ideal_jobs_s']:.2f} jobs/s "
                  f"({time.time() - started:.0f} s)", flush=True)  # fmt: skip
    finally:
        redis.close()
    print_table(rows, args)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
