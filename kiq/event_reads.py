"""How every reader of a job's event stream reads it (the API's event hub, `Client.events`): the resume id
checked before Redis sees it, pages of at most `PAGE` entries, and a snapshot where the stream cannot say what
follows the reader's position.

The stream is capped (`kiq.events.STREAM_MAXLEN`, oldest entries trimmed), so a reader whose last id is older
than the oldest entry kept — or who starts from the beginning of a trimmed stream — would silently miss events,
and one whose id is ahead of the stream's last entry would filter out every later event, the final one too.
Both get a snapshot instead: the stream's last entry (the current status: every state write is an entry) with
the sweep's frames from the job's frames record, then the entries after it. Readers that keep up never see one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from kiq.errors import InvalidEventId
from kiq.events import STREAM_MAXLEN, event_order

PAGE = 100  # entries per read: a reader far behind takes the backlog in steps, never in one reply
_EVENT_ID = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")
_MAX_PART = 2**64 - 1  # each part of a stream id is an unsigned 64-bit number

# KEYS: the stream. ARGV: XRANGE start ("-" or "(<id>"), count. Returns nil without a stream, else
# {length, entries added ever (-1 before Redis 7), first id, last id, entries}: one atomic read, no payload but
# the page's (XINFO's reply, which carries the first and last entries whole, stays inside Redis).
PAGE_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local info = redis.call('XINFO', 'STREAM', KEYS[1])
local f = {}
for i = 1, #info, 2 do f[info[i]] = info[i + 1] end
local entries = redis.pcall('XRANGE', KEYS[1], ARGV[1], '+', 'COUNT', ARGV[2])
if entries.err then entries = {} end
return {f['length'], f['entries-added'] or -1, f['first-entry'][1], f['last-entry'][1], entries}
"""


def parse_event_id(raw: str) -> str:
    """`raw` if it is a stream id Redis accepts ("<ms>-<seq>", each below 2^64), else InvalidEventId."""
    if not _EVENT_ID.fullmatch(raw) or any(int(part) > _MAX_PART for part in raw.split("-")):
        raise InvalidEventId(f"Last-Event-ID must be an event id of this stream (<ms>-<seq>), got {raw[:40]!r}")
    return raw


@dataclass(frozen=True)
class Page:
    entries: list[tuple[str, bytes]]  # (event id, meta) after the reader's position, at most PAGE
    gone: bool = False  # no stream: nothing written yet, or a finished job's stream expired
    snapshot: bool = False  # the stream cannot continue from the reader's position: start from the current state
    last_id: str = ""  # the stream's newest entry

    @property
    def full(self) -> bool:
        return len(self.entries) >= PAGE


def page_args(after: str | None) -> tuple[str, int]:
    return (f"({after}" if after else "-"), PAGE


def parse_page(reply: Any, after: str | None) -> Page:
    """The page script's reply, for a reader whose last event is `after` (None: from the start)."""
    if reply is None:
        return Page([], gone=True)
    length, added, first, last, raw = reply
    first_id, last_id = _text(first), _text(last)
    trimmed = added > length if added >= 0 else length >= STREAM_MAXLEN
    behind = after is None or event_order(after) < event_order(first_id)
    ahead = after is not None and event_order(after) > event_order(last_id)
    if ahead or (trimmed and behind):
        return Page([], snapshot=True, last_id=last_id)
    entries = [(_text(entry_id), _meta(fields)) for entry_id, fields in raw]
    return Page(entries, last_id=last_id)


def parse_snapshot(reply: list[Any]) -> tuple[str, bytes, bytes | None] | None:
    """(last id, its meta, the frames record) from [XREVRANGE COUNT 1, GET frames] run in one MULTI."""
    newest, frames = reply
    if not newest:
        return None
    entry_id, fields = newest[0]
    return _text(entry_id), fields[b"meta"] if b"meta" in fields else fields["meta"], frames


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _meta(fields: Any) -> bytes:
    """The entry's meta: a flat [field, value] list from Lua."""
    pairs = dict(zip(fields[::2], fields[1::2], strict=True))
    value = pairs.get(b"meta", pairs.get("meta"))
    return value if isinstance(value, bytes) else str(value).encode()
