"""Which modules are compiled with mypyc, and whether this process runs them compiled.

The modules of the request path are plain annotated Python.  Where a C compiler and Python's
headers are present, installing the package also compiles them with mypyc (setup.py reads
:data:`MODULES` from this file: a module added here is compiled too).  Without a compiler the
same source runs unchanged.

A compiled build writes ``compiled-sources.txt`` beside this file: a checksum of every
compiled module's source.  ``pyvirtiofs/__init__.py`` calls :func:`choose` before it imports anything
else, and the compiled modules are used only if every source still matches; otherwise (a
source edited after an editable install compiled it in place), or with ``PYVIRTIOFS_PURE=1``
in the environment, the ``.py`` files are imported instead.  :data:`STATE` says which path
runs and why (``pyvirtiofsd --version`` prints it, the daemon logs it).

What mypyc asks of the listed modules (it type-checks them, and checks annotations at run
time): attributes that may be None annotated and narrowed before use; annotations that hold
(a memoryview or bytearray is not ``bytes``: ``strict_bytes`` in pyproject.toml); no method
aliases in a class body (``b = a``), no dataclass with a memoryview field, no attribute named
``_thread`` (its C name is a keyword); instances of compiled classes cannot be monkeypatched,
and a public class that users subclass needs ``@mypyc_attr(allow_interpreted_subclasses=True)``.
A ``tuple[int, int]`` is unboxed: one stored in two places becomes two objects (annotate
``tuple[int, ...]`` to keep one).  ``bash scripts/setup.sh`` compiles after an edit.

Run as a script (``python src/pyvirtiofs/compiled.py``) it prints the state without importing
the package, and exits 1 unless a compiled build matches the sources (scripts/setup.sh uses
that to rebuild).  Nothing here is compiled itself.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import zlib
from importlib.machinery import ModuleSpec
from typing import Any, Sequence

try:  # mypyc reads this decorator; where mypy is not installed it does nothing
    from mypy_extensions import mypyc_attr
except ImportError:  # pragma: no cover - the test environment has mypy
    def mypyc_attr(*attrs: str, **kwattrs: object) -> Any:  # type: ignore[misc]
        return lambda cls: cls

MODULES = (
    "pyvirtiofs.guest_memory",
    "pyvirtiofs.virtqueue",
    "pyvirtiofs.queue_worker",
    "pyvirtiofs.fuse.abi",
    "pyvirtiofs.fuse.server",
    "pyvirtiofs.passthrough",
)
PURE_ENV = "PYVIRTIOFS_PURE"      # =1: run the Python source even where compiled modules exist
BUILD_INFO = "compiled-sources.txt"  # "module crc32" lines, written by setup.py's build_ext

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))

STATE = "pure Python (not decided yet)"
COMPILED = False


def source_path(module: str, package_dir: str = PACKAGE_DIR) -> str:
    """``pyvirtiofs.fuse.abi`` -> ``<package_dir>/fuse/abi.py``."""
    return os.path.join(package_dir, *module.split(".")[1:]) + ".py"


def checksum(path: str) -> int:
    """CRC-32 of a source file: enough to notice an edit (this is not about trust)."""
    with open(path, "rb") as f:
        return zlib.crc32(f.read())


def build_record(package_dir: str = PACKAGE_DIR) -> str:
    """What a compiled build writes to BUILD_INFO: the checksum of each module's source."""
    return "".join(f"{m} {checksum(source_path(m, package_dir))}\n" for m in MODULES)


def _build_sources(package_dir: str) -> dict[str, int] | None:
    """The checksums a compiled build recorded, or None if this is not a compiled build."""
    try:
        with open(os.path.join(package_dir, BUILD_INFO)) as f:
            lines = f.read().split("\n")
    except FileNotFoundError:
        return None
    return {name: int(crc) for name, crc in (ln.split() for ln in lines if ln.strip())}


def examine(package_dir: str = PACKAGE_DIR, environ: dict[str, str] | None = None
            ) -> tuple[bool, str]:
    """(use the compiled modules?, the state in words)."""
    env = os.environ if environ is None else environ
    built = _build_sources(package_dir)
    if built is None:
        return False, "pure Python (installed without compiling)"
    stale = [m for m in MODULES
             if m not in built or checksum(source_path(m, package_dir)) != built[m]]
    if stale:
        return False, ("pure Python (the compiled modules are older than their source: "
                       f"{', '.join(m.rsplit('.', 1)[1] for m in stale)}; reinstall to "
                       "compile them again)")
    if env.get(PURE_ENV, "") not in ("", "0"):
        return False, f"pure Python ({PURE_ENV}={env[PURE_ENV]})"
    return True, f"compiled with mypyc ({len(MODULES)} modules)"


class _SourceFirst:
    """Meta path finder: the listed modules come from their ``.py`` files, whatever compiled
    extension modules sit beside them (those are found first by the default finders)."""

    def __init__(self, modules: Sequence[str], package_dir: str):
        self.modules = frozenset(modules)
        self.package_dir = package_dir

    def find_spec(self, name: str, path: object = None, target: object = None
                  ) -> ModuleSpec | None:
        if name not in self.modules:
            return None
        return importlib.util.spec_from_file_location(name, source_path(name, self.package_dir))


def choose() -> None:
    """Decide, once, before any of :data:`MODULES` is imported (pyvirtiofs/__init__.py)."""
    global STATE, COMPILED
    COMPILED, STATE = examine()
    if not COMPILED and not any(isinstance(f, _SourceFirst) for f in sys.meta_path):
        sys.meta_path.insert(0, _SourceFirst(MODULES, PACKAGE_DIR))  # type: ignore[arg-type]


def running_compiled(module: str) -> bool:
    """Whether an imported module runs from a compiled extension (its file is not .py)."""
    return not (getattr(sys.modules[module], "__file__", None) or "").endswith(".py")


if __name__ == "__main__":
    ok, state = examine(environ={})
    print(state)
    sys.exit(0 if ok else 1)
