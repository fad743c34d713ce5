"""Pausing and resuming a worker's intake through Celery's own pending-operations queue (found by the chaos
campaign: a pause and a resume queued during one job ran resume-then-pause, and the worker never took a job
again after a Sentinel failover)."""

from celery import Celery
from celery.worker.consumer.consumer import Consumer

from kiq.intake import Intake


class Tasks:
    """The task consumer's surface Intake uses, recording which queues it consumes."""

    def __init__(self, names):
        self.names = set(names)

    def cancel_by_queue(self, name):
        self.names.discard(name)

    def consuming_from(self, name):
        return name in self.names

    def add_queue(self, queue):
        self.names.add(queue.name)

    def consume(self):
        pass


class Loop:
    """Celery's consumer as the solo and threads pools run it: no hub, Celery's own call_soon and
    perform_pending_operations (which pops the newest operation first)."""

    call_soon = Consumer.call_soon
    perform_pending_operations = Consumer.perform_pending_operations

    def __init__(self):
        self.hub, self._pending_operations = None, []
        self.app = Celery("intake-test", set_as_current=False)
        self.app.conf.task_default_queue = "kiq"
        self.app.amqp.queues.select(["kiq"])
        self.task_consumer = Tasks(["kiq"])


def consumed(loop):
    return sorted(loop.app.amqp.queues.consume_from), sorted(loop.task_consumer.names)


def test_a_pause_and_a_resume_queued_during_one_job_leave_the_worker_taking_jobs():
    loop = Loop()
    intake = Intake(loop)
    intake.pause()
    intake.resume()  # both pending while the job runs; Celery then runs them newest first
    loop.perform_pending_operations()
    assert consumed(loop) == (["kiq"], ["kiq"])


def test_a_resume_then_a_pause_queued_together_leave_it_paused_and_a_later_resume_restores_it():
    loop = Loop()
    intake = Intake(loop)
    intake.pause()
    loop.perform_pending_operations()
    assert consumed(loop) == ([], [])
    intake.resume()
    intake.pause()
    loop.perform_pending_operations()
    assert consumed(loop) == ([], [])
    intake.resume()
    loop.perform_pending_operations()
    assert consumed(loop) == (["kiq"], ["kiq"])


def test_repeated_pauses_remember_the_queues_once():
    loop = Loop()
    intake = Intake(loop)
    for _ in range(3):
        intake.pause()
        loop.perform_pending_operations()
    intake.resume()
    loop.perform_pending_operations()
    assert consumed(loop) == (["kiq"], ["kiq"])


def test_a_queue_added_while_paused_is_consumed_only_from_the_resume():
    from kombu import Exchange, Queue

    loop = Loop()
    intake = Intake.of(loop)
    assert Intake.of(loop) is intake  # one per consumer: the leases and fair share share its pauses
    intake.pause("drain")
    intake.add(Queue("kiq.t.a", Exchange("kiq.t.a"), routing_key="kiq.t.a"))
    loop.perform_pending_operations()
    assert consumed(loop) == ([], [])
    intake.resume("leases")  # another reason's resume: the drain still holds
    loop.perform_pending_operations()
    assert consumed(loop) == ([], [])
    intake.resume("drain")
    loop.perform_pending_operations()
    assert consumed(loop) == (["kiq", "kiq.t.a"], ["kiq", "kiq.t.a"])
