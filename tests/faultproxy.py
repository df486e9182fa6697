"""A fault-injecting HTTP proxy on loopback, in front of an S3 API server (moto's), for the
object-storage fault tests.  Stdlib only.  The test switches what it does at run time:

- ``proxy.mode = "pass"``: forward each request (one request per connection: the proxy asks
  the server to close after answering, so every request sees the mode of its moment);
- ``"500"``: answer every request with S3's ``InternalError`` (HTTP 500) without forwarding;
- ``"drop"``: read the request, then close the connection without a word;
- ``"hang"``: read the request and answer nothing until the mode changes (then forward).

``proxy.delay = SECONDS`` holds each forwarded request that long first (a slow store).
``proxy.fail_after(n, mode)`` forwards ``n`` more requests, then behaves as ``mode``.
``proxy.switch_when(text, mode)``: a request whose line contains ``text`` (a key a guest
lists, say) switches the mode for the requests after it, for a script that runs on its own.
``proxy.requests`` counts the requests seen, ``proxy.seen(mode)`` those answered in a mode.
"""

from __future__ import annotations

import collections
import socket
import threading
import time

ERROR_500 = (b"<?xml version='1.0' encoding='UTF-8'?>\n<Error><Code>InternalError</Code>"
             b"<Message>We encountered an internal error. Please try again.</Message></Error>")


class FaultProxy:
    def __init__(self, upstream: str):
        host, _, port = upstream.removeprefix("http://").rstrip("/").partition(":")
        self.upstream = (host, int(port))
        self.mode = "pass"
        self.delay = 0.0
        self._passes = 0
        self._switches: dict[str, str] = {}
        self.log: list[str] = []  # "MODE METHOD /path?query" of each request, in order
        self._counts: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._closed = False
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, name="faultproxy", daemon=True).start()

    @property
    def requests(self) -> int:
        with self._lock:
            return sum(self._counts.values())

    def seen(self, mode: str) -> int:
        with self._lock:
            return self._counts[mode]

    def fail_after(self, n: int, mode: str) -> None:
        with self._lock:
            self._passes, self.mode = n, mode

    def switch_when(self, text: str, mode: str) -> None:
        with self._lock:
            self._switches[text] = mode

    def close(self) -> None:
        self._closed = True
        self._listener.close()

    def __enter__(self) -> "FaultProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- serving ----------------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                head, body = _read_request(conn)
            except (OSError, ValueError):
                return
            with self._lock:
                mode = self.mode
                if mode != "pass" and self._passes > 0:
                    self._passes -= 1
                    mode = "pass"
                self._counts[mode] += 1
                line = head.split(b" HTTP/")[0].decode(errors="replace")
                self.log.append(f"{mode} {line}")
                for text, new in self._switches.items():
                    if text in line:
                        self.mode = new
            if mode == "drop":
                return
            if mode == "500":
                conn.sendall(b"HTTP/1.1 500 Internal Server Error\r\n"
                             b"Content-Type: application/xml\r\nConnection: close\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(ERROR_500), ERROR_500))
                return
            while mode == "hang" and self.mode == "hang" and not self._closed:
                time.sleep(0.05)
            if self.delay:
                time.sleep(self.delay)
            try:
                self._forward(conn, head, body)
            except OSError:
                pass  # either side went away: the client sees a dropped connection

    def _forward(self, conn: socket.socket, head: bytes, body: bytes) -> None:
        lines = [x for x in head.split(b"\r\n")
                 if not x.lower().startswith((b"connection:", b"keep-alive:"))]
        lines.insert(1, b"Connection: close")
        with socket.create_connection(self.upstream) as up:
            up.sendall(b"\r\n".join(lines) + b"\r\n\r\n" + body)
            while True:
                data = up.recv(1 << 16)
                if not data:
                    return
                conn.sendall(data)


def _read_request(conn: socket.socket) -> tuple[bytes, bytes]:
    """One HTTP/1.1 request: its head (without the blank line) and its body."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = conn.recv(1 << 16)
        if not data:
            raise ValueError("connection closed before a request")
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    body = bytearray(rest)
    length = 0
    kept = []
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            raise ValueError("chunked request bodies are not supported by this proxy")
        elif name == b"expect":  # botocore asks before sending a body: go ahead
            if len(body) < length or not body:
                conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            continue
        kept.append(line)
    head = b"\r\n".join(kept)
    while len(body) < length:
        data = conn.recv(min(1 << 20, length - len(body)))
        if not data:
            raise ValueError("connection closed inside a request body")
        body += data
    return head, bytes(body)
