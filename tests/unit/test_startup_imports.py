"""A plain daemon loads only what it uses: memory and start-up time a user notices (idle RSS,
and virtme-ng waits about 3 s for the pid file).

The daemon runs under ``python -X importtime``, which logs every module as it is imported, so
the test sees exactly what the real process loaded while it started and served requests.
asyncio (with ssl: ~10 MiB of RSS) is for file systems with ``async def`` methods, atomics
(with cffi and its C parser: ~6 MiB) for ``--version-table``, fsspec for ``--source``.
"""

from __future__ import annotations

import os
import re

from .daemon import Daemon

# optional features' modules: none of them may be loaded by a daemon that does not use them
HEAVY = ("asyncio", "ssl", "atomics", "cffi", "pycparser", "fsspec", "pyvirtiofs.hostmount",
         "pyvirtiofs.testing", "pyvirtiofs.fsspec_fs")


def imported(log: str) -> set[str]:
    """The modules ``-X importtime`` reported in a daemon's log."""
    return {m.group(1) for m in re.finditer(r"^import time:\s+\d+ \|\s+\d+ \|\s+(\S+)$", log,
                                            re.M)}


def heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY))


def run_daemon(shared, extra_args=()) -> str:
    """Start pyvirtiofsd under -X importtime, serve a few requests, stop it; return its log."""
    d = Daemon(shared, extra_args=extra_args)
    d.argv[1:1] = ["-X", "importtime"]
    d.start()
    try:
        c = d.client()
        e = c.lookup(1, "f")
        o = c.open(e.nodeid, os.O_RDONLY)
        assert c.read(e.nodeid, o.fh, 0, 10) == b"data"
        c.release(e.nodeid, o.fh)
        assert c.getattr(1).attr.mode & 0o040000
    finally:
        d.finish()
    return d.log()


def test_plain_daemon_does_not_import_optional_features(tmp_path):
    (tmp_path / "f").write_bytes(b"data")
    mods = imported(run_daemon(tmp_path))
    assert "pyvirtiofs.passthrough" in mods and "pyvirtiofs.fuse.server" in mods, sorted(mods)
    assert heavy(mods) == []


def test_version_table_daemon_imports_atomics(tmp_path, table_path):
    """The check above sees a lazily imported feature when it is used."""
    (tmp_path / "f").write_bytes(b"data")
    mods = imported(run_daemon(tmp_path, [f"--version-table={table_path}"]))
    assert "atomics" in mods and "cffi" in mods
    assert "asyncio" not in mods
