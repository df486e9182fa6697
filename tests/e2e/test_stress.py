"""stress-ng's file system stressors inside a real guest, on the pyvirtiofs mount: no
stressor fails or reports a verification error, and the daemon neither crashes nor logs a
traceback.  CI runs each stressor briefly; PYVIRTIOFS_STRESS_SECONDS=60 makes a long run.

lockf runs with --lockf-nonblock: in its blocking mode a stressor parent keeps its locks while
it waits for a child blocked in F_SETLKW, and only a signal ends that wait.  Linux's virtio-fs
driver never forwards FUSE_INTERRUPT (fs/fuse/virtio_fs.c: "TODO interrupts"), so on any
virtiofs with host-forwarded locks the child can only be SIGKILLed (see the README)."""

import os
import sys
from pathlib import Path

import pytest

from pyvirtiofs.testing import guestvm

from .conftest import daemon_env

pytestmark = pytest.mark.guest
STRESSORS = ["hdd", "dir", "dentry", "link", "symlink", "rename", "lockf", "flock",
             "fallocate", "xattr", "filename", "seek", "open", "chmod", "utime", "fiemap"]
EXTRA = {"lockf": "--lockf-nonblock"}


def test_stress_ng_file_system_stressors(guest_ready, short_tmp):
    guestvm.ensure_host_programs({"stress-ng": "stress-ng"})
    secs = int(os.environ.get("PYVIRTIOFS_STRESS_SECONDS", "2"))
    tmp = Path(short_tmp) / "stress"
    shared = tmp / "share"
    shared.mkdir(parents=True)
    sock = str(tmp / "s.sock")
    d = guestvm.DaemonProcess([sys.executable, "-m", "pyvirtiofs", f"--socket-path={sock}",
                               f"--shared-dir={shared}", "--xattr"],  # the xattr stressor
                              sock, env=daemon_env()).start()
    script = "mkdir -p /mnt/vfs/s && cd /mnt/vfs/s\n" + "".join(
        f"stress-ng --{s} 2 {EXTRA.get(s, '')} --timeout {secs}s --verify --temp-path /mnt/vfs/s "
        f"--hdd-bytes 8M --metrics-brief >/tmp/{s}.log 2>&1; rc=$?; "
        f"echo \"STRESSOR {s} rc=$rc\"; [ $rc = 0 ] || tail -20 /tmp/{s}.log\n"
        for s in STRESSORS)
    try:
        res = guestvm.run_guest(script, [guestvm.Share("vfs", socket=sock)], hostroot=True,
                                smp=2, daemons=[d], timeout=120 + 30 * secs * len(STRESSORS))
        rc = d.wait(timeout=30)  # the guest powered off: QEMU disconnected, the daemon ends
    finally:
        d.stop()
    lines = [ln for ln in res.output.splitlines() if ln.startswith("STRESSOR")]
    assert len(lines) == len(STRESSORS), res.output
    failed = [ln for ln in lines if not ln.endswith("rc=0")]
    assert not failed, res.output
    assert "Traceback" not in d.log, d.log[-5000:]
    assert rc == 0, f"daemon exit status {rc}\n{d.log[-5000:]}"
