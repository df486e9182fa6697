"""Run the real ``pyvirtiofsd`` process for a test and judge how it ended.

    python -m pyvirtiofs --socket-path=S --shared-dir=D --sandbox=none --log-level=debug

:class:`Daemon` starts it (from ``sys.executable``, with this checkout's ``src`` first on
``PYTHONPATH``), waits until both ``S`` and ``S.pid`` exist, and offers the test frontend on
its socket (:meth:`Daemon.frontend`, :meth:`Daemon.client`).  :meth:`Daemon.finish` is the
teardown verdict: the process must still be running or have exited with status 0, and its log
must not contain a Python traceback; it is then terminated (SIGTERM) and must exit 0.

Nothing here skips: a daemon that does not come up raises :class:`DaemonFailed` with its log.

Also helpers for tests that write rings and guest memory by hand: :class:`Guarded` (a buffer
with canary bytes on both sides), :func:`poison_intact`, :func:`put_chain`, :func:`wait_used`,
:func:`assert_no_completion`.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pyvirtiofs.testing.frontend import FuseClient, VhostUserConnection, VirtioFsFrontend

REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "src"


class DaemonFailed(AssertionError):
    """The daemon did not start, crashed, exited non-zero or logged a traceback."""


def daemon_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


class Daemon:
    """One pyvirtiofsd process (it serves exactly one frontend connection)."""

    def __init__(self, shared_dir: str | os.PathLike, *, extra_args: tuple | list = (),
                 start_timeout: float = 15.0):
        self.shared_dir = str(shared_dir)
        # sun_path holds 108 bytes: keep the socket in a short private directory.
        self.sockdir = tempfile.mkdtemp(prefix="pvd-", dir="/tmp")
        self.socket_path = os.path.join(self.sockdir, "vfs.sock")
        self.pid_path = self.socket_path + ".pid"
        self.log_path = os.path.join(self.sockdir, "daemon.log")
        self.argv = [sys.executable, "-m", "pyvirtiofs", f"--socket-path={self.socket_path}",
                     f"--shared-dir={self.shared_dir}", "--sandbox=none", "--log-level=debug",
                     *extra_args]
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None
        self._logf = None
        self._frontends: list[VirtioFsFrontend] = []
        self.finished = False
        self.connected = False
        self._final_log: str | None = None

    # -- life cycle -----------------------------------------------------------------------
    def start(self, wait: bool = True) -> "Daemon":
        """Start the process; with ``wait`` (the default) return once S and S.pid exist."""
        self._logf = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=self._logf,
                                     stderr=subprocess.STDOUT, env=daemon_env(),
                                     start_new_session=True)
        if not wait:
            return self
        deadline = time.monotonic() + self.start_timeout
        while not (os.path.exists(self.socket_path) and self._pid_written()):
            if self.proc.poll() is not None:
                raise DaemonFailed(f"pyvirtiofsd exited with {self.proc.returncode} before "
                                   f"listening:\n{self.log()}")
            if time.monotonic() > deadline:
                self._kill()
                raise DaemonFailed(f"pyvirtiofsd did not create {self.socket_path} and its pid "
                                   f"file within {self.start_timeout}s:\n{self.log()}")
            time.sleep(0.005)
        pid = Path(self.pid_path).read_text().strip()
        if pid != str(self.proc.pid):
            raise DaemonFailed(f"pid file says {pid!r}, the daemon is {self.proc.pid}")
        return self

    def _pid_written(self) -> bool:
        try:
            return Path(self.pid_path).read_text().endswith("\n")
        except FileNotFoundError:
            return False

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log(self) -> str:
        """The daemon's stdout+stderr so far (kept after :meth:`finish` removed the file)."""
        if self._final_log is not None:
            return self._final_log
        try:
            return Path(self.log_path).read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 80) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_log(self, text: str, timeout: float = 5.0) -> str:
        """Wait until ``text`` appears in the log (the daemon logs asynchronously to us)."""
        deadline = time.monotonic() + timeout
        while True:
            log = self.log()
            if text in log:
                return log
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not in the daemon log after {timeout}s:\n"
                                     f"{self.log_tail()}")
            time.sleep(0.01)

    def wait_exit(self, timeout: float = 10.0) -> int:
        """Wait for the daemon to exit by itself; returns its status."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"pyvirtiofsd still running {timeout}s later:\n"
                                 f"{self.log_tail()}") from None

    def signal(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def terminate(self, timeout: float = 10.0) -> int:
        """SIGTERM (SIGKILL after ``timeout``); returns the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._kill()
                raise DaemonFailed(f"pyvirtiofsd ignored SIGTERM for {timeout}s:\n"
                                   f"{self.log_tail()}")
        return self.proc.returncode

    def _kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def check_log(self) -> None:
        log = self.log()
        if "Traceback" in log:
            raise DaemonFailed(f"pyvirtiofsd logged a Python traceback:\n{log[-6000:]}")

    def finish(self) -> None:
        """Teardown verdict (see the module docstring).  Raises DaemonFailed."""
        if self.finished:
            return
        self.finished = True
        problems = []
        try:
            rc = self.proc.poll() if self.proc is not None else None
            if rc not in (None, 0):
                problems.append(f"pyvirtiofsd exited with status {rc}")
            for fe in self._frontends:
                fe.close()
            if self.proc is not None:
                if self.connected and self.proc.poll() is None:
                    # The frontend went away: the daemon ends by itself (let it, so that
                    # SIGTERM does not race with its own clean exit).
                    try:
                        self.proc.wait(5.0)
                    except subprocess.TimeoutExpired:
                        pass
                rc = self.terminate()
                if rc != 0:
                    problems.append(f"pyvirtiofsd exited with status {rc} at teardown")
            if "Traceback" in self.log():
                problems.append("pyvirtiofsd logged a Python traceback")
        finally:
            self._kill()
            if self._logf is not None:
                self._logf.close()
        if problems:
            raise DaemonFailed("; ".join(problems) + f"\n--- daemon log ---\n{self.log()[-8000:]}")
        self._final_log = self.log()
        shutil.rmtree(self.sockdir, ignore_errors=True)

    # -- frontends on its socket ----------------------------------------------------------
    def frontend(self, **kw) -> VirtioFsFrontend:
        """A :class:`VirtioFsFrontend` connected to this daemon (closed at teardown)."""
        kw.setdefault("timeout", 10.0)
        self.connected = True
        fe = VirtioFsFrontend(self.socket_path, **kw)
        self._frontends.append(fe)
        return fe

    def client(self, *, init: bool = True, client_kwargs: dict | None = None,
               **frontend_kw) -> FuseClient:
        """A started frontend plus a :class:`FuseClient` on it (INIT done unless ``init=False``)."""
        fe = self.frontend(**frontend_kw)
        c = FuseClient(fe, **(client_kwargs or {}))
        if init:
            c.init()
        return c

    def connection(self, timeout: float = 10.0) -> VhostUserConnection:
        """A bare vhost-user connection (no handshake at all); closed at teardown too."""
        self.connected = True
        c = VhostUserConnection.connect(self.socket_path, timeout)
        self._frontends.append(c)
        return c


