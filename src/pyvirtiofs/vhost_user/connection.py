"""Framing of vhost-user messages on the Unix socket: a 12-byte header, a payload, and file
descriptors as SCM_RIGHTS ancillary data on the header's bytes.  No meaning is given here."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

from . import messages as m


class ProtocolViolation(Exception):
    """The frontend sent something we cannot parse; the connection must be dropped."""


@dataclass
class Message:
    request: int
    flags: int
    payload: bytes
    fds: list[int] = field(default_factory=list)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & m.FLAG_NEED_REPLY)

    def close_fds(self) -> None:
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []

    def take_fd(self) -> int | None:
        """Take ownership of the single fd this message should carry (others are closed)."""
        if not self.fds:
            return None
        fd, rest = self.fds[0], self.fds[1:]
        self.fds = rest
        self.close_fds()
        return fd


class Connection:
    def __init__(self, sock: socket.socket):
        self.sock = sock

    def _recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ProtocolViolation("frontend closed the socket in the middle of a message")
            buf += chunk
        return bytes(buf)

    def receive(self) -> Message | None:
        """The next message, or None when the frontend has gone away."""
        try:
            data, fds, flags, _ = socket.recv_fds(self.sock, m.HEADER.size, m.MAX_FDS)
        except ConnectionResetError:
            return None
        if not data:
            for fd in fds:
                os.close(fd)
            return None
        try:
            if flags & socket.MSG_CTRUNC:
                raise ProtocolViolation(f"more than {m.MAX_FDS} file descriptors in one message")
            if len(data) < m.HEADER.size:
                data += self._recv_exact(m.HEADER.size - len(data))
            request, hflags, size = m.HEADER.unpack(data)
            if hflags & 0x3 != m.VERSION:
                raise ProtocolViolation(f"unsupported vhost-user version {hflags & 0x3}")
            if size > m.MAX_PAYLOAD:
                raise ProtocolViolation(f"payload of {size} bytes for request {request}")
            payload = self._recv_exact(size) if size else b""
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return Message(request, hflags, payload, list(fds))

    def reply(self, msg: Message, payload: bytes) -> None:
        header = m.HEADER.pack(msg.request, m.VERSION | m.FLAG_REPLY, len(payload))
        self.sock.sendall(header + payload)

    def close(self) -> None:
        self.sock.close()
