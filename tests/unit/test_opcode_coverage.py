"""pyvirtiofsd answers every FUSE operation the Rust virtiofsd (the reference) answers: through
the project's frontend, each opcode is sent with a well-formed request to both daemons; every
opcode the reference answers with anything but ENOSYS must not get ENOSYS from pyvirtiofsd.

Not probed: FORGET, BATCH_FORGET and INTERRUPT (no reply exists to tell), NOTIFY_REPLY (an
answer to a notification), INIT (done first by both).  DESTROY goes last; a daemon that
returns its chain without a reply has handled it too."""

from __future__ import annotations

import errno
import os
import stat
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.peers import run_peer  # noqa: E402

from pyvirtiofs.testing import frontend as F  # noqa: E402
from pyvirtiofs.testing.frontend import FUSE_ROOT_ID, FuseClient, Op  # noqa: E402

pytestmark = pytest.mark.peer
NOT_PROBED = {Op.FORGET, Op.BATCH_FORGET, Op.INTERRUPT, Op.NOTIFY_REPLY, Op.INIT}
FS_IOC_GETFLAGS = 0x80086601
NO_REPLY = -1


def z(name: str) -> bytes:
    return name.encode() + b"\0"


def probe(c: FuseClient, shared: Path) -> dict[str, int]:
    """Send every opcode once; the errno each got (0: success)."""
    (shared / "f").write_bytes(b"0123456789" * 100)
    os.symlink("f", shared / "l")
    f = c.lookup(FUSE_ROOT_ID, "f").nodeid
    link = c.lookup(FUSE_ROOT_ID, "l").nodeid
    fh = c.open(f, os.O_RDWR).fh
    dfh = c.opendir(FUSE_ROOT_ID).fh
    owner = 0x1234
    if c.negotiated & F.FUSE_SETXATTR_EXT:
        setx = F.SETXATTR_IN.pack(1, 0, 0, 0)
    else:
        setx = F.SETXATTR_IN_COMPAT.pack(1, 0)
    requests = {
        Op.LOOKUP: (FUSE_ROOT_ID, z("f")),
        Op.GETATTR: (f, F.GETATTR_IN.pack(0, 0, 0)),
        Op.SETATTR: (f, F.SETATTR_IN.pack(F.FATTR_MODE, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                          stat.S_IFREG | 0o640, 0, 0, 0, 0)),
        Op.READLINK: (link, b""),
        Op.SYMLINK: (FUSE_ROOT_ID, z("s1") + z("f")),
        Op.MKNOD: (FUSE_ROOT_ID, F.MKNOD_IN.pack(stat.S_IFIFO | 0o644, 0, 0, 0) + z("n1")),
        Op.MKDIR: (FUSE_ROOT_ID, F.MKDIR_IN.pack(0o755, 0) + z("d1")),
        Op.UNLINK: (FUSE_ROOT_ID, z("n1")),
        Op.RMDIR: (FUSE_ROOT_ID, z("d1")),
        Op.RENAME: (FUSE_ROOT_ID, F.RENAME_IN.pack(FUSE_ROOT_ID) + z("s1") + z("s2")),
        Op.LINK: (FUSE_ROOT_ID, F.LINK_IN.pack(f) + z("hl")),
        Op.OPEN: (f, F.OPEN_IN.pack(os.O_RDONLY, 0)),
        Op.READ: (f, F.READ_IN.pack(fh, 0, 100, 0, 0, os.O_RDWR, 0)),
        Op.WRITE: (f, F.WRITE_IN.pack(fh, 0, 3, 0, 0, os.O_RDWR, 0) + b"abc"),
        Op.STATFS: (FUSE_ROOT_ID, b""),
        Op.FSYNC: (f, F.FSYNC_IN.pack(fh, 0, 0)),
        Op.SETXATTR: (f, setx + z("user.k") + b"v"),
        Op.GETXATTR: (f, F.GETXATTR_IN.pack(0, 0) + z("user.k")),
        Op.LISTXATTR: (f, F.GETXATTR_IN.pack(0, 0)),
        Op.REMOVEXATTR: (f, z("user.k")),
        Op.FLUSH: (f, F.FLUSH_IN.pack(fh, 0, 0, owner)),
        Op.OPENDIR: (FUSE_ROOT_ID, F.OPEN_IN.pack(os.O_RDONLY, 0)),
        Op.READDIR: (FUSE_ROOT_ID, F.READ_IN.pack(dfh, 0, 4096, 0, 0, 0, 0)),
        Op.READDIRPLUS: (FUSE_ROOT_ID, F.READ_IN.pack(dfh, 0, 4096, 0, 0, 0, 0)),
        Op.FSYNCDIR: (FUSE_ROOT_ID, F.FSYNC_IN.pack(dfh, 0, 0)),
        Op.GETLK: (f, F.LK_IN.pack(fh, owner, 0, 9, 1, 0, 0, 0)),      # F_WRLCK
        Op.SETLK: (f, F.LK_IN.pack(fh, owner, 0, 9, 2, 0, 0, 0)),      # F_UNLCK
        Op.SETLKW: (f, F.LK_IN.pack(fh, owner, 0, 9, 2, 0, 0, 0)),
        Op.ACCESS: (f, F.ACCESS_IN.pack(os.R_OK, 0)),
        Op.CREATE: (FUSE_ROOT_ID, F.CREATE_IN.pack(os.O_RDWR | os.O_CREAT, stat.S_IFREG | 0o644,
                                                   0, 0) + z("c1")),
        Op.BMAP: (f, F.struct.pack("<QII", 0, 4096, 0)),
        Op.IOCTL: (f, F.struct.pack("<QIIQII", fh, 0, FS_IOC_GETFLAGS, 0, 0, 8)),
        Op.POLL: (f, F.struct.pack("<QQII", fh, 0, 0, 1)),
        Op.FALLOCATE: (f, F.FALLOCATE_IN.pack(fh, 0, 4096, 0, 0)),
        Op.RENAME2: (FUSE_ROOT_ID, F.RENAME2_IN.pack(FUSE_ROOT_ID, 0, 0) + z("s2") + z("s3")),
        Op.LSEEK: (f, F.LSEEK_IN.pack(fh, 0, os.SEEK_DATA, 0)),
        Op.COPY_FILE_RANGE: (f, F.COPY_FILE_RANGE_IN.pack(fh, 0, f, fh, 500, 10, 0)),
        Op.COPY_FILE_RANGE_64: (f, F.COPY_FILE_RANGE_IN.pack(fh, 0, f, fh, 600, 10, 0)),
        Op.SETUPMAPPING: (f, F.SETUPMAPPING_IN.pack(fh, 0, 4096, 1, 0)),
        Op.REMOVEMAPPING: (f, F.REMOVEMAPPING_IN.pack(1) + F.struct.pack("<QQ", 0, 4096)),
        Op.SYNCFS: (FUSE_ROOT_ID, F.SYNCFS_IN.pack(0)),
        Op.TMPFILE: (FUSE_ROOT_ID, F.CREATE_IN.pack(os.O_RDWR, stat.S_IFREG | 0o600, 0, 0)),
        Op.STATX: (f, F.struct.pack("<IIQII", 0, 0, 0, 0, 0x7FF)),
        Op.RELEASEDIR: (FUSE_ROOT_ID, F.RELEASE_IN.pack(dfh, 0, 0, 0)),
        Op.RELEASE: (f, F.RELEASE_IN.pack(fh, os.O_RDWR, 0, 0)),
        Op.DESTROY: (FUSE_ROOT_ID, b""),
    }
    missing = set(Op) - NOT_PROBED - set(requests)
    assert not missing, f"no probe for {sorted(o.name for o in missing)}"
    out = {}
    for op, (nodeid, body) in requests.items():
        try:
            out[op.name] = c.raw_request(op, nodeid, body, 4096).error
        except F.ProtocolError:  # the chain came back without a reply (Rust's DESTROY)
            out[op.name] = NO_REPLY
    return out


