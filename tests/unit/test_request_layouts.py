"""The reply to a request does not depend on how the guest split it into buffers.

The FUSE server serves the hot opcodes (GETATTR, LOOKUP, READ, WRITE, CREATE, OPEN, FLUSH,
RELEASE, UNLINK, FORGET, unknown opcodes) on a fast path that expects the layouts Linux and
the benchmark client use: the in header in one buffer and the arguments in the next (or all of
it in one), the reply header in the first writable buffer and the reply in it or in the next.
Every other layout goes through the generic path.  Here every request, well-formed and
malformed, is sent in layouts of both kinds and must get the same answer and the same effect.
"""

import errno
import os
import struct

import pytest

from pyvirtiofs.fuse import abi
from pyvirtiofs.fuse.abi import Opcode
from pyvirtiofs.fuse.server import FuseServer
from pyvirtiofs.passthrough import PassthroughFs
from pyvirtiofs.virtqueue import DescriptorChain

UID, GID = os.getuid(), os.getgid()

# (name, cuts of the readable bytes, cuts of the writable bytes): cut points, in bytes
LAYOUTS = {
    "one buffer each way": ((), ()),
    "linux: header | arguments, header | reply": ((40,), (16,)),
    "generic: header split, reply header split": ((13, 40, 45), (5, 16, 17)),
    "generic: arguments split": ((40, 43), (16, 20)),
}


def _split(data: bytes | int, cuts):
    """Fresh buffers holding data (or of data bytes), cut at the given offsets."""
    raw = bytearray(data) if isinstance(data, int) else bytearray(data)
    cuts = [c for c in cuts if 0 < c < len(raw)]
    edges = [0] + cuts + [len(raw)]
    return [memoryview(raw[a:b]) for a, b in zip(edges, edges[1:]) if b > a]


class Client:
    def __init__(self, share):
        self.fs = PassthroughFs(str(share), cache="auto")
        self.server = FuseServer(self.fs)
        self.unique = 0
        r = self.call(Opcode.INIT, 0, abi.INIT_IN.pack(7, 38, 1 << 17, 0x7BFFFFFB)
                      + struct.pack("<I", 0) + bytes(44), 4096, "one buffer each way")
        assert r[1] == 0

    def call(self, opcode, nodeid, body, reply_size, layout, hdr_len=None):
        """(length, error, body) of the reply, or None when there is none."""
        self.unique += 1
        rcuts, wcuts = LAYOUTS[layout]
        hdr = abi.IN_HEADER.pack(40 + len(body) if hdr_len is None else hdr_len, opcode,
                                 self.unique, nodeid, UID, GID, 1, 0, 0)
        readable = _split(hdr + body, rcuts)
        writable = _split(16 + reply_size, wcuts) if reply_size is not None else []
        n = self.server.serve_request(DescriptorChain(0, readable, writable))
        if not n:
            return None
        out = b"".join(bytes(v) for v in writable)
        length, err, unique = abi.OUT_HEADER.unpack_from(out)
        assert unique == self.unique and length == n
        return n, -err, out[16:n]


@pytest.fixture
def share(tmp_path):
    d = tmp_path / "share"
    d.mkdir()
    (d / "file").write_bytes(bytes(range(256)) * 64)  # 16 KiB
    (d / "dir").mkdir()
    return d


@pytest.fixture
def client(share):
    umask = os.umask(0o022)
    c = Client(share)
    yield c
    c.fs.close()
    os.umask(umask)


def _same_everywhere(client, *args, **kw):
    replies = {lay: client.call(*args, layout=lay, **kw) for lay in LAYOUTS}
    first = next(iter(replies.values()))
    assert all(r == first for r in replies.values()), replies
    return first


def _lookup(client, name, layout="one buffer each way"):
    n, err, body = client.call(Opcode.LOOKUP, 1, name + b"\0", 128, layout)
    assert err == 0, os.strerror(err)
    return struct.unpack_from("<Q", body)[0]


