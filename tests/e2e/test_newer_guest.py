"""What a Linux 6.12 guest sends that 6.1 did not, served by pyvirtiofsd.

The same small workload runs in a 6.1 and in a 6.12 guest.  6.12 speaks FUSE 7.41 (6.1: 7.38),
offers the INIT flags of 7.38-7.41 in flags2, and asks FUSE_STATX when a program wants a file's
birth time (coreutils ``stat``); the daemon answers it, so ``stat -c %W`` in the guest shows the
host file's birth time, where a 6.1 guest (GETATTR only) shows 0.  The daemon's log says what
each guest offered and which requests it sent; both daemons must exit 0 without a traceback.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

from pyvirtiofs import linux
from pyvirtiofs.fuse import abi
from pyvirtiofs.testing import guestvm

from .conftest import daemon_env

pytestmark = pytest.mark.guest

SCRIPT = """\
set -e
stat -c 'host %W' host.txt
echo new > guest.txt
stat -c 'guest %W' guest.txt
python3 -c 'import os; print("os.stat", os.stat("host.txt").st_size)'
"""


def _run(kernel: str, tmp: Path) -> tuple[dict[str, str], str, Path]:
    shared = tmp / f"share-{kernel}"
    shared.mkdir(parents=True)
    (shared / "host.txt").write_text("from the host\n")
    sock = str(tmp / f"{kernel}.sock")
    d = guestvm.DaemonProcess([sys.executable, "-m", "pyvirtiofs", f"--socket-path={sock}",
                               f"--shared-dir={shared}"], sock, env=daemon_env()).start()
    try:
        res = guestvm.run_guest(SCRIPT, [guestvm.Share("nk", socket=sock)], hostroot=True,
                                kernel=kernel, timeout=300, daemons=[d])
        rc = d.wait(timeout=30)
    finally:
        d.stop()
    assert res.status == 0, res.output[-3000:]
    assert rc == 0 and "Traceback" not in d.log, d.log[-5000:]
    out = dict(line.split(" ", 1) for line in res.output.splitlines() if " " in line)
    return out, d.log, shared


def _birth_s(path: Path) -> int:
    fd = os.open(path, os.O_PATH)
    try:
        b = linux.statx(fd).st_birthtime_ns
    finally:
        os.close(fd)
    assert b is not None, f"the host file system of {path} keeps no birth time"
    return b // 10**9


def _session(log: str) -> tuple[int, int, int]:
    m = re.search(r"FUSE session: guest 7\.(\d+) offers flags (0x[0-9a-f]+), negotiated (0x[0-9a-f]+)",
                  log)
    assert m, log[-3000:]
    return int(m.group(1)), int(m.group(2), 16), int(m.group(3), 16)


def _opcodes(log: str) -> dict[str, int]:
    m = re.search(r"requests by opcode: (.*)", log)
    assert m, log[-3000:]
    return {k: int(v) for k, v in (item.rsplit(" ", 1) for item in m.group(1).split(", "))}


def test_6_12_asks_statx_and_gets_the_birth_time_6_1_does_not(guest_ready, short_tmp):
    tmp = Path(short_tmp) / "newer"
    new, new_log, new_dir = _run("6.12", tmp)
    old, old_log, old_dir = _run("6.1", tmp)

    minor_new, offered_new, negotiated_new = _session(new_log)
    minor_old, offered_old, _ = _session(old_log)
    assert (minor_old, minor_new) == (38, 41)
    extra = offered_new & ~offered_old
    print(f"\n6.1 offers {offered_old:#x}, 6.12 offers {offered_new:#x}: new bits "
          f"{[b for b in range(64) if extra >> b & 1]}; negotiated with 6.12 {negotiated_new:#x}")
    # 7.38's CREATE_SUPP_GROUP (34) and 7.39-7.41's DIRECT_IO_ALLOW_MMAP .. ALLOW_IDMAP (36-40).
    assert extra == sum(1 << b for b in (34, 36, 37, 38, 39, 40)), hex(extra)
    # of those, CREATE_SUPP_GROUP (34) and ALLOW_IDMAP (40) are taken unasked, as virtiofsd
    # takes them; the others need an option
    assert negotiated_new >> 34 == 1 | 1 << 6, hex(negotiated_new)

    ops_new, ops_old = _opcodes(new_log), _opcodes(old_log)
    print(f"requests 6.12 sent that 6.1 did not: {sorted(set(ops_new) - set(ops_old))}; "
          f"6.1 only: {sorted(set(ops_old) - set(ops_new))}")
    assert ops_new.get("STATX", 0) >= 2 and "STATX" not in ops_old

    # The guest's stat shows the host's birth time, for a file of the host and one it created.
    assert int(new["host"]) == _birth_s(new_dir / "host.txt")
    assert int(new["guest"]) == _birth_s(new_dir / "guest.txt")
    assert int(old["host"]) == 0 and int(old["guest"]) == 0  # GETATTR carries no birth time
    assert new["os.stat"] == old["os.stat"] == "14"
