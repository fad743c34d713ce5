"""Redis URLs: plain and Sentinel, as kiq checks them and as Celery and kombu are given them."""

import pytest
from kombu import Connection

from kiq import redisconn, redisurl
from kiq.celeryconf import common_config
from kiq.errors import SettingsError
from kiq.settings import Settings

SENTINELS = "sentinel://:s3cret@10.0.0.1:26379;sentinel://10.0.0.2:26380;sentinel://10.0.0.3/4"


def test_sentinel_url_lists_every_sentinel_with_one_database_and_password():
    url = redisurl.parse(SENTINELS, "KIQ_BROKER_URL")
    assert url.sentinel and url.db == 4 and url.password == "s3cret"
    assert url.hosts == (("10.0.0.1", 26379), ("10.0.0.2", 26380), ("10.0.0.3", 26379))
    assert url.celery_url() == (
        "sentinel://:s3cret@10.0.0.1:26379/4;sentinel://:s3cret@10.0.0.2:26380/4;sentinel://:s3cret@10.0.0.3:26379/4"
    )


def test_plain_url_is_passed_through_unchanged():
    raw = "rediss://:pw@redis.internal:6380/2?ssl_cert_reqs=required"
    url = redisurl.parse(raw, "KIQ_BROKER_URL")
    assert not url.sentinel and url.celery_url() == raw and url.db == 2


@pytest.mark.parametrize(
    "raw",
    [
        "sentinel://a:1/1;sentinel://b:2/2",  # two databases
        "redis://a:1;redis://b:2",  # several servers without Sentinel
        "sentinel://a:1;redis://b:2",  # mixed schemes
        "sentinel://:x@a:1;sentinel://:y@b:2",  # two passwords
        "sentinel://a:99999",  # bad port
        "sentinel://a:1/zero",  # bad database
        "sentinel://",  # no host
        "amqp://guest@localhost//",
    ],
)
def test_bad_urls_name_the_variable(raw):
    with pytest.raises(SettingsError, match="KIQ_BROKER_URL"):
        Settings(broker_url=raw)


def test_celery_and_kombu_get_the_master_name_and_the_sentinels_password():
    settings = Settings(broker_url=SENTINELS, sentinel_master="fleet", sentinel_password="sentinel-pw")
    conf = common_config(settings)
    for options in (conf["broker_transport_options"], conf["result_backend_transport_options"]):
        assert options["master_name"] == "fleet"
        assert options["sentinel_kwargs"] == {"password": "sentinel-pw"}
    assert conf["broker_url"] == settings.broker_server.celery_url()
    assert conf["result_backend"] == f"kiq.events:SentinelEventsBackend+{conf['broker_url']}"  # with event streams
    # kombu reads the Sentinels from the alternates and the database from the first part
    connection = Connection(conf["broker_url"])
    assert connection.transport_cls == "sentinel" and len(connection.alt) == 3
    assert connection.virtual_host == "4"


def test_plain_redis_gets_no_sentinel_options():
    conf = common_config(Settings())
    assert conf["result_backend"] == "kiq.events:EventsBackend+redis://localhost:6379/0"
    assert "master_name" not in conf["broker_transport_options"]
    assert "master_name" not in conf["result_backend_transport_options"]


def test_empty_master_name_is_refused():
    with pytest.raises(SettingsError, match="KIQ_SENTINEL_MASTER"):
        Settings.from_env({"KIQ_BROKER_URL": SENTINELS, "KIQ_SENTINEL_MASTER": " "})


@pytest.mark.parametrize("within_s", [1, 10, 30, 120])
def test_publish_retries_span_the_redis_retry_window(within_s):
    policy = redisconn.publish_retry_policy(within_s)
    waits = [
        min(policy["interval_max"], policy["interval_start"] + policy["interval_step"] * n)
        for n in range(policy["max_retries"])
    ]
    assert within_s <= sum(waits) < within_s + policy["interval_max"]


def test_retrying_rides_out_errors_within_the_window(monkeypatch):
    monkeypatch.setattr(redisconn.time, "sleep", lambda s: None)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("failover")
        return "ok"

    assert redisconn.retrying(flaky, within_s=30, what="test") == "ok" and len(calls) == 3
    with pytest.raises(ConnectionError):
        redisconn.retrying(lambda: (_ for _ in ()).throw(ConnectionError("down")), within_s=0, what="test")


def test_passwords_with_url_characters_reach_kombu_and_celery_intact():
    settings = Settings(broker_url="sentinel://:p%2Fw%3Bd%40x@h1:26379;sentinel://h2:26380/2")
    assert settings.broker_server.password == "p/w;d@x"
    connection = Connection(settings.broker_server.celery_url())
    assert connection.password == "p/w;d@x" and connection.virtual_host == "2" and len(connection.alt) == 2


def test_async_sentinel_client_waits_for_a_connection_instead_of_failing():
    from redis.asyncio import BlockingConnectionPool

    settings = Settings(broker_url=SENTINELS)
    client = redisconn.connect_async(settings.results_server, settings, max_connections=4)
    assert isinstance(client.connection_pool, BlockingConnectionPool)
    assert client.connection_pool.max_connections == 4
