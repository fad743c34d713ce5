"""Stopping and restarting a worker's intake of jobs from any thread, as Celery's remote control does
(`cancel_consumer`, `add_consumer`), through Celery's public consumer API. The change runs on the consumer's
own event loop (`call_soon`: kombu's connection is not thread-safe), so with the solo pool it takes effect once
the running job ends, before the next job is fetched. A paused queue is also deselected, so that a broker
reconnect meanwhile (which rebuilds the task consumer from the selected queues) does not resume it.

`pause` and `resume` only record what is wanted; each queued operation applies the latest wish. Celery runs
pending operations last-in first-out (`Consumer.perform_pending_operations` pops from the end), so a pause and a
resume queued during one job would otherwise run resume-then-pause and leave the worker paused for good."""

from __future__ import annotations

import threading
from typing import Any


class Intake:
    def __init__(self, consumer: Any) -> None:
        self.consumer = consumer
        self._lock = threading.Lock()
        self.holds: set[str] = set()  # why the worker should not take jobs; written by any thread, read on the loop
        self._paused: list[Any] = []  # the kombu Queues it stopped consuming; only the event loop touches it
        self._stopped = False  # whether the pause is applied; only the event loop touches it

    @classmethod
    def of(cls, consumer: Any) -> Intake:
        """The consumer's one Intake (made on first use)."""
        intake = getattr(consumer, "_kiq_intake", None)
        if intake is None:
            intake = consumer._kiq_intake = cls(consumer)
        return intake

    @property
    def wanted(self) -> bool:
        return not self.holds

    def pause(self, why: str = "leases") -> None:
        with self._lock:  # the lease keeper and the drain watcher change holds from their own threads
            self.holds = self.holds | {why}
        self.consumer.call_soon(self._apply)

    def resume(self, why: str = "leases") -> None:
        with self._lock:
            self.holds = self.holds - {why}
        self.consumer.call_soon(self._apply)

    def add(self, queue: Any) -> None:
        """Consume one more kombu Queue from now on (or from the resume, while paused)."""
        self.consumer.call_soon(lambda: self._add(queue))

    def _add(self, queue: Any) -> None:
        queues, tasks = self.consumer.app.amqp.queues, self.consumer.task_consumer
        if queue.name in queues.consume_from or any(q.name == queue.name for q in self._paused):
            return
        if self._stopped or not self.wanted:
            self._paused.append(queue)  # a pause pending or applied: taken up with the others at the resume
            return
        queues.select_add(queue)
        if tasks is not None:
            tasks.add_queue(queue)
            tasks.consume()

    def _apply(self) -> None:
        if self.wanted:
            self._resume()
        elif not self._stopped:
            self._pause()

    def _pause(self) -> None:
        self._stopped = True
        queues, tasks = self.consumer.app.amqp.queues, self.consumer.task_consumer
        for queue in list(queues.consume_from.values()):
            queues.deselect(queue.name)
            if tasks is not None:
                tasks.cancel_by_queue(queue.name)
            self._paused.append(queue)

    def _resume(self) -> None:
        paused, self._paused, self._stopped = self._paused, [], False
        queues, tasks = self.consumer.app.amqp.queues, self.consumer.task_consumer
        for queue in paused:
            queues.select_add(queue)
            if tasks is not None and not tasks.consuming_from(queue.name):
                tasks.add_queue(queue)
        if paused and tasks is not None:
            tasks.consume()
