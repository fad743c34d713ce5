"""Fencing tokens against the real Redis (KIQ_TEST_REDIS_URL): a stale run's writes are refused in the same
script that would make them; the Celery and kombu parts the worker relies on to let go of a stale message."""

import inspect
import json
import time
import uuid
from types import SimpleNamespace

import pytest
import redis
from celery import Celery

from kiq import fencing
from kiq.contract import parse_job
from kiq.events import EventsBackend
from kiq.names import deleted_key, deliveries_key, events_key, fence_key, frames_key, webhook_queued_key
from kiq.settings import Settings
from kiq.status import ImageRef, Progress
from kiq.webhooks import queue_webhook
from tests.helpers import redis_databases
from worker import fencing as stale_runs
from worker.delivery import DeliveryGuard
from worker.records import JobRecords
from worker.runner import JobCancelled, Runner, StaleDelivery
from worker.storage import MemoryStorage

REDIS_URL, _ = redis_databases()  # this test process's own database (pytest-xdist)


@pytest.fixture
def db():
    client = redis.Redis.from_url(REDIS_URL)
    keys = []
    yield client, keys
    if keys:
        client.delete(*keys)


@pytest.fixture
def job(db):
    """A fresh job id whose keys are deleted after the test; no token held by this process afterwards."""
    _, keys = db
    job_id = f"fence-{uuid.uuid4().hex}"
    keys += [fence_key(job_id), f"celery-task-meta-{job_id}", events_key(job_id), frames_key(job_id),
             webhook_queued_key(job_id), deliveries_key(job_id)]  # fmt: skip
    yield job_id
    fencing.release(job_id)


@pytest.fixture
def refusals(monkeypatch):
    seen = []
    monkeypatch.setattr(fencing, "on_refused", seen.append)
    return seen


def backend():
    app = Celery("fencing-test", set_as_current=False)
    return EventsBackend(app=app, url=REDIS_URL)


def take(client, job_id):
    """What DeliveryGuard.begin does for a delivery of the job elsewhere: the next token."""
    return int(client.incr(fence_key(job_id)))


def test_a_stale_runs_state_write_is_refused_whole_and_a_current_ones_lands(db, job, refusals):
    client, _ = db
    results = backend()
    fencing.hold(job, take(client, job))  # delivery 1, ours
    results.store_result(job, {"hostname": "a"}, "STARTED")
    assert client.xlen(events_key(job)) == 1
    take(client, job)  # delivery 2 began elsewhere
    results.store_result(job, {"stage": "decoder", "step": 3, "total": 9}, "PROGRESS")
    results.store_result(job, {"images": []}, "SUCCESS")
    assert json.loads(client.get(f"celery-task-meta-{job}"))["status"] == "STARTED"  # neither the state ...
    assert client.xlen(events_key(job)) == 1  # ... nor the event
    assert refusals == [job, job]
    fencing.hold(job, 2)  # now as delivery 2 (a later token than the count is fine too)
    results.store_result(job, {"images": []}, "SUCCESS")
    assert json.loads(client.get(f"celery-task-meta-{job}"))["status"] == "SUCCESS"
    assert client.xlen(events_key(job)) == 2 and refusals == [job, job]


def test_writes_without_a_held_token_or_without_a_count_are_not_fenced(db, job, refusals):
    client, _ = db
    results = backend()
    results.store_result(job, {"hostname": "api"}, "STARTED")  # the API's writes hold no token
    fencing.hold(job, 5)  # a count lost with Redis's data: nothing says a newer run exists
    results.store_result(job, {"stage": "fetch", "step": 0, "total": 1}, "PROGRESS")
    assert client.xlen(events_key(job)) == 2 and not refusals


