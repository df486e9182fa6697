"""The sandbox confines the running daemon: its root is the shared directory, it has its own
namespaces (namespace mode) and only the capabilities a passthrough needs, and it still serves."""

import os
import re

import pytest

CAP_SYS_ADMIN = 21
CAP_SYS_CHROOT = 18


@pytest.mark.parametrize("mode", ["namespace", "chroot"])
def test_sandbox_confines_the_daemon(start_daemon, tmp_path, mode):
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "inside").write_text("in the share")
    d = start_daemon(shared, extra_args=[f"--sandbox={mode}", "--seccomp=kill"])
    d.wait_log("seccomp filter installed")
    pid = d.pid
    if mode == "namespace":
        # the pid file names the supervisor; its one child serves, as PID 1 of its namespace
        children = open(f"/proc/{pid}/task/{pid}/children").read().split()
        assert len(children) == 1, children
        pid = int(children[0])
        assert os.readlink(f"/proc/{pid}/ns/pid") != os.readlink("/proc/self/ns/pid")
        assert re.search(r"NSpid:\s*\d+\s+1\b", open(f"/proc/{pid}/status").read())
    assert sorted(os.listdir(f"/proc/{pid}/root")) == ["inside"]
    mine = {ns: os.readlink(f"/proc/self/ns/{ns}") for ns in ("net", "mnt", "ipc", "uts")}
    theirs = {ns: os.readlink(f"/proc/{pid}/ns/{ns}") for ns in mine}
    if mode == "namespace":
        assert all(theirs[ns] != mine[ns] for ns in mine), theirs
    else:
        assert theirs == mine
    status = open(f"/proc/{pid}/status").read()
    cap_eff = int(re.search(r"CapEff:\s*([0-9a-f]+)", status).group(1), 16)
    assert not cap_eff & (1 << CAP_SYS_ADMIN) and not cap_eff & (1 << CAP_SYS_CHROOT)
    assert re.search(r"Seccomp:\s*2", status)
    # Confined, it still serves the share (file creation included).
    c = d.client()
    e = c.lookup(1, "inside")
    assert e.attr.size == len("in the share")
    entry, opened = c.create(1, "made-in-sandbox")
    c.write(entry.nodeid, opened.fh, 0, b"hello")
    c.release(entry.nodeid, opened.fh)
    assert (shared / "made-in-sandbox").read_bytes() == b"hello"
