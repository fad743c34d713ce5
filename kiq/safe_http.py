"""HTTP(S) GET for user-supplied URLs: address policy after DNS (every redirect hop too), the connection
pinned to the checked address, and caps on redirects, bytes and total time (slow senders included)."""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import time
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from kiq.errors import BlockedAddress, FetchError, FetchUnavailable, ImageTooLarge

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_CHUNK = 64 * 1024


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
        plain = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped else address
        if not plain.is_global:
            raise BlockedAddress(f"{url}: {host} resolves to {address}, a {_kind(plain)} address; refused")


def _kind(address: IPAddress) -> str:
    for attr in ("is_loopback", "is_link_local", "is_private", "is_multicast", "is_unspecified", "is_reserved"):
        if getattr(address, attr):
            return attr.removeprefix("is_").replace("_", "-")
    return "non-public"


def get(url: str, limits: HttpLimits, policy: AddressPolicy) -> bytes:
    deadline = time.monotonic() + limits.timeout_s
    for _ in range(limits.max_redirects + 1):
        status, location, body = _get_once(url, limits, policy, deadline)
        if status not in _REDIRECTS:
            return _checked(url, status, body)
        if not location:
            raise FetchError(f"{url} answered HTTP {status} without a Location")
        url = urljoin(url, location)
    raise FetchError(f"too many redirects (more than {limits.max_redirects}), last to {url}")


def post(url: str, body: bytes, headers: dict[str, str], limits: HttpLimits, policy: AddressPolicy) -> int:
    """POST to a checked, pinned address (redirects are not followed); returns the status code."""
    deadline = time.monotonic() + limits.timeout_s
    conn, sock, path = _open(url, policy, deadline)
    try:
        conn.request("POST", path, body=body, headers={"User-Agent": "kiq", **headers})
        response = conn.getresponse()
        response.read(_CHUNK)
        return response.status
    except (OSError, http.client.HTTPException) as exc:
        raise FetchUnavailable(f"could not post to {url}: {exc or type(exc).__name__}") from None
    finally:
        conn.close()
        sock.close()


def _checked(url: str, status: int, body: bytes) -> bytes:
    if status >= 500 or status == 429:
        raise FetchUnavailable(f"{url} answered HTTP {status}")
    if status >= 400:
        raise FetchError(f"{url} answered HTTP {status}")
    return body


def _get_once(url: str, limits: HttpLimits, policy: AddressPolicy, deadline: float) -> tuple[int, str, bytes]:
    conn, sock, path = _open(url, policy, deadline)
    try:
        conn.request("GET", path, headers={"User-Agent": "kiq-worker", "Accept": "image/*"})
        response = conn.getresponse()
        if response.status in _REDIRECTS:
            return response.status, response.getheader("Location", ""), b""
        return response.status, "", _read_body(url, response, sock, limits.max_bytes, deadline)
    except (OSError, http.client.HTTPException) as exc:
        raise FetchUnavailable(f"could not fetch {url}: {exc or type(exc).__name__}") from None
    finally:
        conn.close()
        sock.close()


def _open(url: str, policy: AddressPolicy, deadline: float) -> tuple[http.client.HTTPConnection, socket.socket, str]:
    """Check the URL's address against the policy and connect to exactly that address."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise FetchError(f"refusing {url!r}: only http and https URLs with a host")
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    address = _resolve(url, host, port)
    policy.check(url, host, address)
    sock = _connect(parts.scheme, host, port, address, _remaining(url, deadline))
    conn = http.client.HTTPConnection(host, port)
    conn.sock = sock  # pinned to the address we checked: no second DNS lookup to rebind
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return conn, sock, path


def _resolve(url: str, host: str, port: int) -> IPAddress:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        error = FetchUnavailable if exc.errno == socket.EAI_AGAIN else FetchError
        raise error(f"could not resolve {host} for {url}: {exc.strerror}") from None
    return ipaddress.ip_address(infos[0][4][0].split("%", 1)[0])


def _connect(scheme: str, host: str, port: int, address: IPAddress, timeout: float) -> socket.socket:
    try:
        sock = socket.create_connection((str(address), port), timeout=timeout)
    except OSError as exc:
        raise FetchUnavailable(f"could not connect to {host}:{port} ({address}): {exc.strerror or exc}") from None
    if scheme == "https":
        sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
    return sock


def _read_body(
    url: str, response: http.client.HTTPResponse, sock: socket.socket, max_bytes: int, deadline: float
) -> bytes:
    declared = response.getheader("Content-Length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise ImageTooLarge(f"{url} declares {declared} bytes, over the {max_bytes}-byte cap")
    chunks, size = [], 0
    while True:
        sock.settimeout(_remaining(url, deadline))  # each read waits at most what is left of the total
        chunk = response.read1(_CHUNK)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > max_bytes:
            raise ImageTooLarge(f"{url} sent more than the {max_bytes}-byte cap")
        chunks.append(chunk)


def _remaining(url: str, deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise FetchUnavailable(f"fetching {url} took longer than the time limit")
    return left