@pytest.mark.parametrize("first", ["REVOKED", "SUCCESS", "FAILURE"])
def test_a_final_state_is_never_replaced_by_a_later_write_of_any_run(db, job, refusals, first):
    """The API's cancel writes REVOKED (no token) while the job's run is starting; the run's STARTED, PROGRESS
    and SUCCESS that follow are dropped whole: a state seen final never changes. Also the API's REVOKED after a
    SUCCESS (its status read was older than the job's end). Not refusals: the run is not stale."""
    client, _ = db
    results = backend()
    if first != "REVOKED":
        fencing.hold(job, take(client, job))
    {"REVOKED": lambda: results.mark_as_revoked(job, reason="cancelled"),
     "SUCCESS": lambda: results.mark_as_done(job, {"images": []}),
     "FAILURE": lambda: results.mark_as_failure(job, ValueError("boom"))}[first]()  # fmt: skip
    fencing.hold(job, take(client, job))
    results.store_result(job, {"hostname": "a"}, "STARTED")
    results.store_result(job, {"stage": "decoder", "step": 3, "total": 9}, "PROGRESS")
    results.mark_as_done(job, {"images": []})
    fencing.release(job)
    results.mark_as_revoked(job, reason="cancelled")  # as the API would, unfenced
    assert json.loads(client.get(f"celery-task-meta-{job}"))["status"] == first
    events = [json.loads(meta[b"meta"])["status"] for _, meta in client.xrange(events_key(job))]
    assert events == [first] and not refusals


def test_no_state_is_written_once_a_jobs_outputs_are_deleted(db, job, refusals):
    """The tombstone drops the job's status; a run still going (a cancel raced its start) writes none again."""
    client, keys = db
    keys.append(deleted_key(job))
    results = backend()
    results.mark_as_revoked(job, reason="cancelled")
    client.delete(f"celery-task-meta-{job}")
    client.set(deleted_key(job), "1")  # what retention.tombstone leaves
    fencing.hold(job, take(client, job))
    results.store_result(job, {"stage": "decoder", "step": 3, "total": 9}, "PROGRESS")
    results.mark_as_done(job, {"images": []})
    assert client.get(f"celery-task-meta-{job}") is None and client.xlen(events_key(job)) == 1 and not refusals


def test_set_and_delete_if_current(db, job, refusals):
    client, _ = db
    take(client, job)
    key = frames_key(job)
    assert fencing.set_if_current(client, job, 1, key, "one", 60)
    assert not fencing.set_if_current(client, job, 1, key, "two", 60, nx=True)  # NX: already there
    assert refusals == []  # NX declining is not a refusal
    take(client, job)
    assert not fencing.set_if_current(client, job, 1, key, "stale", 60)
    assert client.get(key) == b"one" and refusals == [job]
    assert 0 < client.ttl(key) <= 60
    assert fencing.set_if_current(client, job, 2, key, "current", 60)
    assert not fencing.delete_if_current(client, job, 1, key) and client.get(key) == b"current"
    assert fencing.delete_if_current(client, job, 2, key) and not client.exists(key)


class FakeApp:
    def __init__(self):
        self.sent = []

    def send_task(self, name, args, queue, task_id, headers=None):
        self.sent.append(task_id)


def test_a_stale_run_does_not_queue_the_jobs_one_webhook(db, job, refusals):
    client, _ = db
    app = FakeApp()
    take(client, job), take(client, job)
    assert not queue_webhook(app, client, job, "https://example.com/hook", 60, token=1)
    assert app.sent == [] and not client.exists(webhook_queued_key(job))
    assert queue_webhook(app, client, job, "https://example.com/hook", 60, token=2)
    assert not queue_webhook(app, client, job, "https://example.com/hook", 60, token=2)  # once
    assert len(app.sent) == 1


def test_each_delivery_takes_the_next_token_and_a_stale_end_leaves_the_newer_count(db, job):
    client, _ = db
    guard = DeliveryGuard(client, max_deliveries=5, ttl_s=60)
    first = guard.begin(job)
    assert fencing.held(job) == first.token == 1 and 0 < client.ttl(fence_key(job)) <= 60
    second = DeliveryGuard(client, max_deliveries=5, ttl_s=60).begin(job)  # another worker, same process here
    assert second.token == 2 and second.attempt == 2
    fencing.hold(job, first.token)  # back to the first run's view
    guard.end(job)  # the stale run's end: the newer delivery's count stays
    assert client.hget(deliveries_key(job), "solo") == b"2"
    fencing.hold(job, second.token)
    guard.end(job)
    assert not client.exists(deliveries_key(job))


def settings():
    return Settings(progress_interval_ms=0, result_ttl_s=60)


