"""The Redis cost of one queue-metrics scrape (producer/metrics.py) as queued jobs grow: commands, bytes each way
(counted by a TCP proxy in front of Redis) and time, with 2 queues (one configured, one idle), 8 live workers.

    KIQ_BENCH_REDIS_URL=redis://127.0.0.1:6379/15 .venv/bin/python bench/queue_metrics.py [--jobs 0,100,1000]

The database is emptied first: give it one no one else uses.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import threading
import time
import uuid

import redis

from kiq.celeryconf import priority_lists
from kiq.names import FLEET_INDEX, fleet_key
from kiq.settings import Settings
from producer.client import Client
from producer.metrics import QueueCollector

JOB = {"inputs": [{"text": "a cat", "weight": 1.0}], "height": 64, "width": 64, "prior_steps": 2, "decoder_steps": 1}


class CountingProxy:
    """Forwards loopback TCP to Redis and counts the bytes each way."""

    def __init__(self, port: int) -> None:
        self.target, self.sent, self.received = ("127.0.0.1", port), 0, 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            down, _ = self.listener.accept()
            up = socket.create_connection(self.target)
            threading.Thread(target=self._pipe, args=(down, up, "sent"), daemon=True).start()
            threading.Thread(target=self._pipe, args=(up, down, "received"), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, counter: str) -> None:
        while data := src.recv(65536):
            setattr(self, counter, getattr(self, counter) + len(data))
            dst.sendall(data)


class CountingRedis:
    def __init__(self, client: redis.Redis) -> None:
        self.client, self.commands, self.pipelines = client, 0, 0

    def pipeline(self, transaction: bool = False) -> redis.client.Pipeline:
        pipe, outer = self.client.pipeline(transaction=transaction), self
        real = pipe.execute

        def execute() -> list:
            outer.pipelines += 1
            outer.commands += len(pipe.command_stack)
            return real()

        pipe.execute = execute
        return pipe


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", default="0,100,1000")
    parser.add_argument("--scrapes", type=int, default=50)
    args = parser.parse_args()
    url = os.environ.get("KIQ_BENCH_REDIS_URL", "redis://127.0.0.1:6379/15")
    direct = redis.Redis.from_url(url)
    direct.flushdb()
    queue, idle = f"bench-{uuid.uuid4().hex[:6]}", f"bench-idle-{uuid.uuid4().hex[:6]}"
    settings = Settings.from_url(url, queue=queue, metrics_queues=idle)
    for n in range(8):  # live workers, as worker/fleet.py writes them
        key = fleet_key(f"kiq@bench-cpu{n}:{n}")
        direct.hset(key, mapping={"device": f"cpu:{n}", "queues": queue, "current_job": "" if n % 2 else "job"})
        direct.zadd(FLEET_INDEX, {key: time.time() + 3600})
    proxy = CountingProxy(direct.connection_pool.connection_kwargs["port"])
    via = redis.Redis(host="127.0.0.1", port=proxy.port, db=direct.connection_pool.connection_kwargs["db"])
    client = Client(settings)
    print("| queued jobs | pipelines | commands | bytes sent | bytes received | time (median, p95) |")
    print("|---|---|---|---|---|---|")
    for jobs in (int(j) for j in args.jobs.split(",")):
        while sum(direct.llen(name) for name in priority_lists(queue)) < jobs:
            client.submit({**JOB, "priority": jobs % 10})
        counting = CountingRedis(via)
        collector = QueueCollector(settings, counting, counting)
        collector.read()  # connect
        proxy.sent = proxy.received = counting.commands = counting.pipelines = 0
        times = []
        for _ in range(args.scrapes):
            start = time.perf_counter()
            collector.read()
            times.append(time.perf_counter() - start)
        per = args.scrapes
        p95 = sorted(times)[int(0.95 * len(times))]
        print(
            f"| {jobs} | {counting.pipelines / per:g} | {counting.commands / per:g} | {proxy.sent / per:.0f} B "
            f"| {proxy.received / per:.0f} B | {statistics.median(times) * 1000:.2f} ms, {p95 * 1000:.2f} ms |"
        )
    direct.flushdb()


if __name__ == "__main__":
    main()
