"""Fencing with real processes: a worker paused past its visibility timeout while another worker takes its job,
then resumed, stops at its next step and writes nothing (no status, event, object, webhook or ack)."""

import json
import os
import re
import signal
import time

import pytest

from kiq.events import event_order
from kiq.names import events_key, unacked_keys
from producer import devstack
from tests.helpers import FAST_REDELIVERY, client_for, count_in_logs, objects_of, own_queue, wait_for_step
from tests.integration.jobs import tiny_job

# A resumed run stops as stale (B began) or, first, as having begun before its worker's leases lapsed.
STOPPED = re.compile(r"(?:delivery \d+ of (\S+) is stale: .*|the leases of (\S+) lapsed during this run .*), "
                     r"after (\w+) step (\d+) of \d+; .* at ([0-9.]+)")  # fmt: skip


def text(log):
    return log.read_text(errors="replace") if log.exists() else ""


def stopped_at(log, job_id):
    """(When the stale run logged that it stopped, on this host's clock; the last step it found current), or None."""
    found = [(float(m[5]), m[3], int(m[4])) for m in STOPPED.finditer(text(log)) if job_id in (m[1], m[2])]
    return (found[0][0], found[0][1:]) if found else None


def object_versions(s3, settings, job_id):
    listed = s3.list_objects_v2(Bucket=settings.s3_bucket, Prefix=f"{settings.s3_prefix}{job_id}/")
    return {o["Key"]: (o["ETag"], o["LastModified"]) for o in listed.get("Contents", [])}


def unacked_holds(redis_client, job_id):
    """Whether the job's message is still in kombu's unacked hash (its lease: a crash would hand it back)."""
    return any(job_id.encode() in payload for payload in redis_client.hvals(unacked_keys(6)["unacked_key"]))


def steps_of(events, after):
    """The decoder steps of the progress events after stream id `after`, in order."""
    out = []
    for event_id, fields in events:
        meta = json.loads(fields[b"meta"])
        if (
            event_order(event_id.decode()) > event_order(after.decode())
            and meta["status"] == "PROGRESS"
            and meta["result"]["stage"] == "decoder"
        ):
            out.append(meta["result"]["step"])
    return out


def wait_for_restart(client, job_id, below, timeout=120):
    """B's progress: a decoder step past 2 and below where A was paused (A's last write stays until B's)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.status(job_id)
        if status.progress and status.progress.stage == "decoder" and 3 <= status.progress.step < below:
            return status
        assert not status.done, status
        time.sleep(0.05)
    raise AssertionError(f"{job_id} never restarted")


@pytest.mark.parametrize("resume", ["after", "during"])
def test_a_worker_paused_past_its_lease_stops_at_its_next_step_and_writes_nothing(
    resume, env, spawn_worker, s3, settings, redis_client, request, logs
):
    receiver, _ = request.getfixturevalue("webhooks")
    overrides = own_queue(**FAST_REDELIVERY, KIQ_PROGRESS_INTERVAL_MS="200")
    client = client_for(env, overrides)
    a, a_log = spawn_worker(f"fence-a-{resume}", **overrides)
    probe = client.wait(client.submit(tiny_job(decoder_steps=10, seed=5)), timeout=300)
    step_s = probe.result.timings["decoder"] / 10
    steps = min(400, max(20, int(20 / step_s)))  # about 20 s here, whatever the machine's speed today
    job_id = client.submit(tiny_job(decoder_steps=steps, num_images=2, webhook_url=receiver.url))
    wait_for_step(client, job_id, step=steps // 2, timeout=180)  # A is well ahead of any second run
    os.kill(a.pid, signal.SIGSTOP)
    try:
        # B starts once A is paused: A cannot renew its lease, so after 6 s B's sweep hands the job to B.
        _, b_log = spawn_worker(f"fence-b-{resume}", **overrides)
        devstack.wait_until(lambda: f"[{job_id}] received" in text(b_log), 120, "the redelivery to B")
        wait_for_restart(client, job_id, below=steps // 2)
        b_started = redis_client.xrevrange(events_key(job_id), count=50)
        b_start_id = next(i for i, f in b_started if json.loads(f[b"meta"])["status"] == "STARTED")  # newest
        a_last = max(steps_of(redis_client.xrange(events_key(job_id), max=f"({b_start_id.decode()}"), b"0-0"))
        if resume == "after":
            final = client.wait(job_id, timeout=300)
            seen = (redis_client.get(f"celery-task-meta-{job_id}"), redis_client.xrange(events_key(job_id)),
                    object_versions(s3, settings, job_id))  # fmt: skip
    finally:
        os.kill(a.pid, signal.SIGCONT)
    resumed_at = time.time()
    devstack.wait_until(lambda: stopped_at(a_log, job_id) or f"[{job_id}] succeeded" in text(a_log), 120,
                        "A to stop or finish")  # fmt: skip
    assert f"[{job_id}] succeeded" not in text(a_log), "the stale run went on to the end"
    a_stopped, (a_stage, a_checked) = stopped_at(a_log, job_id)
    # A's last check that passed was at the last step it wrote before the pause (or the next one, when paused
    # between the check and the write): after SIGCONT it finished only the step it was in, then found itself stale.
    assert a_stage == "decoder" and a_last <= a_checked <= a_last + 1, (a_last, a_stage, a_checked)
    if resume == "during":
        assert not client.status(job_id).done  # B still runs ...
        assert unacked_holds(redis_client, job_id)  # ... and A's end left B's lease alone
        final = client.wait(job_id, timeout=300)
        seen = None
    assert final.state == "SUCCESS", final.error
    devstack.wait_until(lambda: f"[{job_id}] succeeded" in text(b_log), 30, "B's succeeded line")
    time.sleep(3)  # room for late writes from A, which must not come
    events = redis_client.xrange(events_key(job_id))
    if seen is not None:  # nothing written after B's final state: status, events and objects as B left them
        assert (redis_client.get(f"celery-task-meta-{job_id}"), events, object_versions(s3, settings, job_id)) \
            == seen  # fmt: skip
    # After B's start only B's progress: one run's steps, in order (A's would jump back and forth).
    b_steps = steps_of(events, b_start_id)
    assert b_steps == sorted(b_steps) and len(set(b_steps)) == len(b_steps), b_steps
    assert objects_of(s3, settings, job_id) == sorted(i.uri.split("/", 3)[3] for i in final.result.images)
    assert count_in_logs([a_log, b_log], f"[{job_id}] succeeded") == 1
    assert not unacked_holds(redis_client, job_id)
    devstack.wait_until(lambda: receiver.calls, 60, "the webhook")
    time.sleep(2)
    ((_, body),) = receiver.calls  # one webhook, one delivery id, B's final status
    assert json.loads(body)["state"] == "SUCCESS" and json.loads(body)["result"] == final.result.model_dump(
        mode="json", exclude_none=True
    )
    overlap = a_stopped - resumed_at  # A's only running time while the job was B's: the step it was paused in
    b_step_s = final.result.timings["decoder"] / steps  # B's steps, run on this machine meanwhile
    line = (
        f"fencing (A resumed {resume} B's end): A paused after decoder step {a_checked}, ran only the step it was in "
        f"after SIGCONT and stopped {overlap * 1000:.0f} ms after it; a decoder step "
        f"took {b_step_s * 1000:.0f} ms in B's run ({step_s * 1000:.0f} ms in the probe); {steps} steps\n"
    )
    with (logs / "fencing.txt").open("a") as out:
        out.write(line)
    print(line)
    assert overlap < 60, line  # timing on this shared 2-core machine varies; the steps are the bound
