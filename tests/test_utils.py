"""lightning_eff.utils: the shared checks, the seed derivation and atomic writes."""

from __future__ import annotations

import hashlib
import os
import stat

import pytest

from lightning_eff.utils.checks import check_choice, check_float, check_int, check_optional_int
from lightning_eff.utils.io import atomic_write_bytes, atomic_write_text
from lightning_eff.utils.seeding import derive_seed


def test_check_int_types_and_ranges():
    assert check_int(3, "n", minimum=1, maximum=3) == 3
    with pytest.raises(TypeError, match=r"Owner: `n` must be an int, got True"):
        check_int(True, "n", owner="Owner")
    with pytest.raises(TypeError):
        check_int(2.0, "n")
    with pytest.raises(ValueError, match=r"`n` must be an int in \[1, 3\], got 4"):
        check_int(4, "n", minimum=1, maximum=3)
    with pytest.raises(ValueError, match=r">= 1"):
        check_int(0, "n", minimum=1)
    assert check_optional_int(None, "n", minimum=1) is None


def test_check_float_and_choice():
    assert check_float(1, "lr", low=0.0, low_open=True) == 1.0
    for bad in (float("nan"), float("inf"), True, "1"):
        with pytest.raises(TypeError):
            check_float(bad, "lr")
    with pytest.raises(ValueError, match=r"\(0.0, 1.0\]"):
        check_float(0.0, "p", low=0.0, high=1.0, low_open=True)
    assert check_choice("a", "x", ("a", "b")) == "a"
    with pytest.raises(ValueError, match="one of"):
        check_choice(True, "x", (1, 2))  # a bool is not the int 1
    with pytest.raises(ValueError):
        check_choice("c", "x", ("a", "b"))


def test_derive_seed_is_the_blake2b_digest_written_directly():
    parts = (7, "student", 2)
    expected = int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") % 2**62
    assert derive_seed(*parts) == expected
    assert derive_seed(7, "student", 2) != derive_seed(7, "student", 3)


def test_atomic_write_permissions_and_no_temp_left(tmp_path):
    path = atomic_write_text(tmp_path / "sub" / "a.json", '{"x": 1}')
    assert path.read_text() == '{"x": 1}'
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.json"]

    with pytest.raises(TypeError):
        atomic_write_bytes(tmp_path / "sub" / "b.bin", object())  # type: ignore[arg-type]
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.json"]  # the failed write left nothing
