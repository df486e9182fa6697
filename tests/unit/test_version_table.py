"""The shared metadata version table: slots found the same way by every process, versions
bumped atomically by many threads and processes at once."""

import multiprocessing
import os
import struct
import threading

import pytest

from pyvirtiofs import version_table as vt
from pyvirtiofs.version_table import VersionTable, VersionTableError


@pytest.fixture
def table_path():
    path = f"/dev/shm/pyvfs-test-vt-{os.getpid()}-{threading.get_ident()}"
    yield path
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def test_created_with_header_and_size(table_path):
    t = VersionTable(table_path, 1000)
    try:
        raw = open(table_path, "rb").read()
        assert len(raw) == 4096 + 16 * 1024  # 16,000 bytes of slots, in whole pages
        assert raw[:8] == b"PYVFSVT1"
        assert struct.unpack_from("<IIQ", raw, 8) == (1, 16, 1000)
        assert set(raw[4096:]) == {0}  # no slot claimed, no version yet
    finally:
        t.close()
    assert [n for n in os.listdir("/dev/shm") if n.startswith(os.path.basename(table_path))] \
        == [os.path.basename(table_path)]  # the temporary file is gone


def test_second_opener_uses_the_files_size_and_the_same_slots(table_path):
    a = VersionTable(table_path, 4096)
    b = VersionTable(table_path, 64)  # a different size asked: the file wins
    try:
        assert b.nslots == 4096
        for ino in range(100, 200):
            assert a.slot(7, ino) == b.slot(7, ino)
        s = a.slot(7, 150)
        a.bump(s)
        a.bump(s)
        assert b.version(s) == 2
        assert b.version(b.slot(7, 151)) == 0  # other inodes untouched
    finally:
        a.close()
        b.close()


def test_distinct_inodes_get_distinct_slots_and_reads_never_bump(table_path):
    t = VersionTable(table_path, 4096)
    try:
        slots = {t.slot(1, ino) for ino in range(1000)}
        assert len(slots) == 1000 and vt.OVERFLOW_SLOT not in slots
        s = t.slot(1, 5)
        for _ in range(10):
            t.slot(1, 5)
            t.version(s)
        assert t.version(s) == 0
    finally:
        t.close()


def test_full_table_shares_the_overflow_slot(table_path):
    t = VersionTable(table_path, 8)  # 7 keyed slots
    try:
        slots = [t.slot(3, ino) for ino in range(20)]
        assert sorted(s for s in slots if s != vt.OVERFLOW_SLOT) == list(range(1, 8))
        assert slots.count(vt.OVERFLOW_SLOT) == 13
        # an inode in the overflow slot still sees every bump of its own
        late = slots.index(vt.OVERFLOW_SLOT)
        before = t.version(t.slot(3, late))
        t.bump_inode(3, late)
        assert t.version(t.slot(3, late)) == before + 1
    finally:
        t.close()


def test_bump_all_bumps_every_claimed_slot_and_the_overflow(table_path):
    t = VersionTable(table_path, 64)
    try:
        slots = {t.slot(2, ino) for ino in range(10)}
        assert t.bump_all() == len(slots) + 1
        assert all(t.version(s) == 1 for s in slots) and t.version(vt.OVERFLOW_SLOT) == 1
        unclaimed = set(range(64)) - slots - {vt.OVERFLOW_SLOT}
        assert all(t.version(s) == 0 for s in unclaimed)
    finally:
        t.close()


def test_not_a_table_is_refused(table_path):
    with open(table_path, "wb") as f:
        f.write(b"something else" * 1000)
    with pytest.raises(VersionTableError, match="not a version table"):
        VersionTable(table_path)


def test_uncreatable_path_is_a_clear_error():
    with pytest.raises(VersionTableError, match="cannot create"):
        VersionTable("/dev/shm/no-such-dir/table")


@pytest.mark.parametrize("text,n", [("65536", 65536), ("64k", 65536), ("1M", 1 << 20)])
def test_parse_slots(text, n):
    assert vt.parse_slots(text) == n


@pytest.mark.parametrize("text", ["", "lots", "1", "1G", "-5"])
def test_parse_slots_refuses(text):
    with pytest.raises(ValueError):
        vt.parse_slots(text)


def test_threads_bumping_one_slot_lose_no_increment(table_path):
    t = VersionTable(table_path, 64)
    s = t.slot(9, 9)
    seen = []

    def bumper():
        mine = [t.bump(s) for _ in range(500)]
        seen.append(mine)

    threads = [threading.Thread(target=bumper) for _ in range(8)]
    try:
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert t.version(s) == 8 * 500
        # every bump returned a distinct new version, and each thread saw its own grow
        allv = [v for mine in seen for v in mine]
        assert sorted(allv) == list(range(1, 4001))
        assert all(mine == sorted(mine) for mine in seen)
    finally:
        t.close()


def _bump_in_child(path, dev, ino, n, q, go):
    t = VersionTable(path)
    s = t.slot(dev, ino)
    go.wait(60)  # all at once
    last = 0
    grew = True
    for _ in range(n):
        v = t.bump(s)
        grew = grew and v > last
        last = v
    t.close()
    q.put(grew)


def test_processes_bumping_one_slot_lose_no_increment(table_path):
    t = VersionTable(table_path, 64)
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    go = ctx.Event()
    procs = [ctx.Process(target=_bump_in_child, args=(table_path, 4, 44, 20000, q, go))
             for _ in range(4)]
    try:
        for p in procs:
            p.start()
        go.set()
        results = [q.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(30)
            assert p.exitcode == 0
        assert results == [True] * 4
        assert t.version(t.slot(4, 44)) == 4 * 20000
    finally:
        t.close()


def _claim_in_child(path, inos, q):
    t = VersionTable(path)
    q.put({ino: t.slot(5, ino) for ino in inos})
    t.close()


def test_processes_claiming_at_once_agree_on_slots(table_path):
    VersionTable(table_path, 256).close()
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    inos = list(range(200))
    procs = [ctx.Process(target=_claim_in_child, args=(table_path, inos[::step], q))
             for step in (1, -1, 1, -1)]
    for p in procs:
        p.start()
    maps = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    merged: dict[int, set] = {}
    for m in maps:
        for ino, s in m.items():
            merged.setdefault(ino, set()).add(s)
    assert all(len(v) == 1 for v in merged.values()), merged
    keyed = [next(iter(v)) for v in merged.values() if next(iter(v)) != vt.OVERFLOW_SLOT]
    assert len(keyed) == len(set(keyed))  # no two inodes in one keyed slot
