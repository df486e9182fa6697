"""The conformance runner's pass rule (no guest needed): virtiofs passes a case by giving
tmpfs's result; the host file system's result only for a case whose result depends on the
backing file system; a known difference only with exactly its listed result; a case that
raised never passes."""

from pyvirtiofs.testing.conformance_runner import (
    BACKING_FS_CASES, KNOWN_DIFFERENCES, CaseResult,
)

EXC = {"exception": "OSError: boom"}


def verdict(name, virtiofs, tmpfs=("tmpfs",), host=("host",), cache="auto"):
    return CaseResult(name, cache, list(tmpfs), virtiofs, list(host)).verdict


def test_same_as_tmpfs_passes_and_an_exception_never_does():
    assert verdict("links_hard", ["tmpfs"]) == "same"
    assert verdict("links_hard", EXC, tmpfs=EXC) == "DIFFERENT"


def test_host_result_counts_only_where_the_backing_fs_is_the_reason():
    assert "open_direct" in BACKING_FS_CASES and "links_hard" not in BACKING_FS_CASES
    assert verdict("open_direct", ["host"]) == "backing-fs"
    assert verdict("links_hard", ["host"]) == "DIFFERENT"
    assert verdict("open_direct", EXC, host=EXC) == "DIFFERENT"


def test_a_known_difference_must_give_exactly_its_result():
    want = KNOWN_DIFFERENCES["xattr_trusted_security"].result
    assert verdict("xattr_trusted_security", want) == "known"
    assert verdict("xattr_trusted_security", ["EACCES", "EPERM", [], ["ENODATA", []]]) == "DIFFERENT"
    assert verdict("xattr_trusted_security", EXC) == "DIFFERENT"
    mmap = KNOWN_DIFFERENCES["data_mmap_shared@never"].result
    assert verdict("data_mmap_shared", mmap, cache="never") == "known"
    assert verdict("data_mmap_shared", mmap, cache="auto") == "DIFFERENT"  # only for never
