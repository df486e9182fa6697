"""Drive a FuseServer in-process: requests built by hand into plain buffers (no rings)."""

import struct

from pyvirtiofs.fuse import abi
from pyvirtiofs.virtqueue import DescriptorChain

IN = struct.Struct("<IIQQIIIHH")
OUT = struct.Struct("<IiQ")


class Reply:
    def __init__(self, raw: bytes):
        self.len, self.error, self.unique = OUT.unpack_from(raw)
        self.body = raw[16:self.len]

    @property
    def errno(self):
        return -self.error


class DirectClient:
    def __init__(self, server, uid=0, gid=0):
        self.server = server
        self.uid, self.gid = uid, gid
        self.unique = 0

    def raw(self, chunks_in, reply_size=4096, writable_split=None):
        readable = [memoryview(bytearray(c)) for c in chunks_in]
        sizes = writable_split or [reply_size]
        writable = [memoryview(bytearray(n)) for n in sizes]
        n = self.server.serve_request(DescriptorChain(0, readable, writable))
        out = b"".join(bytes(w) for w in writable)[:n]
        return out

    def call(self, opcode, nodeid=1, body=b"", reply_size=1 << 16, hdr_len=None):
        self.unique += 1
        total = 40 + len(body)
        hdr = IN.pack(total if hdr_len is None else hdr_len, opcode, self.unique, nodeid,
                      self.uid, self.gid, 1234, 0, 0)
        out = self.raw([hdr, body], reply_size)
        return Reply(out) if out else None

    def init(self, flags=0x7BFFFFFB, flags2=0xB):
        r = self.call(abi.Opcode.INIT, 0, struct.pack("<IIII", 7, 38, 128 << 10, flags)
                      + struct.pack("<I", flags2) + bytes(44))
        assert r.error == 0, r.errno
        return r
