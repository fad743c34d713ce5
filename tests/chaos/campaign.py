"""`scripts/chaos --seed N --minutes M`: the nemesis campaign, end to end.

Brings up the hosts and services, runs the seeded workload while the seeded nemesis schedule injects one fault at
a time, heals everything, lets the jobs drain, collects S3 objects and per-execution records, writes the history
(RUN_DIR/history.jsonl) and the checker's table (RUN_DIR/table.md), and exits 1 on any violation, printing the
seed and the command that replays it. Everything it created (namespaces, veths, bridge, rules, processes, Redis
data) is removed at the end, also on failure or Ctrl-C; the run directory keeps the history, logs and table.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import secrets
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

from producer import devstack
from tests.chaos import checker, hosts, nemeses, workload
from tests.chaos.executions import executions
from tests.chaos.history import History
from tests.chaos.receiver import Receiver
from tests.chaos.services import BUCKET, HOSTS, WORKERS, Cluster

MODELS = Path("/tmp/kiq-chaos-models")  # tiny random-weight models, made once and reused
SUPERVISED = (*WORKERS, "api", "hooks", "r1", "r2", "s1", "s2", "s3", "obj")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/chaos", description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=None, help="schedule and workload seed (default: random)")
    parser.add_argument("--minutes", type=float, default=3.0, help="minutes of faults (default 3)")
    parser.add_argument("--jobs-per-minute", type=float, default=40.0)
    parser.add_argument(
        "--decoder-steps",
        type=_steps,
        default=(3, 8),
        metavar="MIN-MAX",
        help="each job's decoder steps, drawn from this range (default 3-8; fewer: more jobs a minute)",
    )
    parser.add_argument("--max-open", type=int, default=24, help="submits pause while this many jobs are unfinished")
    parser.add_argument("--drain-s", type=float, default=240.0, help="how long jobs may take to finish after")
    parser.add_argument("--webhook-wait-s", type=float, default=90.0, help="how long webhooks may take after that")
    parser.add_argument("--overlap-max-s", type=float, default=2.0, help="longest overlap that is no violation")
    parser.add_argument("--out", type=Path, default=None, help="run directory (default /tmp/kiq-chaos/<run>)")
    parser.add_argument("--cleanup", metavar="PREFIX", help="remove what a dead run PREFIX left, then exit")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("iptables") is None:
        print("scripts/chaos must run as root with iproute2 and iptables installed", file=sys.stderr)
        return 2
    if args.cleanup:
        for what in hosts.cleanup(args.cleanup):
            print("removed", what)
        return 0
    stale = hosts.leftovers()
    if stale:
        print(f"leftovers of earlier chaos runs exist: {', '.join(stale)}; remove them with:", file=sys.stderr)
        for prefix in stale:
            print(f"  scripts/chaos --cleanup {prefix}", file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else secrets.randbelow(1_000_000)
    signal.signal(signal.SIGTERM, _interrupted)
    return run(args, seed)


def _steps(text: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    steps = (int(low), int(high or low))
    if not 1 <= steps[0] <= steps[1]:
        raise argparse.ArgumentTypeError(f"want MIN-MAX with 1 <= MIN <= MAX, got {text!r}")
    return steps


def _interrupted(*_: Any) -> None:
    raise KeyboardInterrupt


def replay_command(args: argparse.Namespace, seed: int) -> str:
    return (f"scripts/chaos --seed {seed} --minutes {args.minutes:g} --jobs-per-minute {args.jobs_per_minute:g} "
            f"--decoder-steps {args.decoder_steps[0]}-{args.decoder_steps[1]} "
            f"--max-open {args.max_open} --drain-s {args.drain_s:g} --webhook-wait-s {args.webhook_wait_s:g} "
            f"--overlap-max-s {args.overlap_max_s:g}")  # fmt: skip


def run(args: argparse.Namespace, seed: int) -> int:
    net = hosts.Net.new()
    out = args.out or Path("/tmp/kiq-chaos") / f"{seed}-{net.prefix}"
    out.mkdir(parents=True, exist_ok=True)
    print(f"chaos: seed {seed}, run {net.prefix} on {net.cidr}, files in {out}", flush=True)
    # The campaign's own clients (submit retries, replication warnings) log to a file, not the terminal.
    logging.basicConfig(filename=out / "campaign.log", level=logging.INFO, force=True,
                        format="%(created).3f %(levelname)s %(name)s: %(message)s")  # fmt: skip
    history = History(out / "history.jsonl")
    cluster = receiver = load = nemesis = None
    try:
        net.create(list(HOSTS))
        models = devstack.make_tiny_models(MODELS)
        cluster = Cluster(net, out, models, f"chaos-{secrets.token_hex(8)}")
        started = time.monotonic()
        cluster.start()
        print(f"chaos: {len(cluster.services)} services up in {time.monotonic() - started:.0f} s", flush=True)
        receiver = Receiver(net.gateway, cluster.webhook_secret, history, seed)
        receiver.start()
        faults = nemeses.schedule(seed, args.minutes)
        specs = workload.plan(seed, args.minutes, args.jobs_per_minute, args.decoder_steps)
        history.add("campaign", seed=seed, minutes=args.minutes, prefix=net.prefix, replay=replay_command(args, seed),
                    overlap_max_s=args.overlap_max_s, faults=len(faults), jobs_planned=len(specs))  # fmt: skip
        load = workload.Workload(cluster, history, receiver.url, seed, specs, args.max_open)
        nemesis = nemeses.Nemesis(cluster)
        load.start()
        _run_schedule(faults, nemesis, cluster, history)
        nemesis.heal_all()
        drained = load.drain(args.drain_s)
        history.add("drained", ok=drained, open=load.open_jobs())
        _final_rounds(load, history, args.webhook_wait_s)
        load.stop()
        _collect(cluster, history)
    except KeyboardInterrupt:
        print("chaos: interrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C or SIGTERM must not cut the cleanup short
            signal.signal(sig, signal.SIG_IGN)
        if nemesis is not None:
            nemesis.heal_all()
        if load is not None:
            load.stop()
        if receiver is not None:
            receiver.close()
        if cluster is not None:
            cluster.close()
        net.destroy()
        history.close()
        for name in ("r1", "r2"):
            shutil.rmtree(out / name, ignore_errors=True)  # Redis data: temporary
    return _verdict(out)


def _run_schedule(faults: list[nemeses.Fault], nemesis: nemeses.Nemesis, cluster: Cluster,
                  history: History) -> None:  # fmt: skip
    begin = time.monotonic()
    for fault in faults:
        _sleep_until(begin + fault.at_s, cluster, history)
        nemesis.start(fault)
        print(f"chaos: [{fault.n}] {fault.kind} on {fault.target} {fault.params or ''} for {fault.duration_s} s",
              flush=True)  # fmt: skip
        _sleep_until(time.monotonic() + fault.duration_s, cluster, history, fault)
        nemesis.stop(fault)
        history.add("nemesis", **fault.record())


def _sleep_until(deadline: float, cluster: Cluster, history: History, fault: nemeses.Fault | None = None) -> None:
    """Sleep, restarting (like a supervisor) any service that died by itself, not by the current fault."""
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(1.0, left))
        for name in SUPERVISED:
            service = cluster.services[name]
            if service.alive() or _killed_by(fault, name, cluster):
                continue
            code = service.proc.returncode if service.proc else None
            history.add("crash", service=name, code=code)
            print(f"chaos: {name} exited by itself ({code}); restarting it", flush=True)
            service.start(cluster.net)


def _killed_by(fault: nemeses.Fault | None, name: str, cluster: Cluster) -> bool:
    if fault is None or not fault.kind.startswith("kill-"):
        return False
    return name in (fault.target, fault.params.get("resolved"))


def _final_rounds(load: workload.Workload, history: History, webhook_wait_s: float) -> None:
    """Poll every job twice more, seconds apart (a final state must not change), and give webhooks time."""
    from producer.client import Client

    client, last = Client(load.settings), {}
    for _ in range(2):
        load.poll_round(client, last)
        time.sleep(3)
    hooked = [j for j, spec in load.jobs.items() if spec.webhook and j in load.final]
    deadline = time.monotonic() + webhook_wait_s
    while time.monotonic() < deadline and not _all_delivered(out_path=history.path, jobs=set(hooked)):
        time.sleep(2)


def _all_delivered(out_path: Path, jobs: set[str]) -> bool:
    delivered = {r["job"] for r in checker.read(out_path) if r["kind"] == "webhook" and r["answered"] == 200}
    return jobs <= delivered


def _collect(cluster: Cluster, history: History) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=cluster.s3_endpoint, region_name="us-east-1",
                      aws_access_key_id="chaos", aws_secret_access_key="chaos-secret")  # fmt: skip
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="jobs/"):
        for obj in page.get("Contents", []):
            meta = s3.head_object(Bucket=BUCKET, Key=obj["Key"])["Metadata"]
            history.add("object", key=obj["Key"], size=obj["Size"], meta_job=meta.get("kiq-job-id"))
    for name in WORKERS:
        for run in executions(name, cluster.services[name].log):
            history.add("exec", **run)
    for service in cluster.services.values():
        history.add("process", service=service.name, starts=service.starts, deaths=service.deaths)


def _verdict(out: Path) -> int:
    verdict = checker.check(out / "history.jsonl")
    text = checker.table(verdict)
    (out / "table.md").write_text(text + "\n")
    print(text)
    campaign = next((r for r in checker.read(out / "history.jsonl") if r["kind"] == "campaign"), {})
    (out / "violations.txt").write_text("\n".join(verdict.violations) + "\n")
    return checker.report_violations(verdict, campaign)


if __name__ == "__main__":
    random.seed()
    sys.exit(main())
