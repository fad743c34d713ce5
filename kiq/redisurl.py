"""kiq's Redis URLs, parsed and checked, and shown with their passwords masked. Plain data: no client here, so that
kiq/settings.py can check its URLs without importing the module that builds clients (kiq/redisconn.py).

Two kinds of URL:
- `redis://[user:password@]host:port/db` (or `rediss://`): one Redis;
- `sentinel://[user:password@]host:port;sentinel://host:port/db` (kombu's form): Redis Sentinels, which name the
  current master of the group `KIQ_SENTINEL_MASTER`.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit

from kiq.errors import SettingsError

SENTINEL_DEFAULT_PORT = 26379


@dataclass(frozen=True)
class RedisURL:
    raw: str  # as configured
    scheme: str  # redis, rediss or sentinel
    hosts: tuple[tuple[str, int], ...]  # the server, or every Sentinel
    db: int = 0
    username: str = ""
    password: str = ""

    @property
    def sentinel(self) -> bool:
        return self.scheme == "sentinel"

    @property
    def credentials(self) -> dict[str, str | None]:
        """The master's username and password, as redis-py takes them."""
        return {"username": self.username or None, "password": self.password or None}

    def celery_url(self) -> str:
        """The URL for kombu and Celery: database and credentials repeated in every Sentinel's part."""
        if not self.sentinel:
            return self.raw
        auth = ""
        if self.username or self.password:
            auth = f"{quote(self.username, safe='')}:{quote(self.password, safe='')}@"  # kombu and Celery unquote
        return ";".join(f"{self.scheme}://{auth}{host}:{port}/{self.db}" for host, port in self.hosts)


def redact(url: str) -> str:
    """`url` fit to print: in each `;`-separated part, whatever could be a password is `***` — the userinfo after
    its first ':' (all of it without one), up to the part's last '@', so that malformed URLs (an unescaped '/' or
    '@' in the password) are masked too. Every URL kiq shows in an error or a log goes through here."""
    return ";".join(_redact_part(part) for part in url.split(";"))


def _redact_part(part: str) -> str:
    start = part.find("://") + 3 if "://" in part else 0
    at = part.rfind("@")
    if at < start:
        return part
    user, colon, _ = part[start:at].partition(":")
    return f"{part[:start]}{user + colon if colon else ''}***{part[at:]}"


def parse(url: str, variable: str) -> RedisURL:
    """Parse and check a kiq Redis URL; a malformed one raises SettingsError naming `variable`."""
    chunks = [c.strip() for c in url.split(";") if c.strip()]
    parts = []
    for chunk in chunks:
        try:
            split = urlsplit(chunk)
            port = split.port
        except ValueError:
            raise SettingsError(f"{variable}: {redact(chunk)!r} has a malformed host or port") from None
        parts.append((split, port))
    schemes = {split.scheme for split, _ in parts}
    if not parts or len(schemes) != 1 or not schemes <= {"redis", "rediss", "sentinel"}:
        raise SettingsError(
            f"{variable} must be a redis://, rediss:// or sentinel://host:port;sentinel://host:port/db URL, "
            f"got {redact(url)!r}"
        )
    scheme = schemes.pop()
    if scheme != "sentinel" and len(parts) > 1:
        raise SettingsError(
            f"{variable}: only sentinel:// URLs list several servers (separated by ';'), got {redact(url)!r}"
        )
    if any(not split.hostname for split, _ in parts):
        raise SettingsError(f"{variable} must name a host in every part, got {redact(url)!r}")
    dbs = {_db(split.path, variable) for split, _ in parts if split.path.strip("/")}
    if len(dbs) > 1:
        raise SettingsError(f"{variable}: its parts name different databases {sorted(dbs)}")
    users = {(unquote(s.username or ""), unquote(s.password or "")) for s, _ in parts if s.username or s.password}
    if len(users) > 1:
        raise SettingsError(f"{variable}: its parts carry different credentials")
    username, password = users.pop() if users else ("", "")
    default_port = SENTINEL_DEFAULT_PORT if scheme == "sentinel" else 6379
    hosts = tuple((split.hostname or "", port or default_port) for split, port in parts)
    return RedisURL(url, scheme, hosts, dbs.pop() if dbs else 0, username, password)


def _db(path: str, variable: str) -> int:
    raw = path.strip("/")
    if not raw.isdigit():
        raise SettingsError(f"{variable}: the database must be a number, got {raw!r}")
    return int(raw)
