"""Subnormal floats flushed to zero inside polyfid.numerics.flush_denormals, and only there."""

from __future__ import annotations

import pytest
import torch
from conftest import needs_ftz

from polyfid.numerics import flush_denormals, flushing_denormals

SUBNORMAL = 1e-39  # below float32's smallest normal number, 1.18e-38


def test_subnormals_survive_by_default() -> None:
    assert not flushing_denormals()
    assert float(torch.tensor([SUBNORMAL]) * 1.0) > 0.0


@needs_ftz
def test_flushing_inside_the_block_only() -> None:
    with flush_denormals() as on:
        assert on and flushing_denormals()
        assert float(torch.tensor([SUBNORMAL]) * 1.0) == 0.0
        x = torch.tensor([1e-30]) * torch.tensor([1e-10])  # a product landing in the subnormal range
        assert float(x) == 0.0
    assert not flushing_denormals()
    assert float(torch.tensor([SUBNORMAL]) * 1.0) > 0.0


@needs_ftz
def test_disabled_block_and_nesting_keep_the_mode_they_found() -> None:
    with flush_denormals(False) as on:
        assert not on and not flushing_denormals()
    with flush_denormals():
        with flush_denormals() as inner:
            assert inner
        assert flushing_denormals()  # the inner block found flushing on and left it on
        with flush_denormals(False) as off:
            assert off  # disabled changes nothing: flushing stays as found
    assert not flushing_denormals()


@needs_ftz
def test_restored_after_an_exception() -> None:
    with pytest.raises(RuntimeError), flush_denormals():
        raise RuntimeError("inside")
    assert not flushing_denormals()
