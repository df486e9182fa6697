"""The metadata version table: one shared-memory file per tree, a version number per inode.

Every daemon serving the same tree maps the same file (``--version-table=/dev/shm/NAME``).
Whoever changes an inode's metadata bumps its version with an atomic compare-and-swap on the
shared mapping; a guest that cached attributes compares the version it was told with the
current one, and asks again only when it changed.  The layout and the rules a guest may rely
on are in docs/version-table.md; the numbers below are that document's.

Layout (little-endian)::

    header (4096 bytes): magic "PYVFSVT1", u32 layout 1, u32 slot size 16, u64 slot count
    slot i at 4096 + 16 * i: u64 key, u64 version

A slot belongs to one inode, found the same way by every daemon: ``key = slot_key(st_dev,
st_ino)`` (never 0), linear probing from ``1 + key % (nslots - 1)`` for at most ``MAX_PROBE``
slots, a free slot (key 0) claimed by compare-and-swap 0 -> key.  An inode that finds no slot
in its probe window shares slot 0, the overflow slot, with every other such inode: its
version then changes more often than its metadata does, never less.  Slots are never freed
(an inode number reused by a new file inherits a version that only grows, which is safe).

Memory ordering: keys are claimed and versions bumped with sequentially consistent CAS; the
daemon bumps *after* the change it made has returned from the host kernel, and reads a version
(acquire load) *before* it reads the attributes it reports with it.  So attributes reported
with version v include every change whose bump produced a version <= v.

Atomics come from the ``atomics`` package: lock-free operations on any buffer, built on a
small C library (patomic), so several processes bump one slot without a lock and without
losing an increment.  Its public views check and convert in pure Python on every call (10-40
us an operation here, more than a whole GETATTR); we call the same C functions of the pinned
version through its operations table instead (``_Atomic64``, 2-5 us).
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
import ctypes
import threading


log = logging.getLogger(__name__)

MAGIC = b"PYVFSVT1"
LAYOUT = 1
HEADER_SIZE = 4096
SLOT_SIZE = 16
PAGE_SIZE = 4096
SHMID = 1                # the VIRTIO shared memory region the guest reads it in
OVERFLOW_SLOT = 0
MAX_PROBE = 64
DEFAULT_SLOTS = 1 << 16  # 1 MiB + a page
MIN_SLOTS = 2
MAX_SLOTS = 1 << 28      # 4 GiB: beyond that a size is a typo
_HEADER = struct.Struct("<8sIIQ")
_U64 = (1 << 64) - 1


class VersionTableError(Exception):
    """The table file cannot be used (wrong format, wrong size, not creatable)."""


class _Atomic64:
    """Sequentially consistent load and compare-and-swap of aligned u64s at raw addresses,
    through the atomics package's C functions (the library is loaded here, before any
    sandbox hides its file).  Imported here, not at the top: atomics brings cffi and its C
    parser (~6 MiB of RSS), which a daemon without --version-table does not need."""

    def __init__(self):
        from atomics import MemoryOrder
        from atomics._impl.patomic import Patomic  # the C operations table (atomics pinned)
        self._SEQ_CST = MemoryOrder.SEQ_CST.value
        ops = Patomic.ops(8)
        self._load = ops.fp_load
        self._cas = ops.xchg_ops.fp_cmpxchg_strong
        if not self._load or not self._cas:
            raise VersionTableError("this CPU has no lock-free 64-bit compare-and-swap")

    def load(self, addr: int) -> int:
        out = ctypes.c_uint64()
        self._load(addr, self._SEQ_CST, ctypes.addressof(out))
        return out.value

    def cas(self, addr: int, expected: int, desired: int) -> tuple[bool, int]:
        """Store desired if the word holds expected; returns (done, the value found)."""
        exp = ctypes.c_uint64(expected)
        des = ctypes.c_uint64(desired)
        done = self._cas(addr, ctypes.addressof(exp), ctypes.addressof(des),
                         self._SEQ_CST, self._SEQ_CST)
        return bool(done), exp.value


def slot_key(dev: int, ino: int) -> int:
    """The 64-bit key of an inode: a splitmix64 finish of ino + dev * golden ratio; never 0."""
    x = (ino + dev * 0x9E3779B97F4A7C15) & _U64
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & _U64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & _U64
    x ^= x >> 31
    return x or 1


def table_bytes(nslots: int) -> int:
    """The file's size: header and slots, rounded up to whole pages (it is mapped whole)."""
    return (HEADER_SIZE + SLOT_SIZE * nslots + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE


def parse_slots(text: str) -> int:
    """A slot count from the command line (``65536``, ``64k``, ``1M``)."""
    t = text.strip().lower()
    mult = 1
    if t and t[-1] in "km":
        mult = 1024 if t[-1] == "k" else 1 << 20
        t = t[:-1]
    try:
        n = int(t) * mult
    except ValueError:
        raise ValueError(f"slot count {text!r} is not a number (e.g. 65536, 64k, 1M)") from None
    if not MIN_SLOTS <= n <= MAX_SLOTS:
        raise ValueError(f"slot count {n} outside {MIN_SLOTS}..{MAX_SLOTS}")
    return n


class VersionTable:
    """One process's mapping of a shared version table (read-write: daemons only)."""

    def __init__(self, path: str, nslots: int = DEFAULT_SLOTS):
        self.path = path
        self.fd = _open_or_create(path, nslots)
        try:
            size = os.fstat(self.fd).st_size
            head = os.pread(self.fd, _HEADER.size, 0)
            magic, layout, slot_size, n = _HEADER.unpack(head) if len(head) == _HEADER.size \
                else (b"", 0, 0, 0)
            if magic != MAGIC or layout != LAYOUT or slot_size != SLOT_SIZE:
                raise VersionTableError(f"{path} is not a version table (layout {LAYOUT})")
            if n < MIN_SLOTS or size < table_bytes(n):
                raise VersionTableError(f"{path}: header says {n} slots, file has {size} bytes")
            if n != nslots:
                log.info("%s has %d slots (the file's size wins over the %d asked for)",
                         path, n, nslots)
            self.nslots = n
            self.size = table_bytes(n)
            self._map = mmap.mmap(self.fd, self.size, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self.fd)
            raise
        self._atomic = _Atomic64()
        self._base_obj = ctypes.c_char.from_buffer(self._map)  # pins the mapping until close
        self._base = ctypes.addressof(self._base_obj)
        self._slot_of: dict[int, int] = {}  # key -> slot, learnt once (a slot never moves)

    @staticmethod
    def _key_offset(slot: int) -> int:
        return HEADER_SIZE + SLOT_SIZE * slot

    @staticmethod
    def _version_offset(slot: int) -> int:
        return HEADER_SIZE + SLOT_SIZE * slot + 8

    # -- slots ----------------------------------------------------------------------------
    def slot(self, dev: int, ino: int) -> int:
        """The slot of inode (dev, ino), claimed if it has none yet (never bumps)."""
        key = slot_key(dev, ino)
        s = self._slot_of.get(key)
        if s is not None:
            return s
        s = self._find(key)
        if len(self._slot_of) < 1 << 20:
            self._slot_of[key] = s
        return s

    def _find(self, key: int) -> int:
        n = self.nslots - 1  # slots 1..nslots-1 take keys; slot 0 is the overflow
        start = key % n
        for i in range(min(MAX_PROBE, n)):
            s = 1 + (start + i) % n
            addr = self._base + self._key_offset(s)
            k = self._atomic.load(addr)
            if k == key:
                return s
            if k == 0:
                done, found = self._atomic.cas(addr, 0, key)
                if done or found == key:
                    return s
                # another inode took it between our load and CAS: keep probing
        return OVERFLOW_SLOT

    def version(self, slot: int) -> int:
        """The slot's version now (an acquire load; call before reading the attributes)."""
        return self._atomic.load(self._base + self._version_offset(slot))

    def bump(self, slot: int) -> int:
        """Add one to the slot's version with a CAS loop; returns the new version."""
        addr = self._base + self._version_offset(slot)
        v = self._atomic.load(addr)
        while True:
            done, found = self._atomic.cas(addr, v, (v + 1) & _U64)
            if done:
                return (v + 1) & _U64
            v = found

    def bump_inode(self, dev: int, ino: int) -> int:
        return self.bump(self.slot(dev, ino))

    def bump_all(self) -> int:
        """Bump every claimed slot and the overflow slot (changes were missed, e.g. lost
        inotify events); returns how many."""
        n = 0
        for s in range(self.nslots):
            if s == OVERFLOW_SLOT or self._atomic.load(self._base + self._key_offset(s)):
                self.bump(s)
                n += 1
        return n

    # -- sharing ----------------------------------------------------------------------------
    def dup_fd(self) -> int:
        """A new fd on the table file (for handing the table to a frontend, read-only map)."""
        return os.dup(self.fd)

    def close(self) -> None:
        del self._base_obj  # the mapping's buffer export, else close() refuses
        self._map.close()
        os.close(self.fd)


def _open_or_create(path: str, nslots: int) -> int:
    """Open the table, or create it complete: a filled-in temporary file is linked into place,
    so no daemon ever sees a half-written header (two creators: one link wins)."""
    flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        return os.open(path, flags)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise VersionTableError(f"cannot open {path}: {e.strerror}") from None
    tmp_path = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        tmp = os.open(tmp_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise VersionTableError(f"cannot create {path}: {e.strerror}") from None
    try:
        os.ftruncate(tmp, table_bytes(nslots))
        os.pwrite(tmp, _HEADER.pack(MAGIC, LAYOUT, SLOT_SIZE, nslots), 0)
        try:
            os.link(tmp_path, path)
        except FileExistsError:  # another daemon created it first: use theirs
            os.close(tmp)
            return os.open(path, flags)
        return tmp
    except OSError as e:
        os.close(tmp)
        raise VersionTableError(f"cannot create {path}: {e.strerror}") from None
    finally:
        os.unlink(tmp_path)


class GuestMapping:
    """Puts a table in front of the guest: shared memory region ``SHMID``, mapped read-only
    with SHMEM_MAP when a guest first asks for the extension, and again after every device
    reset (the frontend drops all mappings then)."""

    def __init__(self, table: VersionTable, shmem):
        self.table = table
        self.shmem = shmem
        self._mapped = False
        self._lock = threading.Lock()
        shmem.add_reset_listener(self._dropped)

    def ensure_mapped(self) -> bool:
        """True when the guest can read the table (mapping it now if need be)."""
        with self._lock:
            if self._mapped:
                return True
            if not self.shmem.available:
                log.info("version table not offered: the frontend has no shared memory "
                         "(vhost-user SHMEM)")
                return False
            try:
                self.shmem.map(SHMID, self.table.fd, 0, 0, self.table.size, writable=False)
            except OSError as e:
                log.warning("version table not offered: mapping it failed: %s", e)
                return False
            self._mapped = True
            return True

    def _dropped(self) -> None:
        with self._lock:
            self._mapped = False
