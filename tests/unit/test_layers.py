"""The layers depend downwards only: the transport (guest memory, virtqueues, queue workers,
vhost-user) knows nothing of FUSE or of file systems; the device contract is what joins them."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "pyvirtiofs"
TRANSPORT = ["guest_memory.py", "virtqueue.py", "queue_worker.py", *(
    str(p.relative_to(SRC)) for p in (SRC / "vhost_user").glob("*.py"))]
ABOVE_TRANSPORT = ("fuse", "filesystem", "passthrough", "device", "pathfs", "serving")


def imported_modules(path: Path) -> set[str]:
    """pyvirtiofs modules a file imports, as dotted names relative to the package."""
    pkg = list(path.relative_to(SRC).parent.parts)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = pkg[:len(pkg) - node.level + 1] if node.level else []
            if not node.level and not (node.module or "").startswith("pyvirtiofs"):
                continue
            mod = (node.module or "").removeprefix("pyvirtiofs.").removeprefix("pyvirtiofs")
            parts = base + [p for p in mod.split(".") if p]
            found.add(".".join(parts))
            found.update(".".join(parts + [a.name]) for a in node.names)
    return found


def test_the_transport_does_not_import_fuse_or_file_systems():
    assert len(TRANSPORT) >= 7
    bad = {}
    for rel in TRANSPORT:
        mods = imported_modules(SRC / rel)
        hits = sorted(m for m in mods if m.split(".")[0] in ABOVE_TRANSPORT)
        if hits:
            bad[rel] = hits
    assert not bad, bad


def test_the_check_sees_imports():
    mods = imported_modules(SRC / "fuse" / "server.py")
    assert "vhost_user.device" in mods and "filesystem" in mods


def test_the_test_frontend_is_an_independent_oracle():
    """testing/frontend.py encodes FUSE and vhost-user itself: it imports nothing of the
    daemon, so a wrong layout on either side shows up as a disagreement."""
    assert imported_modules(SRC / "testing" / "frontend.py") == set()
