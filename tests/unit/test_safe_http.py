import datetime
import ipaddress
import re
import socket
import ssl
import threading
import time
from contextlib import contextmanager

import pytest

from kiq import safe_http
from kiq.errors import BlockedAddress, FetchError, FetchUnavailable, ImageTooLarge
from kiq.safe_http import AddressPolicy, HttpLimits, get, post
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


# --- one deadline for DNS, connect, TLS, headers and body; every failure a kiq error ---------------------------


@contextmanager
def raw_server(handle, host=ALLOWED_HOST):
    """A bare TCP listener: `handle(conn, stop)` runs per connection, for misbehaviour http.server cannot do."""
    listener = socket.create_server((host, 0))
    listener.settimeout(0.05)
    stop = threading.Event()

    def run(conn):
        with conn:
            try:
                handle(conn, stop)
            except OSError:  # the client hung up: what these tests want
                pass

    def serve():
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)
            threading.Thread(target=run, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        listener.close()


def header_drip(conn, stop):
    conn.recv(65536)
    for byte in b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 3\r\n\r\nabc":
        if stop.wait(0.3):
            return
        conn.sendall(bytes([byte]))


def silent(conn, stop):
    stop.wait(10)  # accepts the TCP connection, then never answers (no TLS ServerHello either)


def short_body(conn, stop):
    conn.recv(65536)
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\n" + PNG[:10])


@pytest.mark.parametrize(
    ("handler", "scheme"),
    # A header dripped a byte at a time (each within a per-recv timeout), and a TLS handshake never answered:
    # only the watchdog bounds the whole exchange.
    [(header_drip, "http"), (silent, "https")],
    ids=["header drip", "silent TLS handshake"],
)
def test_a_stalled_exchange_is_cut_off_at_the_deadline(handler, scheme):
    with raw_server(handler) as port:
        started = time.monotonic()
        with pytest.raises(FetchUnavailable, match=r"took longer than the 1 s time limit"):
            get(f"{scheme}://{ALLOWED_HOST}:{port}/x.png", HttpLimits(100_000, 1.0, 3), POLICY)
        assert time.monotonic() - started < 1.5


def test_an_earlier_caller_deadline_wins():
    with raw_server(header_drip) as port:
        started = time.monotonic()
        with pytest.raises(FetchUnavailable, match=r"0\.5 s time limit"):
            get(f"http://{ALLOWED_HOST}:{port}/x.png", HttpLimits(100_000, 30.0, 3), POLICY, started + 0.5)
        assert time.monotonic() - started < 1.0
    with pytest.raises(FetchUnavailable, match="no time left"):
        get(f"http://{ALLOWED_HOST}:9/x.png", LIMITS, POLICY, time.monotonic() - 1)


def test_slow_dns_is_cut_off_at_the_deadline(monkeypatch):
    release = threading.Event()

    def hanging_getaddrinfo(*args, **kwargs):
        release.wait(10)
        raise socket.gaierror(socket.EAI_AGAIN, "gave up")

    monkeypatch.setattr(socket, "getaddrinfo", hanging_getaddrinfo)
    started = time.monotonic()
    try:
        with pytest.raises(FetchUnavailable, match=r"0\.5 s time limit \(resolving slow-dns\.example\)"):
            get("http://slow-dns.example/x.png", HttpLimits(100_000, 0.5, 3), POLICY)
        assert time.monotonic() - started < 1.0
    finally:
        release.set()


def test_body_cut_short_by_the_server_is_transient():
    with raw_server(short_body) as port:
        with pytest.raises(FetchUnavailable, match="closed the connection before the end of the body"):
            get(f"http://{ALLOWED_HOST}:{port}/x.png", LIMITS, POLICY)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (f"http://{ALLOWED_HOST}:99999/x.png", r"refusing 'http://127\.0\.0\.2:99999/x\.png': Port out of range"),
        (f"http://{ALLOWED_HOST}:http/x.png", r"refusing .*: Port could not be cast"),
        (f"http://{ALLOWED_HOST}:0/x.png", "port 0"),
        ("http://[::1/x.png", "refusing .*Invalid IPv6 URL"),
        (f"http://{'a' * 64}.example/x.png", "is not a valid host name"),  # UnicodeError from IDNA in getaddrinfo
    ],
)
def test_unusable_urls_are_permanent_fetch_errors(url, message):
    with pytest.raises(FetchError, match=message) as err:
        get(url, LIMITS, POLICY)
    assert not isinstance(err.value, FetchUnavailable)


def test_redirect_to_an_unusable_url_is_a_fetch_error():
    routes = {"/bad-port": redirect(f"http://{ALLOWED_HOST}:99999/x.png"), "/bad-ipv6": redirect("http://[::1/x")}
    with http_server(routes) as base:
        with pytest.raises(FetchError, match="Port out of range"):
            get(f"{base}/bad-port", LIMITS, POLICY)
        with pytest.raises(FetchError, match="redirected to an invalid URL"):
            get(f"{base}/bad-ipv6", LIMITS, POLICY)


def test_non_ascii_path_is_sent_percent_encoded():
    with http_server({"/caf%C3%A9.png?q=%C3%BC%20x": Reply(body=PNG)}) as base:
        assert get(f"{base}/café.png?q=ü x", LIMITS, POLICY) == PNG


