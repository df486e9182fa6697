"""A bounded run of the fuzz target (fuzz/fuzz_fuse_decoder.py) without atheris: 2000
seeded random inputs through the FUSE decoder and the ring walker, in-process; no exception
may escape and the server may log no traceback."""

from __future__ import annotations

import importlib.util
from pathlib import Path

FUZZ = Path(__file__).resolve().parents[2] / "fuzz" / "fuzz_fuse_decoder.py"


def _load():
    spec = importlib.util.spec_from_file_location("fuzz_fuse_decoder", FUZZ)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_fuzz_target_2000_inputs():
    fz = _load()
    t = fz.Target()
    try:
        assert fz.run_random(2000, seed=20251125, t=t) == 2000
        assert t.iterations == 2000
        assert not t.catcher.records
    finally:
        t.close()


def test_fuzz_target_entry_point_takes_any_bytes():
    """TestOneInput (what atheris calls) on edge inputs: empty, all zeros, all ones."""
    fz = _load()
    try:
        for data in (b"", b"\0" * 1000, b"\xff" * 1000, bytes(range(256)) * 4):
            fz.TestOneInput(data)
    finally:
        if fz._target is not None:
            fz._target.close()
