"""The guest stays inside the shared directory, whatever the host plants in it, and
--readonly refuses every write.  A real guest drives the daemon; hostile links are planted
on the host side, some of them while the guest works."""

import os
import sys
import threading
from pathlib import Path

import pytest

from pyvirtiofs.testing import guestvm

from .conftest import daemon_env

pytestmark = pytest.mark.guest
SECRET = "TOP-SECRET-OUTSIDE-THE-SHARE"


def start(tmp: Path, shared: Path, *extra: str) -> guestvm.DaemonProcess:
    sock = str(tmp / "s.sock")
    argv = [sys.executable, "-m", "pyvirtiofs", f"--socket-path={sock}",
            f"--shared-dir={shared}", *extra]
    return guestvm.DaemonProcess(argv, sock, env=daemon_env()).start()


def test_symlinks_planted_by_the_host_never_lead_outside(guest_ready, short_tmp):
    tmp = Path(os.path.join(short_tmp, "esc"))
    outside = tmp / "outside"
    shared = tmp / "share"
    outside.mkdir(parents=True)
    shared.mkdir()
    (outside / "secret").write_text(SECRET)
    (shared / "inside").mkdir()
    (shared / "inside" / "file").write_text("harmless")
    os.symlink(str(outside / "secret"), shared / "abs")
    os.symlink("../outside/secret", shared / "rel")
    os.symlink("..", shared / "up")
    os.symlink(str(outside), shared / "absdir")
    os.symlink("/proc/self/root" + str(outside), shared / "magic")
    stop = threading.Event()

    def swap():  # a directory and a symlink to the outside trade places, again and again
        d, link, tmpname = shared / "swap", shared / "swaplink", shared / ".swaptmp"
        d.mkdir()
        (d / "secret").write_text("inside-swap")
        os.symlink(str(outside), link)
        while not stop.is_set():
            os.rename(d, tmpname)
            os.rename(link, d)
            os.rename(d, link)
            os.rename(tmpname, d)

    script = r"""
for p in abs rel up/outside/secret absdir/secret magic/secret ../outside/secret; do
  cat "$p" 2>/dev/null; echo "write-$p" > "$p" 2>/dev/null; done
i=0; while [ $i -lt 300 ]; do cat swap/secret 2>/dev/null; echo x >> swap/secret 2>/dev/null; i=$((i+1)); done
ln abs hardlink-to-abs 2>/dev/null; cat hardlink-to-abs 2>/dev/null
cd ..; cat vfs/../outside/secret 2>/dev/null; ls / > /dev/null
echo checked
"""
    d = start(tmp, shared)
    t = threading.Thread(target=swap)
    t.start()
    try:
        res = guestvm.run_guest(script, [guestvm.Share("vfs", socket=d.socket_path)],
                                daemons=[d], timeout=300)
    finally:
        stop.set()
        t.join()
        d.stop()
    assert res.status == 0 and "checked" in res.output, res.output
    assert SECRET not in res.output
    assert (outside / "secret").read_text() == SECRET  # never written through a link
    assert sorted(os.listdir(outside)) == ["secret"]
    assert "Traceback" not in d.log


def test_readonly_refuses_every_write(guest_ready, short_tmp):
    tmp = Path(os.path.join(short_tmp, "ro"))
    shared = tmp / "share"
    shared.mkdir(parents=True)
    (shared / "f").write_text("original")
    (shared / "d").mkdir()
    script = r"""
cat f
for c in "echo x > f" "echo y >> f" "touch new" "mkdir nd" "rm f" "rmdir d" "mv f g" \
         "ln f h" "ln -s f s" "chmod 600 f" "truncate -s 0 f" "mknod p p"; do
  if sh -c "$c" 2>/tmp/err; then echo "ALLOWED: $c"; else echo "refused: $c: $(cat /tmp/err)"; fi
done
"""
    d = start(tmp, shared, "--readonly")
    try:
        res = guestvm.run_guest(script, [guestvm.Share("vfs", socket=d.socket_path)],
                                daemons=[d], timeout=300)
    finally:
        d.stop()
    assert res.output.startswith("original"), res.output
    assert "ALLOWED" not in res.output, res.output
    assert res.output.count("refused:") == 12
    assert "Read-only file system" in res.output
    assert sorted(os.listdir(shared)) == ["d", "f"] and (shared / "f").read_text() == "original"
