"""FUSE_CREATE_SUPP_GROUP from a real guest: a user who may write to a directory only through
a supplementary group creates files there, on Linux 6.12 (which sends the group) and 6.1
(which cannot).

Host: ``team`` is root:2000 mode 0775, ``sgid`` root:2000 mode 2777.  In the guest, user 1000
(primary group 1000, supplementary 2000) creates a file, a directory, a FIFO and a symlink in
``team`` and a file with mode 2755 in ``sgid``; user 1001 (no such group) tries ``team`` too.

- 6.12 sends group 2000 with each creation; the daemon creates as 1000:1000 with that group,
  so the host lets it in and keeps the setgid bit a member may set (new file group 2000).
- 6.1 sends no group; as virtiofsd, the daemon keeps CAP_DAC_OVERRIDE for the creation (the
  guest's own check let the member through), and the host drops the setgid bit, as it does
  for a creator outside the group.
- On both, the non-member is refused by the guest (default_permissions).
The daemon runs with its defaults (the seccomp allow-list included) and must end cleanly.
"""

from __future__ import annotations

import os
import re
import stat
import sys
from pathlib import Path

import pytest

from pyvirtiofs.testing import guestvm

from .conftest import daemon_env

pytestmark = pytest.mark.guest

GUEST = r"""
set -u
cd /mnt/sg
say() { echo "$1=$2"; }
member() { setpriv --reuid=1000 --regid=1000 --groups=2000 -- "$@"; }
say file "$(member sh -c 'echo hi > team/file' 2>&1 && echo ok)"
say dir "$(member mkdir team/dir 2>&1 && echo ok)"
say fifo "$(member mkfifo team/fifo 2>&1 && echo ok)"
say link "$(member ln -s file team/link 2>&1 && echo ok)"
say sgid "$(member python3 -c 'import os; os.umask(0); os.close(os.open("sgid/member", os.O_CREAT | os.O_WRONLY, 0o2755))' 2>&1 && echo ok)"
say sgid_mode "$(stat -c %a sgid/member)"
say outsider "$(setpriv --reuid=1001 --regid=1001 --clear-groups -- mkdir team/x 2>&1 || true)"
"""


def _run(kernel: str, tmp: Path):
    shared = tmp / f"share-{kernel}"
    shared.mkdir(parents=True)
    for name, mode in (("team", 0o775), ("sgid", 0o2777)):
        (shared / name).mkdir()
        os.chown(shared / name, 0, 2000)
        os.chmod(shared / name, mode)
    sock = str(tmp / f"{kernel}.sock")
    d = guestvm.DaemonProcess([sys.executable, "-m", "pyvirtiofs", f"--socket-path={sock}",
                               f"--shared-dir={shared}"], sock, env=daemon_env()).start()
    try:
        res = guestvm.run_guest(GUEST, [guestvm.Share("sg", socket=sock)], hostroot=True,
                                kernel=kernel, timeout=300, daemons=[d])
        rc = d.wait(timeout=30)
    finally:
        d.stop()
    assert res.status == 0, res.output[-3000:]
    assert rc == 0 and "Traceback" not in d.log, d.log[-5000:]
    out = dict(line.split("=", 1) for line in res.output.splitlines()
               if re.match(r"^[a-z_]+=", line))
    m = re.search(r"FUSE session: guest 7\.\d+ offers flags (0x[0-9a-f]+), negotiated", d.log)
    assert m, d.log[-3000:]
    return out, int(m.group(1), 16), shared


@pytest.mark.parametrize("kernel", ["6.12", "6.1"])
def test_group_member_creates_through_its_supplementary_group(guest_ready, short_tmp, kernel):
    assert os.geteuid() == 0, "the daemon must be root to create files as the guest's users"
    out, offered, shared = _run(kernel, Path(short_tmp) / "suppgroup")
    sends_group = kernel == "6.12"
    assert bool(offered & 1 << 34) == sends_group, hex(offered)  # FUSE_CREATE_SUPP_GROUP
    for name in ("file", "dir", "fifo", "link", "sgid"):
        assert out.get(name) == "ok", (name, out)
    for name in ("file", "dir", "fifo", "link"):
        st = os.lstat(shared / "team" / name)
        assert (st.st_uid, st.st_gid) == (1000, 1000), (name, st)
    member = os.stat(shared / "sgid" / "member")
    assert (member.st_uid, member.st_gid) == (1000, 2000)
    # the setgid bit: kept when the guest said the creator is in group 2000
    assert bool(member.st_mode & stat.S_ISGID) == sends_group, oct(member.st_mode)
    assert out["sgid_mode"] == ("2755" if sends_group else "755"), out
    assert "Permission denied" in out["outsider"], out
    assert not (shared / "team" / "x").exists()
