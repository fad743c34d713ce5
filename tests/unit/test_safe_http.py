import ipaddress
import time

import pytest

from kiq.errors import BlockedAddress, FetchError, FetchUnavailable, ImageTooLarge
from kiq.safe_http import AddressPolicy, HttpLimits, get
from tests.helpers import ALLOWED_HOST, Reply, http_server, image_bytes, redirect

LIMITS = HttpLimits(max_bytes=100_000, timeout_s=2.0, max_redirects=3)
POLICY = AddressPolicy.parse(ALLOWED_HOST)
PNG = image_bytes()


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/x.png",
        "http://localhost:8080/x.png",
        "http://10.0.0.1/x.png",
        "http://192.168.1.10/x.png",
        "http://172.16.0.5/x.png",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]/x.png",
        "http://[::ffff:127.0.0.1]/x.png",
        "http://[fd00:ec2::254]/x.png",
        "http://0.0.0.0/x.png",
        "http://100.64.0.1/x.png",
    ],
)
def test_non_public_addresses_are_refused_before_connecting(url):
    started = time.monotonic()
    with pytest.raises(BlockedAddress, match="address; refused"):
        get(url, LIMITS, AddressPolicy())
    assert time.monotonic() - started < 1


def test_allowlist_by_network_and_host():
    policy = AddressPolicy.parse("10.0.0.0/8, minio.internal")
    policy.check("u", "anything", ipaddress.ip_address("10.1.2.3"))
    policy.check("u", "minio.internal", ipaddress.ip_address("192.168.0.1"))
    with pytest.raises(BlockedAddress):
        policy.check("u", "other", ipaddress.ip_address("192.168.0.1"))
    AddressPolicy().check("u", "example.com", ipaddress.ip_address("93.184.216.34"))


def test_success_redirects_and_errors():
    routes = {
        "/cat.png": Reply(body=PNG),
        "/hop1": redirect("/hop2"),
        "/hop2": redirect("/cat.png", 301),
        "/loop": redirect("/loop"),
        "/to-loopback": redirect("http://127.0.0.1:80/cat.png"),
        "/to-metadata": redirect("http://169.254.169.254/latest/meta-data/"),
        "/to-ftp": redirect("ftp://example.com/cat.png"),
        "/busy": Reply(503, "text/plain", b"busy"),
        "/gone": Reply(410, "text/plain", b"gone"),
        "/huge-declared": Reply(body=b"x" * 10, headers=()),
    }
    with http_server(routes) as base:
        assert get(f"{base}/cat.png", LIMITS, POLICY) == PNG
        assert get(f"{base}/hop1", LIMITS, POLICY) == PNG
        with pytest.raises(FetchError, match="too many redirects"):
            get(f"{base}/loop", LIMITS, POLICY)
        with pytest.raises(BlockedAddress, match=r"127\.0\.0\.1, a loopback address"):
            get(f"{base}/to-loopback", LIMITS, POLICY)
        with pytest.raises(BlockedAddress, match="link-local"):
            get(f"{base}/to-metadata", LIMITS, POLICY)
        with pytest.raises(FetchError, match="only http and https"):
            get(f"{base}/to-ftp", LIMITS, POLICY)
        with pytest.raises(FetchUnavailable, match="HTTP 503"):
            get(f"{base}/busy", LIMITS, POLICY)
        with pytest.raises(FetchError, match="HTTP 410") as err:
            get(f"{base}/gone", LIMITS, POLICY)
        assert not isinstance(err.value, FetchUnavailable)
        with pytest.raises(ImageTooLarge, match="over the 5-byte cap"):
            get(f"{base}/cat.png", HttpLimits(5, 2.0, 3), POLICY)


def test_slow_sender_hits_the_total_time_limit():
    with http_server({"/slow.png": Reply(body=PNG, drip_s=0.05)}) as base:
        started = time.monotonic()
        with pytest.raises(FetchUnavailable, match=r"timed out|time limit"):
            get(f"{base}/slow.png", HttpLimits(100_000, 1.0, 3), POLICY)
        assert time.monotonic() - started < 2.5


def test_refused_connection_is_transient():
    with pytest.raises(FetchUnavailable, match="could not connect"):
        get(f"http://{ALLOWED_HOST}:9/cat.png", LIMITS, POLICY)


def test_unresolvable_host_is_permanent():
    with pytest.raises(FetchError, match="could not resolve") as err:
        get("http://no-such-host.invalid/cat.png", LIMITS, POLICY)
    assert not isinstance(err.value, FetchUnavailable)
