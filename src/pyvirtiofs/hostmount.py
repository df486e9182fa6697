"""The same file system on the host: FUSE requests read from ``/dev/fuse`` instead of a
virtqueue, served by the same :class:`FuseServer`.  No VM is needed to try a file system.

    pyvirtiofs.mount(MyFs(), "/mnt/x")            # returns when /mnt/x is unmounted

    with pyvirtiofs.Mount(MyFs(), "/mnt/x"):       # threads; unmounted on exit
        os.listdir("/mnt/x")

Needs root (mount(2) of a FUSE file system with an ``fd=`` option).  The mount behaves as a
virtiofs mount does in a guest: the kernel checks permissions from the modes it is shown
(``default_permissions``) and every user may enter it (``allow_other``).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
from typing import Union

from . import aio, linux
from .filesystem import FileSystem
from .fuse.server import MAX_WRITE, FuseServer
from .pathfs import PathFileSystem
from .serving import as_filesystem
from .vhost_user.device import DEFERRED
from .virtqueue import DescriptorChain

log = logging.getLogger(__name__)

# A request is at most a WRITE of MAX_WRITE bytes plus its headers; a reply at most a READ of
# MAX_WRITE bytes plus the out header.  The kernel wants room for a whole request in each read.
BUFFER_SIZE = MAX_WRITE + 8192


class Mount:
    """``fs`` mounted at ``mountpoint`` and served by ``threads`` threads until
    :meth:`unmount` (or someone else unmounts it).  Raises OSError when mount(2) fails.
    ``cache`` is the cache mode of a :class:`PathFileSystem`, as for :class:`Server`."""

    def __init__(self, fs: Union[FileSystem, PathFileSystem], mountpoint: str | os.PathLike[str],
                 *, threads: int = 2, cache: str | None = None, fsname: str = "pyvirtiofs"):
        if threads < 1:
            raise ValueError(f"threads must be >= 1, not {threads}")
        self.mountpoint = os.path.abspath(os.fspath(mountpoint))
        fs = as_filesystem(fs, cache)
        self.server = FuseServer(aio.for_server(fs))
        self._serve_request = (aio.deferring(self.server.serve_request, DEFERRED)
                               if aio.has_coroutines(fs) else self.server.serve_request)
        self._fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        try:
            root = os.stat(self.mountpoint)
            if not stat.S_ISDIR(root.st_mode):
                raise NotADirectoryError(errno.ENOTDIR, "not a directory", self.mountpoint)
            opts = (f"fd={self._fd},rootmode=40000,user_id={os.getuid()},group_id={os.getgid()},"
                    f"default_permissions,allow_other,max_read={MAX_WRITE}")
            # nosuid as libfuse mounts; device nodes work, as in a guest's virtiofs mount
            linux.mount(fsname, self.mountpoint, "fuse.pyvirtiofs", linux.MS_NOSUID, opts)
        except BaseException:
            os.close(self._fd)
            raise
        self._mounted = True
        self._deferred: dict[int, bytearray] = {}  # replies a waiting lock or coroutine owes
        self._lock = threading.Lock()
        self._ids = iter(range(1, 1 << 62))
        self._threads = [threading.Thread(target=self._serve, name=f"fuse-{i}", daemon=True)
                         for i in range(threads)]
        for t in self._threads:
            t.start()

    def _serve(self) -> None:
        inbuf = bytearray(BUFFER_SIZE)
        outbuf = bytearray(BUFFER_SIZE)
        while True:
            try:
                n = os.readv(self._fd, [inbuf])
            except OSError as e:
                if e.errno in (errno.EINTR, errno.EAGAIN, errno.ENOENT):
                    continue  # ENOENT: the request was interrupted before we read it
                if e.errno != errno.ENODEV:  # ENODEV: unmounted
                    log.error("reading /dev/fuse: %s; aborting the mount", e)
                    self._abort()
                return
            with self._lock:
                head = next(self._ids)
                self._deferred[head] = outbuf  # before: the late reply may come at once
            chain = DescriptorChain(head, [memoryview(inbuf)[:n]], [memoryview(outbuf)])
            length = self._serve_request(chain, self._complete)
            if length == DEFERRED:
                outbuf = bytearray(BUFFER_SIZE)  # that one is the deferred reply's now
                continue
            with self._lock:
                del self._deferred[head]
            self._reply(outbuf, length)

    def _complete(self, head: int, length: int) -> None:
        with self._lock:
            outbuf = self._deferred.pop(head, None)
        if outbuf is not None:
            self._reply(outbuf, length)

    def _reply(self, outbuf: bytearray, length: int) -> None:
        if length <= 0:  # FORGET, INTERRUPT: no reply
            return
        try:
            os.write(self._fd, memoryview(outbuf)[:length])
        except OSError as e:
            # ENOENT: the request was interrupted meanwhile; ENODEV: unmounted meanwhile.
            if e.errno not in (errno.ENOENT, errno.ENODEV):
                log.error("writing /dev/fuse: %s", e)

    def _abort(self) -> None:
        """End the connection: every request in flight and to come fails with ENOTCONN
        instead of waiting for a server that stopped reading."""
        conn = _connection_id(self.mountpoint)
        if conn is not None:
            try:
                with open(f"/sys/fs/fuse/connections/{conn}/abort", "w") as f:
                    f.write("1")
            except OSError as e:
                log.error("cannot abort the FUSE connection %s: %s", conn, e)
        self.unmount(wait=False)

    @property
    def mounted(self) -> bool:
        """True until the file system is unmounted and every thread has ended."""
        return any(t.is_alive() for t in self._threads)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until unmounted (by :meth:`unmount` or ``umount``); False on timeout."""
        for t in self._threads:
            t.join(timeout)
        if self.mounted:
            return False
        self._close()
        return True

    def unmount(self, wait: bool = True) -> None:
        """Unmount (lazily: open files keep working until closed) and wait for the threads."""
        if self._mounted:
            self._mounted = False
            try:
                linux.umount2(self.mountpoint, linux.MNT_DETACH)
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.ENOENT):  # already unmounted
                    raise
        if wait:
            self.wait(10)

    def _close(self) -> None:
        with self._lock:
            if self._fd < 0:
                return
            fd, self._fd = self._fd, -1
        self.server.cancel_pending()
        self.server.reset()  # the file system's destroy(): the session is over
        os.close(fd)

    def __enter__(self) -> "Mount":
        return self

    def __exit__(self, *exc: object) -> None:
        self.unmount()


def _connection_id(mountpoint: str) -> int | None:
    """The FUSE connection's number (the mount's device minor), from mountinfo: asking the
    file system itself could wait on the very server that is broken."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == mountpoint:
                major, minor = fields[2].split(":")
                return int(minor) if major == "0" else None
    return None


def mount(fs: Union[FileSystem, PathFileSystem], mountpoint: str | os.PathLike[str], *,
          threads: int = 2, cache: str | None = None) -> None:
    """Mount ``fs`` at ``mountpoint`` and serve it until it is unmounted (``umount``, or
    Ctrl-C here, which unmounts).  Options as for :class:`Mount`."""
    m = Mount(fs, mountpoint, threads=threads, cache=cache)
    try:
        m.wait()
    finally:
        m.unmount()
