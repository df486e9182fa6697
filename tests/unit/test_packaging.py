"""``pip install`` of the package gives the library: a wheel built from this checkout installs
the public API with its type information, with the request path compiled by mypyc where a C
compiler is present, and as the same pure Python source where there is none or
PYVIRTIOFS_COMPILE=0 says so (setup.py)."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# what a wheel's installed package reports: where it is, its typing marker, its API, its path
PROBE = ("import sys; sys.path.insert(0, sys.argv[1]); import json, pathlib, pyvirtiofs.cli; "
         "from pyvirtiofs import compiled as c; "
         "p = pathlib.Path(pyvirtiofs.__file__).parent; "
         "print(json.dumps([p.parent == pathlib.Path(sys.argv[1]), (p / 'py.typed').exists(), "
         "all(hasattr(pyvirtiofs, n) for n in pyvirtiofs.__all__), "
         "'PathFileSystem' in pyvirtiofs.__all__, c.STATE, "
         "[c.running_compiled(m) for m in c.MODULES]]))")


def build(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """``pip wheel`` of a clean copy of the checkout (as git has it: no compiled modules)."""
    tree = tmp_path / "tree"  # a copy: building writes build/ and egg-info beside the sources
    shutil.copytree(ROOT / "src", tree / "src", ignore=shutil.ignore_patterns(
        "__pycache__", "*.egg-info", "*.so", "compiled-sources.txt"))
    for name in ("pyproject.toml", "README.md", "setup.py"):
        shutil.copy(ROOT / name, tree / name)
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("PYVIRTIOFS_COMPILE", "PYVIRTIOFS_PURE", "CC")}
    full_env.update(env)
    return subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-v",
                           "--no-build-isolation", "--disable-pip-version-check",
                           "-w", str(tmp_path / "dist"), str(tree)],
                          capture_output=True, text=True, timeout=600, env=full_env)


def install(tmp_path: Path) -> tuple[Path, list]:
    """Install the one wheel built into a directory of its own; what PROBE says there."""
    wheel, site = _install_built(tmp_path)
    out = subprocess.run([sys.executable, "-I", "-c", PROBE, str(site)], cwd=tmp_path,
                         capture_output=True, text=True, check=True).stdout
    return wheel, json.loads(out)


def _install_built(tmp_path: Path) -> tuple[Path, Path]:
    wheel, = (tmp_path / "dist").glob("pyvirtiofs-*.whl")
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index",
                    "--disable-pip-version-check", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    return wheel, site


def install_wheel(tmp_path: Path, compile: str = "0") -> Path:
    """Build a wheel of this checkout and pip-install it into a directory of its own (returned),
    as ``pip install`` would into site-packages.  Pure Python unless ``compile`` says otherwise
    (PYVIRTIOFS_COMPILE: compiling takes a minute, and the tests below show both wheels)."""
    r = build(tmp_path, PYVIRTIOFS_COMPILE=compile)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return _install_built(tmp_path)[1]


def test_wheel_installs_the_typed_public_api_compiled(tmp_path):
    r = build(tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    wheel, (here, typed, api, listed, state, compiled) = install(tmp_path)
    assert (here, typed, api, listed) == (True, True, True, True)
    assert "-cp311-" in wheel.name and wheel.name.endswith("_x86_64.whl"), wheel.name
    assert state == f"compiled with mypyc ({len(compiled)} modules)"
    assert all(compiled), compiled
    names = zipfile.ZipFile(wheel).namelist()
    assert "pyvirtiofs/compiled-sources.txt" in names
    assert any(n.startswith("pyvirtiofs__mypyc.") and n.endswith(".so") for n in names), names


def test_pure_wheel_with_compile_0(tmp_path):
    r = build(tmp_path, PYVIRTIOFS_COMPILE="0")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "installing pure Python, not compiled: PYVIRTIOFS_COMPILE=0" in r.stdout + r.stderr
    wheel, (here, typed, api, listed, state, compiled) = install(tmp_path)
    assert (here, typed, api, listed) == (True, True, True, True)
    assert wheel.name.endswith("-py3-none-any.whl"), wheel.name
    assert not any(n.endswith(".so") for n in zipfile.ZipFile(wheel).namelist())
    assert state == "pure Python (installed without compiling)"
    assert compiled and not any(compiled)


def test_no_compiler_gives_pure_python_or_with_compile_1_a_clear_error(tmp_path):
    r = build(tmp_path / "auto", CC="/nonexistent/cc")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert ("installing pure Python, not compiled: no C compiler (/nonexistent/cc not found)"
            in r.stdout + r.stderr)
    wheel, (_, _, api, _, state, compiled) = install(tmp_path / "auto")
    assert api and state == "pure Python (installed without compiling)"

    r = build(tmp_path / "must", CC="/nonexistent/cc", PYVIRTIOFS_COMPILE="1")
    assert r.returncode != 0
    assert ("PYVIRTIOFS_COMPILE=1 but cannot compile: no C compiler (/nonexistent/cc not found)"
            in r.stdout + r.stderr)
    assert not list((tmp_path / "must" / "dist").glob("*.whl"))

    r = build(tmp_path / "typo", PYVIRTIOFS_COMPILE="yes")
    assert r.returncode != 0
    assert "PYVIRTIOFS_COMPILE=yes: expected one of auto, 0, 1" in r.stdout + r.stderr