def test_the_step_check_and_the_upload_check_stop_a_stale_run_before_it_writes(db, job, refusals):
    client, _ = db
    fencing.hold(job, take(client, job))
    records = JobRecords(backend(), None, settings())
    ctx = records.context(job, 60)
    ctx.progress("decoder", 1, 9)  # current: reported
    ctx.frame_done(ImageRef(uri="s3://b/k", url="u", width=1, height=1, format="png"))
    take(client, job)
    with pytest.raises(StaleDelivery, match="stale"):
        ctx.progress("decoder", 2, 9)
    assert issubclass(StaleDelivery, JobCancelled)  # so it leaves the pipelines and batches as a cancel does
    storage = MemoryStorage()
    runner = Runner(settings(), storage=storage, pipelines=SimpleNamespace())
    with pytest.raises(StaleDelivery):
        runner.upload(job, 0, b"png", parse_job({"inputs": [{"text": "a", "weight": 1.0}]}), 1, fence=ctx.fence)
    assert storage.objects == {}
    ctx.frame_done(ImageRef(uri="s3://b/k2", url="u", width=1, height=1, format="png"))  # refused
    assert len(json.loads(client.get(frames_key(job)))) == 1
    records.store(job, StaleDelivery("stale"))  # writes nothing
    metas = [json.loads(f[b"meta"])["status"] for _, f in client.xrange(events_key(job))]
    assert metas == ["PROGRESS"] and Progress(**json.loads(client.get(f"celery-task-meta-{job}"))["result"]).step == 1


def _request(delivered: dict, job_id: str, tag: str) -> SimpleNamespace:
    """A Celery request as the let-go code reads it: its message on a channel whose QoS holds `delivered`."""
    channel = SimpleNamespace(qos=SimpleNamespace(_delivered=delivered))
    return SimpleNamespace(id=job_id, acknowledged=False, message=SimpleNamespace(channel=channel, delivery_tag=tag))


def test_letting_go_settles_the_message_in_this_process_only(monkeypatch):
    from celery.worker import state

    delivered = {"tag-a": object(), "tag-b": object()}
    running, reserved = _request(delivered, "a", "tag-a"), _request(delivered, "b", "tag-b")
    monkeypatch.setattr(state, "active_requests", [running])
    monkeypatch.setattr(state, "reserved_requests", [reserved])
    stale_runs.let_go("a")
    stale_runs.let_go("b")
    assert running.acknowledged and reserved.acknowledged and delivered == {}
    assert not stale_runs.was_let_go("a")  # it runs now: nothing to remember
    assert stale_runs.was_let_go("b") and not stale_runs.was_let_go("b")  # its turn, once


def test_the_celery_and_kombu_parts_used_to_let_go_are_still_there():
    """worker/fencing.py leans on these; if a Celery or kombu release changes them, this fails loudly."""
    from celery.worker import request, state
    from kombu.transport.redis import QoS

    assert "if not self.acknowledged" in inspect.getsource(request.Request.acknowledge)
    assert "return self.acknowledge()" in inspect.getsource(request.Request.on_failure)  # Ignore: acknowledge
    assert isinstance(request.Request.message, property) and request.Request.acknowledged is False
    assert hasattr(state, "active_requests") and hasattr(state, "reserved_requests")
    assert "_delivered" in inspect.getsource(QoS.restore_unacked)  # what the restore at shutdown walks
    assert "self._delivered" in inspect.getsource(QoS.__mro__[1].__init__)


def test_a_stale_batch_mate_leaves_the_batch_without_writing_and_its_own_turn_does_not_run_it(monkeypatch):
    from celery.worker import state

    from worker.batching import DecoderBatch, Mate

    class Untouchable:
        def __getattr__(self, name):
            raise AssertionError(f"a stale mate must not {name}")

    finished = []
    observers = SimpleNamespace(finished=lambda outcome, seconds, timings=None: finished.append(outcome))
    batch = DecoderBatch(None, settings(), Untouchable(), Untouchable(), observers)
    message = SimpleNamespace(channel=SimpleNamespace(qos=SimpleNamespace(_delivered={"tag": 1})), delivery_tag="tag")
    mate = SimpleNamespace(id="mate-1", acknowledged=False, message=message)
    monkeypatch.setattr(state, "active_requests", [])
    monkeypatch.setattr(state, "reserved_requests", [mate])
    fencing.hold("mate-1", 1)
    batch._settle(Mate("mate-1", None, {}), StaleDelivery("delivery 1 of mate-1 is stale"), 1.0)
    assert finished == ["stale"] and fencing.held("mate-1") is None and mate.acknowledged
    assert stale_runs.was_let_go("mate-1")  # its own turn is skipped


