"""The FUSE server: decodes a request from a descriptor chain, calls the file system, encodes
the reply into the chain's writable buffers.

Two paths serve a request.  The hot opcodes (GETATTR, LOOKUP, READ, WRITE, CREATE, OPEN,
FLUSH, RELEASE, UNLINK, FORGET, and unknown opcodes), laid out as guests lay them out, are
served by one ``_fast_*`` method each: fixed-size arguments unpacked with a precompiled struct,
the reply packed straight into the guest's buffer, no per-request objects but the
:class:`Context` the file system is given.  Everything else -- other opcodes, other buffer
layouts, anything malformed -- goes through the generic path (the chain's cursor, one ``_op_*``
method per opcode), which checks everything; a fast method hands a request it does not expect
over to it before doing anything.

The guest is the remote peer.  Whatever it sends, :meth:`FuseServer.serve_request` returns normally:
malformed requests get an errno reply (EINVAL, ENOSYS, ...), file system errors get theirs,
and a bug of ours gets EIO plus a logged traceback, never a dead worker thread.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import struct
import threading
from typing import Any, Callable

from .. import dax as _dax
from ..filesystem import Context, Entry, FileSystem, FsError, OpenResult, SetattrRequest
from ..virtqueue import DescriptorChain, Reader, Writer
from ..vhost_user.device import DEFERRED
from . import abi
from .lock_wait import LockRequest, LockWaits, is_busy
from .abi import Opcode

log = logging.getLogger(__name__)
TRACE = 5  # --log-level=trace: below DEBUG, one line per request

MAX_WRITE = 1 << 20
MAX_PAGES = MAX_WRITE // 4096
XATTR_SIZE_MAX = 65536
MAX_NAME = 1024  # longer than any Linux name (255) or xattr name (255), bounded to stay cheap
_NO_REPLY = -1


class ProtocolError(Exception):
    """The request itself is malformed; answered with EINVAL."""


class FuseRequest:
    """One request being served (a plain class: one is made per request)."""
    __slots__ = ("opcode", "unique", "nodeid", "ctx", "head", "complete", "ext_len")

    def __init__(self, opcode, unique, nodeid, ctx, head=0, complete=None, ext_len=0):
        self.opcode = opcode
        self.unique = unique
        self.nodeid = nodeid
        self.ctx = ctx
        self.head = head
        self.complete = complete
        self.ext_len = ext_len  # bytes of request extensions after the arguments


def _split_nul(data: bytes, count: int) -> list[bytes]:
    """Split ``count`` NUL-terminated strings off the front of data."""
    out = []
    pos = 0
    for _ in range(count):
        end = data.find(b"\0", pos)
        if end < 0:
            raise ProtocolError("name is not NUL-terminated")
        out.append(data[pos:end])
        pos = end + 1
    return out


def _check_name(name: bytes) -> bytes:
    if not name or b"/" in name:
        raise FsError(errno.EINVAL, "invalid name")
    if len(name) > 255:
        raise FsError(errno.ENAMETOOLONG)
    return name


_TIMEOUTS: dict[float, tuple[int, int]] = {}
_U64 = 0xFFFFFFFFFFFFFFFF
_NS = 1_000_000_000
# fuse_attr_out and fuse_entry_out packed in one call each (the hot replies)
_ATTR_OUT = struct.Struct("<QII" + abi.ATTR.format[1:])
_ENTRY_OUT = struct.Struct(abi.ENTRY_OUT_HEAD.format + abi.ATTR.format[1:])
_ATTR_OUT_PACK_INTO = _ATTR_OUT.pack_into
_ENTRY_OUT_PACK_INTO = _ENTRY_OUT.pack_into


def _timeout(t: float) -> tuple[int, int]:
    v = _TIMEOUTS.get(t)
    if v is None:
        if t <= 0:
            v = (0, 0)
        else:
            s = int(t)
            v = (s, int((t - s) * 1e9))
        if len(_TIMEOUTS) < 64:
            _TIMEOUTS[t] = v
    return v


def _attr_fields(a, flags: int = 0) -> tuple:
    at, atn = divmod(a.st_atime_ns, _NS)
    mt, mtn = divmod(a.st_mtime_ns, _NS)
    ct, ctn = divmod(a.st_ctime_ns, _NS)
    nlink = a.st_nlink
    return (a.st_ino & _U64, a.st_size, a.st_blocks, at & _U64, mt & _U64, ct & _U64,
            atn, mtn, ctn, a.st_mode, nlink if nlink <= 0xFFFFFFFF else 0xFFFFFFFF,
            a.st_uid, a.st_gid, a.st_rdev & 0xFFFFFFFF, getattr(a, "st_blksize", 4096) or 4096,
            flags)


def _signed(sec: int) -> int:
    """A time in seconds that _attr_fields wrapped to u64, back to the signed s64 statx has."""
    return sec - (1 << 64) if sec >= 1 << 63 else sec


def encode_attr(a, flags: int = 0) -> bytes:
    return abi.ATTR.pack(*_attr_fields(a, flags))


def encode_entry(e: Entry, attr_flags: int = 0) -> bytes:
    es, ens = _timeout(e.entry_timeout)
    as_, ans = _timeout(e.attr_timeout)
    return _ENTRY_OUT.pack(e.inode, e.generation, es, as_, ens, ans,
                           *_attr_fields(e.attr, attr_flags
                                         | (abi.ATTR_SUBMOUNT if e.submount else 0)))


def encode_attr_out(attr, timeout: float, attr_flags: int = 0) -> bytes:
    s, ns = _timeout(timeout)
    return _ATTR_OUT.pack(s, ns, 0, *_attr_fields(attr, attr_flags))


def _open_flags(o: OpenResult) -> int:
    return ((abi.FOPEN_DIRECT_IO if o.direct_io else 0) | (abi.FOPEN_KEEP_CACHE if o.keep_cache else 0)
            | (abi.FOPEN_CACHE_DIR if o.cache_dir else 0))


def encode_open(o: OpenResult) -> bytes:
    return abi.OPEN_OUT.pack(o.fh, _open_flags(o), 0)


# The hot replies pack an os.stat_result's fields in the packing call itself: no tuple of
# fields in between, whole seconds from the result's integer fields [7:10] (what
# _attr_fields computes with divmod).  Any other attribute object goes through _attr_fields.
# (typed Any so that mypy/mypyc do not narrow ``a`` to os.stat_result, whose stubs call the
# integer seconds at [7:10] floats)
_STAT_RESULT: Any = os.stat_result


def pack_attr_out(buf, offset: int, a, timeout: float, attr_flags: int = 0) -> None:
    """fuse_attr_out packed into buf at offset (no bytes object in between)."""
    s, ns = _timeout(timeout)
    if type(a) is _STAT_RESULT:
        _ATTR_OUT_PACK_INTO(
            buf, offset, s, ns, 0, a.st_ino, a.st_size, a.st_blocks, a[7] & _U64,
            a[8] & _U64, a[9] & _U64, a.st_atime_ns % _NS, a.st_mtime_ns % _NS,
            a.st_ctime_ns % _NS, a.st_mode, a.st_nlink, a.st_uid, a.st_gid,
            a.st_rdev & 0xFFFFFFFF, a.st_blksize or 4096, attr_flags)
    else:
        _ATTR_OUT_PACK_INTO(buf, offset, s, ns, 0, *_attr_fields(a, attr_flags))


def pack_entry(buf, offset: int, e: Entry, attr_flags: int = 0) -> None:
    """fuse_entry_out for ``e`` packed into buf at offset (no bytes object in between)."""
    es, ens = _timeout(e.entry_timeout)
    as_, ans = _timeout(e.attr_timeout)
    a: Any = e.attr  # an os.stat_result (the fast path) or any StatResult
    if e.submount:
        attr_flags |= abi.ATTR_SUBMOUNT
    if type(a) is _STAT_RESULT:
        _ENTRY_OUT_PACK_INTO(
            buf, offset, e.inode, e.generation, es, as_, ens, ans, a.st_ino, a.st_size,
            a.st_blocks, a[7] & _U64, a[8] & _U64, a[9] & _U64, a.st_atime_ns % _NS,
            a.st_mtime_ns % _NS, a.st_ctime_ns % _NS, a.st_mode, a.st_nlink, a.st_uid,
            a.st_gid, a.st_rdev & 0xFFFFFFFF, a.st_blksize or 4096, attr_flags)
    else:
        _ENTRY_OUT_PACK_INTO(buf, offset, e.inode, e.generation, es, as_, ens, ans,
                             *_attr_fields(a, attr_flags))


def _reply_space(writable: list, need: int):
    """Where a reply body of ``need`` bytes goes in the layouts guests use: right after the
    16-byte header in the first writable buffer, or at the start of the second when the
    first holds just the header.  (None, 0) for any other layout (the generic path's)."""
    w0 = writable[0]
    if len(w0) >= 16 + need:
        return w0, 16
    if len(w0) == 16 and len(writable) > 1 and len(writable[1]) >= need:
        return writable[1], 0
    return None, 0


def _fast_name(args, offset: int, n: int) -> bytes | None:
    """The NUL-terminated name that fills args[offset:offset+n], when it is a valid one
    (anything else -- no NUL, empty, '/', too long -- is left to the generic path's errors)."""
    if n > MAX_NAME + 1:
        return None
    raw = bytes(args[offset:offset + n])
    end = raw.find(b"\0")
    if end <= 0 or end > 255:
        return None
    name = raw[:end]
    if b"/" in name:
        return None
    return name


# Directory records by padded name length: fuse_dirent (+ fuse_entry_out before it for
# READDIRPLUS) and the name with its NUL padding, one struct each.
_DIRENT: dict[int, struct.Struct] = {}
_DIRENTPLUS: dict[int, struct.Struct] = {}
_NO_ENTRY = (0,) * (len(_ENTRY_OUT.format) - 1)  # node id 0: a plain entry


def _record_struct(cache: dict, padded: int, entry_format: str) -> struct.Struct:
    st = cache[padded] = struct.Struct(f"<{entry_format}QQII{padded}s")
    return st


_IN_UNPACK = abi.IN_HEADER.unpack
_IN_UNPACK_FROM = abi.IN_HEADER.unpack_from
_OUT_PACK_INTO = abi.OUT_HEADER.pack_into
_INIT = int(Opcode.INIT)
_FORGET = int(Opcode.FORGET)
_GETATTR_IN_UNPACK = abi.GETATTR_IN.unpack
_GETATTR_IN_UNPACK_FROM = abi.GETATTR_IN.unpack_from
_READ_IN_UNPACK_FROM = abi.READ_IN.unpack_from
_RELEASE_IN_UNPACK_FROM = abi.RELEASE_IN.unpack_from
_CREATE_IN_UNPACK_FROM = abi.CREATE_IN.unpack_from
_OPEN_IN_UNPACK_FROM = abi.OPEN_IN.unpack_from
_FORGET_IN_UNPACK_FROM = abi.FORGET_IN.unpack_from
_OPEN_OUT_PACK_INTO = abi.OPEN_OUT.pack_into
_WRITE_OUT_PACK_INTO = abi.WRITE_OUT.pack_into
_OFFSET_MAX = 1 << 63
_SLOW = object()  # a fast handler's answer: "not this layout; serve it the generic way"


class FuseServer:
    """Serves FUSE requests from descriptor chains to a :class:`FileSystem`."""

    # What we offer in INIT, ANDed with what the guest offers.
    BASE_FLAGS = (abi.ASYNC_READ | abi.PARALLEL_DIROPS | abi.BIG_WRITES | abi.AUTO_INVAL_DATA
                  | abi.ASYNC_DIO | abi.HAS_IOCTL_DIR | abi.ATOMIC_O_TRUNC | abi.MAX_PAGES
                  | abi.INIT_EXT | abi.CREATE_SUPP_GROUP)

    def __init__(self, fs: FileSystem, dax: "_dax.DaxWindow | None" = None,
                 dax_policy: str = "always"):
        self.fs = fs
        self.dax = dax  # the DAX window's mapping table, when the device has one
        if dax_policy not in _dax.DAX_POLICIES:
            raise ValueError(f"DAX policy {dax_policy!r}: one of {', '.join(_dax.DAX_POLICIES)}")
        self.dax_policy = dax_policy
        self._inode_dax = False  # FUSE_HAS_INODE_DAX negotiated: attrs carry FUSE_ATTR_DAX
        self.initialized = False
        self.flags = 0  # negotiated
        self.proto_minor = 0
        self._init_lock = threading.Lock()
        # Whether the guest can read the version table (the device maps it into shared
        # memory); asked at INIT when the guest wants the extension.
        self.version_table_readable: Callable[[], bool] = lambda: True
        # Only file systems that need per-request clean-up pay for the call.
        self._end_request = fs.end_request if fs.wants_end_request else None
        # Requests seen, by opcode: one Counter per serving thread (no lock on the request
        # path), summed by opcode_counts() and logged when the guest unmounts.
        self._counts_local = threading.local()
        self._all_counts: list[collections.Counter] = []
        self._lock_waits = LockWaits()
        self._trace = log.isEnabledFor(TRACE)  # decided once: the check costs per request
        self._fast: dict[int, Callable] = {}  # opcode -> fast handler, chosen at INIT
        self._handlers = {}
        for op in Opcode:
            h = getattr(self, "_op_" + op.name.lower(), None)
            if h is not None:
                self._handlers[int(op)] = h

    # -- entry point ----------------------------------------------------------------------
    def serve_request(self, chain: DescriptorChain,
               complete: Callable[[int, int], None] | None = None) -> int:
        """Serve one request; returns the number of reply bytes written (0: no reply), or
        DEFERRED when the reply will be delivered later through ``complete(head, length)``."""
        if self._end_request is None:
            return self._dispatch(chain, complete)
        try:
            return self._dispatch(chain, complete)
        finally:
            self._end_request()

    def _dispatch(self, chain, complete):
        """The fast path: a well-formed request of a hot opcode, laid out as guests lay them
        out (header, then the arguments in one buffer; the reply header, then the reply in
        one buffer), is served by its opcode's ``_fast_*`` method, which parses with one
        precompiled struct and packs the reply straight into guest memory.  Anything else --
        another opcode, another layout, a malformed request -- goes to
        :meth:`_dispatch_generic`, which reads it through the chain's cursor and checks
        everything."""
        readable = chain.readable
        if not readable:
            return self._dispatch_generic(chain, complete)
        first = readable[0]
        if len(first) < 40:
            return self._dispatch_generic(chain, complete)
        length, opcode, unique, nodeid, uid, gid, pid, extlen, _ = _IN_UNPACK_FROM(first)
        writable = chain.writable
        if (extlen or length < 40 or length > chain.remaining
                or (len(writable[0]) < 16 if writable else opcode != _FORGET)):
            return self._dispatch_generic(chain, complete)
        fast = self._fast.get(opcode)
        if fast is None:
            if opcode in self._handlers:
                return self._dispatch_generic(chain, complete)
            fast = self._fast_unknown
        # Where the arguments are (contiguous from ``args[aoff]``, ``avail`` bytes of them).
        if len(first) > 40:
            args, aoff, avail = first, 40, len(first) - 40
        elif len(readable) > 1:
            args, aoff = readable[1], 0
            avail = len(args)
        else:
            args, aoff, avail = first, 40, 0
        if avail > length - 40:
            avail = length - 40  # bytes past the header's length are not the request's
        try:
            n = fast(chain, args, aoff, avail, length - 40, unique, nodeid, uid, gid, pid)
        except (FsError, OSError) as e:  # the usual failure: straight into the reply header
            if e.errno:
                _OUT_PACK_INTO(writable[0], 0, 16, -e.errno, unique)
                n = 16
            else:
                n = self._failed(chain, unique, opcode, e)
        except Exception as e:
            n = self._failed(chain, unique, opcode, e)
        if n is _SLOW:
            return self._dispatch_generic(chain, complete)
        try:
            self._counts_local.counts[opcode] += 1
        except AttributeError:
            self._count(opcode)
        return n

    def _count(self, opcode: int) -> None:
        try:
            self._counts_local.counts[opcode] += 1
        except AttributeError:
            self._counts_local.counts = c = collections.Counter({opcode: 1})
            self._all_counts.append(c)

    # -- fast handlers: (chain, args, offset of the arguments in args, bytes of them there,
    # bytes of them in all, unique, nodeid, uid, gid, pid) -> reply length, or _SLOW before
    # doing anything when the request is not laid out as they expect.
    def _install_fast_paths(self) -> None:
        """Choose the fast handlers for the session just negotiated: the replies that carry
        a version (version table) or DAX flags are built the generic way."""
        fast = {}
        if not self._trace:  # tracing logs every request: the generic path does
            fast = {int(Opcode.READ): self._fast_read, int(Opcode.WRITE): self._fast_write,
                    int(Opcode.RELEASE): self._fast_release, int(Opcode.FLUSH): self._fast_flush,
                    _FORGET: self._fast_forget, int(Opcode.UNLINK): self._fast_unlink,
                    int(Opcode.OPEN): self._fast_open}
            if not self.flags & abi.PYVFS_VERSION_TABLE and not self._inode_dax:
                fast[int(Opcode.GETATTR)] = self._fast_getattr
                fast[int(Opcode.LOOKUP)] = self._fast_lookup
                fast[int(Opcode.CREATE)] = self._fast_create
        self._fast = fast

    def _fast_unknown(self, chain, args, aoff, avail, alen, unique, nodeid, uid, gid, pid):
        _OUT_PACK_INTO(chain.writable[0], 0, 16, -errno.ENOSYS, unique)
        return 16

    def _fast_getattr(self, chain, args, aoff, avail, alen, unique, nodeid, uid, gid, pid):
        writable = chain.writable
        out, ooff = _reply_space(writable, 104)
        if avail < 16 or out is None:
            return _SLOW
        flags, _, fh = _GETATTR_IN_UNPACK_FROM(args, aoff)
        res = self.fs.getattr(nodeid, fh if flags & abi.GETATTR_FH else None,
                              Context(uid, gid, pid))
        pack_attr_out(out, ooff, res.attr, res.attr_timeout)
        _OUT_PACK_INTO(writable[0], 0, 120, 0, unique)
        return 120

    def _fast_lookup(self, chain, args, aoff, avail, alen, unique, nodeid, uid, gid, pid):
        writable = chain.writable
        out, ooff = _reply_space(writable, 128)
        name = _fast_name(args, aoff, avail) if avail == alen else None
        if name is None or out is None:
            return _SLOW
        pack_entry(out, ooff, self.fs.lookup(nodeid, name, Context(uid, gid, pid)))
        _OUT_PACK_INTO(writable[0], 0, 144, 0, unique)
        return 144

    def _fast_create(self, chain, args, aoff, avail, alen, unique, nodeid, uid, gid, pid):
        writable = chain.writable
        out, ooff = _reply_space(writable, 144)
        name = _fast_name(args, aoff + 16, avail - 16) if avail == alen and avail > 16 else None
        if name is None or out is None:
            return _SLOW
        flags, mode, umask, _ = _CREATE_IN_UNPACK_FROM(args, aoff)
        ctx = Context(uid, gid, pid, umask)
        if self.flags & abi.CREATE_SUPP_GROUP:
            ctx.supp_groups = ()  # negotiated, and the guest sent none (see _extensions)
        entry, opened = self.fs.create(nodeid, name, mode, flags, ctx)
        pack_entry(out, ooff, entry)
        _OPEN_OUT_PACK_INTO(out, ooff + 128, opened.fh, _open_flags(opened), 0)
        _OUT_PACK_INTO(writable[0], 0, 160, 0, unique)
        return 160

    def _fast_open(self, chain, args, aoff, avail, alen, unique, nodeid, uid, gid, pid):
        writable = chain.writable
        out, ooff = _reply_space(writable, 16)
        if avail < 8 or out is None:
            return _SLOW
        flags, open_flags = _OPEN_IN_UNPACK_FROM(args, aoff)
        if open_flags & abi.OPEN_KILL_SUIDGID:
            return _SLOW
        opened = self.fs.open(nodeid, flags, Context(uid, gid, pid))
        _OPEN_OUT_PACK_INTO(out, ooff, opened.fh, _open_flags(opened), 0)
        _OUT_PACK_INTO(writable[0], 0, 32, 0, unique)
        return 32

    def _fast_read(self, chain, args, aoff, avail, alen, unique, nodeid, uid, gid, pid):
        if avail < 40:
            return _SLOW
        fh, offset, size, _, _, _, _ = _READ_IN_UNPACK_FROM(args, aoff)
        room = chain.capacity - 16
        if size > room:
            size = room
        if size > MAX_WRITE:
            size = MAX_WRITE
        if offset >= _OFFSET_MAX or size <= 0:
            return _SLOW
        writable = chain.writable
        w0 = writable[0]
        if size != room:  # a larger buffer than asked for: clip it
            buffers = chain.views_at(16, size)
        elif len(w0) == 16:
            buffers = writable[1:]
        elif len(writable) == 1:
            buffers = [w0[16:]]
        else:
            buffers = [w0[16:]]
            buffers += writable[1:]
        n = self.fs.read_into(nodeid, fh, offset, buffers)
        _OUT_PACK_INTO(w0, 0, 16 + n, 0, unique)
        return 16 + n

    def _fast_write(self, chain, args, aoff, avail, alen, unique, nodeid, uid, gid, pid):
        writable = chain.writable
        out, ooff = _reply_space(writable, 8)
        if avail < 40 or out is None:
            return _SLOW
        fh, offset, size, wflags, _, _, _ = _READ_IN_UNPACK_FROM(args, aoff)
        if size > alen - 40 or offset >= _OFFSET_MAX:
            return _SLOW
        # The data follows write_in: in the same buffer, or in the buffers after it.
        if avail >= 40 + size:
            buffers = [args[aoff + 40:aoff + 40 + size]] if size else []
        elif avail == 40 and args is not chain.readable[0] and chain.remaining - 80 == size:
            buffers = chain.readable[2:]
        else:
            return _SLOW
        n = self.fs.write_from(nodeid, fh, offset, buffers, bool(wflags & abi.WRITE_KILL_SUIDGID),
                               Context(uid, gid, pid))
        _WRITE_OUT_PACK_INTO(out, ooff, n, 0)
        _OUT_PACK_INTO(writable[0], 0, 24, 0, unique)
        return 24

    def _fast_release(self, chain, args, aoff, avail, alen, unique, nodeid, uid, gid, pid):
        if avail < 24:
            return _SLOW
        fh, _, rflags, _ = _RELEASE_IN_UNPACK_FROM(args, aoff)
        if rflags & abi.RELEASE_FLOCK_UNLOCK and self.flags & abi.FLOCK_LOCKS:
            return _SLOW
        self.fs.release(nodeid, fh)
        _OUT_PACK_INTO(chain.writable[0], 0, 16, 0, unique)
        return 16

    def _fast_flush(self, chain, args, aoff, avail, alen, unique, nodeid, uid, gid, pid):
        if avail < 24:
            return _SLOW
        fh, _, _, owner = _RELEASE_IN_UNPACK_FROM(args, aoff)
        self.cancel_pending(owner=(nodeid, owner))
        self.fs.flush(nodeid, fh, owner)
        _OUT_PACK_INTO(chain.writable[0], 0, 16, 0, unique)
        return 16

    def _fast_unlink(self, chain, args, aoff, avail, alen, unique, nodeid, uid, gid, pid):
        name = _fast_name(args, aoff, avail) if avail == alen else None
        if name is None:
            return _SLOW
        self.fs.unlink(nodeid, name, Context(uid, gid, pid))
        _OUT_PACK_INTO(chain.writable[0], 0, 16, 0, unique)
        return 16

    def _fast_forget(self, chain, args, aoff, avail, alen, unique, nodeid, uid, gid, pid):
        if avail < 8:
            return _SLOW
        self.fs.forget(nodeid, _FORGET_IN_UNPACK_FROM(args, aoff)[0])
        return 0

    def _dispatch_generic(self, chain, complete):
        """Check the header and call the opcode's handler (an ``_op_*`` method)."""
        r = chain.reader()
        w = chain.writer()
        try:
            hdr = r.read(40)
        except EOFError:
            log.warning("request shorter than a FUSE header (%d bytes); dropped", r.remaining)
            return 0
        length, opcode, unique, nodeid, uid, gid, pid, extlen, _ = _IN_UNPACK(hdr)
        if length < 40 or length - 40 > r.remaining:
            return self._error(w, unique, errno.EINVAL, "header len %d disagrees with chain" % length)
        r.remaining = length - 40  # ignore trailing bytes past len
        self._count(opcode)
        if self._trace:
            log.log(TRACE, "request %s unique=%d nodeid=%d uid=%d gid=%d pid=%d len=%d",
                    _opname(opcode), unique, nodeid, uid, gid, pid, length)
        ext_len = extlen * 8
        if ext_len:
            if ext_len > r.remaining:
                return self._error(w, unique, errno.EINVAL, "extensions longer than the request")
            r.remaining -= ext_len  # handlers see the arguments only; see _extensions
        handler = self._handlers.get(opcode)
        if handler is None:
            return self._error(w, unique, errno.ENOSYS)
        if not self.initialized and opcode != _INIT:
            return self._error(w, unique, errno.EIO, "request before INIT")
        req = FuseRequest(opcode, unique, nodeid, Context(uid, gid, pid), chain.head, complete,
                          ext_len)
        try:
            n = handler(req, r, w)
        except Exception as e:
            return self._failed(w, unique, opcode, e)
        if n == _NO_REPLY:
            return 0
        if n == DEFERRED:
            return DEFERRED
        return self._finish(w, unique, n)

    def _failed(self, w: Writer, unique: int, opcode: int, e: Exception) -> int:
        """The errno reply for what a handler raised."""
        if isinstance(e, FsError):
            return self._error(w, unique, e.errno)
        if isinstance(e, OSError):
            if e.errno is None:  # not a failed system call (e.g. a library that failed to load)
                log.error("internal error serving %s", _opname(opcode), exc_info=e)
            return self._error(w, unique, e.errno or errno.EIO)
        if isinstance(e, (ProtocolError, EOFError)):
            return self._error(w, unique, errno.EINVAL, "%s: %s" % (_opname(opcode), e))
        if isinstance(e, OverflowError):
            # A number from the guest (offset, size, mode, flags...) beyond what the host
            # call takes, e.g. lseek(2) to 2^64-1: the guest's mistake, not a bug of ours.
            return self._error(w, unique, errno.EINVAL, "%s: %s" % (_opname(opcode), e))
        log.error("internal error serving %s", _opname(opcode), exc_info=e)
        return self._error(w, unique, errno.EIO)

    @staticmethod
    def _finish(w: Writer, unique: int, n: int) -> int:
        if w.capacity < 16:
            return 0
        total = 16 + n
        first = w.writable[0]
        if len(first) >= 16:
            _OUT_PACK_INTO(first, 0, total, 0, unique)
        else:
            w.write_at(0, abi.OUT_HEADER.pack(total, 0, unique))
        return total

    def _error(self, w: Writer, unique: int, err: int, why: str | None = None) -> int:
        if why:
            log.info("error reply %s: %s", errno.errorcode.get(err, err), why)
        if w.capacity < abi.OUT_HEADER.size:
            return 0
        w.write_at(0, abi.OUT_HEADER.pack(abi.OUT_HEADER.size, -err, unique))
        return abi.OUT_HEADER.size

    @staticmethod
    def _reply(w: Writer, data: bytes | bytearray | memoryview) -> int:
        try:
            w.write_at(16, data)
        except EOFError:
            raise FsError(errno.ERANGE, "reply does not fit the guest's buffer") from None
        return len(data)

    @staticmethod
    def _names(r: Reader, count: int) -> list[bytes]:
        if r.remaining > MAX_NAME * count + 16:
            raise ProtocolError("names too long")
        return [_check_name(n) for n in _split_nul(r.read(r.remaining), count)]

    # -- session --------------------------------------------------------------------------
    def _op_init(self, req, r, w):
        major, minor, max_readahead, flags = abi.INIT_IN.unpack(r.read(abi.INIT_IN.size))
        flags2 = 0
        if r.remaining >= 4 and flags & abi.INIT_EXT:
            flags2 = int.from_bytes(r.read(4), "little")
        if major < abi.KERNEL_VERSION or (major == abi.KERNEL_VERSION
                                          and minor < abi.MIN_MINOR_VERSION):
            log.error("guest speaks FUSE %d.%d; %d.%d or newer is needed",
                      major, minor, abi.KERNEL_VERSION, abi.MIN_MINOR_VERSION)
            raise FsError(errno.EPROTO)
        if major > abi.KERNEL_VERSION:
            # The kernel will retry with our major; reply only the version.
            return self._reply(w, abi.INIT_OUT.pack(abi.KERNEL_VERSION, abi.KERNEL_MINOR_VERSION,
                                                    0, 0, 0, 0, 0, 0, 0, 0, 0))
        with self._init_lock:
            if self.initialized:
                self.fs.destroy()
            want = self.BASE_FLAGS
            caps = self.fs.capabilities
            if caps.posix_locks:
                want |= abi.POSIX_LOCKS
            if caps.flock_locks:
                want |= abi.FLOCK_LOCKS
            if caps.writeback_cache:
                want |= abi.WRITEBACK_CACHE
            required = 0  # what the file system was configured for: no mount without it
            if caps.posix_acl:
                required |= abi.POSIX_ACL | abi.DONT_MASK | abi.SETXATTR_EXT
            if caps.security_label:
                required |= abi.SECURITY_CTX
            if caps.submounts:
                want |= abi.SUBMOUNTS
            if (flags2 << 32 & abi.PYVFS_VERSION_TABLE and self.fs.version_table is not None
                    and self.version_table_readable()):
                want |= abi.PYVFS_VERSION_TABLE
            if caps.readdirplus:
                want |= abi.DO_READDIRPLUS | abi.READDIRPLUS_AUTO
            if caps.handle_killpriv_v2:
                want |= abi.HANDLE_KILLPRIV_V2
            if caps.direct_io_allow_mmap:
                want |= abi.DIRECT_IO_ALLOW_MMAP
            if caps.idmapped_mounts:
                want |= abi.ALLOW_IDMAP
            if self.dax is not None and self.dax.available:  # a window the guest can see
                want |= abi.MAP_ALIGNMENT | abi.HAS_INODE_DAX
                self.dax.remove_all()  # mappings of an earlier session, if any
            guest = flags | (flags2 << 32 if flags & abi.INIT_EXT else 0)
            if required & ~guest:
                log.error("the guest lacks INIT flags %#x that --posix-acl/--security-label "
                          "need; refusing the mount", required & ~guest)
                raise FsError(errno.EPROTO)
            self.flags = (want | required) & guest
            self._inode_dax = bool(self.flags & abi.HAS_INODE_DAX)
            self.proto_minor = min(minor, abi.KERNEL_MINOR_VERSION)
            self.fs.init()
            self.initialized = True
            self._install_fast_paths()
        log.info("FUSE session: guest %d.%d offers flags %#x, negotiated %#x",
                 major, minor, guest, self.flags)
        map_alignment = _dax.MAP_ALIGNMENT_SHIFT if self.flags & abi.MAP_ALIGNMENT else 0
        out = abi.INIT_OUT.pack(abi.KERNEL_VERSION, abi.KERNEL_MINOR_VERSION, max_readahead,
                                self.flags & 0xFFFFFFFF, 65535, 49149, MAX_WRITE, 1,
                                MAX_PAGES, map_alignment, self.flags >> 32)
        return self._reply(w, out)

    def opcode_counts(self) -> dict[str, int]:
        """How many requests of each opcode were served so far (unknown ones included)."""
        total: collections.Counter = collections.Counter()
        for c in list(self._all_counts):
            while True:
                try:
                    total.update(dict(c))
                    break
                except RuntimeError:  # its thread added an opcode meanwhile
                    continue
        return {_opname(op): n for op, n in sorted(total.items())}

    def _op_destroy(self, req, r, w):
        log.info("requests by opcode: %s",
                 ", ".join(f"{k} {v}" for k, v in self.opcode_counts().items()))
        with self._init_lock:
            if self.initialized:
                if self.dax is not None:
                    self.dax.remove_all()
                self.fs.destroy()
            self.initialized = False
            self._fast = {}
        return 0

    # -- DAX window ---------------------------------------------------------------------------
    def _attr_flags(self, attr) -> int:
        if self._inode_dax and _dax.wants_dax(self.dax_policy, attr):
            return abi.ATTR_DAX
        return 0

    def _entry(self, e: Entry) -> bytes:
        return encode_entry(e, self._attr_flags(e.attr) if self._inode_dax else 0)

    def _attr_out(self, attr, timeout: float) -> bytes:
        return encode_attr_out(attr, timeout, self._attr_flags(attr) if self._inode_dax else 0)

    def _op_setupmapping(self, req, r, w):
        if self.dax is None:
            raise FsError(errno.ENOSYS)
        fh, foffset, length, flags, moffset = abi.SETUPMAPPING_IN.unpack(
            r.read(abi.SETUPMAPPING_IN.size))
        if flags & ~(_dax.SETUPMAPPING_FLAG_READ | _dax.SETUPMAPPING_FLAG_WRITE):
            raise FsError(errno.EINVAL, f"unknown SETUPMAPPING flags {flags:#x}")
        writable = bool(flags & _dax.SETUPMAPPING_FLAG_WRITE)
        source = self.fs.map_source(req.nodeid, None if fh == _dax.NO_FH else fh, writable)
        self.dax.setup(moffset, length, foffset, writable, source)
        return 0

    def _op_removemapping(self, req, r, w):
        if self.dax is None:
            raise FsError(errno.ENOSYS)
        (count,) = abi.REMOVEMAPPING_IN.unpack(r.read(abi.REMOVEMAPPING_IN.size))
        one = abi.REMOVEMAPPING_ONE
        if count == 0 or count * one.size > r.remaining:
            raise ProtocolError(f"REMOVEMAPPING of {count} entries carries {r.remaining} bytes")
        while count:  # in slices: the guest sizes the message, not our memory
            k = min(count, 256)
            self.dax.remove(one.iter_unpack(r.read(k * one.size)))
            count -= k
        return 0

    def reset(self) -> None:
        """The device was reset: forget the session as DESTROY would."""
        self._op_destroy(None, None, None)

    # -- names and inodes -----------------------------------------------------------------
    def _op_lookup(self, req, r, w):
        (name,) = self._names(r, 1)
        entry = self.fs.lookup(req.nodeid, name, req.ctx)
        if not self.flags & abi.PYVFS_VERSION_TABLE:
            return self._reply(w, self._entry(entry))
        try:
            # The version is read before the attributes it vouches for: stat again after it.
            slot, version = self._version(entry.inode)
            entry.attr = self.fs.getattr(entry.inode, None, req.ctx).attr
            return self._reply(w, self._entry(entry) + abi.VERSION_OUT.pack(slot, version))
        except BaseException:
            self.fs.forget(entry.inode, 1)  # the guest never learns of this reference
            raise

    def _version(self, inode: int) -> tuple[int, int]:
        table = self.fs.version_table
        if table is None:  # the extension is negotiated only when the file system has one
            raise FsError(errno.ENOSYS)
        slot = self.fs.version_slot(inode)
        return slot, table.version(slot)

    def _op_forget(self, req, r, w):
        (n,) = abi.FORGET_IN.unpack(r.read(8))
        self.fs.forget(req.nodeid, n)
        return _NO_REPLY

    def _op_batch_forget(self, req, r, w):
        count, _ = abi.BATCH_FORGET_IN.unpack(r.read(8))
        if count * abi.FORGET_ONE.size > r.remaining:
            log.warning("BATCH_FORGET claims %d entries, message holds %d; using those",
                        count, r.remaining // abi.FORGET_ONE.size)
            count = r.remaining // abi.FORGET_ONE.size
        while count:  # in slices: the guest sizes the message, not our memory
            k = min(count, 4096)
            for nodeid, n in abi.FORGET_ONE.iter_unpack(r.read(k * abi.FORGET_ONE.size)):
                self.fs.forget(nodeid, n)
            count -= k
        return _NO_REPLY

    def _op_interrupt(self, req, r, w):
        (target,) = abi.INTERRUPT_IN.unpack(r.read(abi.INTERRUPT_IN.size))
        self._lock_waits.interrupt(target)  # a waiting lock answers EINTR
        return _NO_REPLY  # only waiting locks can be interrupted; others finish soon anyway

    def cancel_pending(self, complete=None, owner=None) -> None:
        """Cancel waiting locks: those completing through ``complete`` (a queue stopping),
        those of one (nodeid, lock owner) (the owner closed the file), or all of them."""
        self._lock_waits.cancel(complete, owner)

    def _op_getattr(self, req, r, w):
        flags, _, fh = _GETATTR_IN_UNPACK(r.read(16))
        fh = fh if flags & abi.GETATTR_FH else None
        if self.flags & abi.PYVFS_VERSION_TABLE:
            slot, version = self._version(req.nodeid)  # before the stat (see _op_lookup)
            res = self.fs.getattr(req.nodeid, fh, req.ctx)
            return self._reply(w, self._attr_out(res.attr, res.attr_timeout)
                               + abi.VERSION_OUT.pack(slot, version))
        res = self.fs.getattr(req.nodeid, fh, req.ctx)
        return self._reply(w, self._attr_out(res.attr, res.attr_timeout))

    def _op_statx(self, req, r, w):
        # Linux >= 6.6 asks when a caller wants more than stat(2) gives (the birth time); it
        # uses the mask, the basic fields and btime.  Owner fields go through _attr_fields
        # like every other attribute reply.
        flags, _, fh, _sx_flags, _sx_mask = abi.STATX_IN.unpack(r.read(abi.STATX_IN.size))
        res = self.fs.statx(req.nodeid, fh if flags & abi.GETATTR_FH else None, req.ctx)
        attr, t = res.attr, res.attr_timeout
        (ino, size, blocks, at, mt, ct, atn, mtn, ctn, mode, nlink, uid, gid, rdev, blksize,
         _) = _attr_fields(attr)
        mask = abi.STATX_BASIC_STATS
        birth = getattr(attr, "st_birthtime_ns", None)
        bt, btn = (0, 0) if birth is None else divmod(birth, _NS)
        if birth is not None:
            mask |= abi.STATX_BTIME
        s, ns = _timeout(t)
        return self._reply(w, abi.STATX_OUT_HEAD.pack(s, ns, 0) + abi.STATX.pack(
            mask, blksize, 0, nlink, uid, gid, mode & 0xFFFF, ino, size, blocks, 0,
            _signed(at), atn, _signed(bt), btn, _signed(ct), ctn, _signed(mt), mtn,
            os.major(rdev), os.minor(rdev), 0, 0))

    def _op_setattr(self, req, r, w):
        (valid, _, fh, size, _lo, atime, mtime, _ct, atimens, mtimens, _ctns, mode, _u4, uid, gid,
         _u5) = abi.SETATTR_IN.unpack(r.read(abi.SETATTR_IN.size))
        s = SetattrRequest()
        if valid & abi.FATTR_MODE:
            s.mode = mode
        if valid & abi.FATTR_UID:
            s.uid = uid
        if valid & abi.FATTR_GID:
            s.gid = gid
        if valid & abi.FATTR_SIZE:
            s.size = size
        if valid & abi.FATTR_ATIME_NOW:
            s.atime_now = True
        elif valid & abi.FATTR_ATIME:
            s.atime_ns = atime * 1_000_000_000 + atimens
        if valid & abi.FATTR_MTIME_NOW:
            s.mtime_now = True
        elif valid & abi.FATTR_MTIME:
            s.mtime_ns = mtime * 1_000_000_000 + mtimens
        s.kill_suidgid = bool(valid & abi.FATTR_KILL_SUIDGID)
        res = self.fs.setattr(req.nodeid, fh if valid & abi.FATTR_FH else None, s, req.ctx)
        return self._reply(w, self._attr_out(res.attr, res.attr_timeout))

    def _op_readlink(self, req, r, w):
        return self._reply(w, self.fs.readlink(req.nodeid, req.ctx))

    def _op_symlink(self, req, r, w):
        if r.remaining > MAX_NAME + 4096 + 2:
            raise FsError(errno.ENAMETOOLONG)
        name, target = _split_nul(r.read(r.remaining), 2)
        if not target:
            raise FsError(errno.ENOENT)
        self._extensions(req, r)
        return self._reply(w, self._entry(self.fs.symlink(req.nodeid, _check_name(name),
                                                           target, req.ctx)))

    def _op_mknod(self, req, r, w):
        mode, rdev, umask, _ = abi.MKNOD_IN.unpack(r.read(abi.MKNOD_IN.size))
        (name,) = self._names(r, 1)
        req.ctx.umask = umask
        self._extensions(req, r)
        return self._reply(w, self._entry(self.fs.mknod(req.nodeid, name, mode, rdev, req.ctx)))

    def _op_mkdir(self, req, r, w):
        mode, umask = abi.MKDIR_IN.unpack(r.read(abi.MKDIR_IN.size))
        (name,) = self._names(r, 1)
        req.ctx.umask = umask
        self._extensions(req, r)
        return self._reply(w, self._entry(self.fs.mkdir(req.nodeid, name, mode, req.ctx)))

    def _extensions(self, req, r) -> None:
        """The request extensions after a creating request's arguments (the handler has read
        those): FUSE_SECURITY_CTX's context for the new file (at most one is used) and
        FUSE_CREATE_SUPP_GROUP's supplementary groups, each only when negotiated."""
        if self.flags & abi.CREATE_SUPP_GROUP:
            req.ctx.supp_groups = ()  # the guest sends the group when the caller needs it
        if not req.ext_len or not self.flags & (abi.SECURITY_CTX | abi.CREATE_SUPP_GROUP):
            return
        r.remaining = req.ext_len
        ext = r.read(req.ext_len)
        pos = 0
        while pos + abi.EXT_HEADER.size <= len(ext):
            size, kind = abi.EXT_HEADER.unpack_from(ext, pos)
            if size < abi.EXT_HEADER.size or pos + size > len(ext):
                raise ProtocolError("malformed request extension")
            body = ext[pos + abi.EXT_HEADER.size:pos + size]
            pos += size
            if kind <= abi.MAX_NR_SECCTX and self.flags & abi.SECURITY_CTX:
                # nr_secctx; 0 when no security module in the guest gave one
                if kind and req.ctx.secctx is None:
                    vlen, _ = abi.SECCTX.unpack_from(body) if len(body) >= 8 else (-1, 0)
                    end = body.find(b"\0", abi.SECCTX.size)
                    if vlen < 0 or end < 0 or end + 1 + vlen > len(body):
                        raise ProtocolError("malformed security context")
                    req.ctx.secctx = (body[abi.SECCTX.size:end], body[end + 1:end + 1 + vlen])
            elif kind == abi.EXT_GROUPS and self.flags & abi.CREATE_SUPP_GROUP:
                (n,) = abi.SUPP_GROUPS.unpack_from(body) if len(body) >= 4 else (-1,)
                if n < 0 or 4 + 4 * n > len(body) or n > 64:
                    raise ProtocolError("malformed supplementary groups")
                req.ctx.supp_groups = struct.unpack_from(f"<{n}I", body, 4)

    def _op_unlink(self, req, r, w):
        (name,) = self._names(r, 1)
        self.fs.unlink(req.nodeid, name, req.ctx)
        return 0

    def _op_rmdir(self, req, r, w):
        (name,) = self._names(r, 1)
        self.fs.rmdir(req.nodeid, name, req.ctx)
        return 0

    def _op_rename(self, req, r, w):
        (newdir,) = abi.RENAME_IN.unpack(r.read(abi.RENAME_IN.size))
        old, new = self._names(r, 2)
        self.fs.rename(req.nodeid, old, newdir, new, 0, req.ctx)
        return 0

    def _op_rename2(self, req, r, w):
        newdir, flags, _ = abi.RENAME2_IN.unpack(r.read(abi.RENAME2_IN.size))
        old, new = self._names(r, 2)
        self.fs.rename(req.nodeid, old, newdir, new, flags, req.ctx)
        return 0

    def _op_link(self, req, r, w):
        (old,) = abi.LINK_IN.unpack(r.read(abi.LINK_IN.size))
        (name,) = self._names(r, 1)
        return self._reply(w, self._entry(self.fs.link(old, req.nodeid, name, req.ctx)))

    # -- files ----------------------------------------------------------------------------
    def _op_open(self, req, r, w):
        flags, open_flags = abi.OPEN_IN.unpack(r.read(abi.OPEN_IN.size))
        opened = self.fs.open(req.nodeid, flags, req.ctx)
        if open_flags & abi.OPEN_KILL_SUIDGID:
            # O_TRUNC by a process without CAP_FSETID: the server drops suid/sgid (killpriv v2)
            self.fs.setattr(req.nodeid, opened.fh, SetattrRequest(kill_suidgid=True), req.ctx)
        return self._reply(w, encode_open(opened))

    def _op_create(self, req, r, w):
        flags, mode, umask, _ = abi.CREATE_IN.unpack(r.read(abi.CREATE_IN.size))
        (name,) = self._names(r, 1)
        req.ctx.umask = umask
        self._extensions(req, r)
        entry, opened = self.fs.create(req.nodeid, name, mode, flags, req.ctx)
        return self._reply(w, self._entry(entry) + encode_open(opened))

    def _op_tmpfile(self, req, r, w):
        flags, mode, umask, _ = abi.CREATE_IN.unpack(r.read(abi.CREATE_IN.size))
        req.ctx.umask = umask
        if req.ext_len and r.remaining:
            r.read_views(r.remaining)  # skip (no copy) the placeholder name that follows
        self._extensions(req, r)
        entry, opened = self.fs.tmpfile(req.nodeid, mode, flags, req.ctx)
        return self._reply(w, self._entry(entry) + encode_open(opened))

    def _op_read(self, req, r, w):
        fh, offset, size, _, _, _, _ = abi.READ_IN.unpack(r.read(abi.READ_IN.size))
        size = min(size, MAX_WRITE, max(w.capacity - abi.OUT_HEADER.size, 0))
        if offset >= 1 << 63:
            raise FsError(errno.EINVAL)
        if size == 0:
            return 0
        return self.fs.read_into(req.nodeid, fh, offset, w.views_at(abi.OUT_HEADER.size, size))

    def _op_write(self, req, r, w):
        fh, offset, size, wflags, _, _, _ = abi.WRITE_IN.unpack(r.read(abi.WRITE_IN.size))
        if size > r.remaining:
            raise ProtocolError(f"WRITE of {size} bytes carries {r.remaining}")
        if offset >= 1 << 63:
            raise FsError(errno.EINVAL)
        n = self.fs.write_from(req.nodeid, fh, offset, r.read_views(size),
                               bool(wflags & abi.WRITE_KILL_SUIDGID), req.ctx)
        return self._reply(w, abi.WRITE_OUT.pack(n, 0))

    def _op_statfs(self, req, r, w):
        s = self.fs.statfs(req.nodeid)
        return self._reply(w, abi.KSTATFS.pack(s.f_blocks, s.f_bfree, s.f_bavail, s.f_files,
                                               s.f_ffree, s.f_bsize, s.f_namemax, s.f_frsize))

    def _op_release(self, req, r, w):
        fh, _, rflags, owner = abi.RELEASE_IN.unpack(r.read(abi.RELEASE_IN.size))
        if rflags & abi.RELEASE_FLOCK_UNLOCK and self.flags & abi.FLOCK_LOCKS:
            try:
                self.fs.setlk(req.nodeid, fh, owner, 0, 0, 2, 0, False, True)  # F_UNLCK
            except FsError:
                pass
        self.fs.release(req.nodeid, fh)
        return 0

    def _op_flush(self, req, r, w):
        fh, _, _, owner = abi.FLUSH_IN.unpack(r.read(abi.FLUSH_IN.size))
        self.cancel_pending(owner=(req.nodeid, owner))
        self.fs.flush(req.nodeid, fh, owner)
        return 0

    def _op_fsync(self, req, r, w):
        fh, flags, _ = abi.FSYNC_IN.unpack(r.read(abi.FSYNC_IN.size))
        self.fs.fsync(req.nodeid, fh, bool(flags & abi.FSYNC_FDATASYNC))
        return 0

    def _op_fallocate(self, req, r, w):
        fh, offset, length, mode, _ = abi.FALLOCATE_IN.unpack(r.read(abi.FALLOCATE_IN.size))
        self.fs.fallocate(req.nodeid, fh, mode, offset, length)
        return 0

    def _op_lseek(self, req, r, w):
        fh, offset, whence, _ = abi.LSEEK_IN.unpack(r.read(abi.LSEEK_IN.size))
        return self._reply(w, abi.LSEEK_OUT.pack(self.fs.lseek(req.nodeid, fh, offset, whence)))

    def _op_copy_file_range(self, req, r, w):
        fh_in, off_in, node_out, fh_out, off_out, length, flags = abi.COPY_FILE_RANGE_IN.unpack(
            r.read(abi.COPY_FILE_RANGE_IN.size))
        n = self.fs.copy_file_range(req.nodeid, fh_in, off_in, node_out, fh_out, off_out,
                                    min(length, 0xFFFFFFFF), flags)
        return self._reply(w, abi.WRITE_OUT.pack(n, 0))

    # -- locks ----------------------------------------------------------------------------
    def _op_getlk(self, req, r, w):
        fh, owner, start, end, type_, pid, _lkflags, _ = abi.LK_IN.unpack(r.read(abi.LK_IN.size))
        out = self.fs.getlk(req.nodeid, fh, owner, start, end, type_, pid)
        return self._reply(w, abi.LK_OUT.pack(*out))

    def _setlk(self, req, r, w, wait):
        fh, owner, start, end, type_, pid, lkflags, _ = abi.LK_IN.unpack(r.read(abi.LK_IN.size))
        if type_ not in (0, 1, 2):
            raise FsError(errno.EINVAL)
        lock = LockRequest(req.nodeid, fh, owner, start, end, type_, pid,
                           bool(lkflags & abi.LK_FLOCK))
        try:
            lock.take(self.fs)
            return 0
        except (FsError, OSError) as e:  # BlockingIOError included
            if not (wait and is_busy(e)):
                raise
        if req.complete is None:
            raise FsError(errno.EAGAIN)  # no way to answer later: the caller retries
        self.fs.begin_lock_wait(req.nodeid, owner, start, end, type_, lock.flock)

        def answer(err: int) -> None:
            n = self._error(w, req.unique, err) if err else self._finish(w, req.unique, 0)
            req.complete(req.head, n)

        self._lock_waits.start(self.fs, lock, req.unique, req.complete, answer)
        return DEFERRED

    def _op_setlk(self, req, r, w):
        return self._setlk(req, r, w, False)

    def _op_setlkw(self, req, r, w):
        return self._setlk(req, r, w, True)

    # -- directories ----------------------------------------------------------------------
    def _op_opendir(self, req, r, w):
        flags, _ = abi.OPEN_IN.unpack(r.read(abi.OPEN_IN.size))
        return self._reply(w, encode_open(self.fs.opendir(req.nodeid, req.ctx)))

    def _op_releasedir(self, req, r, w):
        fh, _, _, _ = abi.RELEASE_IN.unpack(r.read(abi.RELEASE_IN.size))
        self.fs.releasedir(req.nodeid, fh)
        return 0

    def _op_fsyncdir(self, req, r, w):
        fh, flags, _ = abi.FSYNC_IN.unpack(r.read(abi.FSYNC_IN.size))
        self.fs.fsyncdir(req.nodeid, fh, bool(flags & abi.FSYNC_FDATASYNC))
        return 0

    def _op_readdir(self, req, r, w):
        return self._readdir(req, r, w, plus=False)

    def _op_readdirplus(self, req, r, w):
        if not self.fs.capabilities.readdirplus:  # not offered (--no-readdirplus)
            raise FsError(errno.ENOSYS)
        return self._readdir(req, r, w, plus=True)

    def _readdir(self, req, r, w, plus):
        """READDIR / READDIRPLUS: each record packed by one precompiled struct (the name and
        its padding included) straight into the guest's buffer when it is one piece."""
        fh, offset, size, _, _, _, _ = abi.READ_IN.unpack(r.read(abi.READ_IN.size))
        size = min(size, max(w.capacity - abi.OUT_HEADER.size, 0), MAX_WRITE)
        out, base = _reply_space(w.writable, size) if w.writable else (None, 0)
        direct = out is not None
        if not direct:  # another layout: packed here, copied in at the end
            out, base = bytearray(size), 0
        fs = self.fs
        used = 0
        if not plus:
            for ent in fs.readdir(req.nodeid, fh, offset):
                name = ent.name
                padded = (len(name) + 7) & ~7
                if used + 24 + padded > size:
                    break
                record = _DIRENT.get(padded) or _record_struct(_DIRENT, padded, "")
                record.pack_into(out, base + used, ent.ino, ent.offset, len(name), ent.type,
                                 name)
                used += 24 + padded
        else:
            dax = self._inode_dax
            last_timeout = es = ens = None
            for ent, e in fs.readdirplus(req.nodeid, fh, offset, req.ctx):
                name = ent.name
                padded = (len(name) + 7) & ~7
                if used + 152 + padded > size:
                    if e is not None:
                        fs.forget(e.inode, 1)  # the guest will not see this one
                    break
                record = (_DIRENTPLUS.get(padded)
                          or _record_struct(_DIRENTPLUS, padded, _ENTRY_OUT.format[1:]))
                if e is None:  # '.', '..' or gone: a plain entry (node id 0)
                    record.pack_into(out, base + used, *_NO_ENTRY, ent.ino, ent.offset,
                                     len(name), ent.type, name)
                else:
                    t = e.entry_timeout
                    if t != last_timeout:
                        es, ens = _timeout(t)
                        last_timeout = t
                    as_, ans = _timeout(e.attr_timeout) if e.attr_timeout != t else (es, ens)
                    a = e.attr
                    flags = ((abi.ATTR_SUBMOUNT if e.submount else 0)
                             | (self._attr_flags(a) if dax else 0))
                    if type(a) is _STAT_RESULT:  # as pack_entry
                        record.pack_into(
                            out, base + used, e.inode, e.generation, es, as_, ens, ans,
                            a.st_ino, a.st_size, a.st_blocks, a[7] & _U64, a[8] & _U64,
                            a[9] & _U64, a.st_atime_ns % _NS, a.st_mtime_ns % _NS,
                            a.st_ctime_ns % _NS, a.st_mode, a.st_nlink, a.st_uid, a.st_gid,
                            a.st_rdev & 0xFFFFFFFF, a.st_blksize or 4096, flags,
                            ent.ino, ent.offset, len(name), ent.type, name)
                    else:
                        record.pack_into(out, base + used, e.inode, e.generation, es, as_,
                                         ens, ans, *_attr_fields(a, flags), ent.ino,
                                         ent.offset, len(name), ent.type, name)
                used += 152 + padded
        if not used:
            return 0
        if direct:
            return used
        return self._reply(w, memoryview(out)[:used])

    # -- misc -----------------------------------------------------------------------------
    def _op_access(self, req, r, w):
        mask, _ = abi.ACCESS_IN.unpack(r.read(abi.ACCESS_IN.size))
        self.fs.access(req.nodeid, mask, req.ctx)
        return 0

    def _op_setxattr(self, req, r, w):
        st = abi.SETXATTR_IN_EXT if self.flags & abi.SETXATTR_EXT else abi.SETXATTR_IN
        fields = st.unpack(r.read(st.size))
        size, flags = fields[0], fields[1]
        kill_sgid = len(fields) > 2 and fields[2] & abi.SETXATTR_ACL_KILL_SGID
        if size > XATTR_SIZE_MAX:
            raise FsError(errno.E2BIG)
        if size > r.remaining:
            raise ProtocolError("xattr value longer than the request")
        rest = r.read(min(r.remaining, MAX_NAME + 1 + size))  # not all the guest sent
        end = rest.find(b"\0")
        if end <= 0 or len(rest) - end - 1 < size:
            raise ProtocolError("malformed SETXATTR")
        name, value = rest[:end], rest[end + 1:end + 1 + size]
        if kill_sgid and name == b"system.posix_acl_access":
            # The guest's caller may not keep setgid (not in the group, no CAP_FSETID); the
            # host sees the daemon set the ACL, so it would keep the bit: drop it here.
            attr = self.fs.getattr(req.nodeid, None, req.ctx).attr
            if attr.st_mode & 0o2000:
                self.fs.setattr(req.nodeid, None, SetattrRequest(mode=attr.st_mode & 0o5777),
                                req.ctx)
        self.fs.setxattr(req.nodeid, name, value, flags, req.ctx)
        return 0

    def _op_getxattr(self, req, r, w):
        size, _ = abi.GETXATTR_IN.unpack(r.read(abi.GETXATTR_IN.size))
        (name,) = _split_nul(r.read(min(r.remaining, MAX_NAME)), 1)
        if not name:
            raise FsError(errno.EINVAL)
        value = self.fs.getxattr(req.nodeid, name, req.ctx)
        return self._sized_reply(w, size, value)

    def _op_listxattr(self, req, r, w):
        size, _ = abi.GETXATTR_IN.unpack(r.read(abi.GETXATTR_IN.size))
        names = self.fs.listxattr(req.nodeid, req.ctx)
        return self._sized_reply(w, size, b"".join(n + b"\0" for n in names))

    def _sized_reply(self, w, size, value: bytes):
        if size == 0:
            return self._reply(w, abi.GETXATTR_OUT.pack(len(value), 0))
        if len(value) > size:
            raise FsError(errno.ERANGE)
        return self._reply(w, value)

    def _op_removexattr(self, req, r, w):
        (name,) = _split_nul(r.read(min(r.remaining, MAX_NAME)), 1)
        self.fs.removexattr(req.nodeid, name, req.ctx)
        return 0

    def _op_syncfs(self, req, r, w):
        self.fs.syncfs(req.nodeid)
        return 0


def _opname(opcode: int) -> str:
    try:
        return Opcode(opcode).name
    except ValueError:
        return f"opcode {opcode}"
