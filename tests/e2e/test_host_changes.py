"""Changes made on the host while the guest works are seen in the guest as the cache mode
promises: at once with --cache=never, within the 1 s timeout with --cache=auto; never ESTALE
for a path that exists.  With --cache=always (entries, attributes and file data kept for a
day) the guest, 1.5 s later, still finds the files it had looked up under their old names and
reads their old data from its page cache; with --cache=metadata names are kept the same way,
but file data is read from the host each time."""

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
cat data; cat gone; cat recreated; ls dir
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


FRESH = {"data": "new content", "gone": "No such file", "renamed": "moved on the host",
         "dir": "b", "recreated": "second inode", "size": "11"}
# Names the guest had looked up still lead to the inodes it knew, and the file data it had
# read is served from its page cache; a name it never looked up is found.  (Attributes are not
# compared: the guest kernel fetches them again after a read, to update the access time.)
KEPT = {"data": "old", "gone": "soon deleted", "renamed": "moved on the host",
        "recreated": "first inode"}
# names kept the same way, but file data read from the host (through the inode it knew)
METADATA = {**KEPT, "data": "new content"}


@pytest.mark.parametrize("cache,delay,expected", [
    ("never", "0", FRESH), ("auto", "1.5", FRESH), ("always", "1.5", KEPT),
    ("metadata", "1.5", METADATA)])
def test_host_changes_are_seen(guest_ready, short_tmp, cache, delay, expected):
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
    out["dir"] = " ".join(out["dir"].split())
    for key, want in expected.items():
        assert want in out[key] if want == "No such file" else out[key] == want, \
            f"{key}: {out[key]!r}, expected {want!r} with --cache={cache}\n{res.output}"
    assert "Stale" not in res.output
