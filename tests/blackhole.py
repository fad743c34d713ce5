"""Network faults that end in silence rather than in an error, as after a host loss or a partition: a proxy whose
chosen connections stop forwarding while staying open (half-open peers), which can also slow every connection,
and a server that accepts connections and never answers."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from tests.proxy import Proxy, _close


class SilencingProxy(Proxy):
    """A loopback proxy. Once `silence()` is called, every connection whose client has sent one of `markers`
    (anywhere in its stream; none: every connection) has its traffic swallowed in both directions, new ones
    included, until `unsilence()`. `delay_s` holds back each chunk a client sends: a slow link."""

    def __init__(self, target_port: int, markers: tuple[bytes, ...] = (), delay_s: float = 0.0) -> None:
        super().__init__(target_port)
        self.markers, self.delay_s = markers, delay_s
        self.silent = False
        self.swallowed = 0  # chunks swallowed so far

    def silence(self) -> None:
        self.silent = True

    def unsilence(self) -> None:
        self.silent = False

    def _forward(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            _close(client)
            return
        upstream.settimeout(None)  # an idle connection is no fault: never cut it
        with self._lock:
            self._conns += [client, upstream]
        link = _Link(self.markers)
        threading.Thread(target=self._pipe, args=(client, upstream, link, True), daemon=True).start()
        threading.Thread(target=self._pipe, args=(upstream, client, link, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, link: _Link, from_client: bool) -> None:
        try:
            while data := src.recv(65536):
                if from_client:
                    link.saw(data)
                    if self.delay_s:
                        time.sleep(self.delay_s)
                if self.silent and link.marked:
                    self.swallowed += 1
                    continue
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _close(src)
            _close(dst)


class _Link:
    def __init__(self, markers: tuple[bytes, ...]) -> None:
        self.markers, self.marked, self._tail = markers, not markers, b""

    def saw(self, data: bytes) -> None:
        if not self.marked:
            window = self._tail + data
            self.marked = any(marker in window for marker in self.markers)
            self._tail = window[-max(map(len, self.markers)) :]


@contextmanager
def silent_server() -> Iterator[str]:
    """http://127.0.0.1:<port> of a server that accepts every connection and never sends a byte."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        _close(listener)
        for conn in held:
            _close(conn)
