"""Two pyvirtiofsd processes on one tree share one version table: a change made through one
daemon is seen through the other with exactly one request, and nothing is asked while the
table says nothing changed (the reference guest client, testing.version_client)."""

import errno
import os
import stat

import pytest

from pyvirtiofs.testing.frontend import FuseClient, FuseError
from pyvirtiofs.testing.version_client import TableView, VersionedClient


@pytest.fixture
def pair(start_daemon, tmp_path, table_path):
    """(shared dir, client A on daemon A, caching client B on daemon B, B's table view)."""
    shared = tmp_path / "tree"
    shared.mkdir()
    (shared / "f").write_bytes(b"hello")
    (shared / "f").chmod(0o644)  # whatever the umask (in-process tests set it to 0)
    (shared / "sub").mkdir()
    args = (f"--version-table={table_path}", "--version-table-slots=4096", "--xattr")
    a = start_daemon(shared, extra_args=args).client()
    cb = start_daemon(shared, extra_args=args).client(init=False, shmem=True)
    VersionedClient.init(cb)
    view = TableView.from_region(cb.fe.shmem_regions[1])  # what the daemon mapped
    b = VersionedClient(cb, view)
    yield shared, a, b, view
    view.close()


def _counted(b, fn):
    before = b.requests
    out = fn()
    return out, b.requests - before


@pytest.mark.parametrize("sandbox", ["namespace", "chroot"])
def test_the_table_works_inside_the_sandbox(start_daemon, tmp_path, table_path, sandbox):
    # The daemon maps the table before it confines itself; bumping must still work after
    # (the atomics C library, loaded from a file, is out of reach then).
    if os.geteuid() != 0:
        pytest.fail("the sandboxes need root", pytrace=False)
    shared = tmp_path / "tree"
    shared.mkdir()
    args = (f"--version-table={table_path}", f"--sandbox={sandbox}")
    c = start_daemon(shared, extra_args=args).client(init=False, shmem=True)
    VersionedClient.init(c)
    b = VersionedClient(c, TableView.from_region(c.fe.shmem_regions[1]))
    root_version = b.table.version(b._slots[1])
    c.create(1, "made-in-the-sandbox", 0o644)
    c.mkdir(1, "dir")
    assert b.table.version(b._slots[1]) == root_version + 2
    assert b.stat("made-in-the-sandbox").size == 0
    b.table.close()


def test_chmod_through_one_daemon_costs_the_other_one_request(pair):
    shared, a, b, _ = pair
    first = b.stat("f")
    assert stat.S_IMODE(first.mode) == 0o644
    _, n = _counted(b, lambda: b.stat("f"))
    assert n == 0
    node = a.lookup(1, "f").nodeid
    a.setattr(node, mode=0o600)
    attr, n = _counted(b, lambda: b.stat("f"))
    assert stat.S_IMODE(attr.mode) == 0o600 and n == 1
    _, n = _counted(b, lambda: b.stat("f"))
    assert n == 0
    assert first.ino == attr.ino


def test_write_through_one_daemon_is_seen_with_one_request(pair):
    shared, a, b, _ = pair
    assert b.stat("f").size == 5
    node = a.lookup(1, "f").nodeid
    fh = a.open(node, os.O_WRONLY).fh
    a.write(node, fh, 5, b" world")
    attr, n = _counted(b, lambda: b.stat("f"))
    assert (attr.size, n) == (11, 1)
    a.release(node, fh)


def test_rename_and_unlink_are_seen_with_one_request(pair):
    shared, a, b, _ = pair
    ino = b.stat("f").ino
    with pytest.raises(FuseError):
        b.stat("g")
    a.rename(1, "f", 1, "g")
    attr, n = _counted(b, lambda: b.stat("g"))
    assert (attr.ino, n) == (ino, 1)  # one LOOKUP brings entry, attributes and version
    with pytest.raises(FuseError) as e:
        b.stat("f")
    assert e.value.errno == errno.ENOENT
    _, n = _counted(b, lambda: b.stat("g"))
    assert n == 0
    a.unlink(1, "g")
    before = b.requests
    with pytest.raises(FuseError) as e:
        b.stat("g")
    assert e.value.errno == errno.ENOENT and b.requests - before == 1
    before = b.requests
    with pytest.raises(FuseError):  # the missing name is cached too
        b.stat("g")
    assert b.requests == before


def test_create_in_a_subdirectory_is_seen_with_one_request(pair):
    shared, a, b, _ = pair
    with pytest.raises(FuseError):
        b.stat("sub/new")
    sub = a.lookup(1, "sub").nodeid
    a.create(sub, "new", 0o640)
    before = b.requests
    attr = b.stat("sub/new")
    assert stat.S_IMODE(attr.mode) == 0o640 and b.requests - before == 1


def test_xattr_change_bumps(pair):
    shared, a, b, view = pair
    b.stat("f")
    node = a.lookup(1, "f").nodeid
    _, n = _counted(b, lambda: b.stat("f"))
    assert n == 0
    a.setxattr(node, "user.k", b"v")
    _, n = _counted(b, lambda: b.stat("f"))
    assert n == 1
    a.removexattr(node, "user.k")
    _, n = _counted(b, lambda: b.stat("f"))
    assert n == 1


def test_stat_loop_on_an_unchanged_file_sends_nothing(pair):
    shared, a, b, _ = pair
    b.stat("sub")
    b.stat("f")
    before = b.requests
    for _ in range(200):
        b.stat("f")
        b.stat("sub")
    assert b.requests == before


