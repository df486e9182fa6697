"""The caching and I/O options with a real guest: --writeback (writes of partial pages to
files opened write-only, appends the guest positions itself), --allow-direct-io (O_DIRECT
I/O from the guest), --no-readdirplus (listings without READDIRPLUS) and --allow-mmap
(shared mmap of a --cache=never file, on Linux 6.12, which knows the flag)."""

from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path

import pytest

from pyvirtiofs.fuse import abi
from pyvirtiofs.testing import guestvm

from .conftest import daemon_env

pytestmark = pytest.mark.guest


def start(tmp: Path, name: str, shared: Path, *args: str) -> guestvm.DaemonProcess:
    sock = str(tmp / f"{name}.sock")
    return guestvm.DaemonProcess([sys.executable, "-m", "pyvirtiofs", f"--socket-path={sock}",
                                  f"--shared-dir={shared}", "--log-level=debug", *args],
                                 sock, env=daemon_env()).start()


def finish(d: guestvm.DaemonProcess) -> str:
    """Stop the daemon; it must have exited cleanly, without a traceback or ERROR line."""
    status = d.stop()
    log = d.log
    assert status == 0, f"daemon exited with {status}:\n{guestvm._tail(log, 60)}"
    assert "Traceback" not in log and " ERROR " not in log, guestvm._tail(log, 80)
    return log


def negotiated(log: str) -> int:
    m = re.search(r"negotiated (0x[0-9a-f]+)", log)
    assert m, log[-3000:]
    return int(m.group(1), 16)


WRITEBACK_SCRIPT = r"""
set -e
printf 'hello' > appended
printf ' world' >> appended
printf 'XY' | dd of=partial bs=1 seek=3 conv=notrunc 2>/dev/null
dd if=/dev/urandom of=direct bs=4096 count=8 oflag=direct 2>/dev/null
dd if=direct of=/dev/null bs=4096 iflag=direct 2>/dev/null
echo "direct-read=$(dd if=direct bs=4096 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)"
echo "listing=$(ls -l dir | grep -c 'entry')"
sync
"""


@pytest.mark.parametrize("args", [(), ("--writeback", "--allow-direct-io", "--no-readdirplus")],
                         ids=["defaults", "writeback,allow-direct-io,no-readdirplus"])
def test_writeback_direct_io_and_no_readdirplus(guest_ready, short_tmp, args):
    tmp = Path(short_tmp) / ("io-" + str(len(args)))
    shared = tmp / "share"
    (shared / "dir").mkdir(parents=True)
    for i in range(20):
        (shared / "dir" / f"entry{i}").write_text(str(i))
    (shared / "partial").write_bytes(b"0123456789")
    d = start(tmp, "io", shared, *args)
    try:
        res = guestvm.run_guest(WRITEBACK_SCRIPT, [guestvm.Share("io", socket=d.socket_path)],
                                daemons=[d], timeout=300)
    finally:
        log = finish(d)
    assert res.status == 0, res.output
    out = dict(line.split("=", 1) for line in res.output.splitlines() if "=" in line)
    assert (shared / "appended").read_bytes() == b"hello world"
    assert (shared / "partial").read_bytes() == b"012XY56789"

    assert out["direct-read"] == hashlib.md5((shared / "direct").read_bytes()).hexdigest()
    assert (shared / "direct").stat().st_size == 8 * 4096
    assert out["listing"] == "20", res.output
    flags = negotiated(log)
    counts = re.search(r"requests by opcode: (.*)", log)
    assert counts, log[-3000:]
    ops = dict(item.rsplit(" ", 1) for item in counts.group(1).split(", "))
    if args:
        assert flags & abi.WRITEBACK_CACHE
        assert not flags & abi.DO_READDIRPLUS
        assert "READDIRPLUS" not in ops and "READDIR" in ops, ops
    else:
        assert not flags & abi.WRITEBACK_CACHE
        assert flags & abi.DO_READDIRPLUS
        assert "READDIRPLUS" in ops, ops


MMAP_SCRIPT = r"""
for share in plain allowmmap; do
python3 - /mnt/$share/f <<'EOF'
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
try:
    m = mmap.mmap(fd, 4096, mmap.MAP_SHARED)
except OSError as e:
    print(sys.argv[1], "mmap-error", e.errno)
else:
    m[0:6] = b"mapped"
    m.flush()
    m.close()
    print(sys.argv[1], "mmap-ok")
EOF
done
"""


def test_allow_mmap_with_cache_never(guest_ready, short_tmp):
    tmp = Path(short_tmp) / "mmap"
    plain, allow = tmp / "plain", tmp / "allow"
    for d in (plain, allow):
        d.mkdir(parents=True)
        (d / "f").write_bytes(b"\0" * 4096)
    d1 = start(tmp, "plain", plain, "--cache=never")
    d2 = start(tmp, "allow", allow, "--cache=never", "--allow-mmap")
    try:
        res = guestvm.run_guest(MMAP_SCRIPT, [guestvm.Share("plain", socket=d1.socket_path),
                                              guestvm.Share("allowmmap", socket=d2.socket_path)],
                                hostroot=True, kernel="6.12", daemons=[d1, d2], timeout=300)
    finally:
        log1, log2 = finish(d1), finish(d2)
    assert res.status == 0, res.output
    # without the option a cache=never file cannot be mapped shared (ENODEV), with it it can
    assert "/mnt/plain/f mmap-error 19" in res.output, res.output
    assert "/mnt/allowmmap/f mmap-ok" in res.output, res.output
    assert (allow / "f").read_bytes()[:6] == b"mapped"
    assert (plain / "f").read_bytes()[:6] == b"\0" * 6
    assert negotiated(log2) & abi.DIRECT_IO_ALLOW_MMAP
    assert not negotiated(log1) & abi.DIRECT_IO_ALLOW_MMAP
