"""A TCP proxy on loopback that a test can take down and bring back: a real network outage for one peer."""

from __future__ import annotations

import socket
import threading


class Proxy:
    def __init__(self, target_port: int, host: str = "127.0.0.1") -> None:
        self.target = (host, target_port)
        self.host = host
        self.port = 0
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._held: list[socket.socket] | None = None  # a list while new connections are held, not forwarded
        self._trip: tuple[bytes, float] | None = None  # (bytes a client sends, outage seconds): see trip_after
        self.seen: list[bytes] = []  # the client chunks that carried a trip's bytes
        self._cut_on: bytes | None = None
        self.cut = threading.Event()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        """Refuse new connections and cut the open ones."""
        if self._listener is not None:
            _close(self._listener)  # shutdown() wakes the thread blocked in accept(); close() alone does not
            self._listener = None
        self.reset()

    def reset(self) -> None:
        """Cut the open connections and keep accepting new ones: a NAT or proxy reset, CLIENT KILL."""
        with self._lock:
            for conn in self._conns:
                _close(conn)
            self._conns.clear()

    def hold(self) -> None:
        """Accept new connections but forward nothing on them (a peer that hangs); open ones keep working."""
        with self._lock:
            self._held = []

    def release(self) -> None:
        """Forward the held connections (what their clients sent meanwhile arrives now) and new ones again."""
        with self._lock:
            held, self._held = self._held or [], None
        for client in held:
            self._forward(client)

    def trip_after(self, needle: bytes, down_s: float) -> None:
        """Once a client sends `needle`, forward that chunk, then go down (cut everything, refuse new connections)
        for `down_s` seconds: the server ran the command, its reply is lost, and retries meet an outage."""
        with self._lock:
            self._trip = needle, down_s

    def _watch(self, data: bytes, muted: threading.Event):
        """Before a client chunk is forwarded: trip on it (its reply is muted before the server can answer); returns
        what to do once it is forwarded (go down)."""
        with self._lock:
            trip = self._trip
            if trip is None or trip[0] not in data:
                return None
            self._trip = None
            self.seen.append(data)
        muted.set()
        return lambda: threading.Thread(target=self._outage, args=(trip[1],), daemon=True).start()

    def _outage(self, down_s: float) -> None:
        self.stop()
        threading.Event().wait(down_s)
        self.start()

    def cut_on(self, marker: bytes) -> None:
        """Once: drop the first server reply that carries `marker` and cut that connection (both sides), so the
        server acted on the command and its client never hears of it. `cut` is set when it happened."""
        self.cut.clear()
        self._cut_on = marker

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            with self._lock:
                if self._held is not None:
                    self._held.append(client)
                    continue
            self._forward(client)

    def _forward(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            _close(client)
            return
        upstream.settimeout(None)  # the 5 s bound the connect only: an idle (pub/sub) connection stays up
        with self._lock:
            self._conns += [client, upstream]
        muted = threading.Event()  # set once this connection tripped: the server's replies no longer reach the client
        threading.Thread(target=_pipe, args=(client, upstream, lambda data: self._watch(data, muted)),
                         daemon=True).start()  # fmt: skip
        threading.Thread(target=self._replies, args=(upstream, client, muted), daemon=True).start()

    def _replies(self, upstream: socket.socket, client: socket.socket, muted: threading.Event) -> None:
        try:
            while data := upstream.recv(65536):
                if muted.is_set():
                    continue
                marker = self._cut_on
                if marker is not None and marker in data:
                    self._cut_on = None
                    self.cut.set()
                    break
                client.sendall(data)
        except OSError:
            pass
        finally:
            _close(upstream)
            _close(client)


def _pipe(src: socket.socket, dst: socket.socket, watch=None) -> None:
    try:
        while data := src.recv(65536):
            then = watch(data) if watch is not None else None
            dst.sendall(data)
            if then is not None:
                then()
    except OSError:
        pass
    finally:
        _close(src)
        _close(dst)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
