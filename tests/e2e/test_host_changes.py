"""Changes made on the host while the guest works are seen in the guest as the cache mode
promises: at once with --cache=never, within the 1 s timeout with --cache=auto; never ESTALE
for a path that exists."""

import os
import sys
import threading
import time
from pathlib import Path

import pytest

from pyvirtiofs.testing import guestvm

from .conftest import daemon_env

pytestmark = pytest.mark.guest

GUEST = r"""
wait_for() { i=0; while [ ! -e "$1" ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done; }
cat data; cat gone; ls dir
touch ready
wait_for changed
sleep {delay}
echo "data=$(cat data 2>&1)"
echo "gone=$(cat gone 2>&1)"
echo "renamed=$(cat renamed 2>&1)"
echo "dir=$(ls dir 2>&1 | tr '\n' ' ')"
echo "recreated=$(cat recreated 2>&1)"
echo "size=$(stat -c %s data 2>&1)"
"""


@pytest.mark.parametrize("cache,delay", [("never", "0"), ("auto", "1.5")])
def test_host_changes_are_seen(guest_ready, short_tmp, cache, delay):
    tmp = Path(short_tmp) / f"hc-{cache}"
    shared = tmp / "share"
    (shared / "dir").mkdir(parents=True)
    (shared / "data").write_text("old")
    (shared / "gone").write_text("soon deleted")
    (shared / "recreated").write_text("first inode")
    (shared / "dir" / "a").write_text("")

    def host_side():
        deadline = time.monotonic() + 120
        while not (shared / "ready").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        (shared / "data").write_text("new content")
        (shared / "gone").unlink()
        os.rename(shared / "dir" / "a", shared / "dir" / "b")
        (shared / "renamed-src").write_text("moved on the host")
        os.rename(shared / "renamed-src", shared / "renamed")
        (shared / "recreated").unlink()
        (shared / "recreated").write_text("second inode")
        (shared / "changed").write_text("")

    sock = str(tmp / "s.sock")
    d = guestvm.DaemonProcess([sys.executable, "-m", "pyvirtiofs", f"--socket-path={sock}",
                               f"--shared-dir={shared}", f"--cache={cache}"], sock,
                              env=daemon_env()).start()
    t = threading.Thread(target=host_side)
    t.start()
    try:
        res = guestvm.run_guest(GUEST.replace("{delay}", delay),
                                [guestvm.Share("vfs", socket=sock)], daemons=[d], timeout=300)
    finally:
        t.join()
        d.stop()
    out = dict(line.split("=", 1) for line in res.output.splitlines() if "=" in line)
    assert out["data"] == "new content", res.output
    assert "No such file" in out["gone"], res.output
    assert out["renamed"] == "moved on the host", res.output
    assert out["dir"].split() == ["b"], res.output
    assert out["recreated"] == "second inode", res.output
    assert out["size"] == "11", res.output
    assert "Stale" not in res.output