def test_post_runs_under_the_same_deadline():
    with http_server({}) as base:
        assert post(f"{base}/hook", b"{}", {}, LIMITS, POLICY) == 501  # http.server has no do_POST
    with raw_server(header_drip) as port:
        started = time.monotonic()
        with pytest.raises(FetchUnavailable, match="1 s time limit"):
            post(f"http://{ALLOWED_HOST}:{port}/hook", b"{}", {}, HttpLimits(1000, 1.0, 0), POLICY)
        assert time.monotonic() - started < 1.5
    with pytest.raises(FetchError, match="Port out of range"):
        post(f"http://{ALLOWED_HOST}:99999/hook", b"{}", {}, LIMITS, POLICY)


# --- TLS ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    """A self-signed certificate for 127.0.0.2, and its key."""
    pytest.importorskip("cryptography")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kiq test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ALLOWED_HOST))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return folder / "cert.pem", folder / "key.pem"


def tls_server(cert, key):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)

    def handle(conn, stop):
        with context.wrap_socket(conn, server_side=True) as tls:
            tls.recv(65536)
            tls.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\n" + b"Content-Length: %d\r\n\r\n" % len(PNG) + PNG
            )

    return raw_server(handle)


def test_untrusted_certificate_is_a_permanent_fetch_error(tls_files):
    with tls_server(*tls_files) as port:
        with pytest.raises(FetchError, match=r"TLS certificate of 127\.0\.0\.2 not valid: self.signed") as err:
            get(f"https://{ALLOWED_HOST}:{port}/x.png", LIMITS, POLICY)
    assert not isinstance(err.value, FetchUnavailable)


def test_trusted_certificate_fetches(tls_files, monkeypatch):
    trusting = ssl.create_default_context(cafile=str(tls_files[0]))
    monkeypatch.setattr(safe_http, "_tls_context", lambda: trusting)
    with tls_server(*tls_files) as port:
        assert get(f"https://{ALLOWED_HOST}:{port}/x.png", LIMITS, POLICY) == PNG


def test_other_tls_failures_are_transient():
    with http_server({"/x.png": Reply(body=PNG)}) as base:  # plain HTTP on the other end of an https URL
        with pytest.raises(FetchUnavailable, match="TLS error"):
            get(base.replace("http://", "https://") + "/x.png", LIMITS, POLICY)


# --- addresses embedding an IPv4 address ---------------------------------------------------------------------------


def teredo(server: str, client: str) -> str:
    """2001:0::/32 with the server's IPv4, flags 0, port 0, and the client's IPv4 bit-inverted (RFC 4380)."""
    value = (
        (0x2001_0000 << 96)
        | (int(ipaddress.IPv4Address(server)) << 64)
        | (0xFFFF_FFFF ^ int(ipaddress.IPv4Address(client)))
    )
    return str(ipaddress.IPv6Address(value))


@pytest.mark.parametrize(
    ("address", "embedded", "kind"),
    [
        ("::ffff:10.0.0.1", "10.0.0.1", "private"),
        ("64:ff9b::a00:1", "10.0.0.1", "private"),  # NAT64: Python alone calls this global
        ("64:ff9b::7f00:1", "127.0.0.1", "loopback"),
        ("64:ff9b::a9fe:a9fe", "169.254.169.254", "link-local"),
        ("2002:c0a8:0101::", "192.168.1.1", "private"),  # 6to4
        ("2002:7f00:1::1", "127.0.0.1", "loopback"),
        (teredo("8.8.8.8", "10.0.0.1"), "10.0.0.1", "private"),  # Teredo: the client
        (teredo("192.168.1.1", "8.8.8.8"), "192.168.1.1", "private"),  # Teredo: the server
        ("::10.0.0.1", "10.0.0.1", "private"),  # IPv4-compatible
        ("::169.254.169.254", "169.254.169.254", "link-local"),
    ],
)
def test_ipv6_addresses_embedding_a_non_public_ipv4_are_refused(address, embedded, kind):
    shown = re.escape(str(ipaddress.ip_address(address)))
    pattern = rf"resolves to {shown} \(which embeds {re.escape(embedded)}\), a {kind} address; refused"
    with pytest.raises(BlockedAddress, match=pattern):
        AddressPolicy().check("u", "host", ipaddress.ip_address(address))


@pytest.mark.parametrize(
    "address",
    ["::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::1", teredo("8.8.8.8", "1.1.1.1"), "::8.8.8.8"],
)
def test_ipv6_addresses_embedding_a_public_ipv4_are_allowed(address):
    AddressPolicy().check("u", "host", ipaddress.ip_address(address))


def test_local_use_nat64_is_refused():
    with pytest.raises(BlockedAddress, match="local-use NAT64 address; refused"):
        AddressPolicy().check("u", "host", ipaddress.ip_address("64:ff9b:1::808:808"))
    AddressPolicy.parse("64:ff9b:1::/48").check("u", "host", ipaddress.ip_address("64:ff9b:1::808:808"))


def test_ipv6_loopback_and_unspecified_are_still_refused():
    for address in ("::1", "::"):
        with pytest.raises(BlockedAddress, match=rf"resolves to {re.escape(address)}, a"):
            AddressPolicy().check("u", "host", ipaddress.ip_address(address))


def test_embedded_private_address_in_a_url_is_refused_before_connecting():
    started = time.monotonic()
    with pytest.raises(BlockedAddress, match=r"which embeds 10\.0\.0\.1"):
        get("http://[64:ff9b::a00:1]/x.png", LIMITS, AddressPolicy())
    assert time.monotonic() - started < 1
