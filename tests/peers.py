"""Locate and run the peer virtiofs daemons that the project compares itself with.

* ``rust``: the Rust virtiofsd (the reference), installed without touching the system by
  ``shared/peers/install-virtiofsd-rs.sh DIR`` (needs the Debian mirror).  Run as
  ``virtiofsd --socket-path=S --shared-dir=D --sandbox none``.
* ``c``: QEMU 7.2's C virtiofsd at /usr/lib/qemu/virtiofsd (Debian ``qemu-system-common``),
  run as ``virtiofsd --socket-path=S -o source=D -o cache=auto``.

Both serve exactly one frontend connection and exit when it goes away.

Nothing here skips: a peer that cannot be found or installed raises :class:`PeerUnavailable`
with the reason, so a test that needs it fails loudly.

Environment overrides: ``PYVIRTIOFS_VIRTIOFSD_RS`` (path of a Rust virtiofsd binary or
wrapper), ``PYVIRTIOFS_VIRTIOFSD_C`` (path of the C one), ``PYVIRTIOFS_SHARED`` (the shared/
folder holding ``peers/install-virtiofsd-rs.sh``), ``PYVIRTIOFS_PEER_DIR`` (where to install
the Rust one; default ``$TMPDIR/virtiofsd-rs``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
C_VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
KINDS = ("rust", "c")


class PeerUnavailable(RuntimeError):
    """A peer daemon could not be found, installed or started."""


def shared_dir() -> Path | None:
    """The shared/ folder: $PYVIRTIOFS_SHARED, ../shared beside the repo (CI), or
    /work/shared (developer machines)."""
    cands = []
    if os.environ.get("PYVIRTIOFS_SHARED"):
        cands.append(Path(os.environ["PYVIRTIOFS_SHARED"]))
    cands += [REPO.parent / "shared", Path("/work/shared")]
    for c in cands:
        if (c / "peers" / "install-virtiofsd-rs.sh").is_file():
            return c
    return None


def _works(path: str) -> bool:
    try:
        r = subprocess.run([path, "--version"], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


def find_rust_virtiofsd(install: bool = True, install_dir: str | os.PathLike | None = None) -> str:
    """Path of a working Rust virtiofsd; installs it with the shared script if needed."""
    env = os.environ.get("PYVIRTIOFS_VIRTIOFSD_RS")
    if env:
        if _works(env):
            return env
        raise PeerUnavailable(f"PYVIRTIOFS_VIRTIOFSD_RS={env} does not run (--version failed)")
    d = Path(install_dir or os.environ.get("PYVIRTIOFS_PEER_DIR")
             or Path(tempfile.gettempdir()) / "virtiofsd-rs")
    wrapper = d / "virtiofsd"
    if wrapper.is_file() and _works(str(wrapper)):
        return str(wrapper)
    if not install:
        raise PeerUnavailable(f"Rust virtiofsd not installed in {d}")
    sh = shared_dir()
    if sh is None:
        raise PeerUnavailable("Rust virtiofsd: shared/peers/install-virtiofsd-rs.sh not found "
                              "(set PYVIRTIOFS_SHARED or PYVIRTIOFS_VIRTIOFSD_RS)")
    script = sh / "peers" / "install-virtiofsd-rs.sh"
    try:
        r = subprocess.run(["bash", str(script), str(d)], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, timeout=600)
    except subprocess.TimeoutExpired as e:
        raise PeerUnavailable(f"{script} timed out") from e
    if r.returncode != 0:
        raise PeerUnavailable(f"{script} {d} failed ({r.returncode}):\n{r.stderr[-4000:]}")
    path = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else str(wrapper)
    if not _works(path):
        raise PeerUnavailable(f"installed Rust virtiofsd at {path} does not run")
    return path


def find_c_virtiofsd() -> str:
    """Path of QEMU's C virtiofsd."""
    path = os.environ.get("PYVIRTIOFS_VIRTIOFSD_C") or C_VIRTIOFSD
    if not os.access(path, os.X_OK):
        raise PeerUnavailable(f"C virtiofsd not found at {path} "
                              "(apt-get install qemu-system-common, Debian bookworm)")
    if not _works(path):
        raise PeerUnavailable(f"C virtiofsd at {path} does not run")
    return path


