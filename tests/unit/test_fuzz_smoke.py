"""A bounded run of the fuzz target (fuzz/fuzz_fuse_decoder.py) without atheris: 2000
seeded random inputs through the FUSE decoder and the ring walker, in-process.  No exception
may escape and the server may log no traceback; the inputs must reach past the decoder (many
opcodes answered with success, chains walked off rings), and the target's own checks must
catch a server that misbehaves."""

from __future__ import annotations

import importlib.util
import struct
from pathlib import Path

import pytest

from pyvirtiofs.fuse.abi import Opcode

FUZZ = Path(__file__).resolve().parents[2] / "fuzz" / "fuzz_fuse_decoder.py"


def _load():
    spec = importlib.util.spec_from_file_location("fuzz_fuse_decoder", FUZZ)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def fz_target():
    fz = _load()
    t = fz.Target()
    yield fz, t
    t.close()


def test_fuzz_target_2000_inputs(fz_target):
    fz, t = fz_target
    assert fz.run_random(2000, seed=20251125, t=t) == 2000
    assert t.iterations == 2000
    assert not t.catcher.records
    succeeded = {op for (op, err) in t.replies if err == 0}
    assert len(succeeded) >= 12, f"only {sorted(succeeded)} ever succeeded"
    assert {Opcode.GETATTR, Opcode.READ, Opcode.SETATTR, Opcode.READDIRPLUS} <= succeeded
    assert t.ring_chains >= 500, "the ring half of the target served almost no chain"


def test_fuzz_target_catches_a_reply_with_the_wrong_unique(fz_target, monkeypatch):
    fz, t = fz_target

    class WrongUnique:
        """The server, but its replies carry another unique (a compiled FuseServer's methods
        cannot be patched on the instance: the target gets this wrapper instead)."""
        def __init__(self, server):
            self.server = server

        def serve_request(self, chain, *a):
            n = self.server.serve_request(chain, *a)
            if n >= 16:
                struct.pack_into("<Q", chain.writable[0], 8, 0xBAD)  # out header's unique
            return n

        def __getattr__(self, name):
            return getattr(self.server, name)
    monkeypatch.setattr(t, "server", WrongUnique(t.server))
    with pytest.raises(fz.Crash, match="unique"):
        fz.run_random(200, seed=1, t=t)


def test_fuzz_target_catches_an_internal_error(fz_target, monkeypatch):
    fz, t = fz_target

    def broken_getattr(*a):
        raise RuntimeError("a bug in the file system")
    monkeypatch.setattr(t.fs, "getattr", broken_getattr)
    with pytest.raises(fz.Crash, match="traceback"):
        fz.run_random(500, seed=2, t=t)


def test_fuzz_target_entry_point_takes_any_bytes():
    """TestOneInput (what atheris calls) on edge inputs: empty, all zeros, all ones."""
    fz = _load()
    try:
        for data in (b"", b"\0" * 1000, b"\xff" * 1000, bytes(range(256)) * 4):
            fz.TestOneInput(data)
        assert fz._target.iterations == 4
    finally:
        if fz._target is not None:
            fz._target.close()
