"""Fixtures that run the real pyvirtiofsd process (see :mod:`tests.unit.daemon`).

* ``daemon``: a started daemon sharing ``tmp_path/shared``; its teardown fails the test if the
  daemon crashed, exited non-zero or logged a traceback.
* ``start_daemon``: a factory ``start_daemon(shared_dir=None, extra_args=())`` for tests that
  need several daemons or other options; every daemon gets the same teardown verdict.

The log of every daemon a failing test used is attached to the test report.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
if str(SRC) not in sys.path:  # a checkout without `pip install -e .` works too
    sys.path.insert(0, str(SRC))

from .daemon import Daemon  # noqa: E402


class DaemonStarter:
    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.daemons: list[Daemon] = []

    def __call__(self, shared_dir=None, extra_args=()) -> Daemon:
        if shared_dir is None:
            shared_dir = self.tmp_path / f"shared{len(self.daemons) or ''}"
            shared_dir.mkdir(exist_ok=True)
        d = Daemon(shared_dir, extra_args=extra_args)
        self.daemons.append(d)
        return d.start()

    def finish(self) -> None:
        errors = []
        for d in self.daemons:
            try:
                d.finish()
            except AssertionError as e:
                errors.append(str(e))
        if errors:
            pytest.fail("\n\n".join(errors), pytrace=False)


@pytest.fixture
def start_daemon(tmp_path):
    starter = DaemonStarter(tmp_path)
    yield starter
    starter.finish()


@pytest.fixture
def daemon(start_daemon) -> Daemon:
    return start_daemon()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Attach the logs of the daemons a failing test used to its report."""
    outcome = yield
    rep = outcome.get_result()
    if not rep.failed:
        return
    seen = set()
    for value in getattr(item, "funcargs", {}).values():
        daemons = ([value] if isinstance(value, Daemon) else
                   list(getattr(value, "daemons", [])) + [getattr(value, "d", None)])
        for d in daemons:
            if isinstance(d, Daemon) and id(d) not in seen:
                seen.add(id(d))
                state = "running" if d.alive() else f"exit status {d.proc.returncode}"
                rep.sections.append((f"pyvirtiofsd log ({state})", d.log_tail(150)))


@pytest.fixture
def table_path(tmp_path):
    """A version-table path in /dev/shm for this test, removed afterwards."""
    path = f"/dev/shm/pyvfs-test-{os.getpid()}-{tmp_path.name}"
    yield path
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
