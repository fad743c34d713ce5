"""kiq names kombu's Redis lists and binding tables itself (kiq.celeryconf, kiq.brokerformat): these fail loudly
if the installed kombu names them differently, or if kiq's options stop being Celery's defaults."""

from types import SimpleNamespace

from kombu.transport import redis as kombu_redis

from kiq.brokerformat import BINDING_PATTERNS
from kiq.celeryconf import KOMBU_SEP, OLD_SEP, PRIORITY_STEPS, broker_transport_options, priority_lists
from kiq.settings import Settings

Channel = kombu_redis.Channel


def kombus_list(queue: str, priority: int) -> str:
    """kombu's own `_q_for_pri`, on a stand-in channel with its default options."""
    channel = SimpleNamespace(sep=Channel.sep, priority_steps=Channel.priority_steps)
    channel.priority = lambda n: Channel.priority(channel, n)
    return Channel._q_for_pri(channel, queue, priority)


def test_kiq_keeps_kombus_default_separator_and_priority_steps():
    options = broker_transport_options(Settings())
    assert "sep" not in options  # a plain Celery app, Flower and `celery inspect` use kombu's default
    assert Channel.sep == KOMBU_SEP
    assert options["priority_steps"] == list(Channel.priority_steps) == list(PRIORITY_STEPS)


def test_priority_lists_are_the_lists_kombu_pushes_to():
    for queue in ("kiq", "kiq-large", "kiq.webhooks"):
        # kiq sends a job's priority p as 9 - p: any sent priority within a step lands on that step's list.
        assert [kombus_list(queue, sent) for sent in PRIORITY_STEPS] == priority_lists(queue)
        assert [kombus_list(queue, sent + 2) for sent in PRIORITY_STEPS] == priority_lists(queue)
    assert priority_lists("kiq") == ["kiq", "kiq\x06\x163", "kiq\x06\x166", "kiq\x06\x169"]
    assert priority_lists("kiq", OLD_SEP) == ["kiq", "kiq:3", "kiq:6", "kiq:9"]  # what older kiq releases used


def test_binding_tables_are_where_kombu_keeps_them():
    assert [Channel.keyprefix_queue % ("",) + "*", Channel.keyprefix_binding_permanent % ("",) + "*"] == list(
        BINDING_PATTERNS
    )
