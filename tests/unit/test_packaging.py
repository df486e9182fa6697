"""``pip install`` of the package gives the library: a wheel built from this checkout installs
the public API with its type information."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def install_wheel(tmp_path: Path) -> Path:
    """Build a wheel of this checkout and pip-install it into a directory of its own (returned),
    as ``pip install`` would into site-packages."""
    tree = tmp_path / "tree"  # a copy: building writes build/ and egg-info beside the sources
    shutil.copytree(ROOT / "src", tree / "src", ignore=shutil.ignore_patterns(
        "__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tree / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "-q", "-w", str(tmp_path / "dist"), str(tree)],
                   check=True, capture_output=True, timeout=300)
    wheel, = (tmp_path / "dist").glob("pyvirtiofs-*.whl")
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index",
                    "--disable-pip-version-check", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    return site


def test_wheel_installs_the_typed_public_api(tmp_path):
    site = install_wheel(tmp_path)
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); import pathlib, pyvirtiofs; "
             "p = pathlib.Path(pyvirtiofs.__file__).parent; "
             "print(p.parent == pathlib.Path(sys.argv[1]), (p / 'py.typed').exists(), "
             "all(hasattr(pyvirtiofs, n) for n in pyvirtiofs.__all__), "
             "'PathFileSystem' in pyvirtiofs.__all__)")
    out = subprocess.run([sys.executable, "-I", "-c", probe, str(site)], cwd=tmp_path,
                         capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "True", "True", "True"], out
