"""Leases against faults outside the worker: its broker connections reset while Redis stays up, and host clocks
minutes off. Real worker processes; the clocks are skewed with libfaketime."""

import glob
import os
import signal
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import pytest
import redis

from kiq import transport
from kiq.celeryconf import broker_transport_options, priority_lists
from kiq.names import unacked_keys
from producer import devstack
from tests.helpers import FAST_REDELIVERY, client_for, count_in_logs, on_queue, own_queue, received, wait_for_step
from tests.integration.jobs import steps_lasting, tiny_job
from tests.proxy import Proxy

FAKETIME = sorted(glob.glob("/usr/lib/*/faketime/libfaketimeMT.so.1") + glob.glob("/usr/lib/faketime/*MT.so.1"))


def pause(proc, redis_client=None, queue=None):
    """SIGSTOP an idle worker, once it has acknowledged what it ran (a stopped worker's unacked job comes back).
    Its pending BRPOP (kombu waits 1 s) runs out meanwhile, so it takes nothing while stopped."""
    if queue is not None:
        devstack.wait_until(lambda: not unacked_tags(redis_client, 6, [queue]), 30, "the last job's ack")
    os.kill(proc.pid, signal.SIGSTOP)
    time.sleep(2)


def resume(proc):
    os.kill(proc.pid, signal.SIGCONT)


def unacked_tags(redis_client, timeout_s, needles):
    """The delivery tags of the messages in the unacked hash of `timeout_s` that name a job id or queue."""
    held = redis_client.hgetall(unacked_keys(timeout_s)["unacked_key"])
    return {tag for tag, payload in held.items() if any(needle.encode() in payload for needle in needles)}


def test_a_closing_channel_hands_back_only_what_the_process_no_longer_holds_and_late_acks_still_clear(
    settings, redis_client
):
    """kiq's transport against the real Redis, as a reconnect closes a consumer's channel: a running job's message
    stays unacknowledged with its lease kept; a prefetched one nobody will run goes back; the old channel's ack
    clears the unacked hash and index."""
    queue = f"kiq-close-{uuid.uuid4().hex[:6]}"
    keys = unacked_keys(settings.visibility_timeout_s)
    index, unacked = keys["unacked_index_key"], keys["unacked_key"]
    connection = transport.Connection(settings.broker_url, transport_options=broker_transport_options(settings))
    inbox = connection.SimpleQueue(queue)
    for n in range(2):
        inbox.put({"n": n})
    running, waiting = inbox.get(timeout=5), inbox.get(timeout=5)
    transport.hold_while(lambda: {running.delivery_tag})
    try:
        connection.release()  # what Celery does to the consumer's connection when it reconnects
        assert [len(redis_client.lrange(name, 0, -1)) for name in priority_lists(queue)] == [1, 0, 0, 0]
        assert redis_client.hget(unacked, waiting.delivery_tag) is None
        assert transport.kept_leases() == [(index, running.delivery_tag)]
        assert redis_client.zscore(index, running.delivery_tag) is not None
        running.ack()  # the job ends after the reconnect: its ack goes through the closed channel
        assert redis_client.hget(unacked, running.delivery_tag) is None
        assert redis_client.zscore(index, running.delivery_tag) is None
        assert transport.kept_leases() == []
    finally:
        transport.hold_while(lambda: ())
        redis_client.delete(*priority_lists(queue))


