"""The DAX window: file ranges mapped into the guest's address space (virtio-fs shared memory
region 0), so that the guest reads and writes the host's page cache without a request.

The guest asks with FUSE_SETUPMAPPING (map ``length`` bytes of a file at ``foffset`` to window
offset ``moffset``) and FUSE_REMOVEMAPPING; the frontend does the mapping when we send it
SHMEM_MAP / SHMEM_UNMAP (:mod:`pyvirtiofs.vhost_user.shmem`).  The two sets of rules differ:

* FUSE: a new mapping may land on old ones; an exact overlap replaces, a partial overlap
  splits (what is left of an old mapping outside the new range stays mapped); removing part
  of a mapping keeps the rest.
* SHMEM: a map may not overlap an existing mapping; an unmap names one whole mapping.

So :class:`DaxWindow` keeps the window's mapping table and turns each FUSE request into SHMEM
requests: unmap every mapping the range touches, map back the pieces that stay, then map the
new range.  A piece is mapped back from a freshly opened fd (:class:`MapSource`), so the table
holds no open files, whatever the guest does.  The table only ever records what the frontend
acknowledged.  At device reset the frontend drops every mapping and the table is emptied.

Alignment: we announce ``map_alignment`` = 12 in FUSE_INIT, so offsets and lengths are
multiples of 4 KiB (the frontend mmaps the fds at those offsets).  Linux maps 2 MiB ranges.

Per-file DAX (``--dax=never|always|inode``): with FUSE_HAS_INODE_DAX a guest mounted with the
default ``dax=inode`` uses the window only for files whose attributes carry FUSE_ATTR_DAX.
:func:`wants_dax` says which: none, every regular file, or (``inode``) regular files of at
least :data:`INODE_DAX_MIN_SIZE` bytes (small files gain little and would each take a whole
2 MiB range of the window).  Linux reads the flag when it first sees an inode; a file that
crosses the threshold is switched the next time the guest loads it.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
from bisect import bisect_left
from typing import Iterable, Protocol

from .filesystem import FsError
from .vhost_user.shmem import PAGE_SIZE, SharedMemory, ShmemError

log = logging.getLogger(__name__)

MAP_ALIGNMENT_SHIFT = 12          # FUSE_INIT map_alignment: log2 of the alignment
NO_FH = (1 << 64) - 1             # Linux sends fh = -1: "map the inode"
SETUPMAPPING_FLAG_WRITE = 1
SETUPMAPPING_FLAG_READ = 2
DAX_POLICIES = ("never", "always", "inode")
INODE_DAX_MIN_SIZE = 1 << 20      # --dax=inode: regular files of at least 1 MiB


def wants_dax(policy: str, attr) -> bool:
    """Whether a file's attributes carry FUSE_ATTR_DAX under ``policy``."""
    if policy == "never" or not stat.S_ISREG(attr.st_mode):
        return False
    return policy == "always" or attr.st_size >= INODE_DAX_MIN_SIZE


class MapSource(Protocol):
    """A file that can be mapped: ``key`` says which file (e.g. (st_dev, st_ino)); ``open``
    returns a new fd on it (the caller closes it), read-write when ``writable``."""
    key: tuple

    def open(self, writable: bool) -> int: ...


class Mapping:
    __slots__ = ("moffset", "length", "foffset", "writable", "source")

    def __init__(self, moffset: int, length: int, foffset: int, writable: bool,
                 source: MapSource):
        self.moffset = moffset
        self.length = length
        self.foffset = foffset
        self.writable = writable
        self.source = source

    @property
    def end(self) -> int:
        return self.moffset + self.length

    def __repr__(self) -> str:
        return (f"Mapping({self.moffset:#x}+{self.length:#x} <- {self.source.key} "
                f"@{self.foffset:#x}{' rw' if self.writable else ''})")


