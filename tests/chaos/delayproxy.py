"""A TCP proxy that adds a fixed delay to every chunk, both ways (the kernel here has no netem).

Run inside a namespace whose outgoing connections are DNATed to it: it finds each connection's original
destination (SO_ORIGINAL_DST) and connects there with a firewall mark the DNAT rule skips.
`python -m tests.chaos.delayproxy LISTEN_IP PORT DELAY_MS MARK`
"""

from __future__ import annotations

import queue
import socket
import struct
import sys
import threading
import time

SO_ORIGINAL_DST = 80
SO_MARK = 36
MAX_QUEUED = 256  # chunks in flight per direction: a bound on what a slow peer can make the proxy hold


def original_destination(conn: socket.socket) -> tuple[str, int]:
    raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, packed = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(packed), port


def serve(host: str, port: int, delay_s: float, mark: int) -> None:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(128)
    print(f"delay proxy on {host}:{port}, {delay_s * 1000:.0f} ms", flush=True)
    while True:
        client, _ = listener.accept()
        threading.Thread(target=_connect, args=(client, delay_s, mark), daemon=True).start()


def _connect(client: socket.socket, delay_s: float, mark: int) -> None:
    try:
        target = original_destination(client)
        upstream = socket.socket()
        upstream.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        upstream.settimeout(5)
        upstream.connect(target)
        upstream.settimeout(None)
    except OSError:
        client.close()
        return
    for src, dst in ((client, upstream), (upstream, client)):
        chunks: queue.Queue[tuple[float, bytes]] = queue.Queue(MAX_QUEUED)
        threading.Thread(target=_read, args=(src, chunks), daemon=True).start()
        threading.Thread(target=_write, args=(dst, chunks, delay_s), daemon=True).start()


def _read(src: socket.socket, chunks: queue.Queue[tuple[float, bytes]]) -> None:
    try:
        while data := src.recv(65536):
            chunks.put((time.monotonic(), data))
    except OSError:
        pass
    chunks.put((time.monotonic(), b""))


def _write(dst: socket.socket, chunks: queue.Queue[tuple[float, bytes]], delay_s: float) -> None:
    while True:
        at, data = chunks.get()
        time.sleep(max(0.0, at + delay_s - time.monotonic()))
        try:
            if not data:
                dst.shutdown(socket.SHUT_WR)
                return
            dst.sendall(data)
        except OSError:
            return


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) / 1000, int(sys.argv[4], 0))