def test_a_connection_reset_hands_back_nothing_a_live_batching_worker_holds(env, spawn_worker, redis_client):
    # The threads pool (decoder batching) keeps running jobs across a broker reconnect: kombu used to put every
    # unacknowledged message back on its queue when the old channel closed, and Celery's reconnect dropped the
    # batch mates from its reserved requests, so their leases lapsed.
    overrides = own_queue(KIQ_DECODER_BATCH="2", KIQ_DECODER_BATCH_WAIT_MS="3000", **FAST_REDELIVERY)
    client = client_for(env, overrides)
    idle, idle_log = spawn_worker("churn-idle", **{**overrides, "KIQ_DECODER_BATCH": "1"})
    steps = steps_lasting(client, 10)  # on the idle worker, before it idles
    pause(idle, redis_client, overrides["KIQ_QUEUE"])
    ids = [client.submit(tiny_job(decoder_steps=steps, seed=60 + n)) for n in range(2)]
    proxy = Proxy(urlsplit(env["KIQ_BROKER_URL"]).port or 6379)
    proxy.start()
    try:
        proxied = env["KIQ_BROKER_URL"].replace(f":{proxy.target[1]}/", f":{proxy.port}/")
        batching, log = spawn_worker("churn-batching", **{**overrides, "KIQ_BROKER_URL": proxied})
        wait_for_step(client, ids[0], step=2, timeout=120)
        assert "decoder batch of 2" in log.read_text()
        tags = unacked_tags(redis_client, 6, ids)
        assert len(tags) == 2
        resume(idle)
        time.sleep(2)
        proxy.reset()  # every Redis connection of the batching worker, Redis itself stays up
        deadline = time.monotonic() + 240
        while not all(client.status(job_id).done for job_id in ids):
            assert time.monotonic() < deadline, [client.status(job_id).state for job_id in ids]
            for job_id in ids:
                assert count_in_logs([log, idle_log], f"[{job_id}] received") == 1, f"{job_id} handed out again"
                assert not on_queue(redis_client, overrides["KIQ_QUEUE"], job_id), f"{job_id} is back on its queue"
            time.sleep(0.2)
        assert "Connection to broker lost" in log.read_text()  # the reset did reach the consumer
        finals = [client.status(job_id) for job_id in ids]
        assert [f.state for f in finals] == ["SUCCESS", "SUCCESS"], [f.error for f in finals]
        time.sleep(6 + 1 + 3)  # a message left unacknowledged would come back after one timeout and a sweep
        for job_id in ids:
            assert count_in_logs([log, idle_log], f"[{job_id}] received") == 1
        assert count_in_logs([log], f"[{ids[0]}] succeeded") == 1
        # The acks after the reconnect went through the old channel and still cleared the unacked hash and index.
        index = unacked_keys(6)["unacked_index_key"]
        assert not unacked_tags(redis_client, 6, ids)
        assert all(redis_client.zscore(index, tag) is None for tag in tags)
        assert batching.poll() is None
    finally:
        resume(idle)
        proxy.stop()


def skewed(seconds):
    """The environment of a process whose wall clock is `seconds` off (monotonic clocks stay true, as with NTP)."""
    return {"LD_PRELOAD": FAKETIME[0], "FAKETIME": f"{seconds:+d}", "FAKETIME_DONT_FAKE_MONOTONIC": "1"}


@pytest.mark.skipif(not FAKETIME, reason="needs libfaketime (apt-get install faketime; .ci/run installs it)")
def test_worker_clocks_minutes_off_neither_take_live_jobs_nor_keep_dead_ones(env, spawn_worker, own_redis):
    # A Redis of its own: no other worker of the session sweeps these indexes with a true clock.
    url, _, _ = own_redis
    overrides = own_queue(KIQ_BROKER_URL=url, **FAST_REDELIVERY)
    own = redis.Redis.from_url(url)
    client = client_for(env, overrides)
    clocks = {"clock-ahead": skewed(300), "clock-behind": skewed(-300), "clock-true": {}}
    with ThreadPoolExecutor(len(clocks)) as starting:  # no job is queued yet: start them side by side
        started = list(starting.map(lambda name: spawn_worker(name, **overrides, **clocks[name]), clocks))
    (ahead, ahead_log), (behind, behind_log), (true, true_log) = started
    pause(ahead)
    pause(behind)
    logs = [ahead_log, behind_log, true_log]
    try:
        steps = steps_lasting(client, 8)
        # A live job of the true-clock worker: the worker 300 s ahead, idle and sweeping, must not take it.
        live = client.submit(tiny_job(decoder_steps=steps, seed=71))
        wait_for_step(client, live, step=1, timeout=120)
        resume(ahead)
        while not client.status(live).done:
            assert not received(ahead_log, live), "a worker whose clock is ahead took a live job"
            time.sleep(0.2)
        assert client.status(live).state == "SUCCESS"
        time.sleep(2)
        assert count_in_logs(logs, f"[{live}] received") == 1
        # A job of the worker 300 s ahead, which dies: the worker 300 s behind hands it back within the timeout
        # and a sweep (its own leases were scored 600 s in its future by the host clocks).
        pause(true, own, overrides["KIQ_QUEUE"])
        dead = client.submit(tiny_job(decoder_steps=steps, seed=72))
        wait_for_step(client, dead, step=1, timeout=120)
        assert received(ahead_log, dead)
        os.kill(ahead.pid, signal.SIGKILL)
        ahead.wait()
        killed_at = time.monotonic()
        resume(behind)
        devstack.wait_until(lambda: received(behind_log, dead), 60, "the dead worker's job handed back")
        back_s = time.monotonic() - killed_at
        assert client.wait(dead, timeout=120).state == "SUCCESS"
        print(f"clocks 300 s ahead and behind: a dead worker's job came back after {back_s:.1f} s")
        assert back_s <= 6 + 1 + 6, back_s  # the timeout, a sweep, slack for a loaded machine
    finally:
        for proc in (ahead, behind, true):
            if proc.poll() is None:
                resume(proc)
