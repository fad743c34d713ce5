"""Imported at start-up by the kiq processes whose clock the chaos campaign skews (this directory is on their
PYTHONPATH): their wall clock, `time.time` and `time.time_ns`, runs the number of seconds in KIQ_CHAOS_SKEW_FILE
off the host's, re-read at most every 0.2 s, so a skew can start and end while they run. Monotonic clocks are
left alone, as on a real host whose wall clock is wrong. (libfaketime cannot do this here: see services.py.)"""

import os
import time

_PATH = os.environ.get("KIQ_CHAOS_SKEW_FILE")
if _PATH:
    _real_time, _real_time_ns = time.time, time.time_ns
    _state = [0.0, -1.0]  # the offset, and when (monotonic) it was read

    def _offset() -> float:
        now = time.monotonic()
        if now - _state[1] > 0.2:
            try:
                with open(_PATH) as skew:
                    _state[0] = float(skew.read().strip() or 0)
            except (OSError, ValueError):
                pass  # mid-rewrite: keep the last offset
            _state[1] = now
        return _state[0]

    def _time() -> float:
        return _real_time() + _offset()

    def _time_ns() -> int:
        return _real_time_ns() + int(_offset() * 1e9)

    time.time, time.time_ns = _time, _time_ns
