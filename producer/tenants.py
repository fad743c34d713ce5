"""API tenants: who a bearer key is, and what its jobs may do (queues, priority, which s3:// objects to name).

`KIQ_API_KEYS` gives each key the defaults: the routed queue only, priorities up to `KIQ_API_MAX_PRIORITY`,
and s3:// references only to its own uploads. `KIQ_API_TENANTS` (JSON, or a path to a JSON file) grants more:

    {"tenants": [{"name": "studio", "key": "…", "queues": ["kiq-large"], "max_priority": 9,
                  "s3_read": ["s3://studio-assets/refs/"], "weight": 2, "admin": false}]}

`weight` (1..100, default 1): turns in a row when tenants take turns (fair share); `admin`: the key may also use
`/v1/admin` (purge, drain) and see every tenant's queued jobs there.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiq import s3
from kiq.contract import Job
from kiq.errors import SettingsError
from kiq.fairshare import MAX_WEIGHT
from kiq.names import QUEUE_NAME
from kiq.settings import Settings


@dataclass(frozen=True)
class Tenant:
    owner: str  # opaque id in job records and the tenant's upload prefix: a digest of its key
    name: str
    queues: frozenset[str] = frozenset()
    max_priority: int = 5
    s3_read: tuple[tuple[str, str], ...] = ()
    weight: int = 1  # turns in a row in fair share (kiq/fairshare.py)
    admin: bool = False  # may use /v1/admin (producer/admin.py)

    def problems(self, job: Job, settings: Settings) -> list[dict[str, Any]]:
        """What this tenant may not ask for in the job, each as {"loc", "msg", "type"}: empty if allowed."""
        found = []
        if job.queue is not None and job.queue not in self.queues:
            found.append(_forbidden(["queue"], f"queue {job.queue!r} is not allowed for this API key"))
        if job.priority > self.max_priority:
            found.append(_forbidden(["priority"], f"priority above {self.max_priority} is not allowed"))
        readable = ((settings.s3_bucket, f"{settings.s3_input_prefix}{self.owner}/"), *self.s3_read)
        for i, item in enumerate(job.inputs):
            if item.image is not None and item.image[:5].lower() == "s3://" and not s3.within(item.image, readable):
                # The same answer whether or not the object exists: nothing about other tenants' objects leaks.
                found.append(_forbidden(["inputs", i, "image"], "s3:// reference is not readable by this API key"))
        return found


def _forbidden(loc: list[Any], msg: str) -> dict[str, Any]:
    return {"loc": ["body", *loc], "msg": msg, "type": "forbidden"}


class Tenants:
    def __init__(self, by_key: dict[str, Tenant], default_max_priority: int) -> None:
        self.by_key = by_key
        self.public = Tenant(owner="public", name="public", max_priority=default_max_priority)

    @property
    def open(self) -> bool:
        return not self.by_key

    @classmethod
    def from_settings(cls, settings: Settings) -> Tenants:
        by_key = {key: _tenant(key, key[:4] + "…", {}, settings) for key in settings.api_key_list}
        for entry in _entries(settings.api_tenants):
            key = entry.get("key")
            if not isinstance(key, str) or not key:
                raise SettingsError("KIQ_API_TENANTS: every tenant needs a non-empty 'key'")
            by_key[key] = _tenant(key, str(entry.get("name") or key[:4] + "…"), entry, settings)
        return cls(by_key, settings.api_max_priority)

    def find(self, token: str) -> Tenant | None:
        for key, tenant in self.by_key.items():
            if hmac.compare_digest(token.encode(), key.encode()):
                return tenant
        return None


def _tenant(key: str, name: str, entry: dict[str, Any], settings: Settings) -> Tenant:
    queues = entry.get("queues", [])
    if not isinstance(queues, list) or not all(isinstance(q, str) and QUEUE_NAME.fullmatch(q) for q in queues):
        raise SettingsError(f"KIQ_API_TENANTS: {name}: 'queues' must be a list of queue names")
    max_priority = entry.get("max_priority", settings.api_max_priority)
    if not isinstance(max_priority, int) or not 0 <= max_priority <= 9:
        raise SettingsError(f"KIQ_API_TENANTS: {name}: 'max_priority' must be an integer in 0..9")
    reads = entry.get("s3_read", [])
    if not isinstance(reads, list) or not all(isinstance(r, str) and r.startswith("s3://") for r in reads):
        raise SettingsError(f"KIQ_API_TENANTS: {name}: 's3_read' must be a list of s3://bucket/prefix")
    weight, admin = entry.get("weight", 1), entry.get("admin", False)
    if not isinstance(weight, int) or isinstance(weight, bool) or not 1 <= weight <= MAX_WEIGHT:
        raise SettingsError(f"KIQ_API_TENANTS: {name}: 'weight' must be an integer in 1..{MAX_WEIGHT}")
    if not isinstance(admin, bool):
        raise SettingsError(f"KIQ_API_TENANTS: {name}: 'admin' must be true or false")
    owner = hashlib.sha256(key.encode()).hexdigest()[:16]
    return Tenant(owner, name, frozenset(queues), max_priority, tuple(s3.split_uri(r) for r in reads), weight, admin)


def _entries(raw: str) -> list[dict[str, Any]]:
    if not raw.strip():
        return []
    text = raw if raw.lstrip().startswith("{") else _read(raw.strip())
    try:
        tenants = json.loads(text).get("tenants")
    except (json.JSONDecodeError, AttributeError) as exc:
        raise SettingsError(f"KIQ_API_TENANTS is not a JSON object with 'tenants': {exc}") from None
    if not isinstance(tenants, list) or not all(isinstance(t, dict) for t in tenants):
        raise SettingsError("KIQ_API_TENANTS: 'tenants' must be a list of objects")
    return tenants


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise SettingsError(f"KIQ_API_TENANTS: cannot read {path}: {exc.strerror}") from None
