"""The examples of the file system API (examples/*.py) serve a real guest, as a user runs them:
``python examples/NAME.py SOCKET [ARGS]``.  Each must end by itself with status 0 when the VM
leaves, without a traceback or an ERROR line (the e2e conftest judges every DaemonProcess)."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from pyvirtiofs.testing import guestvm

from .conftest import daemon_env

pytestmark = pytest.mark.guest
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def serve_example(name: str, script: str, tmp: Path, *args: str, hostroot: bool = False) -> str:
    """Run examples/NAME.py on a socket, boot a guest that runs ``script`` in the mount, and
    return the script's output."""
    sock = str(tmp / f"{name}.sock")
    env = dict(daemon_env(), PYTHONFAULTHANDLER="1")  # SIGABRT prints every thread's stack
    # DaemonProcess: the e2e conftest judges its exit status and log after the test
    d = guestvm.DaemonProcess([sys.executable, str(EXAMPLES / f"{name}.py"), sock, *args], sock,
                              env=env)
    failure = None
    with d:
        try:
            res = guestvm.run_guest(script, [guestvm.Share("ex", socket=sock)], daemons=[d],
                                    hostroot=hostroot, timeout=300)
            rc = d.wait(20)  # the example returns when the VM leaves
        except (guestvm.GuestError, subprocess.TimeoutExpired) as e:
            failure = e
            if d.running:  # a hung example: show where its threads are
                d.proc.send_signal(signal.SIGABRT)
                try:
                    d.wait(5)
                except subprocess.TimeoutExpired:
                    pass
    assert failure is None, f"{failure}\n--- {name}'s output ---\n{d.log}"
    assert rc == 0 and "Traceback" not in d.log, f"{name} exited {rc}:\n{d.log}"
    assert res.status == 0, res.output
    return res.output


def test_hello_example(guest_ready, short_tmp):
    out = serve_example("hello_fs", "ls; cat hello; cat missing 2>&1; touch new 2>&1; "
                        "echo touch=$?; ls", short_tmp)
    lines = out.splitlines()
    assert lines[0] == "hello" and lines[1] == "hello from Python", out
    assert "No such file" in lines[2], out
    # The example has no CREATE or MKNOD: the guest's touch fails with ENOSYS, nothing appears
    assert lines[3:] == ["touch: new: Function not implemented", "touch=1", "hello"], out


def test_path_example(guest_ready, short_tmp):
    out = serve_example("path_fs", """
        cat README
        mkdir d && echo one > d/a && echo two >> d/a && cat d/a
        mv d e && ls e && cat e/a
        dd if=/dev/zero of=e/a bs=1 count=0 seek=3 2>/dev/null; wc -c < e/a
        rmdir e 2>&1 | grep -c 'not empty'
        rm e/a && rmdir e && ls
        """, short_tmp)
    assert out.split() == ["files", "live", "in", "a", "Python", "dict",
                           "one", "two", "a", "one", "two", "3", "1", "README"], out


def test_path_example_served_from_an_installed_wheel(guest_ready, short_tmp, tmp_path):
    """The issue's "done when": pip install the package, write a path-based file system in
    under 50 lines, serve it with one call, boot a guest that uses it.  The example runs on
    the wheel alone: no site-packages, not this checkout (python -I -S)."""
    from tests.unit.test_packaging import install_wheel
    site = install_wheel(tmp_path)
    example = EXAMPLES / "path_fs.py"
    assert len(example.read_text().splitlines()) < 50
    sock = str(short_tmp / "wheel.sock")
    run = ("import runpy, sys; sys.path.insert(0, sys.argv[1]); import pyvirtiofs; "
           "assert pyvirtiofs.__file__.startswith(sys.argv[1]), pyvirtiofs.__file__; "
           "sys.argv = sys.argv[2:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    d = guestvm.DaemonProcess([sys.executable, "-I", "-S", "-c", run, str(site), str(example),
                               sock], sock, env=daemon_env(), cwd=str(tmp_path))
    with d:
        res = guestvm.run_guest("cat README; echo hi > new; cat new; ls",
                                [guestvm.Share("ex", socket=sock)], daemons=[d], timeout=300)
        assert d.wait(20) == 0, d.log
    assert res.status == 0, res.output
    assert res.output.split() == ["files", "live", "in", "a", "Python", "dict", "hi",
                                  "README", "new"], res.output


# The conformance cases (src/pyvirtiofs/testing/conformance.py) within the memory file
# system's scope; the others need what it leaves out, on purpose, to stay short.
MEMORY_FS_OUT_OF_SCOPE = {
    "data_fallocate_and_seek": "no fallocate or SEEK_DATA/SEEK_HOLE",
    "data_sparse_large": "no sparse files (a 5 GiB file would take 5 GiB of memory)",
    "open_tmpfile": "no O_TMPFILE",
    "rename2_flags": "no RENAME_WHITEOUT",
    "xattr_user": "no extended attributes",
    "xattr_trusted_security": "no extended attributes",
}


