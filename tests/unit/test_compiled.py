"""The request path runs compiled with mypyc where the set-up could compile it, and the very same
source runs without it: with PYVIRTIOFS_PURE=1, and when a source was edited after it was
compiled (an editable install compiles in place, so an old compiled module sits beside it).

scripts/setup.sh installs a C compiler and Python's headers and installs with
PYVIRTIOFS_COMPILE=1, so in a checkout set up by it the modules are compiled; a test here that
finds them pure says so (run ``bash scripts/setup.sh`` again after editing a compiled module).
The whole suite runs on the compiled build and scripts/test.sh runs the unit tests again with
PYVIRTIOFS_PURE=1.  Building (setup.py's choices) is tested in test_packaging.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from pyvirtiofs import __version__, compiled

from .daemon import SRC, Daemon, daemon_env

PROBE = ("import json, sys, pyvirtiofs.cli; from pyvirtiofs import compiled as c; "
         "print(json.dumps([c.STATE, {m: sys.modules[m].__file__ for m in c.MODULES}]))")
SETUP_HINT = ("the request path is not compiled in this checkout: run `bash scripts/setup.sh` "
              "(it compiles with PYVIRTIOFS_COMPILE=1; again after editing a compiled module)")


def env_with(src=SRC, **extra: str) -> dict[str, str]:
    env = daemon_env()
    env.pop(compiled.PURE_ENV, None)
    env["PYTHONPATH"] = str(src)
    env.update(extra)
    return env


def probe(src=SRC, **extra: str) -> tuple[str, dict[str, str]]:
    """(the state the package reports, the file each compiled-list module was loaded from)."""
    out = subprocess.run([sys.executable, "-c", PROBE], env=env_with(src, **extra),
                         capture_output=True, text=True, timeout=60, cwd="/")
    assert out.returncode == 0, out.stderr
    state, files = json.loads(out.stdout)
    return state, files


def version(**extra: str) -> str:
    out = subprocess.run([sys.executable, "-m", "pyvirtiofs", "--version"], env=env_with(**extra),
                         capture_output=True, text=True, timeout=60, cwd="/")
    assert out.returncode == 0, out
    return out.stdout


def test_the_request_path_runs_compiled_here():
    state, files = probe()
    assert state == f"compiled with mypyc ({len(compiled.MODULES)} modules)", \
        f"{state}\n{SETUP_HINT}"
    assert set(files) == set(compiled.MODULES)
    assert all(f.endswith(".so") for f in files.values()), files
    assert version() == f"pyvirtiofsd {__version__}\nrequest path: {state}\n"


def test_pure_env_runs_the_python_source(tmp_path, monkeypatch):
    state, files = probe(PYVIRTIOFS_PURE="1")
    assert state == "pure Python (PYVIRTIOFS_PURE=1)"
    assert files == {m: compiled.source_path(m, str(SRC / "pyvirtiofs")) for m in compiled.MODULES}
    assert version(PYVIRTIOFS_PURE="1").endswith("request path: pure Python (PYVIRTIOFS_PURE=1)\n")
    # the daemon says which path serves, and serves
    monkeypatch.setenv(compiled.PURE_ENV, "1")
    d = Daemon(tmp_path).start()
    try:
        assert d.client().getattr(1).attr.mode & 0o040000
        assert "request path pure Python (PYVIRTIOFS_PURE=1)" in d.log()
    finally:
        d.finish()


def test_an_edited_source_is_not_shadowed_by_its_old_compiled_module(tmp_path):
    """A copy of this checkout's compiled tree: as it is, it runs compiled; once one compiled
    module's source is edited, every module of the list runs from source (they call each
    other directly when compiled together), the edit included."""
    assert os.path.exists(SRC / "pyvirtiofs" / compiled.BUILD_INFO), SETUP_HINT
    tree = tmp_path / "src"
    shutil.copytree(SRC, tree, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    state, files = probe(tree)
    assert state.startswith("compiled with mypyc"), f"{state}\n{SETUP_HINT}"
    assert all(f.startswith(str(tree)) and f.endswith(".so") for f in files.values()), files

    with open(tree / "pyvirtiofs" / "virtqueue.py", "a") as f:
        f.write("\nEDITED_AFTER_BUILD = True\n")
    state, files = probe(tree)
    assert state == ("pure Python (the compiled modules are older than their source: "
                     "virtqueue; reinstall to compile them again)")
    assert all(f.endswith(".py") for f in files.values()), files
    out = subprocess.run([sys.executable, "-c", "import pyvirtiofs.virtqueue as v; "
                          "print(v.EDITED_AFTER_BUILD)"], env=env_with(tree),
                         capture_output=True, text=True, timeout=60, cwd="/")
    assert out.stdout == "True\n", out


def test_a_user_subclass_of_passthroughfs_overrides_what_the_compiled_class_calls(tmp_path):
    """PassthroughFs is public and compiled: a Python subclass of it works, and the compiled
    methods call the subclass's overrides (fsyncdir calls fsync)."""
    code = """if True:
        import os, sys
        from pyvirtiofs import PassthroughFs, compiled
        calls = []
        class Counting(PassthroughFs):
            def fsync(self, inode, fh, datasync):
                calls.append((inode, fh, datasync))
                super().fsync(inode, fh, datasync)
        fs = Counting(sys.argv[1])
        fh = fs.opendir(1, None).fh
        fs.fsyncdir(1, fh, True)
        fs.releasedir(1, fh)
        print(compiled.running_compiled("pyvirtiofs.passthrough"), calls == [(1, fh, True)])
    """
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env_with(),
                         capture_output=True, text=True, timeout=60, cwd="/")
    assert out.stdout == "True True\n", out
