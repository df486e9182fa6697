"""Build: pure Python, plus the request path compiled with mypyc where that is possible.

The modules listed in src/pyvirtiofs/compiled.py (MODULES) are compiled into extension modules
when mypyc (the ``mypy`` build requirement), a C compiler and Python's headers are present.
The environment variable PYVIRTIOFS_COMPILE decides:

  auto (default)  compile if possible, else install pure Python and say why on stderr
  1               compile, or fail with the reason (scripts/setup.sh and CI use this)
  0               never compile

An editable install (``pip install -e .``) compiles in place, next to the sources; the package
then runs the compiled modules only while their sources are unchanged (see compiled.py).
Everything else about the package is in pyproject.toml.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import shlex
import shutil
import sys
import sysconfig

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
PACKAGE_DIR = os.path.join(HERE, "src", "pyvirtiofs")
MODES = ("auto", "0", "1")
# commands that only read metadata: no need to run mypyc for them
METADATA_ONLY = {"egg_info", "dist_info", "sdist", "--name", "--version"}


def _compiled_module():
    """src/pyvirtiofs/compiled.py, loaded on its own (the package need not be importable)."""
    spec = importlib.util.spec_from_file_location(
        "_pyvirtiofs_compiled", os.path.join(PACKAGE_DIR, "compiled.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cannot_compile() -> str | None:
    """Why mypyc cannot run here, or None."""
    if importlib.util.find_spec("mypyc") is None:
        return "mypyc is not installed (it comes with the mypy package)"
    cc = shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")
    if not cc or shutil.which(cc[0]) is None:
        return f"no C compiler ({cc[0] if cc else 'CC'} not found)"
    include = sysconfig.get_paths()["include"]
    if not os.path.exists(os.path.join(include, "Python.h")):
        return f"no Python headers ({include}/Python.h; on Debian: apt-get install python3-dev)"
    return None


def _remove_in_place_build() -> None:
    """A pure editable install must not leave an earlier in-place build behind."""
    compiled = _compiled_module()
    leftovers = [os.path.join(PACKAGE_DIR, compiled.BUILD_INFO)]
    leftovers += glob.glob(os.path.join(PACKAGE_DIR, "**", "*.so"), recursive=True)
    leftovers += glob.glob(os.path.join(HERE, "src", "*__mypyc*.so"))
    for path in leftovers:
        if os.path.exists(path):
            os.unlink(path)


class BuildExt(build_ext):
    """build_ext that also records which sources the compiled modules were built from."""

    def run(self) -> None:
        super().run()
        compiled = _compiled_module()
        if self.inplace:
            target = PACKAGE_DIR
        else:
            target = os.path.join(self.build_lib, "pyvirtiofs")
        os.makedirs(target, exist_ok=True)
        with open(os.path.join(target, compiled.BUILD_INFO), "w") as f:
            f.write(compiled.build_record(PACKAGE_DIR))


def extensions() -> list:
    mode = os.environ.get("PYVIRTIOFS_COMPILE", "auto") or "auto"
    if mode not in MODES:
        sys.exit(f"PYVIRTIOFS_COMPILE={mode}: expected one of {', '.join(MODES)}")
    if METADATA_ONLY.intersection(sys.argv[1:]):
        return []
    if mode == "0":
        why = "PYVIRTIOFS_COMPILE=0"
    else:
        why = _cannot_compile()
        if why and mode == "1":
            sys.exit(f"PYVIRTIOFS_COMPILE=1 but cannot compile: {why}")
    if why:
        print(f"pyvirtiofs: installing pure Python, not compiled: {why}", file=sys.stderr)
        _remove_in_place_build()
        return []
    from mypyc.build import mypycify
    compiled = _compiled_module()
    paths = [os.path.relpath(compiled.source_path(m, PACKAGE_DIR), HERE)
             for m in compiled.MODULES]
    return mypycify(paths, opt_level="3", group_name="pyvirtiofs",
                    target_dir=os.path.join("build", "mypyc"))


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
