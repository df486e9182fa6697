"""The guest half of the metadata version table, which no kernel has: a caching client.

It plays what a guest file system driver would do with the extension of
docs/version-table.md.  It keeps attributes and directory entries it learnt (including
"no such name"), each with the version-table slot and version that vouched for it, and before
using one it reads that slot in the table the device exposes (shared memory region 1, mapped
read-only):

* version unchanged: the cached answer stands, no request is sent;
* version changed: exactly one request (LOOKUP for an entry, GETATTR for attributes)
  refreshes it.

An entry (parent, name) is vouched for by the *parent directory's* version, read from the
table before the LOOKUP is sent (whoever adds, removes or renames a name bumps the directory
afterwards, so a version read first can only be too old, which costs a refresh, never a stale
answer).  Attributes are vouched for by the version the daemon put in the reply.

Built on :class:`pyvirtiofs.testing.frontend.FuseClient`; like it, it imports nothing of the
daemon.  ``requests`` counts the FUSE requests it sent, for tests.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import struct
import weakref
from typing import NamedTuple

import atomics

from .frontend import (ATTR_OUT_SIZE, ENTRY_OUT_SIZE, FUSE_INIT_EXT, FUSE_ROOT_ID, GETATTR_IN,
                       LINUX_6_1_INIT_FLAGS, Attr, FuseClient, FuseError, Op, parse_attr_out,
                       parse_entry)

PYVFS_VERSION_TABLE = 1 << 63        # INIT flag (flags2 bit 31)
VERSION_OUT = struct.Struct("<QQ")   # slot, version: after fuse_entry_out / fuse_attr_out
TABLE_MAGIC = b"PYVFSVT1"
TABLE_HEADER = struct.Struct("<8sIIQ")  # magic, layout, slot size, slot count
TABLE_HEADER_SIZE = 4096
SLOT_SIZE = 16


class TableView:
    """A read-only view of a version table (the guest's mapping of shared memory region 1)."""

    def __init__(self, buf):
        self._mv = memoryview(buf).cast("B")
        magic, layout, slot_size, n = TABLE_HEADER.unpack_from(self._mv, 0)
        if magic != TABLE_MAGIC or layout != 1 or slot_size != SLOT_SIZE:
            raise ValueError("not a version table")
        if len(self._mv) < TABLE_HEADER_SIZE + SLOT_SIZE * n:
            raise ValueError(f"table of {n} slots in {len(self._mv)} bytes")
        self.nslots = n
        self._views: dict[int, tuple] = {}  # slot -> open (context, view); atomics wants
        self._finalizer = weakref.finalize(self, _close_views, self._views)  # them closed

    @classmethod
    def from_region(cls, region) -> "TableView":
        """The table as the guest sees it: shared memory region 1 of a frontend started with
        ``shmem=True`` (:class:`~pyvirtiofs.testing.frontend.ShmemRegion`), which the daemon
        mapped read-only at INIT."""
        mp = region.mapping_at(0)
        if mp is None:
            raise ValueError(f"nothing is mapped at the start of region {region.shmid}")
        if mp.writable:
            raise ValueError("the daemon mapped the version table writable")
        return cls((ctypes.c_char * mp.length).from_address(region.base + mp.offset))

    @classmethod
    def open_file(cls, path: str) -> "TableView":
        """Map a table file read-only (what QEMU does before it maps it into the guest)."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            m = mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            os.close(fd)
        return cls(m)

    def version(self, slot: int) -> int:
        """An acquire load of the slot's version (a real atomic load, as READ_ONCE would be)."""
        if not 0 <= slot < self.nslots:
            raise ValueError(f"slot {slot} outside the table's {self.nslots}")
        cv = self._views.get(slot)
        if cv is None:
            off = TABLE_HEADER_SIZE + SLOT_SIZE * slot + 8
            ctx = atomics.atomicview(buffer=self._mv[off:off + 8], atype=atomics.UINT)
            cv = self._views[slot] = (ctx, ctx.__enter__())
        return cv[1].load()

    def close(self) -> None:
        self._finalizer()
        self._mv.release()


def _close_views(views: dict) -> None:
    for ctx, _view in views.values():
        ctx.__exit__(None, None, None)
    views.clear()


class Cached(NamedTuple):
    value: object     # Attr, or a node id (None: the name does not exist)
    slot: int
    version: int


class VersionedClient:
    """Caches attributes and entries; revalidates them by reading the version table."""

    def __init__(self, client: FuseClient, table: TableView):
        self.c = client
        self.table = table
        self.requests = 0
        self._attrs: dict[int, Cached] = {}
        self._entries: dict[tuple[int, bytes], Cached] = {}
        self._slots: dict[int, int] = {}
        self.lookups: dict[int, int] = {}   # node id -> references the daemon handed us
        self.getattr(FUSE_ROOT_ID)           # the root's slot

    @staticmethod
    def init(client: FuseClient) -> None:
        """FUSE_INIT asking for the extension; refuses a daemon that does not offer it."""
        client.init(flags=LINUX_6_1_INIT_FLAGS | FUSE_INIT_EXT | PYVFS_VERSION_TABLE)
        if not client.negotiated & PYVFS_VERSION_TABLE:
            raise RuntimeError("the daemon did not negotiate the version-table extension")

    # -- the two requests ------------------------------------------------------------------
    def _send_lookup(self, parent: int, name: bytes) -> int:
        self.requests += 1
        r = self.c.request(Op.LOOKUP, parent, [name + b"\0"],
                           [ENTRY_OUT_SIZE + VERSION_OUT.size])
        e = parse_entry(r.data)
        slot, version = VERSION_OUT.unpack_from(r.data, ENTRY_OUT_SIZE)
        self.lookups[e.nodeid] = self.lookups.get(e.nodeid, 0) + 1
        self._slots[e.nodeid] = slot
        self._attrs[e.nodeid] = Cached(e.attr, slot, version)
        return e.nodeid

    def _send_getattr(self, nodeid: int) -> Attr:
        self.requests += 1
        r = self.c.request(Op.GETATTR, nodeid, [GETATTR_IN.pack(0, 0, 0)],
                           [ATTR_OUT_SIZE + VERSION_OUT.size])
        a = parse_attr_out(r.data).attr
        slot, version = VERSION_OUT.unpack_from(r.data, ATTR_OUT_SIZE)
        self._slots[nodeid] = slot
        self._attrs[nodeid] = Cached(a, slot, version)
        return a

    # -- what a guest's VFS asks -----------------------------------------------------------
    def lookup(self, parent: int, name) -> int:
        """The node id of name in parent (FuseError ENOENT when there is none)."""
        name = os.fsencode(name)
        pslot = self._slots[parent]
        hit = self._entries.get((parent, name))
        if hit is not None and self.table.version(pslot) == hit.version:
            if hit.value is None:
                raise FuseError(errno.ENOENT, Op.LOOKUP)
            return hit.value
        pversion = self.table.version(pslot)  # before the request (see the module doc)
        try:
            nodeid = self._send_lookup(parent, name)
        except FuseError as e:
            if e.errno == errno.ENOENT:
                self._entries[(parent, name)] = Cached(None, pslot, pversion)
            raise
        self._entries[(parent, name)] = Cached(nodeid, pslot, pversion)
        return nodeid

    def getattr(self, nodeid: int) -> Attr:
        hit = self._attrs.get(nodeid)
        if hit is not None and self.table.version(hit.slot) == hit.version:
            return hit.value
        return self._send_getattr(nodeid)

    def resolve(self, path: str) -> int:
        nodeid = FUSE_ROOT_ID
        for part in path.strip("/").split("/"):
            if part:
                nodeid = self.lookup(nodeid, part)
        return nodeid

    def stat(self, path: str) -> Attr:
        """stat(2): walk the path through cached entries, then the attributes."""
        return self.getattr(self.resolve(path))

    def forget_all(self) -> None:
        """Give back every lookup reference (a guest unmounting)."""
        if self.lookups:
            self.c.batch_forget(sorted(self.lookups.items()))
            self.lookups.clear()
