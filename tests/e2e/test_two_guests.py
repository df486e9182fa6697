"""Two QEMU guests at once, each with its own pyvirtiofsd on the same directory tree: what one
guest does is seen by the other, concurrent O_APPEND writers lose nothing and never
interleave, a lock in one guest makes the other wait, and the tree holds exactly what both
wrote.  One pair of boots does every check; each guest mounts the tree twice, through a
daemon with --cache=never and through one with --cache=auto."""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

import pytest

from pyvirtiofs.testing import guestvm

from pyvirtiofs.version_table import VersionTable

from .conftest import daemon_argv, daemon_env, daemon_name

pytestmark = pytest.mark.guest

LINES = 600            # appended by each guest to each log
SEEN_WITHIN = 15.0     # how long the other guest may take to see a change under auto (loaded CI)

GUEST = r"""
cat > /tmp/two.py <<'EOF2'
import fcntl, os, sys, time
ME, OTHER = sys.argv[1], sys.argv[2]
NEVER, AUTO = "/mnt/never", "/mnt/auto"
SYNC = NEVER + "/.sync"  # rendezvous files, under cache=never: seen at once
LINES, SEEN_WITHIN = int(sys.argv[3]), float(sys.argv[4])

def say(*a):
    print(ME, *a, flush=True)

def barrier(step):
    open(f"{SYNC}/{step}.{ME}", "w").close()
    deadline = time.monotonic() + 300
    while not os.path.exists(f"{SYNC}/{step}.{OTHER}"):
        if time.monotonic() > deadline:
            say("BARRIER TIMEOUT", step); sys.exit(3)
        time.sleep(0.01)

def read(path):
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return None

def until(what, cond):
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > SEEN_WITHIN:
            say(f"{what}: NOT SEEN within {SEEN_WITHIN}s"); return
        time.sleep(0.02)
    say(f"{what}: seen after %.2fs" % (time.monotonic() - t0))

barrier("start")

# 1. under cache=never, b sees a's write, rename and removal at once (no waiting)
if ME == "a":
    with open(NEVER + "/f1", "w") as f:
        f.write("written by a")
barrier("n1")
if ME == "b":
    say("never write:", read(NEVER + "/f1") == "written by a")
barrier("n2")
if ME == "a":
    os.rename(NEVER + "/f1", NEVER + "/f2")
barrier("n3")
if ME == "b":
    say("never rename:", read(NEVER + "/f2") == "written by a" and not os.path.exists(NEVER + "/f1"))
barrier("n4")
if ME == "a":
    os.unlink(NEVER + "/f2")
barrier("n5")
if ME == "b":
    say("never remove:", not os.path.exists(NEVER + "/f2"))

# 2. under cache=auto, b has the old state cached and still sees each change in time
if ME == "a":
    with open(AUTO + "/g", "w") as f:
        f.write("v1")
barrier("a1")
if ME == "b":
    say("auto first read:", read(AUTO + "/g") == "v1", os.stat(AUTO + "/g").st_size == 2)
barrier("a2")
if ME == "a":
    with open(AUTO + "/g", "a") as f:
        f.write(" and v2")
barrier("a3")
if ME == "b":
    until("auto write", lambda: read(AUTO + "/g") == "v1 and v2")
barrier("a4")
if ME == "a":
    os.rename(AUTO + "/g", AUTO + "/h")
barrier("a5")
if ME == "b":
    until("auto rename", lambda: os.path.exists(AUTO + "/h") and not os.path.exists(AUTO + "/g"))
barrier("a6")
if ME == "a":
    os.unlink(AUTO + "/h")
barrier("a7")
if ME == "b":
    until("auto remove", lambda: not os.path.exists(AUTO + "/h"))

# 3. both append numbered lines with O_APPEND at once, under never and under auto
for mode, root in (("never", NEVER), ("auto", AUTO)):
    barrier("append-" + mode)
    fd = os.open(root + "/log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    for i in range(LINES):
        line = "%s %04d %s\n" % (ME, i, ME * 38)  # 46 bytes
        assert os.write(fd, line.encode()) == 46
    os.close(fd)
    say("appended", mode)

# 4. a lock taken in one guest makes the other wait
barrier("lock")
if ME == "a":
    fd = os.open(AUTO + "/lockfile", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.lockf(fd, fcntl.LOCK_EX)
    open(SYNC + "/locked", "w").close()
    time.sleep(2.0)
    open(SYNC + "/unlocking", "w").close()
    os.close(fd)
else:
    while not os.path.exists(SYNC + "/locked"):
        time.sleep(0.01)
    fd = os.open(AUTO + "/lockfile", os.O_RDWR)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        say("lock while a holds: got")
    except OSError:
        say("lock while a holds: busy")
    fcntl.lockf(fd, fcntl.LOCK_EX)  # waits for a
    say("blocking lock waited for a:", os.path.exists(SYNC + "/unlocking"))
    os.close(fd)

# 5. each leaves a file of its own behind
with open(AUTO + "/left-by-" + ME, "w") as f:
    f.write("bye from " + ME)
barrier("end")
say("done")
EOF2
exec @PYTHON@ /tmp/two.py @ME@ @OTHER@ @LINES@ @SEEN@
"""