def test_reads_through_the_other_daemon_never_bump(pair):
    shared, a, b, view = pair
    b.stat("f")
    slot = b._attrs[b.resolve("f")].slot
    v = view.version(slot)
    node = a.lookup(1, "f").nodeid
    a.getattr(node)
    fh = a.open(node, os.O_RDONLY).fh
    assert a.read(node, fh, 0, 5) == b"hello"
    a.release(node, fh)
    a.listdir(1)
    assert view.version(slot) == v
    _, n = _counted(b, lambda: b.stat("f"))
    assert n == 0


def test_versions_only_grow(pair):
    shared, a, b, view = pair
    b.stat("f")
    fslot = b._attrs[b.resolve("f")].slot
    rslot = b._slots[1]
    node = a.lookup(1, "f").nodeid
    seen = [(view.version(fslot), view.version(rslot))]
    steps = [lambda: a.setattr(node, mode=0o600), lambda: a.setattr(node, size=2),
             lambda: a.link(node, 1, "f2"), lambda: a.unlink(1, "f2"),
             lambda: a.rename(1, "f", 1, "f3"), lambda: a.rename(1, "f3", 1, "f")]
    for step in steps:
        step()
        seen.append((view.version(fslot), view.version(rslot)))
    files = [s[0] for s in seen]
    assert all(x < y for x, y in zip(files, files[1:])), seen  # every step changed f
    dirs = [s[1] for s in seen]
    assert dirs == sorted(dirs) and dirs[-1] >= dirs[0] + 4, seen  # link, unlink, 2 renames


def test_the_guest_sees_the_table_read_only_in_region_1(pair, table_path):
    shared, a, b, view = pair
    region = b.c.fe.shmem_regions[1]
    mp = region.mapping_at(0)
    assert (mp.offset, mp.length, mp.writable) == (0, 4096 + 16 * 4096, False)
    st = os.stat(table_path)
    assert (mp.dev, mp.ino) == (st.st_dev, st.st_ino)
    assert region.read(0, 8) == b"PYVFSVT1"
    with pytest.raises(Exception, match="read-only|faulted"):
        region.write(4096, b"\1" * 8)  # a guest cannot bump (or forge) a version


def test_a_daemon_without_a_table_does_not_negotiate(start_daemon, tmp_path):
    c = start_daemon(extra_args=()).client(init=False, shmem=True)
    with pytest.raises(RuntimeError, match="did not negotiate"):
        VersionedClient.init(c)
    # and its replies keep the plain layout for an ordinary guest
    assert c.lookup(1, ".").attr.ino


def test_no_shared_memory_no_extension(start_daemon, tmp_path, table_path):
    # A frontend without SHMEM (QEMU up to 10.2) cannot show the guest the table.
    d = start_daemon(extra_args=(f"--version-table={table_path}",))
    c = d.client(init=False)
    with pytest.raises(RuntimeError, match="did not negotiate"):
        VersionedClient.init(c)
    assert c.lookup(1, ".").attr.ino  # plain replies
    assert "no shared memory" in d.wait_log("version table not offered")


def test_bad_version_table_option_is_a_clear_error(tmp_path):
    import subprocess
    import sys
    from .daemon import daemon_env
    (tmp_path / "s").mkdir()
    bad = tmp_path / "notatable"
    bad.write_bytes(b"x" * 8192)
    for args, msg, status in (
            (["--version-table", str(bad)], "not a version table", 1),
            (["--version-table", "/dev/shm/x", "--version-table-slots", "lots"], "not a number", 2),
            (["--version-table", "/dev/shm/nodir/x"], "cannot create", 1)):
        p = subprocess.run([sys.executable, "-m", "pyvirtiofs", "--socket-path",
                            str(tmp_path / "s.sock"), "--shared-dir", str(tmp_path / "s"),
                            "--sandbox=none", *args], capture_output=True, text=True,
                           env=daemon_env(), timeout=60)
        assert p.returncode == status and msg in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_after_a_device_reset_the_table_is_mapped_again(start_daemon, tmp_path, table_path):
    shared = tmp_path / "tree"
    shared.mkdir()
    (shared / "f").write_bytes(b"1")
    c = start_daemon(shared, extra_args=(f"--version-table={table_path}",)).client(
        init=False, shmem=True)
    VersionedClient.init(c)
    region = c.fe.shmem_regions[1]
    assert region.mapping_at(0) is not None
    c.fe.reset_device()  # the frontend drops every mapping
    assert region.mapping_at(0) is None
    c.fe.start()
    c2 = FuseClient(c.fe)
    VersionedClient.init(c2)  # negotiated again: the daemon mapped the table again
    view = TableView.from_region(c.fe.shmem_regions[1])
    b = VersionedClient(c2, view)
    assert b.stat("f").size == 1
    view.close()


def test_changes_racing_stats_never_leave_a_stale_cache(pair):
    """While daemon A changes a file as fast as it can, B stats it in a loop; once A stops,
    B's next stat shows A's last change: every bump lands, none is lost between the two
    daemons, and B never keeps attributes older than the version it holds."""
    import threading
    shared, a, b, _ = pair
    node = a.lookup(1, "f").nodeid
    b.stat("f")
    done = threading.Event()
    modes = [0o600 | (i % 64) for i in range(400)]

    def changer():
        for m in modes:
            a.setattr(node, mode=m)
        done.set()

    t = threading.Thread(target=changer)
    t.start()
    stats = 0
    while not done.is_set():
        b.stat("f")
        stats += 1
    t.join()
    assert stat.S_IMODE(b.stat("f").mode) == modes[-1]
    assert os.stat(shared / "f").st_mode & 0o7777 == modes[-1]
    assert stats > 10  # the two really overlapped