def test_letting_go_of_the_running_request_does_not_skip_the_jobs_next_delivery(monkeypatch):
    """Celery lists the running request as reserved too: marking it would let every later delivery of the job be
    let go of in turn, a job redelivered and ignored forever (found by test_lease_faults after self-fencing)."""
    from celery.worker import state

    message = SimpleNamespace(channel=SimpleNamespace(qos=SimpleNamespace(_delivered={"tag": 1})), delivery_tag="tag")
    running = SimpleNamespace(id="run-1", acknowledged=False, message=message)
    monkeypatch.setattr(state, "active_requests", [running])
    monkeypatch.setattr(state, "reserved_requests", [running])
    stale_runs.let_go("run-1")
    assert running.acknowledged and message.channel.qos._delivered == {}
    assert not stale_runs.was_let_go("run-1")


def test_a_run_whose_leases_lapsed_stops_at_its_next_step_even_when_redis_is_unreachable(job, monkeypatch):
    """Self-fencing: cut off from Redis, a worker cannot see a newer token, so it stops once its own leases are
    two thirds of the timeout old, before another worker can take the job."""
    from kiq import leases

    keeper = leases.LeaseKeeper(redis=None, held=list, interval_s=1.0)
    keeper.lapse_after_s = leases.lapse_after_s(6)
    monkeypatch.setattr(leases, "_process_keeper", [keeper])
    unreachable = redis.Redis(host="127.0.0.1", port=1, **leases.lease_sockets(6))  # as checks_client; nothing there
    records = JobRecords(backend(), Celery("fencing-test", set_as_current=False), Settings(), unreachable)
    ctx = records.context(job, limit_s=60)
    keeper.last_renewed -= 1.0  # renewed a second ago: a Redis blip is not a lapse
    assert ctx.cancelled() is False
    keeper.last_renewed -= 4.0  # 5 s without a renewal, past 4 s (two thirds of 6)
    with pytest.raises(StaleDelivery, match="last renewed"):
        ctx.cancelled()
    with pytest.raises(StaleDelivery):
        records.check_fence(job)


def test_a_run_stopped_as_its_leases_lapsed_lets_go_of_the_prefetched_jobs_too(monkeypatch):
    """Their leases lapsed with the running job's: another worker may take them, and a copy run here later would
    take a newer token and fence that worker's run out (the chaos campaign, seed 4: a batching worker's prefetched
    job held through a partition while another worker ran it)."""
    from celery.worker import state

    delivered = {"tag-run": 1, "tag-next": 2}
    running, prefetched = _request(delivered, "run-2", "tag-run"), _request(delivered, "next-2", "tag-next")
    monkeypatch.setattr(state, "active_requests", [running])
    monkeypatch.setattr(state, "reserved_requests", [running, prefetched])
    stale_runs.let_go_reserved()
    assert prefetched.acknowledged and delivered == {"tag-run": 1}  # the running one is its run's to let go of
    assert not running.acknowledged
    assert stale_runs.was_let_go("next-2")  # its turn, if Celery keeps it, does not run it


class _Unreachable:
    """The leases' Redis cut off by a partition: every renewal fails."""

    def zadd(self, *args, **kwargs):
        raise redis.ConnectionError("partitioned")

    ping = zadd