def _check_log(path: Path) -> list[str]:
    """Problems of a log both guests appended to: lines lost, torn or out of order."""
    lines = path.read_text().split("\n")
    problems = []
    if lines[-1] != "":
        problems.append(f"{path.name}: does not end with a newline")
    lines = lines[:-1]
    want = re.compile(r"^([ab]) (\d{4}) \1{38}$")
    mine: dict[str, list[int]] = {"a": [], "b": []}
    for n, line in enumerate(lines):
        m = want.match(line)
        if not m:
            problems.append(f"{path.name} line {n}: torn or interleaved: {line!r}")
            continue
        mine[m.group(1)].append(int(m.group(2)))
    for who, nums in mine.items():
        if nums != list(range(LINES)):
            problems.append(f"{path.name}: {who}'s lines are {len(nums)}, not 0..{LINES - 1} "
                            "in order")
    return problems


def test_two_guests_share_one_tree(guest_ready, short_tmp):
    top = Path(short_tmp) / "two"
    tree = top / "tree"
    for sub in ("never", "auto"):
        (tree / sub).mkdir(parents=True)
    (tree / "never" / ".sync").mkdir()  # the guests' rendezvous files
    # The two cache=auto daemons also share a version table (real guests do not read it: no
    # SHMEM in this QEMU), so its bumping runs under two real guests' traffic.
    table_path = f"/dev/shm/pyvfs-e2e-two-{os.getpid()}"
    use_table = daemon_name() == "pyvirtiofsd"
    daemons = {}
    for guest in ("a", "b"):
        for cache in ("never", "auto"):
            sock = str(top / f"{guest}-{cache}.sock")
            extra = [f"--version-table={table_path}"] if use_table and cache == "auto" else []
            daemons[guest, cache] = guestvm.DaemonProcess(
                daemon_argv(sock, str(tree / cache)) + [f"--cache={cache}", *extra], sock,
                env=daemon_env()).start()
    results: dict[str, object] = {}

    def boot(me: str, other: str) -> None:
        script = (GUEST.replace("@PYTHON@", guestvm.guest_python()).replace("@ME@", me)
                  .replace("@OTHER@", other).replace("@LINES@", str(LINES))
                  .replace("@SEEN@", str(SEEN_WITHIN)))
        mine = [daemons[me, "never"], daemons[me, "auto"]]
        try:
            results[me] = guestvm.run_guest(
                script, [guestvm.Share("never", socket=mine[0].socket_path),
                         guestvm.Share("auto", socket=mine[1].socket_path)],
                hostroot=True, daemons=mine, timeout=900)
        except Exception as e:  # reported below, with the other guest's output
            results[me] = e

    threads = [threading.Thread(target=boot, args=p) for p in (("a", "b"), ("b", "a"))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        statuses = {key: d.wait(timeout=60) for key, d in daemons.items()}
    finally:
        for d in daemons.values():
            d.stop()
        table = VersionTable(table_path) if use_table else None
        if use_table:
            os.unlink(table_path)
    out = "\n".join(f"--- guest {g} ---\n" + (r.output if hasattr(r, "output") else repr(r))
                    for g, r in sorted(results.items()))
    for g in ("a", "b"):
        assert getattr(results[g], "status", None) == 0, out
    # every daemon exited by itself, cleanly, when its guest powered off
    assert statuses == {key: 0 for key in daemons}, (statuses, out)
    for key, d in daemons.items():
        assert "Traceback" not in d.log, (key, d.log[-5000:])

    b = results["b"].output
    print(b)  # the times guest b took to see a's changes under auto (pytest -s shows them)
    for line in ("b never write: True", "b never rename: True", "b never remove: True",
                 "b auto first read: True True", "b lock while a holds: busy",
                 "b blocking lock waited for a: True"):
        assert line in b, out
    for what in ("auto write", "auto rename", "auto remove"):
        m = re.search(rf"b {what}: seen after ([\d.]+)s", b)
        assert m, out
        assert float(m.group(1)) <= SEEN_WITHIN
    # after both shut down the tree holds exactly what both wrote
    assert _check_log(tree / "never" / "log") == []
    assert _check_log(tree / "auto" / "log") == []
    assert sorted(os.listdir(tree / "never")) == [".sync", "log"]
    assert sorted(os.listdir(tree / "auto")) == ["left-by-a", "left-by-b", "lockfile", "log"]
    assert (tree / "auto" / "left-by-a").read_text() == "bye from a"
    assert (tree / "auto" / "left-by-b").read_text() == "bye from b"
    assert (tree / "never" / "log").stat().st_size == (tree / "auto" / "log").stat().st_size \
        == 2 * LINES * 46
    if table is not None:
        # every one of the 1,200 WRITEs through the two daemons bumped the log's version
        st = (tree / "auto" / "log").stat()
        assert table.version(table.slot(st.st_dev, st.st_ino)) >= 2 * LINES
        table.close()
