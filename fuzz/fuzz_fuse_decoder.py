#!/usr/bin/env python3
"""Fuzz target: the FUSE request decoder and the split-ring walker, in-process.

    python fuzz/fuzz_fuse_decoder.py --iterations 20000 [--seed 1]   # stdlib random, bounded
    python fuzz/fuzz_fuse_decoder.py [libFuzzer options]              # atheris, if installed

One input (bytes) drives one of two things:

* a FUSE message: opcode, node id, header fields and argument struct taken from the input
  (with valid node ids and file handles mixed in, so requests reach the file system), split
  into readable descriptors and a writable area at input-chosen boundaries, and handed to
  :class:`FuseServer` (over :class:`PassthroughFs` on a temporary directory) as a
  :class:`DescriptorChain` of memoryviews;
* a ring: a :class:`Virtqueue` over a memfd-backed :class:`GuestMemory` whose descriptor
  table, avail ring and buffers come from the input; every chain it pops is served by the
  same FuseServer and published in the used ring.

A crash is any exception other than the ones the API promises (ChainError, QueueBroken), a
reply that breaks the FUSE rules (out header length, unique, errno range, error replies with
a payload, more bytes than the buffer), or a traceback logged by the server ("internal
error").  Without atheris, inputs are random bytes from a seeded ``random.Random``.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import logging
import os
import random
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path

_SRC = Path(__file__).resolve().parent.parent / "src"
if str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))

from pyvirtiofs.fuse import abi  # noqa: E402
from pyvirtiofs.fuse.abi import Opcode  # noqa: E402
from pyvirtiofs.fuse.server import DEFERRED, FuseServer  # noqa: E402
from pyvirtiofs.guest_memory import GuestMemory, MemoryRegion  # noqa: E402
from pyvirtiofs.passthrough import PassthroughFs  # noqa: E402
from pyvirtiofs.virtqueue import ChainError, DescriptorChain, QueueBroken, Virtqueue  # noqa: E402

OPCODES = [int(o) for o in Opcode]
# Fixed-size argument struct of each opcode (names follow for some).
ARG_SIZE = {
    Opcode.INIT: 64, Opcode.GETATTR: 16, Opcode.SETATTR: 88, Opcode.MKNOD: 16,
    Opcode.MKDIR: 8, Opcode.RENAME: 8, Opcode.RENAME2: 16, Opcode.LINK: 8, Opcode.OPEN: 8,
    Opcode.CREATE: 16, Opcode.TMPFILE: 16, Opcode.READ: 40, Opcode.WRITE: 40,
    Opcode.RELEASE: 24, Opcode.RELEASEDIR: 24, Opcode.FLUSH: 24, Opcode.FSYNC: 16,
    Opcode.FSYNCDIR: 16, Opcode.SETXATTR: 8, Opcode.GETXATTR: 8, Opcode.LISTXATTR: 8,
    Opcode.OPENDIR: 8, Opcode.READDIR: 40, Opcode.READDIRPLUS: 40, Opcode.GETLK: 48,
    Opcode.SETLK: 48, Opcode.SETLKW: 48, Opcode.ACCESS: 8, Opcode.INTERRUPT: 8,
    Opcode.FORGET: 8, Opcode.BATCH_FORGET: 8, Opcode.FALLOCATE: 32, Opcode.LSEEK: 24,
    Opcode.COPY_FILE_RANGE: 56, Opcode.SYNCFS: 8,
}
# Opcodes whose argument struct starts with a file handle.
FH_FIRST = {Opcode.READ, Opcode.WRITE, Opcode.RELEASE, Opcode.RELEASEDIR, Opcode.FLUSH,
            Opcode.FSYNC, Opcode.FSYNCDIR, Opcode.READDIR, Opcode.READDIRPLUS, Opcode.GETLK,
            Opcode.SETLK, Opcode.SETLKW, Opcode.FALLOCATE, Opcode.LSEEK,
            Opcode.COPY_FILE_RANGE}
NAMES = [b"f\0", b"d\0", b"new\0", b"x\0y\0", b"..\0", b".\0", b"a/b\0", b"\0", b"noterm",
         b"user.fuzz\0", b"trusted.x\0", b"n" * 300 + b"\0", b"\xff\xfe\0"]

MEM_GPA = 0x10000
MEM_SIZE = 64 * 1024
DESC_AT, AVAIL_AT, USED_AT, DATA_AT = 0, 4096, 8192, 16384   # offsets in the region
RING_SIZES = [1, 2, 4, 8, 16, 64, 256]


class Crash(AssertionError):
    """The target misbehaved (for atheris: an uncaught exception is a finding)."""


class _Input:
    """Consumes an input front to back; past its end every read yields zeros."""

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def bytes(self, n: int) -> bytes:
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out + bytes(n - len(out))

    def int(self, n: int) -> int:
        return int.from_bytes(self.bytes(n), "little")

    def below(self, n: int) -> int:
        return self.int(2 if n > 256 else 1) % n if n > 1 else 0

    def choice(self, seq):
        return seq[self.below(len(seq))]

    def rest(self, limit: int) -> bytes:
        out = self.data[self.pos:self.pos + limit]
        self.pos += len(out)
        return out


class _TracebackCatcher(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        if record.exc_info:
            self.records.append(record)


class Target:
    """The objects under test, made once and reused by every input."""

    def __init__(self):
        self.tmp = tempfile.mkdtemp(prefix="pyvirtiofs-fuzz-")
        self.root = os.path.join(self.tmp, "shared")
        os.mkdir(self.root)
        Path(self.root, "f").write_bytes(os.urandom(8192))
        os.mkdir(os.path.join(self.root, "d"))
        umask = os.umask(0o022)
        try:
            self.fs = PassthroughFs(self.root)
        finally:
            os.umask(umask)            # PassthroughFs sets the process umask to 0
        self.server = FuseServer(self.fs)
        self.catcher = _TracebackCatcher()
        for name in ("pyvirtiofs", ""):
            logging.getLogger(name).addHandler(self.catcher)
        self._level = logging.getLogger("pyvirtiofs").level
        logging.getLogger("pyvirtiofs").setLevel(logging.ERROR)
        self.unique = 0
        self._init()
        self.memfd = os.memfd_create("fuzz-guest", os.MFD_CLOEXEC)
        os.ftruncate(self.memfd, MEM_SIZE)
        self.region = MemoryRegion.from_fd(self.memfd, MEM_GPA, MEM_SIZE, 0x7F0000000000, 0)
        self.memory = GuestMemory([self.region])
        self.mem = self.region.view
        self.iterations = 0
        # what the inputs reached: (opcode, errno) of each FUSE reply, chains popped off rings
        self.replies: collections.Counter = collections.Counter()
        self.ring_chains = 0

    # -- helpers --------------------------------------------------------------------------
    def _call(self, opcode, nodeid, body, reply=4096):
        self.unique += 2
        hdr = abi.IN_HEADER.pack(40 + len(body), opcode, self.unique, nodeid, 0, 0, 0, 0, 0)
        out = memoryview(bytearray(reply))
        n = self.server.serve_request(DescriptorChain(0, [memoryview(bytearray(hdr + body))], [out]))
        return bytes(out[:n])

    def _init(self):
        body = abi.INIT_IN.pack(7, 38, 131072, 0x7BFFFFFB) + struct.pack("<I", 0xB) + bytes(44)
        self._call(Opcode.INIT, 0, body)
        self.handles = []
        self.nodes = [1]
        for name, op, arg in ((b"f", Opcode.OPEN, abi.OPEN_IN.pack(os.O_RDWR, 0)),
                              (b"d", Opcode.OPENDIR, abi.OPEN_IN.pack(os.O_RDONLY, 0))):
            r = self._call(Opcode.LOOKUP, 1, name + b"\0")
            if len(r) >= 24 and struct.unpack_from("<i", r, 4)[0] == 0:
                nid = struct.unpack_from("<Q", r, 16)[0]
                self.nodes.append(nid)
                r = self._call(op, nid, arg)
                if len(r) >= 24 and struct.unpack_from("<i", r, 4)[0] == 0:
                    self.handles.append(struct.unpack_from("<Q", r, 16)[0])

    def close(self):
        if self.fs is None:
            return
        for name in ("pyvirtiofs", ""):
            logging.getLogger(name).removeHandler(self.catcher)
        logging.getLogger("pyvirtiofs").setLevel(self._level)
        self.fs.close()
        self.fs = None
        self.memory.release()
        os.close(self.memfd)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _check_logs(self):
        if self.catcher.records:
            rec = self.catcher.records[0]
            self.catcher.records.clear()
            raise Crash(f"the server logged a traceback: {rec.getMessage()}") from (
                rec.exc_info[1] if rec.exc_info else None)

    # -- one input ------------------------------------------------------------------------
    def run(self, data: bytes) -> None:
        self.iterations += 1
        inp = _Input(data)
        if not self.server.initialized:
            self._init()                # a DESTROY earlier: start a session again
        if inp.int(1) % 4 == 3:
            self._ring(inp)
        else:
            self._fuse(inp)
        self._check_logs()

    def _message(self, inp: _Input) -> bytes:
        sel = inp.int(1)
        opcode = self.OPC[sel % len(self.OPC)] if sel < 240 else inp.int(4)
        nodeid = inp.choice(self.nodes + [0, 2**64 - 1, inp.int(8)])
        size = ARG_SIZE.get(opcode, inp.below(64))
        args = bytearray(inp.bytes(size))
        if opcode in FH_FIRST and size >= 8 and inp.int(1) < 200:
            struct.pack_into("<Q", args, 0, inp.choice(self.handles + [0, 999, 2**64 - 1]))
        if opcode in (Opcode.READ, Opcode.WRITE, Opcode.READDIR, Opcode.READDIRPLUS,
                      Opcode.LSEEK, Opcode.FALLOCATE) and inp.int(1) < 160:
            struct.pack_into("<Q", args, 8, inp.int(2))            # a sensible offset
        if opcode == Opcode.FALLOCATE:
            # a real preallocation of random size would fill the disk; keep it small
            struct.pack_into("<Q", args, 16, struct.unpack_from("<Q", args, 16)[0] & 0xFFF)
        if opcode in (Opcode.READ, Opcode.WRITE, Opcode.READDIR, Opcode.READDIRPLUS) \
                and inp.int(1) < 160:
            struct.pack_into("<I", args, 16, inp.int(2))           # a sensible size
        if opcode == Opcode.BATCH_FORGET and inp.int(1) < 128:
            struct.pack_into("<I", args, 0, inp.int(1))
        tail = b""
        for _ in range(inp.int(1) % 3):
            tail += inp.choice(NAMES)
        tail += inp.rest(inp.int(1) % 64)
        return bytes(args) + tail, opcode, nodeid

    OPC = OPCODES + [Opcode.READ, Opcode.WRITE, Opcode.LOOKUP, Opcode.GETATTR, Opcode.SETATTR,
                     Opcode.SETLK, Opcode.GETLK, Opcode.LSEEK, Opcode.READDIRPLUS]

    def _fuse(self, inp: _Input) -> None:
        body, opcode, nodeid = self._message(inp)
        self.unique += 2
        unique = self.unique if inp.int(1) < 240 else inp.int(8)
        length = 40 + len(body)
        if inp.int(1) >= 224:
            length = inp.int(4)
        uid = inp.choice([0, 0, 0, 1000, 2**32 - 1])
        hdr = abi.IN_HEADER.pack(length, opcode, unique, nodeid, uid, uid, inp.int(4),
                                 inp.int(2) if inp.int(1) >= 250 else 0, 0)
        msg = hdr + body
        if inp.int(1) >= 250:
            msg = msg[:inp.below(len(msg))]                         # a cut-short request
        # readable descriptors at input-chosen boundaries (zero-length ones included)
        readable, pos = [], 0
        for _ in range(inp.int(1) % 6):
            cut = min(len(msg), pos + inp.int(1) % 48)
            readable.append(memoryview(bytearray(msg[pos:cut])))
            pos = cut
        readable.append(memoryview(bytearray(msg[pos:])))
        writable = [memoryview(bytearray(inp.choice([0, 8, 16, 17, 120, 128, 4096]) +
                                          inp.int(1) % 32))
                    for _ in range(inp.int(1) % 4)]
        self._serve(DescriptorChain(0, readable, writable), unique, opcode)

    def _serve(self, chain: DescriptorChain, unique: int | None, opcode: int | None = None) -> int:
        cap = sum(len(v) for v in chain.writable)
        n = self.server.serve_request(chain)
        if n == DEFERRED:
            raise Crash("a reply was deferred although no completion callback was given")
        if not isinstance(n, int) or n < 0 or n > cap:
            raise Crash(f"handle() returned {n!r} for a writable capacity of {cap}")
        if n:
            out = b"".join(bytes(v) for v in chain.writable)[:n]
            if n < 16:
                raise Crash(f"a reply of {n} bytes is shorter than the out header")
            ln, error, uq = abi.OUT_HEADER.unpack_from(out)
            if ln != n:
                raise Crash(f"out header len {ln} != reply length {n}")
            if unique is not None and uq != unique:
                raise Crash(f"out header unique {uq} != {unique}")
            if not -4095 <= error <= 0:
                raise Crash(f"error {error} is not a negative errno")
            if error and n != 16:
                raise Crash(f"error reply {error} carries {n - 16} payload bytes")
            if opcode is not None:
                self.replies[opcode, -error] += 1
        return n

    def _ring(self, inp: _Input) -> None:
        mem = self.mem
        size = inp.choice(RING_SIZES)
        vq = Virtqueue(1)
        vq.size = size
        vq.event_idx = bool(inp.int(1) & 1)
        # guest memory: descriptor table, avail ring, then data from the input
        mem[DESC_AT:DESC_AT + 16 * size] = bytes(16 * size)
        for i in range(min(size, inp.int(1) % 12 + 1)):
            kind = inp.int(1)
            if kind < 160:
                addr = MEM_GPA + DATA_AT + inp.int(2) % (MEM_SIZE - DATA_AT)
            elif kind < 200:
                addr = MEM_GPA + DESC_AT + 16 * inp.int(1)                # an indirect table
            else:
                addr = inp.int(8)
            length = inp.int(2) if inp.int(1) < 220 else inp.int(4)
            flags = inp.int(1) & 7 if inp.int(1) < 230 else inp.int(2)
            nxt = inp.int(1) % (size + 2) if inp.int(1) < 230 else inp.int(2)
            struct.pack_into("<QIHH", mem, DESC_AT + 16 * i, addr, length, flags, nxt)
        vq.configure(self.memory, MEM_GPA + DESC_AT, MEM_GPA + AVAIL_AT, MEM_GPA + USED_AT)
        start = inp.int(2)
        vq.next_avail = start
        count = inp.int(1) % (size + 1) if inp.int(1) < 240 else inp.int(2)
        struct.pack_into("<HH", mem, AVAIL_AT, inp.int(1) & 1, (start + count) & 0xFFFF)
        for i in range(size):
            struct.pack_into("<H", mem, AVAIL_AT + 4 + 2 * i,
                             inp.int(1) % size if inp.int(1) < 240 else inp.int(2))
        struct.pack_into("<H", mem, AVAIL_AT + 4 + 2 * size, inp.int(2))     # used_event
        # the buffers' contents last: they take the rest of the input, and anything read
        # after them would be zeros (no chain would ever be published)
        data = inp.rest(4096)
        mem[DATA_AT:DATA_AT + len(data)] = data
        used0 = vq.next_used
        popped = 0
        for _ in range(size + 2):
            try:
                chain = vq.pop()
            except ChainError:
                popped += 1                 # returned with used length 0 by pop() itself
                continue
            except QueueBroken:
                return
            if chain is None:
                break
            popped += 1
            self.ring_chains += 1
            n = self._serve(chain, None)
            vq.add_used(chain.head, n)
        vq.needs_notification()
        vq.enable_notification()
        if (vq.next_used - used0) & 0xFFFF != popped:
            raise Crash(f"{popped} chains popped, used index moved by {vq.next_used - used0}")
        if struct.unpack_from("<H", mem, USED_AT + 2)[0] != vq.next_used:
            raise Crash("used.idx in guest memory disagrees with the device's count")


_target: Target | None = None


def target() -> Target:
    global _target
    if _target is None:
        _target = Target()
        atexit.register(_target.close)     # libFuzzer ends the process by itself
    return _target


def TestOneInput(data: bytes) -> None:  # noqa: N802 (the atheris/libFuzzer name)
    target().run(data)


def run_random(iterations: int, seed: int = 0, max_len: int = 512, t: Target | None = None,
               verbose: bool = False) -> int:
    """``iterations`` random inputs; raises on the first crash (with the input attached)."""
    rng = random.Random(seed)
    t = t or target()
    for i in range(iterations):
        data = rng.randbytes(rng.randrange(max_len))
        try:
            t.run(data)
        except Exception as e:
            raise Crash(f"iteration {i} (seed {seed}): input {data.hex()}\n{type(e).__name__}: "
                        f"{e}") from e
        if verbose and i and i % 5000 == 0:
            print(f"{i} inputs", file=sys.stderr)
    return iterations


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iterations", type=int, help="run this many random inputs (no atheris)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-len", type=int, default=512)
    args, rest = p.parse_known_args(argv)
    if args.iterations is None:
        try:
            import atheris  # type: ignore
        except ImportError:
            print("atheris is not installed: use --iterations N for a random run",
                  file=sys.stderr)
            return 2
        atheris.instrument_all()       # coverage feedback from the pyvirtiofs code loaded
        atheris.Setup([sys.argv[0], *rest], TestOneInput)
        atheris.Fuzz()
        return 0
    t0 = time.monotonic()
    try:
        run_random(args.iterations, args.seed, args.max_len, verbose=True)
    finally:
        if _target is not None:
            _target.close()
    print(f"{args.iterations} inputs, no crash ({time.monotonic() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
