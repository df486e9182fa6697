"""Node ids, lookup counts and handles, kept for file systems that name their files some other
way (paths, archive members, objects in memory): :class:`InodeTable` and :class:`HandleTable`.

Both are thread-safe.  Node ids and handles are never reused, so generations stay 0.
"""

from __future__ import annotations

import errno
import itertools
import threading
from typing import Generic, Hashable, Iterator, TypeVar

from .filesystem import ROOT_INODE, FsError

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class InodeTable(Generic[K]):
    """Maps node ids to your keys (any hashable: a path, an object) and counts references.

    Call :meth:`lookup` each time you return an :class:`Entry` (it hands out one reference)
    and :meth:`forget` from :meth:`FileSystem.forget`.  A key whose count drops to zero is
    dropped; the root (``ROOT_INODE``) never is."""

    def __init__(self, root: K):
        self._lock = threading.Lock()
        self._next = itertools.count(ROOT_INODE + 1)
        self._key: dict[int, K] = {ROOT_INODE: root}
        self._count: dict[int, int] = {ROOT_INODE: 1}
        self._inode: dict[K, int] = {root: ROOT_INODE}

    def lookup(self, key: K) -> int:
        """The node id of ``key`` (a new one for a key not in the table), with one more
        reference."""
        with self._lock:
            inode = self._inode.get(key)
            if inode is None:
                inode = next(self._next)
                self._inode[key] = inode
                self._key[inode] = key
                self._count[inode] = 0
            self._count[inode] += 1
            return inode

    def forget(self, inode: int, nlookup: int) -> K | None:
        """Drop ``nlookup`` references; returns the key when it left the table (never raises,
        also not for node ids it does not know)."""
        with self._lock:
            count = self._count.get(inode)
            if count is None or inode == ROOT_INODE:
                return None
            if count > nlookup:
                self._count[inode] = count - nlookup
                return None
            del self._count[inode]
            key = self._key.pop(inode)
            if self._inode.get(key) == inode:
                del self._inode[key]
            return key

    def __getitem__(self, inode: int) -> K:
        """The key of ``inode``; ESTALE for a node id the guest should not have."""
        try:
            return self._key[inode]
        except KeyError:
            raise FsError(errno.ESTALE, f"unknown node id {inode}") from None

    def get(self, inode: int) -> K | None:
        """The key of ``inode``, or None."""
        return self._key.get(inode)

    def inode_of(self, key: K) -> int | None:
        """The node id of ``key`` if the guest holds it, without a new reference."""
        return self._inode.get(key)

    def count(self, inode: int) -> int:
        """The guest's references to ``inode`` (0 when unknown)."""
        return self._count.get(inode, 0)

    def rekey(self, old: K, new: K) -> None:
        """``old`` is now called ``new`` (a rename); a node that held ``new`` is detached."""
        with self._lock:
            inode = self._inode.pop(old, None)
            self._detach_locked(new)
            if inode is not None:
                self._inode[new] = inode
                self._key[inode] = new

    def detach(self, key: K, placeholder: K | None = None) -> None:
        """``key`` no longer names its node (unlinked, replaced): the node keeps its id until
        forgotten, but a new file under ``key`` gets a new id.  ``placeholder`` becomes its key."""
        with self._lock:
            inode = self._detach_locked(key)
            if inode is not None and placeholder is not None:
                self._key[inode] = placeholder

    def _detach_locked(self, key: K) -> int | None:
        return self._inode.pop(key, None)

    def keys(self) -> list[K]:
        """The keys the guest holds (a snapshot)."""
        with self._lock:
            return list(self._inode)

    def clear(self) -> None:
        """Drop every reference but the root's (the guest unmounted: :meth:`FileSystem.destroy`)."""
        with self._lock:
            root = self._key[ROOT_INODE]
            self._key = {ROOT_INODE: root}
            self._count = {ROOT_INODE: 1}
            self._inode = {root: ROOT_INODE}

    def __len__(self) -> int:
        return len(self._key)


class HandleTable(Generic[V]):
    """Open handles: any object of yours behind the integer ``fh`` the guest holds."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._next = itertools.count(1)
        self._items: dict[int, V] = {}

    def add(self, value: V) -> int:
        """A new handle number for ``value``."""
        with self._lock:
            fh = next(self._next)
            self._items[fh] = value
            return fh

    def __getitem__(self, fh: int) -> V:
        """The value behind ``fh``; EBADF for a handle that is not open."""
        try:
            return self._items[fh]
        except KeyError:
            raise FsError(errno.EBADF, f"unknown handle {fh}") from None

    def pop(self, fh: int) -> V | None:
        """Close ``fh``: returns its value (None if it was not open)."""
        with self._lock:
            return self._items.pop(fh, None)

    def clear(self) -> None:
        """Forget every handle (the guest unmounted)."""
        with self._lock:
            self._items.clear()

    def __iter__(self) -> Iterator[int]:
        return iter(list(self._items))

    def __len__(self) -> int:
        return len(self._items)
