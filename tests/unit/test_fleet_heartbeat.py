import threading

from worker.fleet import Heartbeat


class SlowRedis:
    """Records hset mappings; the first write stalls, as a descheduled heartbeat thread would."""

    def __init__(self):
        self.writes, self.stall = [], threading.Event()

    def hset(self, key, mapping):
        if not self.writes and threading.current_thread().name == "stale":
            self.stall.wait(1)
        self.writes.append(dict(mapping))

    def expire(self, key, ttl):
        pass

    def delete(self, key):
        pass

    def zadd(self, key, mapping):
        pass

    def zrem(self, key, member):
        pass


def test_a_periodic_beat_cannot_overwrite_a_newer_job_state():
    redis = SlowRedis()
    beat = Heartbeat(redis, "kiq@h-cpu0", "cpu:0", ["kiq"])
    stale = threading.Thread(target=beat._beat, name="stale")
    stale.start()
    started = threading.Thread(target=beat.job_started, args=("job-1",))
    started.start()
    redis.stall.set()
    stale.join()
    started.join()
    assert redis.writes[-1]["current_job"] == "job-1"
    beat.job_finished(ok=False)
    assert (redis.writes[-1]["current_job"], redis.writes[-1]["failed"], redis.writes[-1]["done"]) == ("", 1, 0)


def test_two_processes_with_one_nodename_keep_separate_beats():
    import os

    first = Heartbeat(SlowRedis(), "kiq@h-cpu0", "cpu:0", ["kiq"])
    assert first.key == f"kiq:fleet:kiq@h-cpu0:{os.getpid()}"
