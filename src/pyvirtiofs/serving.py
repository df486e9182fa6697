"""Serving a file system to one vhost-user frontend (QEMU): :func:`serve` and :class:`Server`.

    pyvirtiofs.serve(MyFs(), "/tmp/myfs.sock")     # returns when the VM disconnects

    with pyvirtiofs.Server(MyFs(), "/tmp/myfs.sock") as server:   # a thread, for tests
        ...                                                       # stopped on exit
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import threading
from typing import Callable, Union

from .cache import CachePolicy
from .device import VirtioFsDevice
from .filesystem import FileSystem
from .pathfs import PathAdapter, PathFileSystem
from .vhost_user.backend import VhostUserSession

log = logging.getLogger(__name__)

MAX_REQUEST_QUEUES = 255  # vhost-user names rings in 8 bits: 1 hiprio + 255 request queues


class SocketInUse(OSError):
    """Another process listens on the socket path already."""


def listen(path: str | os.PathLike[str], *, group: int | None = None) -> socket.socket:
    """A Unix socket listening on ``path``, for its owner only, or for ``group`` too.

    A stale socket file (nobody listening) from an earlier run is replaced; a live one raises
    :class:`SocketInUse`; anything else at ``path`` (a regular file, a directory, a symlink)
    is never touched and raises :class:`FileExistsError`."""
    path = os.fspath(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(errno.EEXIST, "exists and is not a socket; not replacing it",
                                  path)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except ConnectionRefusedError:  # stale: left behind by a daemon that is gone
            os.unlink(path)
        else:
            raise SocketInUse(f"{path}: another process is listening on it")
        finally:
            probe.close()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # With a group, its members must be able to connect (write permission on the socket).
    old_umask = os.umask(0o007 if group is not None else 0o077)
    try:
        s.bind(path)
    except BaseException:
        s.close()
        raise
    finally:
        os.umask(old_umask)
    try:
        if group is not None:
            os.chown(path, -1, group)
        s.listen(1)
    except BaseException:
        s.close()
        os.unlink(path)
        raise
    return s


AnyFileSystem = Union[FileSystem, PathFileSystem]


def as_filesystem(fs: AnyFileSystem, cache: str | None = None) -> FileSystem:
    """The inode-level file system that serves ``fs`` (a :class:`PathFileSystem` is adapted,
    with the cache mode ``cache``)."""
    check_cache(fs, cache)
    if isinstance(fs, PathFileSystem):
        return PathAdapter(fs, cache)
    return fs


def check_cache(fs: AnyFileSystem, cache: str | None) -> None:
    """``cache`` is a mode the library can apply to ``fs``: ValueError otherwise."""
    if cache is None:
        return
    CachePolicy.from_name(cache)
    if not isinstance(fs, PathFileSystem):
        raise ValueError(f"cache= is for a PathFileSystem; {type(fs).__name__} answers at the "
                         f"inode level and sets Entry timeouts and OpenResult flags itself")


def _check(fs: AnyFileSystem, queues: int, thread_pool_size: int,
           cache: str | None = None) -> None:
    if not isinstance(fs, (FileSystem, PathFileSystem)):
        raise TypeError(f"expected a pyvirtiofs.FileSystem or PathFileSystem, "
                        f"not {type(fs).__name__}")
    check_cache(fs, cache)
    if not 1 <= queues <= MAX_REQUEST_QUEUES:
        raise ValueError(f"queues must be 1..{MAX_REQUEST_QUEUES}, not {queues}")
    if thread_pool_size < 0:
        raise ValueError(f"thread_pool_size must be >= 0, not {thread_pool_size}")


class Server:
    """One frontend served in a background thread: listens on ``socket_path`` as soon as it is
    made (so a VM can be started right after), serves the first frontend that connects, and
    ends when that frontend leaves or :meth:`stop` is called.

    ``queues`` is how many request queues the device offers (the VM uses as many as it was
    configured with, up to that); ``thread_pool_size`` threads serve requests that wait behind
    others on a queue (0: each queue's thread serves its requests in turn).  ``cache``, for a
    :class:`PathFileSystem`, is the cache mode, with the values of the daemon's ``--cache``:
    ``"never"`` (the guest asks every time and caches no file data), ``"auto"`` (1 s; file
    data cached while open), ``"always"`` (a day; the page cache survives opens: only when
    nothing but the guest changes the files) or ``"metadata"`` (a day; no file data cache).
    None: the file system's ``entry_timeout``, as ``"auto"``."""

    def __init__(self, fs: AnyFileSystem, socket_path: str | os.PathLike[str], *, queues: int = 1,
                 cache: str | None = None, thread_pool_size: int = 0):
        _check(fs, queues, thread_pool_size, cache)
        self.fs = fs
        self.socket_path = os.fspath(socket_path)
        self.queues = queues
        self.cache = cache
        self.thread_pool_size = thread_pool_size
        self.error: BaseException | None = None
        self._listener: socket.socket | None = listen(self.socket_path)
        self._conn: socket.socket | None = None
        self._lock = threading.Lock()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="pyvirtiofs-server", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            assert self._listener is not None
            serve_listener(self.fs, self._listener, queues=self.queues, cache=self.cache,
                           thread_pool_size=self.thread_pool_size, on_connect=self._connected,
                           socket_path=self.socket_path)
        except OSError as e:
            if not self._stopping:  # stop() wakes accept() with an error: not a failure
                self.error = e
                log.error("server on %s failed: %s", self.socket_path, e)
        except BaseException as e:
            self.error = e
            log.exception("server on %s failed", self.socket_path)

    def _connected(self, conn: socket.socket) -> None:
        with self._lock:
            self._conn = conn
            if self._stopping:
                conn.shutdown(socket.SHUT_RDWR)

    @property
    def running(self) -> bool:
        """True until the frontend has left (or the server was stopped)."""
        return self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the frontend has left; False if ``timeout`` expired first."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def stop(self, timeout: float | None = 10.0) -> None:
        """Disconnect the frontend (or stop waiting for one) and wait for the thread."""
        with self._lock:
            self._stopping = True
            for s in (self._conn, self._listener):
                if s is not None:
                    try:
                        s.shutdown(socket.SHUT_RDWR)  # wakes accept() and recv()
                    except OSError:
                        pass
        self._thread.join(timeout)

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_listener(fs: AnyFileSystem, listener: socket.socket, *, queues: int = 1,
                   cache: str | None = None, thread_pool_size: int = 0,
                   on_connect: Callable[[socket.socket], None] | None = None,
                   socket_path: str | None = None) -> None:
    """Accept one frontend on ``listener`` (closed afterwards) and serve it until it leaves.
    ``socket_path``, when given, is removed once the frontend is connected."""
    _check(fs, queues, thread_pool_size, cache)
    try:
        log.info("waiting for a vhost-user frontend on %s", socket_path or listener)
        conn, _ = listener.accept()
    finally:
        listener.close()
        if socket_path is not None:
            try:
                os.unlink(socket_path)
            except FileNotFoundError:
                pass
    log.info("frontend connected")
    if on_connect is not None:
        on_connect(conn)
    device = VirtioFsDevice(as_filesystem(fs, cache), num_request_queues=queues,
                            thread_pool_size=thread_pool_size)
    VhostUserSession(device).serve(conn)


def serve(fs: AnyFileSystem, socket_path: str | os.PathLike[str], *, queues: int = 1,
          cache: str | None = None, thread_pool_size: int = 0) -> None:
    """Listen on ``socket_path``, serve the first vhost-user frontend that connects (a VM
    started with ``-chardev socket,path=SOCKET -device vhost-user-fs-pci,tag=TAG``) and return
    when it disconnects.  The socket file is removed once the frontend is connected.
    Options as for :class:`Server`."""
    _check(fs, queues, thread_pool_size, cache)
    serve_listener(fs, listen(socket_path), queues=queues, cache=cache,
                   thread_pool_size=thread_pool_size, socket_path=os.fspath(socket_path))
