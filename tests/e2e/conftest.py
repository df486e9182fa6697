"""Fixtures for the end-to-end tests that boot a real Linux guest.

The daemon under test is pyvirtiofsd by default::

    python -m pyvirtiofs --socket-path=S --shared-dir=D --xattr

(the battery uses extended attributes, which are off by default, as in virtiofsd; every other
setting is the default, the seccomp allow-list with kill included).

Set ``PYVIRTIOFS_E2E_DAEMON=/path/to/virtiofsd`` to test another daemon (for
example the Rust reference); it is started as::

    DAEMON --socket-path=S --shared-dir=D $PYVIRTIOFS_E2E_DAEMON_ARGS

with ``PYVIRTIOFS_E2E_DAEMON_ARGS`` defaulting to ``--sandbox none --xattr``
(the Rust daemon leaves extended attributes off unless asked).

Missing tools (QEMU, busybox, the kernel package) make the tests fail with the
reason; they are never skipped.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
if str(SRC) not in sys.path:  # allow running from a checkout without installing
    sys.path.insert(0, str(SRC))

from pyvirtiofs.testing import guestvm  # noqa: E402
from pyvirtiofs.testing.guestvm import DaemonProcess  # noqa: E402

DEFAULT_EXTERNAL_ARGS = "--sandbox none --xattr"


def daemon_argv(socket_path: str, shared_dir: str) -> list[str]:
    """The command line of the daemon under test."""
    external = os.environ.get("PYVIRTIOFS_E2E_DAEMON")
    if external:
        extra = shlex.split(os.environ.get("PYVIRTIOFS_E2E_DAEMON_ARGS", DEFAULT_EXTERNAL_ARGS))
        return [external, f"--socket-path={socket_path}", f"--shared-dir={shared_dir}", *extra]
    # PYVIRTIOFS_E2E_ARGS: extra pyvirtiofsd options for a whole run (e.g. the sandbox,
    # seccomp or --inode-file-handles variants)
    return [sys.executable, "-m", "pyvirtiofs", f"--socket-path={socket_path}",
            f"--shared-dir={shared_dir}", "--xattr",
            *shlex.split(os.environ.get("PYVIRTIOFS_E2E_ARGS", ""))]


def daemon_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH")) if p)
    return env


def daemon_name() -> str:
    return os.environ.get("PYVIRTIOFS_E2E_DAEMON") or "pyvirtiofsd"


@pytest.fixture(scope="session")
def guest_ready() -> None:
    """Host tools installed, kernel and base initramfs cached (fails, never skips)."""
    if os.geteuid() != 0:
        pytest.fail("the guest tests need root (QEMU's 9p host root, chown checks, apt-get)",
                    pytrace=False)
    try:
        guestvm.ensure_host_tools()
        kernel = guestvm.prepare_kernel()
        guestvm.base_initramfs(kernel)
    except guestvm.GuestError as e:
        pytest.fail(f"cannot prepare the guest: {e}", pytrace=False)


@pytest.fixture(scope="session")
def short_tmp() -> Iterator[Path]:
    """A short directory for sockets (sun_path is limited to 108 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="pyvfs-e2e-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


class DaemonStarter:
    """Starts daemons on directories and stops them all at teardown."""

    def __init__(self, sockdir: Path) -> None:
        self.sockdir = sockdir
        self.daemons: list[DaemonProcess] = []

    def __call__(self, shared_dir: Path, name: str = "vfs", *, wait_pidfile: bool = False) -> DaemonProcess:
        sock = str(self.sockdir / f"{name}{len(self.daemons)}.sock")
        d = DaemonProcess(daemon_argv(sock, str(shared_dir)), sock, env=daemon_env(),
                          wait_pidfile=wait_pidfile)
        self.daemons.append(d)
        d.start()
        return d

    def close(self) -> None:
        for d in self.daemons:
            d.stop()


@pytest.fixture
def start_daemon(guest_ready, short_tmp: Path) -> Iterator[Callable[..., DaemonProcess]]:
    sockdir = Path(tempfile.mkdtemp(dir=short_tmp))
    starter = DaemonStarter(sockdir)
    yield starter
    starter.close()


@pytest.fixture(scope="module")
def start_daemon_module(guest_ready, short_tmp: Path) -> Iterator[Callable[..., DaemonProcess]]:
    sockdir = Path(tempfile.mkdtemp(dir=short_tmp))
    starter = DaemonStarter(sockdir)
    yield starter
    starter.close()


def _judge(daemons: list[DaemonProcess], *, stop: bool) -> None:
    """Fail (in the teardown of the test) if any of these daemons exited non-zero, was killed
    by a signal or logged a traceback or an ERROR line.  ``stop``: stop those still running
    first; otherwise leave them to a later check (a module's daemon outlives one test)."""
    bad = []
    for d in daemons:
        if getattr(d, "judged", False):
            continue
        if d.running:
            if not stop:
                continue
            d.stop()
        d.judged = True
        found = d.problems()
        if found:
            bad.append(f"{daemon_name()} on {d.socket_path}: {'; '.join(found)}\n"
                       f"--- its log ---\n{guestvm._tail(d.log, 60)}")
    if bad:
        pytest.fail("a daemon did not end well:\n" + "\n".join(bad), pytrace=False)


@pytest.fixture(autouse=True)
def every_daemon_ends_well() -> Iterator[None]:
    """After every e2e test: each daemon it started has stopped cleanly (see _judge)."""
    first = len(DaemonProcess.started)
    yield
    _judge(DaemonProcess.started[first:], stop=False)


@pytest.fixture(scope="module", autouse=True)
def every_module_daemon_ends_well() -> Iterator[None]:
    """The same for daemons that live as long as a module (start_daemon_module)."""
    first = len(DaemonProcess.started)
    yield
    _judge(DaemonProcess.started[first:], stop=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Attach the logs of the daemons a failing test used to its report."""
    outcome = yield
    rep = outcome.get_result()
    if rep.when != "call" or not rep.failed:
        return
    for name in ("start_daemon", "start_daemon_module"):
        starter = getattr(item, "funcargs", {}).get(name)
        for d in getattr(starter, "daemons", ()):
            state = "running" if d.running else f"exit status {d.returncode}"
            rep.sections.append((f"log of {daemon_name()} on {d.socket_path} ({state})",
                                 guestvm._tail(d.log, 100)))