def test_the_lease_keeper_lets_go_of_prefetched_jobs_once_its_leases_lapse_with_no_run_in_progress(monkeypatch):
    """Issue 20 (the long chaos campaign): a batching worker with no running job held a prefetched copy through a
    partition, then started it as a new delivery and fenced out the worker that had taken the job meanwhile. No run
    was there to stop and let go: the keeper itself does, past the self-fencing point."""
    from celery.worker import state

    from kiq import leases

    delivered = {"tag-next": 1}
    prefetched = _request(delivered, "next-3", "tag-next")
    monkeypatch.setattr(state, "active_requests", [])
    monkeypatch.setattr(state, "reserved_requests", [prefetched])
    monkeypatch.setattr(leases, "on_lapse", None)
    stale_runs.install()  # what the worker's task module does
    assert leases.on_lapse is stale_runs.let_go_reserved
    keeper = leases.LeaseKeeper(_Unreachable(), lambda: [("index", "tag-next")], interval_s=0.02)
    keeper.lapse_after_s = 0.2
    keeper.start()
    try:
        deadline = time.monotonic() + 5
        while not prefetched.acknowledged and time.monotonic() < deadline:
            time.sleep(0.01)
        assert keeper.let_go and time.monotonic() - keeper.last_renewed > 0.2
    finally:
        keeper.stop()
    assert prefetched.acknowledged and delivered == {}  # settled here only: no ack, no more renewals of its lease
    assert stale_runs.was_let_go("next-3")  # its turn, after the partition heals, does not run it


def test_a_job_is_never_started_while_this_workers_leases_are_lapsed(monkeypatch):
    """The check at start: a prefetched request whose lease lapsed (the keeper's let-go not reached yet) is dropped
    without running and without an ack; a sweep hands the job back."""
    from celery.exceptions import Ignore
    from celery.worker import state

    from kiq import leases
    from worker.execution import JobDelivery

    delivered = {"tag-start": 1}
    message = SimpleNamespace(
        channel=SimpleNamespace(qos=SimpleNamespace(_delivered=delivered)), delivery_tag="tag-start"
    )
    starting = SimpleNamespace(id="start-4", acknowledged=False, message=message)
    monkeypatch.setattr(state, "active_requests", [starting])
    monkeypatch.setattr(state, "reserved_requests", [starting])
    keeper = leases.LeaseKeeper(redis=None, held=list, interval_s=1.0)
    keeper.last_renewed -= 5.0
    keeper.lapse_after_s = leases.lapse_after_s(6)
    monkeypatch.setattr(leases, "_process_keeper", [keeper])
    delivery = object.__new__(JobDelivery)  # no records, runner or guard: touching any of them fails the test
    delivery.job_id = "start-4"
    with pytest.raises(Ignore):
        delivery._deliver({})
    assert starting.acknowledged and delivered == {}  # Celery sends no ack for it


def _lapsed_keeper(monkeypatch):
    from kiq import leases

    keeper = leases.LeaseKeeper(redis=None, held=list, interval_s=1.0)
    keeper.lapse_after_s = leases.lapse_after_s(6)
    monkeypatch.setattr(leases, "_process_keeper", [keeper])
    return keeper


def _delivery(job_id: str, **methods):
    """A JobDelivery with no records, runner or guard: touching any of them fails the test."""
    from worker.execution import JobDelivery

    delivery = object.__new__(JobDelivery)
    delivery.job_id, delivery.records = job_id, SimpleNamespace(began=None)
    for name, method in methods.items():
        setattr(delivery, name, method)
    return delivery


@pytest.mark.parametrize("where", ["final state check", "expiry check"])
def test_a_redis_error_once_the_leases_lapsed_lets_go_instead_of_failing_the_job(monkeypatch, where):
    """Review of issue 20: a pre-run Redis call that gave up as the leases lapsed raised an ordinary error, so Celery
    stored FAILURE (or, partitioned, failed that and its ack, and the job hung): now the delivery lets go of the job,
    writes nothing, sends no ack, and a sweep hands it back."""
    from celery.exceptions import Ignore
    from celery.worker import state

    keeper = _lapsed_keeper(monkeypatch)
    delivered = {"tag-d1": 1}
    running = _request(delivered, "d1", "tag-d1")
    monkeypatch.setattr(state, "active_requests", [running])
    monkeypatch.setattr(state, "reserved_requests", [running])

    def cut_off(*args):
        keeper.last_renewed -= 5.0  # the lapse comes while the call retries
        raise redis.ConnectionError("partitioned")

    calls = {"_final": cut_off}
    if where == "expiry check":
        calls = {"_final": lambda: False, "_expire_if_late": cut_off}
    with pytest.raises(Ignore):
        _delivery("d1", **calls)._deliver({})
    assert running.acknowledged and delivered == {}


