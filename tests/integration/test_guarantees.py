"""The guarantees of docs/reliability.md, with real processes: leases on default settings,
batches without collateral damage, and the S3 read fence."""

import os
import signal
import time
import uuid

import numpy as np
import redis
from kombu import Connection

from kiq.celeryconf import broker_transport_options, priority_lists
from kiq.leases import OtherIndexes
from kiq.names import VISIBILITY_TIMEOUTS_KEY, unacked_keys
from kiq.settings import Settings
from producer import devstack
from tests.helpers import (
    FAST_REDELIVERY,
    calling_server,
    client_for,
    count_in_logs,
    image_bytes,
    objects_of,
    on_queue,
    own_queue,
    received,
    wait_for_step,
)
from tests.integration.conftest import SPARE_REDIS_URL
from tests.integration.jobs import read_object, steps_lasting, tiny_job

STEPS, IMAGES = 40, 4  # the resumed job: 4 images a step, so 500 steps outlast the timeout on fast days too


def test_on_defaults_a_killed_workers_job_resumes_within_two_minutes_and_a_long_live_job_runs_once(
    env, spawn_worker, s3, settings, logs
):
    assert not any(name in env for name in ("KIQ_VISIBILITY_TIMEOUT_S", "KIQ_TIME_LIMIT_MIN_S", "KIQ_MAX_DELIVERIES"))
    assert settings.visibility_timeout_s == 60
    queue = own_queue()  # the queue is the only setting this test changes
    client = client_for(env, queue)
    first, first_log = spawn_worker("lease-killed", **queue)
    job_id = client.submit(tiny_job(decoder_steps=STEPS, num_images=IMAGES))
    wait_for_step(client, job_id, step=2, timeout=120)
    os.kill(first.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    first.wait()
    # Two fresh workers: one resumes the job; then one runs a job longer than the timeout while the other
    # sweeps the unacked index all the while, and would take it a second time if the running one's lease lapsed.
    (_, b_log), (_, c_log) = spawn_worker("lease-b", **queue), spawn_worker("lease-c", **queue)
    devstack.wait_until(lambda: received(b_log, job_id) or received(c_log, job_id), 180, "redelivery")
    resumed_s = time.monotonic() - killed_at
    resumed = client.wait(job_id, timeout=400)
    assert resumed_s <= 120, resumed_s
    assert resumed.state == "SUCCESS", resumed.error
    # Sized from the resumed run, on the same kind of worker: CPU speed varies several-fold between days.
    step_s = resumed.result.timings["decoder"] / STEPS
    long_id = client.submit(tiny_job(decoder_steps=min(500, max(STEPS, int(90 / step_s))), num_images=IMAGES))
    long = client.wait(long_id, timeout=900)
    ran_s = long.result.timings["decoder"]
    (logs / "lease-recovery.txt").write_text(f"resumed after {resumed_s:.1f} s; a live job ran {ran_s:.1f} s\n")
    print(f"SIGKILL on defaults: job resumed after {resumed_s:.1f} s; a live job then ran {ran_s:.1f} s")
    assert long.state == "SUCCESS", long.error
    assert ran_s > settings.visibility_timeout_s  # it outlived the timeout while alive, yet ...
    for one in (job_id, long_id):
        assert count_in_logs([b_log, c_log], f"[{one}] received") == 1  # ... was handed out once
        succeeded = f"[{one}] succeeded"  # Celery logs it just after the task stored its result: wait for it
        devstack.wait_until(lambda s=succeeded: count_in_logs([b_log, c_log], s) >= 1, 30, "the succeeded line")
        assert count_in_logs([first_log, b_log, c_log], succeeded) == 1
        assert objects_of(s3, settings, one) == [f"jobs/{one}/{n}.png" for n in range(IMAGES)]


def test_a_worker_with_a_shorter_visibility_timeout_never_takes_a_default_workers_live_job(
    env, client, worker, spawn_worker, settings, logs, redis_client
):
    # kombu's unacked index is one per Redis database, and every consumer sweeps it by its own timeout: a 6 s
    # worker on another queue would hand back a job whose lease a default worker renews only every 10 s.
    _, short_log = spawn_worker("short-timeout", **own_queue(**FAST_REDELIVERY))
    job_id = client.submit(tiny_job(decoder_steps=steps_lasting(client, 20), seed=9))
    wait_for_step(client, job_id, step=1, timeout=120)
    while not client.status(job_id).done:  # a job handed back waits here: the session worker is busy with it
        assert not on_queue(redis_client, settings.queue, job_id), "the live job was handed back to its queue"
        time.sleep(0.5)
    final = client.status(job_id)
    assert final.state == "SUCCESS", final.error
    assert final.result.timings["decoder"] > 12  # past a renewal of the default worker, with sweeps every 1 s
    time.sleep(2)  # a copy handed back would be received right after the first run ends
    assert count_in_logs([logs / "worker.log", short_log], f"[{job_id}] received") == 1


def test_a_killed_workers_job_comes_back_through_a_default_worker_when_none_of_its_timeout_is_left(
    env, worker, spawn_worker, settings, s3, logs, redis_client
):
    # kombu sweeps only its own timeout's index: without kiq's sweep of the others, a fleet that moved to another
    # timeout (or lost its last 6 s worker) would keep this job unacked forever. The session worker (defaults,
    # another queue) is the only one left that can hand it back.
    short = own_queue(**FAST_REDELIVERY)
    client = client_for(env, short)
    killed, _ = spawn_worker("other-timeout-killed", **short)
    job_id = client.submit(tiny_job(decoder_steps=10, num_images=2))
    wait_for_step(client, job_id, step=1, timeout=120)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    killed_at = time.monotonic()
    devstack.wait_until(lambda: on_queue(redis_client, short["KIQ_QUEUE"], job_id), 120, "the job back on its queue")
    back_s = time.monotonic() - killed_at
    _, rescuer_log = spawn_worker("other-timeout-rescuer", KIQ_QUEUE=short["KIQ_QUEUE"])  # defaults: 60 s
    final = client.wait(job_id, timeout=120)
    assert final.state == "SUCCESS", final.error
    assert count_in_logs([rescuer_log], f"[{job_id}] received") == 1
    assert objects_of(s3, settings, job_id) == [f"jobs/{job_id}/{n}.png" for n in range(2)]
    (logs / "other-timeout-recovery.txt").write_text(f"back on its queue after {back_s:.1f} s\n")
    assert back_s <= 6 + 10 + 10, back_s  # its timeout, one sweep interval of a default worker, slack


def test_the_sweep_of_another_timeouts_index_takes_only_leases_older_than_that_timeout(env, settings, redis_client):
    """Against kombu's own bookkeeping on the real Redis: a lapsed 6 s lease is handed back once; a 1 s old and a
    fresh one are not. (Other workers of the session sweep the 6 s index too: the test checks the end state.)"""
    queue = f"kiq-sweep-{uuid.uuid4().hex[:6]}"

    def connect(timeout_s: float) -> Connection:
        timed = Settings.from_env({**env, "KIQ_VISIBILITY_TIMEOUT_S": f"{timeout_s:g}"})
        return Connection(settings.broker_url, transport_options=broker_transport_options(timed))

    index = unacked_keys(6)["unacked_index_key"]
    with connect(6) as short:
        inbox = short.SimpleQueue(queue)
        for n in range(3):
            inbox.put({"n": n})
        lapsed, recent, fresh = (inbox.get(timeout=5) for _ in range(3))  # unacked, in the 6 s index
        short_sweeper = OtherIndexes(lambda: connect(6), 6, 1)
        default_sweeper = OtherIndexes(lambda: connect(60), 60, 1)
        try:
            short_sweeper.sweep()  # notes 6 s, as a 6 s worker does
            now = time.time()
            redis_client.zadd(index, {lapsed.delivery_tag: now - 7, recent.delivery_tag: now - 1}, xx=True)
            deadline = time.monotonic() + 2
            while redis_client.zscore(index, lapsed.delivery_tag) is not None and time.monotonic() < deadline:
                default_sweeper.sweep()  # a sweep finding kombu's mutex held by another sweeper does nothing
            assert redis_client.zscore(index, lapsed.delivery_tag) is None
            assert redis_client.zscore(index, recent.delivery_tag) is not None
            assert redis_client.zscore(index, fresh.delivery_tag) is not None
            assert sum(redis_client.llen(name) for name in priority_lists(queue)) == 1  # back on its queue, once
            assert default_sweeper.sweep() == 0
        finally:
            default_sweeper.stop()
            short_sweeper.stop()
        again = inbox.get(timeout=5)
        assert again.payload == {"n": 0} and again.delivery_info.get("redelivered")
        for message in (again, recent, fresh):
            message.ack()
        inbox.close()


def test_a_timeout_unseen_for_a_day_is_forgotten_only_once_its_index_is_gone(settings):
    url = SPARE_REDIS_URL  # a database of its own: no session worker sweeps there
    db = redis.Redis.from_url(url)
    db.flushdb()
    gone, held = 7.25, 8.25
    held_index = unacked_keys(held)["unacked_index_key"]
    db.zadd(held_index, {"a-dead-workers-tag": time.time() - 3600})  # no payload left: nothing to requeue
    two_days_ago = time.time() - 2 * 86400
    db.zadd(VISIBILITY_TIMEOUTS_KEY, {repr(gone): two_days_ago, repr(held): two_days_ago, "junk": 0})
    options = broker_transport_options(settings)
    sweeper = OtherIndexes(lambda: Connection(url, transport_options=options), settings.visibility_timeout_s, 1)
    try:
        assert sweeper.sweep() == 0  # the lapsed tag had no message left: unindexed, not counted
        assert db.zrange(VISIBILITY_TIMEOUTS_KEY, 0, -1) == [repr(held).encode(), b"60.0"]  # its index was there
        assert not db.exists(held_index)
        sweeper.sweep()
        assert db.zrange(VISIBILITY_TIMEOUTS_KEY, 0, -1) == [b"60.0"]  # ours, just renewed
    finally:
        sweeper.stop()
        db.flushdb()


def test_a_job_that_crashes_its_decoder_batch_is_found_out_alone_and_its_mates_succeed(env, spawn_worker, s3,
                                                                                      settings):  # fmt: skip
    overrides = own_queue(KIQ_DECODER_BATCH="3", KIQ_DECODER_BATCH_WAIT_MS="2000", KIQ_MAX_DELIVERIES="1",
                          KIQ_VISIBILITY_TIMEOUT_S="6")  # fmt: skip
    client = client_for(env, overrides)
    workers, kills = [], []

    def crash_the_worker():  # what a job that segfaults its worker does, from the job's own fetch
        kills.append(workers[-1][0].pid)
        os.kill(workers[-1][0].pid, signal.SIGKILL)

    with calling_server(crash_the_worker) as crash_url:
        ids = [client.submit(tiny_job(seed=31)), client.submit(tiny_job({"image": crash_url, "weight": 1.0})),
               client.submit(tiny_job(seed=33))]  # fmt: skip
        deadline = time.monotonic() + 240
        while not all(client.status(job_id).done for job_id in ids):
            assert time.monotonic() < deadline, [client.status(job_id).state for job_id in ids]
            if not workers or workers[-1][0].poll() is not None:
                workers.append(spawn_worker(f"batch-crash-{len(workers)}", **overrides))
            time.sleep(0.2)
    finals = [client.status(job_id) for job_id in ids]
    assert [f.state for f in finals] == ["SUCCESS", "FAILURE", "SUCCESS"], [f.error for f in finals]
    assert finals[1].error.type == "PoisonJob" and "KIQ_MAX_DELIVERIES=1" in finals[1].error.message
    assert "decoder batch of 3" in workers[0][1].read_text()
    assert len(kills) == 2  # once in the batch, once alone; the third delivery was refused
    for job_id in (ids[0], ids[2]):
        assert objects_of(s3, settings, job_id) == [f"jobs/{job_id}/0.png"]
    assert objects_of(s3, settings, ids[1]) == []


def test_a_cancelled_job_leaves_its_decoder_batch_at_the_next_step(env, client, worker, spawn_worker, s3,
                                                                   settings, redis_client):  # fmt: skip
    jobs = [tiny_job({"text": f"batch prompt {n}", "weight": 1.0}, seed=40 + n, decoder_steps=30) for n in range(3)]
    alone = client.wait(client.submit(jobs[2]), timeout=120)  # the session worker: batch size 1
    overrides = {"KIQ_QUEUE": f"kiq-batch-{uuid.uuid4().hex[:6]}", "KIQ_DECODER_BATCH": "3",
                 "KIQ_DECODER_BATCH_WAIT_MS": "2000"}  # fmt: skip
    batch_client = client_for(env, overrides)
    ids = [batch_client.submit(job) for job in jobs]
    _, log = spawn_worker("batch-cancel", **overrides)
    wait_for_step(batch_client, ids[0], step=3)
    batch_client.cancel(ids[1])
    cancelled = batch_client.wait(ids[1], timeout=30)
    leader_meanwhile = batch_client.status(ids[0])
    assert cancelled.state == "REVOKED"
    assert not leader_meanwhile.done and leader_meanwhile.progress.step < 30  # it left while the batch ran on
    finals = [batch_client.wait(ids[n], timeout=120) for n in (0, 2)]
    assert [f.state for f in finals] == ["SUCCESS", "SUCCESS"]
    assert "decoder batch of 3" in log.read_text()
    assert objects_of(s3, settings, ids[1]) == []
    ours, _ = read_object(s3, finals[1].result.images[0].uri)
    theirs, _ = read_object(s3, alone.result.images[0].uri)
    diff = np.abs(np.asarray(ours, dtype=np.int16) - np.asarray(theirs, dtype=np.int16))
    assert diff.max() <= 2, diff.max()  # dropping a row left the other rows' draws and results as they were
    for mate in ids[1:]:  # each record holds its own job's data only: never the leader's prompt
        assert b"batch prompt 0" not in redis_client.get(f"celery-task-meta-{mate}")


def image_job(ref):
    return tiny_job({"text": "a cat", "weight": 0.5}, {"image": ref, "weight": 0.5})


def test_s3_references_outside_the_read_fence_are_refused_alike_whether_or_not_they_exist(worker, client, s3,
                                                                                         settings):  # fmt: skip
    private = f"kiq-private-{uuid.uuid4().hex[:6]}"
    s3.create_bucket(Bucket=private)
    s3.put_object(Bucket=private, Key="secret.png", Body=image_bytes())
    results = client.wait(client.submit(tiny_job()), timeout=120).result.images[0].uri  # another job's output
    notes = f"{settings.s3_input_prefix}notes-{uuid.uuid4().hex[:6]}.txt"
    s3.put_object(Bucket=settings.s3_bucket, Key=notes, Body=b"PRIVATE-NOTES 0123456789 " * 40)
    cases = {
        f"s3://{private}/secret.png": "ReferenceNotAllowed",  # another bucket, the object exists
        f"s3://{private}/nothing.png": "ReferenceNotAllowed",  # another bucket, no such object
        results: "ReferenceNotAllowed",  # our bucket, outside the input prefix
        f"s3://{settings.s3_bucket}/inputs/../{results.split('/', 3)[3]}": "ReferenceNotAllowed",
        f"s3://{settings.s3_bucket}/{notes}": "NotAnImage",  # inside the fence, but not an image
        f"s3://{settings.s3_bucket}/inputs/no-such-key.png": "ObjectNotFound",
    }
    errors = {ref: client.wait(client.submit(image_job(ref)), timeout=120).error for ref in cases}
    assert {ref: e.type for ref, e in errors.items()} == cases
    fenced = [e.message.replace(ref, "<ref>") for ref, e in errors.items() if e.type == "ReferenceNotAllowed"]
    assert len(set(fenced)) == 1, fenced  # one answer whatever the object: nothing learnt about it
    notes_error = errors[f"s3://{settings.s3_bucket}/{notes}"].message
    assert "PRIVATE" not in notes_error and "1000" not in notes_error  # neither its bytes nor its size
    assert worker.poll() is None