# ------------------------------------------------------------------------------------------
# Helpers for tests that write rings and guest memory by hand
# ------------------------------------------------------------------------------------------

class Guarded:
    """``size`` bytes of guest RAM with ``canary`` bytes of a known pattern on both sides:
    :meth:`intact` tells whether anything wrote next to the buffer."""

    def __init__(self, ram, size: int, *, canary: int = 256, region: int | None = None,
                 pattern: int = 0xC3, fill: int | None = 0x00):
        self.ram = ram
        self.size = size
        self.canary = canary
        self.pattern = pattern
        self.base = ram.alloc(size + 2 * canary, 64, region)
        self.gpa = self.base + canary
        ram.fill(self.base, canary, pattern)
        ram.fill(self.gpa + size, canary, pattern)
        if fill is not None and size:
            ram.fill(self.gpa, size, fill)

    def intact(self) -> bool:
        want = bytes([self.pattern]) * self.canary
        return (self.ram.read(self.base, self.canary) == want
                and self.ram.read(self.gpa + self.size, self.canary) == want)

    def read(self, n: int | None = None) -> bytes:
        return self.ram.read(self.gpa, self.size if n is None else n)

    def free(self) -> None:
        self.ram.free(self.base)


def poison_intact(ram) -> bool:
    """The bytes of each memfd before its mmap_offset (not guest RAM) are still poison."""
    for r in ram.regions:
        poison = bytes([ram.POISON]) * r.mmap_offset
        if r.mmap_offset and os.pread(r.fd, r.mmap_offset, 0) != poison:
            return False
    return True


def put_chain(q, descs) -> tuple[int, list[int]]:
    """Write a chain by hand into free descriptor slots of SplitQueue ``q``.

    ``descs``: ``(addr, len, flags, next)`` tuples where ``next`` is the position of the
    next descriptor in ``descs`` (or ``None``: not chained; NEXT is then left as given in
    flags) - or ``("slot", n)`` to put the raw slot number ``n`` in the next field
    (``("slot", None)``: the chain's own head slot).  NEXT is
    set automatically when ``next`` is a position.  Returns (head slot, slots taken); publish
    with ``q.add_raw(head)`` and give the slots back with ``q.put_desc(slots)``."""
    slots = q.take_desc(len(descs))
    for i, (addr, length, flags, nxt) in enumerate(descs):
        if isinstance(nxt, tuple):
            nxt_slot = slots[0] if nxt[1] is None else nxt[1]
        elif nxt is None:
            nxt_slot = 0
        else:
            nxt_slot = slots[nxt]
            flags |= 1  # VRING_DESC_F_NEXT
        q.write_desc(slots[i], addr, length, flags, nxt_slot)
    return slots[0], slots


def wait_used(q, head: int, timeout: float = 5.0):
    """Wait for the completion of ``head`` on ``q`` (published with add_raw / add_chain);
    other completions seen meanwhile are returned too: (completion of head, others)."""
    deadline = time.monotonic() + timeout
    others = []
    while True:
        rem = deadline - time.monotonic()
        if rem <= 0:
            raise AssertionError(f"chain {head} not completed within {timeout}s: "
                                 f"{q._stuck_message(timeout)}")
        try:
            comps = q.wait(rem)
        except TimeoutError:
            continue
        for c in comps:
            if c.head == head:
                return c, others + [x for x in comps if x is not c]
        others.extend(comps)


def assert_no_completion(q, seconds: float = 0.3) -> None:
    """Nothing lands on ``q``'s used ring for ``seconds``."""
    before = q.used_idx
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert q.used_idx == before, \
            f"queue {q.index}: used.idx moved from {before} to {q.used_idx}"
        time.sleep(0.01)