def find_peer(kind: str) -> str:
    if kind == "rust":
        return find_rust_virtiofsd()
    if kind == "c":
        return find_c_virtiofsd()
    raise ValueError(f"unknown peer kind {kind!r} (one of {KINDS})")


def peer_command(kind: str, binary: str, socket_path: str, shared: str,
                 cache: str = "auto", extra: list[str] | tuple = ()) -> list[str]:
    if kind == "rust":
        return [binary, f"--socket-path={socket_path}", f"--shared-dir={shared}",
                "--sandbox", "none", f"--cache={cache}", *extra]
    if kind == "c":
        # cache: auto|always|none; the default sandbox (namespaces) works as root here.
        return [binary, f"--socket-path={socket_path}", "-o", f"source={shared}",
                "-o", f"cache={'none' if cache == 'never' else cache}", *extra]
    raise ValueError(kind)


class PeerDaemon:
    """A running peer daemon; ``socket_path``, ``shared_dir``, ``proc``, ``log_path``."""

    def __init__(self, kind: str, binary: str, socket_path: str, shared: str, log_path: str,
                 proc: subprocess.Popen):
        self.kind = kind
        self.binary = binary
        self.socket_path = socket_path
        self.shared_dir = shared
        self.log_path = log_path
        self.proc = proc

    def log(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_exit(self, timeout: float = 10.0) -> int:
        """Wait for the daemon to exit by itself; returns its exit status."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"{self.kind} virtiofsd still running after {timeout}s; "
                               f"log:\n{self.log()[-3000:]}") from None

    def _signal_group(self, sig: int) -> None:
        # The daemon runs in its own session (process group = its pid); the C virtiofsd's
        # namespace sandbox forks a child into that group, so signal the group we created.
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self, timeout: float = 5.0) -> int | None:
        if self.proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.proc.wait(timeout)
        else:
            self._signal_group(signal.SIGKILL)       # leftovers of an exited leader
        return self.proc.returncode


def wait_for_socket(path: str, proc: subprocess.Popen | None = None, timeout: float = 15.0,
                    log_path: str | None = None) -> None:
    """Wait until ``path`` exists (without connecting: the daemons serve one connection)."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc is not None and proc.poll() is not None:
            log = Path(log_path).read_text(errors="replace") if log_path else ""
            raise PeerUnavailable(f"daemon exited with {proc.returncode} before creating "
                                  f"{path}:\n{log[-3000:]}")
        if time.monotonic() > deadline:
            raise PeerUnavailable(f"{path} did not appear within {timeout}s")
        time.sleep(0.01)


@contextlib.contextmanager
def run_peer(kind: str, shared: str | os.PathLike | None = None, *, cache: str = "auto",
             extra_args: list[str] | tuple = (), workdir: str | os.PathLike | None = None,
             binary: str | None = None):
    """Start a peer daemon serving ``shared`` (a fresh temporary folder if None); yields a
    :class:`PeerDaemon` once its socket exists; stops it (if still running) on exit."""
    binary = binary or find_peer(kind)
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix=f"peer-{kind}-"))
        workdir = str(workdir)
        if shared is None:
            shared = os.path.join(workdir, "shared")
            os.makedirs(shared, exist_ok=True)
        shared = str(shared)
        sock = os.path.join(workdir, f"{kind}.sock")
        if len(sock) > 100:                      # sun_path holds 108 bytes
            sock = os.path.join(stack.enter_context(
                tempfile.TemporaryDirectory(prefix="pv-", dir="/tmp")), f"{kind}.sock")
        log_path = os.path.join(workdir, f"{kind}.log")
        cmd = peer_command(kind, binary, sock, shared, cache, extra_args)
        logf = open(log_path, "wb")
        stack.callback(logf.close)
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf,
                                stderr=subprocess.STDOUT, start_new_session=True)
        d = PeerDaemon(kind, binary, sock, shared, log_path, proc)
        stack.callback(d.stop)
        wait_for_socket(sock, proc, log_path=log_path)
        yield d


def which_pyvirtiofsd() -> str | None:
    """Our own daemon's entry point, if installed (for side-by-side runs)."""
    return shutil.which("pyvirtiofsd")
