"""The README's "A file system API" section and docs/api.md describe the whole public API: every
name ``import pyvirtiofs`` exports, every public method and attribute of the exported classes,
and the examples' line counts as they are."""

import inspect
import re
import types
from pathlib import Path

import pyvirtiofs

ROOT = Path(__file__).resolve().parents[2]
API_DOC = (ROOT / "docs" / "api.md").read_text()


def readme_section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("\n## A file system API\n")
    return text[start:text.index("\n## ", start + 1)]


def mentioned(name: str, text: str) -> bool:
    """``name`` in code spans: `name`, `name(...)`, `x.name`, `name = ...`."""
    return re.search(r"`[^`]*\b" + re.escape(name) + r"\b[^`]*`", text) is not None


def public_members(cls: type) -> list[str]:
    """Methods, properties, class attributes and dataclass fields of ``cls`` and its bases
    from this package."""
    names = list(getattr(cls, "__dataclass_fields__", {}))
    for klass in cls.__mro__:
        if klass is object or not klass.__module__.startswith("pyvirtiofs"):
            continue
        for attr, value in vars(klass).items():
            # (a class compiled with mypyc holds its instance attributes as getset
            # descriptors: those are not class-level API, as in the pure Python class)
            if isinstance(value, types.GetSetDescriptorType):
                continue
            if not attr.startswith("_") and attr not in names:
                names.append(attr)
    return names


def test_every_export_is_named_in_the_readme_and_the_reference():
    section = readme_section()
    assert [n for n in pyvirtiofs.__all__ if not mentioned(n, section)] == []
    assert [n for n in pyvirtiofs.__all__ if not mentioned(n, API_DOC)] == []


def test_every_public_method_of_an_export_is_in_the_reference():
    missing = []
    for name in pyvirtiofs.__all__:
        obj = getattr(pyvirtiofs, name)
        if inspect.isclass(obj) and not issubclass(obj, (int, BaseException)):
            missing += [f"{name}.{m}" for m in public_members(obj) if not mentioned(m, API_DOC)]
    assert missing == []


def test_the_examples_table_gives_each_examples_length():
    rows = re.findall(r"^\| `examples/(\w+\.py)` \| (\d+) \|", API_DOC, re.M)
    files = sorted(p.name for p in (ROOT / "examples").glob("*.py"))
    assert sorted(f for f, _ in rows) == files
    for f, lines in rows:
        n = len((ROOT / "examples" / f).read_text().splitlines())
        assert int(lines) == n, f"{f}: the table says {lines} lines, it has {n}"
        assert n <= 150, f"{f} has {n} lines: the examples stay under 150"
