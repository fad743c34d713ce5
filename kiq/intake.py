"""Stopping and restarting a worker's intake of jobs from any thread, as Celery's remote control does
(`cancel_consumer`, `add_consumer`), through Celery's public consumer API. The change runs on the consumer's
own event loop (`call_soon`: kombu's connection is not thread-safe), so with the solo pool it takes effect once
the running job ends, before the next job is fetched. A paused queue is also deselected, so that a broker
reconnect meanwhile (which rebuilds the task consumer from the selected queues) does not resume it."""

from __future__ import annotations

from typing import Any


class Intake:
    def __init__(self, consumer: Any) -> None:
        self.consumer = consumer
        self._paused: list[Any] = []  # the kombu Queues it stopped consuming; only the event loop touches it

    def pause(self) -> None:
        self.consumer.call_soon(self._pause)

    def resume(self) -> None:
        self.consumer.call_soon(self._resume)

    def _pause(self) -> None:
        queues, tasks = self.consumer.app.amqp.queues, self.consumer.task_consumer
        for queue in list(queues.consume_from.values()):
            queues.deselect(queue.name)
            if tasks is not None:
                tasks.cancel_by_queue(queue.name)
            self._paused.append(queue)

    def _resume(self) -> None:
        paused, self._paused = self._paused, []
        queues, tasks = self.consumer.app.amqp.queues, self.consumer.task_consumer
        for queue in paused:
            queues.select_add(queue)
            if tasks is not None and not tasks.consuming_from(queue.name):
                tasks.add_queue(queue)
        if paused and tasks is not None:
            tasks.consume()