def _open(client, nodeid, flags=os.O_RDWR):
    n, err, body = client.call(Opcode.OPEN, nodeid, abi.OPEN_IN.pack(flags, 0), 16,
                               "one buffer each way")
    assert err == 0, os.strerror(err)
    return struct.unpack_from("<Q", body)[0]


def test_getattr_lookup_and_read_answer_the_same_in_every_layout(client, share):
    node = _lookup(client, b"file")
    n, err, body = _same_everywhere(client, Opcode.GETATTR, node, bytes(16), 104)
    assert err == 0 and n == 120
    attr = abi.ATTR.unpack_from(body, 16)
    assert attr[0] == os.stat(share / "file").st_ino and attr[1] == 16384

    n, err, body = _same_everywhere(client, Opcode.LOOKUP, 1, b"file\0", 128)
    assert err == 0 and struct.unpack_from("<Q", body)[0] == node
    assert _same_everywhere(client, Opcode.LOOKUP, 1, b"missing\0", 128)[1] == errno.ENOENT

    fh = _open(client, node, os.O_RDONLY)
    n, err, body = _same_everywhere(client, Opcode.READ, node,
                                    abi.READ_IN.pack(fh, 1000, 5000, 0, 0, 0, 0), 5000)
    assert err == 0 and body == (bytes(range(256)) * 64)[1000:6000]
    # A reply buffer larger than the request: the reply is what was asked for
    n, err, body = _same_everywhere(client, Opcode.READ, node,
                                    abi.READ_IN.pack(fh, 0, 100, 0, 0, 0, 0), 8192)
    assert n == 116 and body == bytes(range(100))
    # ... and a smaller one: what fits
    n, err, body = _same_everywhere(client, Opcode.READ, node,
                                    abi.READ_IN.pack(fh, 16000, 4096, 0, 0, 0, 0), 300)
    assert n == 316 and body == (bytes(range(256)) * 64)[16000:16300]
    # At the end of the file: a short reply
    n, err, body = _same_everywhere(client, Opcode.READ, node,
                                    abi.READ_IN.pack(fh, 16380, 4096, 0, 0, 0, 0), 4096)
    assert body == bytes(range(252, 256))
    counts = client.server.opcode_counts()
    assert counts["READ"] == 4 * len(LAYOUTS) and counts["LOOKUP"] == 2 * len(LAYOUTS) + 1


@pytest.mark.parametrize("layout", LAYOUTS)
def test_create_write_release_unlink_in_each_layout(client, share, layout):
    c = client
    n, err, body = c.call(Opcode.CREATE, 1, abi.CREATE_IN.pack(os.O_RDWR, 0o100640, 0o022, 0)
                          + b"new\0", 144, layout)
    assert err == 0 and n == 160
    node = struct.unpack_from("<Q", body)[0]
    fh, open_flags, _ = abi.OPEN_OUT.unpack_from(body, 128)
    assert abi.ATTR.unpack_from(body, 40)[9] & 0o7777 == 0o640
    data = os.urandom(10000)
    n, err, body = c.call(Opcode.WRITE, node, abi.WRITE_IN.pack(fh, 3, len(data), 0, 0, 0, 0)
                          + data, 8, layout)
    assert err == 0 and abi.WRITE_OUT.unpack(body)[0] == len(data)
    assert (share / "new").read_bytes() == bytes(3) + data
    # a zero-length write
    n, err, body = c.call(Opcode.WRITE, node, abi.WRITE_IN.pack(fh, 0, 0, 0, 0, 0, 0), 8, layout)
    assert err == 0 and abi.WRITE_OUT.unpack(body)[0] == 0
    assert c.call(Opcode.FLUSH, node, abi.FLUSH_IN.pack(fh, 0, 0, 7), 0, layout)[:2] == (16, 0)
    assert c.call(Opcode.RELEASE, node, abi.RELEASE_IN.pack(fh, 0, 0, 0), 0, layout)[:2] == (16, 0)
    # the handle is gone: a read with it fails
    r = c.call(Opcode.READ, node, abi.READ_IN.pack(fh, 0, 10, 0, 0, 0, 0), 10, layout)
    assert r[1] == errno.EBADF
    assert c.call(Opcode.UNLINK, 1, b"new\0", 0, layout)[:2] == (16, 0)
    assert not (share / "new").exists()
    assert c.call(Opcode.UNLINK, 1, b"new\0", 0, layout)[1] == errno.ENOENT
    # FORGET has no reply; the node is gone afterwards
    assert c.call(Opcode.FORGET, node, struct.pack("<Q", 1), None, layout) is None
    assert c.call(Opcode.GETATTR, node, bytes(16), 104, layout)[1] == errno.EBADF


