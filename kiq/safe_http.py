"""HTTP(S) GET for user-supplied URLs: address policy after DNS (every redirect hop too), the connection
pinned to the checked address, and caps on redirects, bytes and total time (slow senders included).

One deadline covers a whole request, redirects included: DNS runs in a daemon thread we stop waiting for,
and a watchdog timer shuts the socket down when the deadline passes, so a connect, TLS handshake or read
that trickles in one byte at a time cannot stretch it (a per-recv timeout alone would restart on every byte).
Every failure ends as a kiq error: FetchError (permanent), FetchUnavailable (transient) or BlockedAddress."""

from __future__ import annotations

import functools
import http.client
import ipaddress
import queue
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import quote, urljoin, urlsplit

from kiq.errors import BlockedAddress, FetchError, FetchUnavailable, ImageTooLarge

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_CHUNK = 64 * 1024
_URL_SAFE = "".join(map(chr, range(0x21, 0x7F)))  # printable ASCII stays; spaces, controls and non-ASCII are escaped
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052: Python calls it global, the IPv4 inside decides
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")  # RFC 8215: the operator's own translators
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")  # deprecated ::a.b.c.d, still routed by some stacks


@dataclass(frozen=True)
class HttpLimits:
    max_bytes: int
    timeout_s: float
    max_redirects: int


@dataclass(frozen=True)
class AddressPolicy:
    """Only globally routable addresses, unless the host or its address is allowlisted (on-prem use)."""

    networks: tuple[IPNetwork, ...] = ()
    hosts: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, allow: str) -> AddressPolicy:
        networks, hosts = [], set()
        for item in filter(None, (part.strip() for part in allow.split(","))):
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                hosts.add(item.lower())
        return cls(tuple(networks), frozenset(hosts))

    def check(self, url: str, host: str, address: IPAddress) -> None:
        if host.lower() in self.hosts or any(address in net for net in self.networks):
            return
        if address in _NAT64_LOCAL:
            raise BlockedAddress(f"{url}: {host} resolves to {address}, a local-use NAT64 address; refused")
        # A transition address reaches the IPv4 inside it: judge that one (each, for Teredo's server and client).
        embedded = _embedded_ipv4(address)
        for plain in embedded or [address]:
            if not plain.is_global:
                shown = f"{address} (which embeds {plain})" if embedded else str(address)
                raise BlockedAddress(f"{url}: {host} resolves to {shown}, a {_kind(plain)} address; refused")


