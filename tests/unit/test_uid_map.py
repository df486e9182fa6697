"""--uid-map/--gid-map run by an ordinary user (nobody): the ranges it is granted in
/etc/subuid and /etc/subgid are mapped into its user namespace through newuidmap/newgidmap
(as virtiofsd does) and the server is root there, so files a guest user creates belong to
the host id that user's id maps to, and owners outside the ranges show as the overflow id.
(Root with the same options: tests/unit/test_rootless.py.)"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.unit.daemon import daemon_env
from tests.unit.test_rootless import NOBODY, ROOT, rootless_daemon, share  # noqa: F401

SUB_BASE = 300000  # nobody's subordinate ids for this test
OVERFLOW = 65534   # what a user namespace shows for ids it does not hold


@pytest.fixture
def subids():
    """nobody:300000:1000 in /etc/subuid and /etc/subgid for the test, restored after."""
    saved = {}
    for name in ("/etc/subuid", "/etc/subgid"):
        p = Path(name)
        saved[p] = p.read_text() if p.exists() else None
        p.write_text((saved[p] or "") + f"nobody:{SUB_BASE}:1000\n")
    yield
    for p, text in saved.items():
        if text is None:
            p.unlink()
        else:
            p.write_text(text)


MAPS = ("--uid-map=:0:65534:1:", f"--uid-map=:1:{SUB_BASE}:1000:",
        "--gid-map=:0:65534:1:", f"--gid-map=:1:{SUB_BASE}:1000:")


def test_guest_users_create_files_as_their_mapped_host_ids(share, subids):  # noqa: F811
    if subprocess.run(["sh", "-c", "command -v newuidmap"]).returncode:
        pytest.fail("newuidmap missing: scripts/setup.sh installs Debian's uidmap")
    os.chmod(share, 0o777)
    (share / "by-host-root").write_text("x")  # uid 0 on the host: outside the ranges
    (share / "by-sub").write_text("y")
    os.chown(share / "by-sub", SUB_BASE + 41, SUB_BASE + 42)
    d = rootless_daemon(share, *MAPS).start()
    try:
        c = d.client()
        c.uid, c.gid = 0, 0
        m = c.mkdir(ROOT, "as-guest-root", 0o755)
        c.uid, c.gid = 7, 8
        e, o = c.create(ROOT, "as-guest-7", mode=0o644)
        c.release(e.nodeid, o.fh)
        attrs = {n: c.lookup(ROOT, n).attr for n in ("by-host-root", "by-sub")}
    finally:
        d.finish()
    assert "Traceback" not in d.log(), d.log()
    assert (m.attr.uid, m.attr.gid) == (0, 0) and (e.attr.uid, e.attr.gid) == (7, 8)
    st = (share / "as-guest-root").stat()
    assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY)
    st = (share / "as-guest-7").stat()
    assert (st.st_uid, st.st_gid) == (SUB_BASE + 6, SUB_BASE + 7)
    assert (attrs["by-sub"].uid, attrs["by-sub"].gid) == (42, 43)
    assert (attrs["by-host-root"].uid, attrs["by-host-root"].gid) == (OVERFLOW, OVERFLOW)


def run(argv):
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, env=daemon_env())


def test_ranges_not_granted_in_subuid_are_refused_saying_why(share):  # noqa: F811
    d = rootless_daemon(share, f"--uid-map=:0:{SUB_BASE}:1000:")
    r = run(d.argv)
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("pyvirtiofsd: cannot enter the sandbox")
    assert "/etc/subuid" in r.stderr
    assert "Traceback" not in r.stderr