def memory_fs_cases() -> str:
    from pyvirtiofs.testing import conformance
    return ",".join(n for n in conformance.CASES
                    if n not in conformance.SLOW and n not in MEMORY_FS_OUT_OF_SCOPE)


def test_memory_example_passes_the_conformance_cases_in_its_scope(guest_ready):
    from pyvirtiofs.testing import conformance_runner
    report = conformance_runner.run(
        "memory_fs", only=memory_fs_cases(), env=daemon_env(),
        daemon_argv=lambda sock: [sys.executable, str(EXAMPLES / "memory_fs.py"), sock])
    assert len(report.results) >= 30
    # as for pyvirtiofsd: equal to tmpfs, or to the host where tmpfs is the odd one (O_DIRECT)
    bad = [report.describe(r) for r in report.failures]
    assert not bad, "the memory file system differs from tmpfs:\n" + "\n".join(bad)
    assert sum(r.verdict == "same" for r in report.results) >= len(report.results) - 2


@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
def test_archive_example(guest_ready, short_tmp, tmp_path, kind):
    import hashlib
    import os
    import tarfile
    import zipfile
    src = tmp_path / "src"
    (src / "sub" / "deep").mkdir(parents=True)
    (src / "a.txt").write_text("alpha\n")
    blob = os.urandom(300_000)
    (src / "sub" / "deep" / "b.bin").write_bytes(blob)
    (src / "a.txt").chmod(0o640)
    archive = tmp_path / f"t.{kind}"
    if kind == "zip":
        with zipfile.ZipFile(archive, "w") as z:
            z.write(src / "a.txt", "top/a.txt")
            z.write(src / "sub" / "deep" / "b.bin", "top/sub/deep/b.bin")
    else:
        os.symlink("a.txt", src / "link")
        with tarfile.open(archive, "w:gz") as t:
            t.add(src, "top")
    out = serve_example("archive_fs", """
        find . | sort
        cat top/a.txt; stat -c %a top/a.txt
        md5sum top/sub/deep/b.bin | cut -d' ' -f1
        echo x 2>&1 > top/a.txt | grep -c Read-only
        """, short_tmp, str(archive))
    want = [".", "./top", "./top/a.txt"] + (["./top/link"] if kind != "zip" else []) + [
        "./top/sub", "./top/sub/deep", "./top/sub/deep/b.bin",
        "alpha", "640", hashlib.md5(blob).hexdigest(), "1"]
    assert out.split() == want, out


def test_overlay_example(guest_ready, short_tmp, tmp_path):
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    (lower / "dir" / "sub").mkdir(parents=True)
    upper.mkdir()
    (lower / "a").write_text("lower a\n")
    (lower / "a").chmod(0o640)
    (lower / "dir" / "b").write_text("lower b\n")
    (lower / "dir" / "sub" / "c").write_text("c\n")
    os.mkfifo(lower / "fifo", 0o644)
    before = {p: p.read_bytes() for p in lower.rglob("*") if p.is_file()}
    out = serve_example("overlay_fs", """
        cat a; echo more >> a; cat a; stat -c %a a
        rm dir/b; ls dir; echo new > dir/new; ls dir
        rm -r dir; ls; mkdir dir; ls dir | wc -l
        mv a a2 && ls && cat a2
        chmod 600 fifo; stat -c '%a %F' fifo; mkfifo new-fifo; stat -c %F new-fifo
        """, short_tmp, str(lower), str(upper))
    assert out.split() == ["lower", "a", "lower", "a", "more", "640",
                           "sub", "new", "sub",
                           "a", "fifo", "0",
                           "a2", "dir", "fifo", "lower", "a", "more",
                           "600", "fifo", "fifo"], out
    # the lower directory is untouched; the upper one holds the changes and the whiteouts
    assert {p: p.read_bytes() for p in lower.rglob("*") if p.is_file()} == before
    assert (upper / "a2").read_text() == "lower a\nmore\n"
    wh = os.lstat(upper / "a")
    assert stat.S_ISCHR(wh.st_mode) and wh.st_rdev == 0
    # the FIFO was copied up to be changed (a FIFO has no data); the lower one kept its mode
    assert stat.S_ISFIFO(os.lstat(upper / "fifo").st_mode)
    assert stat.S_IMODE(os.lstat(upper / "fifo").st_mode) == 0o600
    assert stat.S_IMODE(os.lstat(lower / "fifo").st_mode) == 0o644
    assert stat.S_ISFIFO(os.lstat(upper / "new-fifo").st_mode)
    assert sorted(os.listdir(upper / "dir")) == ["b", "sub"]  # whiteouts under the new dir
