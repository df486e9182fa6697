"""Host side of the differential conformance suite (:mod:`pyvirtiofs.testing.conformance`).

One guest boot runs every case twice: on the guest's own tmpfs (the reference) and on the
virtiofs mount.  The cases also run natively on the host, in the file system that holds the
shared directory: where virtiofs differs from tmpfs but agrees with the host's own file system
(ext4 has no ZERO_RANGE limits tmpfs has, and a smaller xattr budget), the difference belongs
to the backing file system, not to the daemon.

    python -m pyvirtiofs.testing.conformance_runner [--daemon pyvirtiofsd|PATH] [--fast]
        [--cache auto] [--markdown OUT.md] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os

import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from . import conformance, guestvm

CASES_FILE = Path(conformance.__file__).resolve()

# Cases whose result depends on the file system behind the share.  Only these may give the
# host file system's result (run natively on the host) instead of tmpfs's.
BACKING_FS_CASES: dict[str, str] = {
    "data_fallocate_and_seek":
        "tmpfs and ext4 differ in FALLOC_FL_ZERO_RANGE support and in where SEEK_HOLE finds a "
        "hole",
    "open_direct": "tmpfs refuses O_DIRECT, ext4 takes it",
    "xattr_user": "Linux 6.1's tmpfs has no user.* xattrs, ext4 has",
}


@dataclass(frozen=True)
class KnownDifference:
    result: object  # exactly what the virtiofs mount must give instead of tmpfs's result
    why: str


# Cases where virtiofs differs from tmpfs on purpose or by a guest limit (listed in the
# README).  "name" holds for every cache mode, "name@cache" for that mode only.
KNOWN_DIFFERENCES: dict[str, KnownDifference] = {
    "data_mmap_shared@never": KnownDifference(
        ["mmap", "ENODEV"],
        "with cache=never files are opened FOPEN_DIRECT_IO and Linux before 6.6 refuses shared "
        "mmap of such files (ENODEV); FUSE_DIRECT_IO_ALLOW_MMAP needs a newer guest"),
    "xattr_trusted_security": KnownDifference(
        ["EPERM", "EPERM", [], ["ENODATA", []]],
        "trusted.* and security.* xattrs need CAP_SYS_ADMIN on the host, which the daemon drops "
        "like virtiofsd does (EPERM); --modcaps=+sys_admin allows them"),
}


def known_difference(name: str, cache: str) -> KnownDifference | None:
    return KNOWN_DIFFERENCES.get(f"{name}@{cache}") or KNOWN_DIFFERENCES.get(name)


def _is_exception(result: object) -> bool:
    return isinstance(result, dict) and "exception" in result


@dataclass
class CaseResult:
    name: str
    cache: str
    tmpfs: object
    virtiofs: object
    host: object

    @property
    def verdict(self) -> str:
        """same: as on tmpfs; backing-fs: as natively on the host, for a case whose result
        depends on the backing file system; known: exactly the listed known difference."""
        if self.virtiofs == self.tmpfs and not _is_exception(self.virtiofs):
            return "same"
        if (self.name in BACKING_FS_CASES and self.virtiofs == self.host
                and not _is_exception(self.host)):
            return "backing-fs"
        known = known_difference(self.name, self.cache)
        if known is not None and self.virtiofs == known.result:
            return "known"
        return "DIFFERENT"


@dataclass
class Report:
    daemon: str
    cache: str
    results: list[CaseResult] = field(default_factory=list)

    @property
    def failures(self) -> list[CaseResult]:
        return [r for r in self.results if r.verdict == "DIFFERENT"]

    def describe(self, r: CaseResult) -> str:
        return (f"{r.name}: virtiofs {json.dumps(r.virtiofs)}\n"
                f"    tmpfs  {json.dumps(r.tmpfs)}\n    host   {json.dumps(r.host)}")


def default_daemon_argv(daemon: str, sock: str, shared: str, cache: str,
                        daemon_args: Sequence[str] = ()) -> list[str]:
    if daemon == "pyvirtiofsd":
        return [sys.executable, "-m", "pyvirtiofs", f"--socket-path={sock}",
                f"--shared-dir={shared}", f"--cache={cache}", "--xattr", *daemon_args]
    # The Rust reference: its options are spelled the same way (xattrs are off by default
    # in both daemons; the cases use them).
    return [daemon, f"--socket-path={sock}", f"--shared-dir={shared}", f"--cache={cache}",
            "--sandbox", "none", "--xattr"]


def _extract(output: str, tag: str) -> dict:
    start, end = f"<<{tag}>>", f"<</{tag}>>"
    i, j = output.find(start), output.find(end)
    if i < 0 or j < 0:
        raise guestvm.GuestError(f"no {tag} results in the guest output:\n{output[-3000:]}")
    return json.loads(output[i + len(start):j])


def run(daemon: str = "pyvirtiofsd", *, fast: bool = True, cache: str = "auto",
        only: str = "", workdir: str | None = None, env: dict | None = None,
        daemon_argv=None, daemon_args: Sequence[str] = ()) -> Report:
    """``daemon_argv(socket_path)``: the command of a daemon that serves its own file system
    (a library example) instead of sharing a directory; ``daemon_args``: more pyvirtiofsd
    options (e.g. --seccomp=kill)."""
    with tempfile.TemporaryDirectory(prefix="pyvfs-conf-", dir=workdir) as tmp:
        shared = os.path.join(tmp, "share")
        hostref = os.path.join(tmp, "hostref")
        os.chmod(tmp, 0o755)  # cases run parts as uid 1000, on the host too
        os.makedirs(shared)
        os.makedirs(hostref)
        args = ["--fast"] if fast else []
        if only:
            args += ["--only", only]
        host = json.loads(subprocess.run(
            [sys.executable, str(CASES_FILE), "--root", hostref, *args],
            check=True, capture_output=True, text=True).stdout)
        sock = os.path.join(tmp, "vfs.sock")
        argv = (daemon_argv(sock) if daemon_argv is not None
                else default_daemon_argv(daemon, sock, shared, cache, daemon_args))
        cases = " ".join(args)
        py = guestvm.guest_python()
        script = (
            guestvm.embed_file("/tmp/conformance.py", CASES_FILE.read_text())
            + "mkdir -p /tmp/ref /mnt/vfs/c\n"
            f"echo '<<tmpfs>>'; {py} /tmp/conformance.py --root /tmp/ref {cases}; "
            "echo '<</tmpfs>>'\n"
            f"echo '<<virtiofs>>'; {py} /tmp/conformance.py --root /mnt/vfs/c {cases}; "
            "echo '<</virtiofs>>'\n")
        with guestvm.DaemonProcess(argv, sock, env=env) as d:
            res = guestvm.run_guest(script, [guestvm.Share("vfs", socket=sock)], hostroot=True,
                                    timeout=1200, daemons=[d])
            # the daemon ends by itself once QEMU has gone; SIGTERM (leaving the block) is for
            # one that does not, and kills a library example, which has no handler for it
            with contextlib.suppress(subprocess.TimeoutExpired):
                d.wait(timeout=30)
        if res.status != 0:
            raise guestvm.GuestError(f"conformance script failed ({res.status}):\n"
                                     f"{res.output[-3000:]}\n--- daemon ---\n{d.log[-3000:]}")
        tmpfs = _extract(res.output, "tmpfs")
        vfs = _extract(res.output, "virtiofs")
    report = Report(daemon=os.path.basename(daemon), cache=cache)
    for name in tmpfs:
        report.results.append(CaseResult(name, cache, tmpfs[name], vfs.get(name), host.get(name)))
    return report


def markdown(reports: list[Report]) -> str:
    names = [r.name for r in reports[0].results]
    head = "| case | " + " | ".join(f"{r.daemon} (cache={r.cache})" for r in reports) + " |"
    lines = [head, "|---|" + "---|" * len(reports)]
    for i, n in enumerate(names):
        cells = []
        for rep in reports:
            v = rep.results[i].verdict
            cells.append({"same": "same as tmpfs", "backing-fs": "same as host ext4",
                          "known": "known difference"}.get(v, "**differs**"))
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


TABLE_START = "<!-- conformance table: written by conformance_runner --markdown -->"
TABLE_END = "<!-- end of conformance table -->"


def write_markdown(path: Path, table: str) -> None:
    """Put ``table`` into the document at ``path``: between its table markers when it has
    them (the prose around the table is kept), else as the whole file."""
    text = path.read_text() if path.exists() else ""
    i, j = text.find(TABLE_START), text.find(TABLE_END)
    if i < 0 or j < i:
        path.write_text(table)
        return
    path.write_text(text[:i + len(TABLE_START)] + "\n" + table + text[j:])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--daemon", action="append",
                    help="pyvirtiofsd (default) or the path of another virtiofsd; repeatable")
    ap.add_argument("--fast", action="store_true", help="leave out the slow cases")
    ap.add_argument("--cache", default="auto")
    ap.add_argument("--only", default="")
    ap.add_argument("--markdown")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    reports = []
    for daemon in a.daemon or ["pyvirtiofsd"]:
        rep = run(daemon, fast=a.fast, cache=a.cache, only=a.only)
        reports.append(rep)
        for r in rep.results:
            print(f"{rep.daemon:12} {r.verdict:10} {r.name}")
        for r in rep.failures:
            print(rep.describe(r))
    md = markdown(reports)
    print(md)
    if a.markdown:
        write_markdown(Path(a.markdown), md)
    if a.json:
        Path(a.json).write_text(json.dumps(
            [{"daemon": r.daemon, "cache": r.cache,
              "cases": {c.name: {"verdict": c.verdict, "tmpfs": c.tmpfs, "virtiofs": c.virtiofs,
                                 "host": c.host} for c in r.results}} for r in reports],
            indent=1))
    return 1 if reports[0].failures else 0


if __name__ == "__main__":
    sys.exit(main())