def _embedded_ipv4(address: IPAddress) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv4-mapped, NAT64, 6to4, Teredo or IPv4-compatible IPv6 address carries."""
    if not isinstance(address, ipaddress.IPv6Address):
        return []
    found = []
    if address.ipv4_mapped:
        found.append(address.ipv4_mapped)
    if address in _NAT64 or (address in _IPV4_COMPATIBLE and int(address) > 1):  # :: and ::1 are IPv6's own
        found.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    if address.sixtofour:
        found.append(address.sixtofour)
    if address.teredo:
        found.extend(address.teredo)
    return found


def _kind(address: IPAddress) -> str:
    for attr in ("is_loopback", "is_link_local", "is_private", "is_multicast", "is_unspecified", "is_reserved"):
        if getattr(address, attr):
            return attr.removeprefix("is_").replace("_", "-")
    return "non-public"


@dataclass(frozen=True)
class _Budget:
    """The one deadline of a request (time.monotonic()), and the limit it stands for, for messages."""

    deadline: float
    limit_s: float

    @classmethod
    def start(cls, timeout_s: float, deadline: float | None) -> _Budget:
        now = time.monotonic()
        end = now + timeout_s if deadline is None else min(deadline, now + timeout_s)
        return cls(end, end - now)

    def passed(self) -> bool:
        return time.monotonic() >= self.deadline

    def left(self, url: str) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise self.expired(url)
        return left

    def expired(self, url: str, during: str = "") -> FetchUnavailable:
        if self.limit_s <= 0:
            return FetchUnavailable(f"no time left to fetch {url}")
        return FetchUnavailable(f"fetching {url} took longer than the {round(self.limit_s, 2):g} s time limit{during}")


def get(url: str, limits: HttpLimits, policy: AddressPolicy, deadline: float | None = None) -> bytes:
    """GET `url`, following redirects, within `limits.timeout_s` or by `deadline` (time.monotonic()), if earlier."""
    budget = _Budget.start(limits.timeout_s, deadline)
    for _ in range(limits.max_redirects + 1):
        status, location, body = _get_once(url, limits, policy, budget)
        if status not in _REDIRECTS:
            return _checked(url, status, body)
        if not location:
            raise FetchError(f"{url} answered HTTP {status} without a Location")
        try:
            url = urljoin(url, _header_url(location))
        except ValueError as exc:  # an invalid [IPv6] literal, say
            raise FetchError(f"{url} redirected to an invalid URL {location!r}: {exc}") from None
    raise FetchError(f"too many redirects (more than {limits.max_redirects}), last to {url}")


def post(
    url: str,
    body: bytes,
    headers: dict[str, str],
    limits: HttpLimits,
    policy: AddressPolicy,
    deadline: float | None = None,
) -> int:
    """POST to a checked, pinned address (redirects are not followed); returns the status code."""
    budget = _Budget.start(limits.timeout_s, deadline)
    with _exchange(url, policy, budget, "could not post to") as (conn, sock, path):
        sock.settimeout(budget.left(url))  # each call waits at most what is left; the watchdog bounds the sum
        conn.request("POST", path, body=body, headers={"User-Agent": "kiq", **headers})
        sock.settimeout(budget.left(url))
        response = conn.getresponse()
        response.read(_CHUNK)
        return response.status


def _checked(url: str, status: int, body: bytes) -> bytes:
    if status >= 500 or status == 429:
        raise FetchUnavailable(f"{url} answered HTTP {status}")
    if status >= 400:
        raise FetchError(f"{url} answered HTTP {status}")
    return body


def _get_once(url: str, limits: HttpLimits, policy: AddressPolicy, budget: _Budget) -> tuple[int, str, bytes]:
    with _exchange(url, policy, budget, "could not fetch") as (conn, sock, path):
        sock.settimeout(budget.left(url))  # each call waits at most what is left; the watchdog bounds the sum
        conn.request("GET", path, headers={"User-Agent": "kiq-worker", "Accept": "image/*"})
        sock.settimeout(budget.left(url))
        response = conn.getresponse()
        if response.status in _REDIRECTS:
            return response.status, response.getheader("Location", ""), b""
        return response.status, "", _read_body(url, response, sock, limits.max_bytes, budget)


@dataclass(frozen=True)
class _Target:
    scheme: str
    host: str
    port: int
    path: str


def _target(url: str) -> _Target:
    try:
        parts = urlsplit(url)
        port = parts.port  # raises on "host:99999" or "host:abc"
    except ValueError as exc:
        raise FetchError(f"refusing {url!r}: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise FetchError(f"refusing {url!r}: only http and https URLs with a host")
    if port == 0:
        raise FetchError(f"refusing {url!r}: port 0")
    # http.client sends the target as ASCII: escape the rest (UTF-8), as a browser would.
    path = quote(parts.path or "/", safe=_URL_SAFE) + (f"?{quote(parts.query, safe=_URL_SAFE)}" if parts.query else "")
    return _Target(parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80), path)


def _header_url(value: str) -> str:
    # http.client decodes header bytes as latin-1: take the raw bytes back and escape the non-ASCII ones.
    return quote(value.encode("latin-1", "replace"), safe=_URL_SAFE)


@contextmanager
def _exchange(
    url: str, policy: AddressPolicy, budget: _Budget, failed: str
) -> Iterator[tuple[http.client.HTTPConnection, socket.socket, str]]:
    """Resolve, check, connect (TLS for https) under the watchdog; yields the pinned connection, its socket and
    the request target, and turns every socket, TLS or HTTP failure inside into a kiq error."""
    target = _target(url)
    address = _resolve(url, target.host, target.port, budget)
    policy.check(url, target.host, address)
    watchdog, conn = _Watchdog(budget.deadline), None
    try:
        sock = _connect(url, target, address, budget, watchdog)
        conn = http.client.HTTPConnection(target.host, target.port)
        conn.sock = sock  # pinned to the address we checked: no second DNS lookup to rebind
        yield conn, sock, target.path
        if watchdog.fired:  # a read the shutdown cut short can look like a clean end of the body
            raise budget.expired(url)
    except ssl.SSLCertVerificationError as exc:  # a wrong or untrusted certificate does not fix itself
        why = exc.verify_message or exc
        raise FetchError(f"{failed} {url}: TLS certificate of {target.host} not valid: {why}") from None
    except (OSError, http.client.HTTPException, FetchUnavailable) as exc:  # SSLError, timeouts, resets are OSError
        if watchdog.fired or budget.passed():
            raise budget.expired(url) from None
        if isinstance(exc, FetchUnavailable):
            raise
        kind = "TLS error: " if isinstance(exc, ssl.SSLError) else ""
        raise FetchUnavailable(f"{failed} {url}: {kind}{exc or type(exc).__name__}") from None
    finally:
        watchdog.close()
        if conn is not None:
            conn.close()  # the response's file holds the socket open until it is closed too


class _Watchdog:
    """Shuts the watched socket down at the deadline: a blocked connect, handshake or read returns at once."""

    def __init__(self, deadline: float) -> None:
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self.fired = False
        self._timer = threading.Timer(max(0.0, deadline - time.monotonic()), self._fire)
        self._timer.daemon = True
        self._timer.start()

    def watch(self, sock: socket.socket) -> None:
        """Watch `sock` (the TLS socket replaces the plain one it wraps); closed by `close`."""
        with self._lock:
            self._sock = sock
            if self.fired:
                _shutdown(sock)

    def close(self) -> None:
        self._timer.cancel()
        with self._lock:  # no shutdown after this: the descriptor number may be reused once closed
            sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def _fire(self) -> None:
        with self._lock:
            self.fired = True
            if self._sock is not None:
                _shutdown(self._sock)


def _shutdown(sock: socket.socket) -> None:
    try:
        # The plain socket's method: SSLSocket.shutdown would also drop the TLS state under the reading thread.
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass  # not connected yet, or already closed: the socket timeout still bounds the call


def _resolve(url: str, host: str, port: int, budget: _Budget) -> IPAddress:
    try:
        return ipaddress.ip_address(host)  # a literal: nothing to look up
    except ValueError:
        pass
    answers: queue.SimpleQueue[list[tuple] | Exception] = queue.SimpleQueue()

    def lookup() -> None:
        try:
            answers.put(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except Exception as exc:  # noqa: BLE001 - handed to the waiting thread, which maps it
            answers.put(exc)

    # getaddrinfo cannot be interrupted: a daemon thread may finish it late, nobody waits past the deadline.
    threading.Thread(target=lookup, name="kiq-resolve", daemon=True).start()
    try:
        answer = answers.get(timeout=budget.left(url))
    except queue.Empty:
        raise budget.expired(url, f" (resolving {host})") from None
    if isinstance(answer, socket.gaierror):
        error = FetchUnavailable if answer.errno == socket.EAI_AGAIN else FetchError
        raise error(f"could not resolve {host} for {url}: {answer.strerror}")
    if isinstance(answer, ValueError):  # UnicodeError from IDNA: a label over 63 characters, say
        raise FetchError(f"refusing {url!r}: {host!r} is not a valid host name ({answer})")
    if isinstance(answer, OSError):
        raise FetchUnavailable(f"could not resolve {host} for {url}: {answer}")
    if isinstance(answer, Exception):
        raise FetchError(f"could not resolve {host} for {url}: {type(answer).__name__}: {answer}")
    return ipaddress.ip_address(answer[0][4][0].split("%", 1)[0])


@functools.cache
def _tls_context() -> ssl.SSLContext:
    return ssl.create_default_context()  # loading the CA bundle once; wrap_socket is thread-safe


def _connect(url: str, target: _Target, address: IPAddress, budget: _Budget, watchdog: _Watchdog) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if address.version == 6 else socket.AF_INET, socket.SOCK_STREAM)
    watchdog.watch(sock)
    try:
        sock.settimeout(budget.left(url))
        sock.connect((str(address), target.port))
    except OSError as exc:
        where = f"{target.host}:{target.port} ({address})"
        raise FetchUnavailable(f"could not connect to {where}: {exc.strerror or exc}") from None
    if target.scheme != "https":
        return sock
    # Handshake after the watchdog holds the TLS socket: wrap_socket detaches the plain one first.
    tls = _tls_context().wrap_socket(sock, server_hostname=target.host, do_handshake_on_connect=False)
    watchdog.watch(tls)
    tls.settimeout(budget.left(url))
    tls.do_handshake()
    return tls


def _read_body(
    url: str, response: http.client.HTTPResponse, sock: socket.socket, max_bytes: int, budget: _Budget
) -> bytes:
    declared = response.getheader("Content-Length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise ImageTooLarge(f"{url} declares {declared} bytes, over the {max_bytes}-byte cap")
    chunks, size = [], 0
    while True:
        sock.settimeout(budget.left(url))  # each read waits at most what is left of the total
        chunk = response.read1(_CHUNK)
        if not chunk:
            break
        size += len(chunk)
        if size > max_bytes:
            raise ImageTooLarge(f"{url} sent more than the {max_bytes}-byte cap")
        chunks.append(chunk)
    if response.length:  # http.client counts a Content-Length down; read1 just returns b"" at an early close
        raise FetchUnavailable(f"{url} closed the connection before the end of the body")
    return b"".join(chunks)