MALFORMED = [
    # (what, opcode, nodeid, body, reply size, header length or None, errno)
    ("GETATTR with 8 bytes of arguments", Opcode.GETATTR, 1, bytes(8), 104, None, errno.EINVAL),
    ("LOOKUP name without NUL", Opcode.LOOKUP, 1, b"file", 128, None, errno.EINVAL),
    ("LOOKUP empty name", Opcode.LOOKUP, 1, b"\0", 128, None, errno.EINVAL),
    ("LOOKUP name with '/'", Opcode.LOOKUP, 1, b"dir/x\0", 128, None, errno.EINVAL),
    ("LOOKUP 300-byte name", Opcode.LOOKUP, 1, b"a" * 300 + b"\0", 128, None, errno.ENAMETOOLONG),
    ("LOOKUP reply buffer too small", Opcode.LOOKUP, 1, b"file\0", 100, None, errno.ERANGE),
    ("LOOKUP name cut off by the header's length", Opcode.LOOKUP, 1, b"file\0", 128, 42,
     errno.EINVAL),
    ("header longer than the chain", Opcode.GETATTR, 1, bytes(16), 104, 400, errno.EINVAL),
    ("header shorter than a header", Opcode.GETATTR, 1, bytes(16), 104, 20, errno.EINVAL),
    ("READ at offset 2^63", Opcode.READ, 2, abi.READ_IN.pack(1, 1 << 63, 10, 0, 0, 0, 0), 10,
     None, errno.EINVAL),
    ("READ with 20 bytes of arguments", Opcode.READ, 2, bytes(20), 10, None, errno.EINVAL),
    ("WRITE of more than it carries", Opcode.WRITE, 2,
     abi.WRITE_IN.pack(1, 0, 100, 0, 0, 0, 0) + bytes(50), 8, None, errno.EINVAL),
    ("WRITE at offset 2^63", Opcode.WRITE, 2, abi.WRITE_IN.pack(1, 1 << 63, 4, 0, 0, 0, 0)
     + bytes(4), 8, None, errno.EINVAL),
    ("CREATE without a name", Opcode.CREATE, 1, abi.CREATE_IN.pack(0, 0o100644, 0, 0), 144,
     None, errno.EINVAL),
    ("RELEASE with 8 bytes of arguments", Opcode.RELEASE, 1, bytes(8), 0, None, errno.EINVAL),
    ("UNLINK of '..' ", Opcode.UNLINK, 1, b"a/..\0", 0, None, errno.EINVAL),
    ("an opcode nobody knows", 4242, 1, bytes(16), 0, None, errno.ENOSYS),
    ("unknown node id", Opcode.GETATTR, 999, bytes(16), 104, None, errno.EBADF),
]


@pytest.mark.parametrize("case", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_requests_get_the_same_errno_in_every_layout(client, share, case):
    _what, opcode, nodeid, body, size, hdr_len, err = case
    before = sorted(os.listdir(share))
    n, got, reply = _same_everywhere(client, opcode, nodeid, body, size, hdr_len=hdr_len)
    assert (n, got, reply) == (16, err, b"")
    assert sorted(os.listdir(share)) == before


def test_a_reply_buffer_too_small_for_the_header_gets_no_reply(client):
    for opcode, body in ((Opcode.GETATTR, bytes(16)), (4242, b"")):
        hdr = abi.IN_HEADER.pack(40 + len(body), opcode, 5, 1, UID, GID, 1, 0, 0)
        chain = DescriptorChain(0, [memoryview(bytearray(hdr + body))],
                                [memoryview(bytearray(10))])
        assert client.server.serve_request(chain) == 0