def test_a_redis_error_with_the_leases_current_still_fails_as_before(monkeypatch):
    from celery.worker import state

    _lapsed_keeper(monkeypatch)
    monkeypatch.setattr(state, "active_requests", [])
    monkeypatch.setattr(state, "reserved_requests", [])

    def blip():
        raise redis.ConnectionError("down for longer than KIQ_REDIS_RETRY_S")

    with pytest.raises(redis.ConnectionError):
        _delivery("d2", _final=blip)._deliver({})


def test_the_keeper_lets_go_of_jobs_kept_across_a_reconnect_that_celery_forgot(monkeypatch):
    """Review of issue 20: a reconnect clears Celery's reserved requests while the threads pool still holds them and
    kiq's transport keeps their messages; at a lapse those too are let go of, and their turns do not run them."""
    from celery.worker import state

    from kiq import transport

    delivered = {"tag-k": 1}
    message = SimpleNamespace(delivery_tag="tag-k", acknowledged=False, headers={"id": "kept-5"},
                              channel=SimpleNamespace(qos=SimpleNamespace(_delivered=delivered)))  # fmt: skip
    monkeypatch.setattr(transport, "_kept", {"tag-k": ("kiq:unacked_index:60s", message)})
    monkeypatch.setattr(state, "active_requests", [])
    monkeypatch.setattr(state, "reserved_requests", [])
    stale_runs.let_go_reserved()
    assert transport.kept_leases() == [] and delivered == {}
    assert stale_runs.was_let_go("kept-5") and not stale_runs.was_let_go("kept-5")


def test_a_let_go_request_is_not_renewed_by_the_keeper(monkeypatch):
    from celery.worker import state

    from kiq import leases

    delivered = {"tag-a": 1, "tag-b": 1}
    kept, settled = _request(delivered, "a", "tag-a"), _request(delivered, "b", "tag-b")
    settled.acknowledged = True
    monkeypatch.setattr(state, "active_requests", [kept])
    monkeypatch.setattr(state, "reserved_requests", [settled])
    assert leases.held_tags(SimpleNamespace()) == {"tag-a"}


def test_a_blip_while_a_batch_leader_looks_for_mates_is_retried(monkeypatch):
    """Review of issue 20: the leader's Redis TIME had no retry, so a blip failed the job (without a token yet)."""
    from kiq.settings import Settings
    from worker import batching

    answers = [redis.ConnectionError("blip"), (1_700_000_000, 0)]

    def time_or_blip():
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    task = SimpleNamespace(backend=SimpleNamespace(client=SimpleNamespace(time=time_or_blip)),
                           request=SimpleNamespace(id="leader"))  # fmt: skip
    monkeypatch.setattr(batching.internals, "reserved_requests", lambda: [])
    settings = Settings(decoder_batch=2, decoder_batch_wait_ms=0, redis_retry_s=5)
    leader = parse_job({"inputs": [{"text": "a cat", "weight": 1.0}]})
    assert batching.find_mates(task, leader, settings, lambda _: True) == [] and answers == []


def test_a_run_that_began_before_a_lapse_stops_even_once_renewals_resumed(monkeypatch):
    """Review of issue 20: after SIGCONT the paused worker's keeper notes the lapse and renews within milliseconds,
    before the run's next step check, which then saw current leases and went on beside the worker that took the
    job. The lapse is counted, and a run that began before it stops."""
    from kiq import leases
    from worker import records
    from worker.runner import LeasesLapsed

    keeper = leases.LeaseKeeper(redis=None, held=list, interval_s=1.0)
    keeper.lapse_after_s = 4.0
    monkeypatch.setattr(leases, "_process_keeper", [keeper])
    monkeypatch.setattr(leases, "on_lapse", None)
    began = leases.lapse_count()
    records._raise_if_lapsed("p1", None, began)  # current leases: the run goes on
    keeper.last_renewed -= 5.0  # SIGSTOPped for 5 s
    keeper._let_go_if_lapsed()  # the keeper's first round after SIGCONT …
    keeper._renewed()  # … renews at once
    assert leases.lapsed() is None
    with pytest.raises(LeasesLapsed, match="lapsed during this run"):
        records._raise_if_lapsed("p1", None, began)
    records._raise_if_lapsed("p2", None, leases.lapse_count())  # a run begun since goes on