class DaxWindow:
    """The mapping table of one shared memory region (shmid 0 for virtio-fs)."""

    def __init__(self, shmem: SharedMemory, shmid: int = 0):
        self.shmem = shmem
        self.shmid = shmid
        self.size = shmem.sizes[shmid]
        self.alignment = 1 << MAP_ALIGNMENT_SHIFT
        self._lock = threading.Lock()     # one table change (and its SHMEM requests) at a time
        self._starts: list[int] = []      # sorted moffsets
        self._maps: dict[int, Mapping] = {}
        shmem.add_reset_listener(self.forget_all)

    @property
    def available(self) -> bool:
        return self.shmem.available

    def mappings(self) -> list[Mapping]:
        with self._lock:
            return [self._maps[s] for s in self._starts]

    def __len__(self) -> int:
        return len(self._maps)

    # -- FUSE requests ----------------------------------------------------------------------
    def setup(self, moffset: int, length: int, foffset: int, writable: bool,
              source: MapSource) -> None:
        """FUSE_SETUPMAPPING: map [foffset, +length) of ``source`` at ``moffset``."""
        self._check_range(moffset, length)
        if foffset % self.alignment or foffset + length > 1 << 63:
            raise FsError(errno.EINVAL, f"file offset {foffset:#x} misaligned or too big")
        if not self.available:
            raise FsError(errno.EOPNOTSUPP, "the frontend has no DAX window (no SHMEM)")
        fd = source.open(writable)  # before touching the table: a refusal changes nothing
        try:
            with self._lock:
                self._punch(moffset, length)
                self.shmem.map(self.shmid, fd, foffset, moffset, length, writable)
                self._insert(Mapping(moffset, length, foffset, writable, source))
        finally:
            os.close(fd)

    def remove(self, ranges: Iterable[tuple[int, int]]) -> None:
        """FUSE_REMOVEMAPPING: every range is unmapped (parts of mappings outside it stay);
        a range with nothing mapped is fine.  Stops at the first failure."""
        for moffset, length in ranges:
            self._check_range(moffset, length)
            with self._lock:
                self._punch(moffset, length)

    def remove_all(self) -> None:
        """Unmap everything (the guest's session ended); failures are logged."""
        with self._lock:
            for s in list(self._starts):
                mp = self._maps[s]
                try:
                    self._unmap(mp)
                except OSError as e:
                    log.warning("DAX: could not unmap %r: %s", mp, e)
                    self._drop(mp)

    def forget_all(self) -> None:
        """The frontend dropped every mapping (device reset): forget the table."""
        with self._lock:
            self._maps.clear()
            self._starts.clear()

    # -- table ------------------------------------------------------------------------------
    def _check_range(self, moffset: int, length: int) -> None:
        if length <= 0 or moffset % self.alignment or length % self.alignment:
            raise FsError(errno.EINVAL, f"window range {moffset:#x}+{length:#x} not "
                                        f"{self.alignment}-aligned or empty")
        if moffset + length > self.size:
            raise FsError(errno.EINVAL, f"window range {moffset:#x}+{length:#x} past the "
                                        f"window's end {self.size:#x}")

    def _overlapping(self, start: int, end: int) -> list[Mapping]:
        i = bisect_left(self._starts, start)
        if i > 0 and self._maps[self._starts[i - 1]].end > start:
            i -= 1
        out = []
        while i < len(self._starts) and self._starts[i] < end:
            out.append(self._maps[self._starts[i]])
            i += 1
        return out

    def _punch(self, start: int, length: int) -> None:
        """Make [start, start+length) unmapped: unmap every mapping it touches and map back
        the parts of them outside it."""
        end = start + length
        for mp in self._overlapping(start, end):
            self._unmap(mp)
            if mp.moffset < start:
                self._remap_piece(mp, mp.moffset, start)
            if mp.end > end:
                self._remap_piece(mp, end, mp.end)

    def _unmap(self, mp: Mapping) -> None:
        self.shmem.unmap(self.shmid, mp.moffset, mp.length)  # raises: the table keeps it
        self._drop(mp)

    def _remap_piece(self, mp: Mapping, start: int, end: int) -> None:
        """Map [start, end) of an old mapping back (after the old one went)."""
        foffset = mp.foffset + (start - mp.moffset)
        try:
            fd = mp.source.open(mp.writable)
        except (OSError, FsError) as e:
            # The file is gone (forgotten, removed): the piece stays unmapped.
            log.warning("DAX: cannot map back %#x+%#x of %s: %s", start, end - start,
                        mp.source.key, e)
            return
        try:
            self.shmem.map(self.shmid, fd, foffset, start, end - start, mp.writable)
        except ShmemError as e:
            log.warning("DAX: frontend refused to map back %#x+%#x: %s", start, end - start, e)
            return
        finally:
            os.close(fd)
        self._insert(Mapping(start, end - start, foffset, mp.writable, mp.source))

    def _insert(self, mp: Mapping) -> None:
        self._maps[mp.moffset] = mp
        self._starts.insert(bisect_left(self._starts, mp.moffset), mp.moffset)

    def _drop(self, mp: Mapping) -> None:
        del self._maps[mp.moffset]
        self._starts.pop(bisect_left(self._starts, mp.moffset))