def test_pyvirtiofsd_answers_every_operation_the_reference_answers(start_daemon, tmp_path):
    ref_shared = tmp_path / "ref"
    ref_shared.mkdir()
    with run_peer("rust", ref_shared, extra_args=["--xattr"], workdir=tmp_path) as peer:
        ref = probe(FuseClient.connect(peer.socket_path), ref_shared)
    ours_shared = tmp_path / "ours"
    ours_shared.mkdir()
    ours = probe(start_daemon(ours_shared, extra_args=["--xattr"]).client(), ours_shared)
    answered = {name for name, err in ref.items() if err != errno.ENOSYS}
    # the probe reaches the reference's implementations (else this test could not fail)
    assert len(answered) >= 30, ref
    assert all(ref[n] == 0 for n in ("LOOKUP", "WRITE", "LINK", "SETXATTR", "CREATE")), ref
    gaps = {name: ours[name] for name in answered if ours[name] == errno.ENOSYS}
    assert not gaps, (f"the Rust virtiofsd answers these, pyvirtiofsd says ENOSYS: {sorted(gaps)}"
                      f"\nreference: {ref}\npyvirtiofsd: {ours}")
    print("answered by the reference:", sorted(answered))
    print("ENOSYS from the reference:", sorted(set(ref) - answered))
