"""Wire and checkpoint encoding of model tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.errors import InvalidUpdateError
from common.tensors import (
    TensorSpec,
    check_specs,
    checkpoint_bytes,
    decode_f32le,
    encode_f32le,
    flatten,
    in_order,
    load_checkpoint_bytes,
    specs_of,
    unflatten,
)


def state():
    g = torch.Generator().manual_seed(0)
    return {"b.weight": torch.randn(3, 2, generator=g), "a.bias": torch.randn(4, generator=g)}


def test_flatten_unflatten_roundtrip_keeps_model_order():
    s = state()
    specs = specs_of(s)
    assert [p.name for p in specs] == ["b.weight", "a.bias"]
    vec = flatten(s)
    assert vec.dtype == np.float32 and vec.shape == (10,)
    back = unflatten(vec, specs)
    for k in s:
        assert torch.equal(back[k], s[k])


def test_checkpoint_bytes_are_deterministic_and_roundtrip():
    s = state()
    meta = {f"k{i}": str(i) for i in range(8)}
    blobs = {checkpoint_bytes(s, meta) for _ in range(50)}
    assert len(blobs) == 1, "equal models must serialise to equal bytes (content addressing)"
    loaded, loaded_meta = load_checkpoint_bytes(blobs.pop())
    assert loaded_meta == meta
    assert all(torch.equal(loaded[k], s[k]) for k in s)


def test_decode_refuses_wrong_length_and_non_finite_values():
    specs = specs_of(state())
    good = encode_f32le(np.zeros(10, np.float32))
    assert decode_f32le(good, specs).shape == (10,)
    with pytest.raises(InvalidUpdateError, match="bytes"):
        decode_f32le(good[:-1], specs)
    bad = np.zeros(10, np.float32)
    bad[3] = np.nan
    with pytest.raises(InvalidUpdateError, match="NaN"):
        decode_f32le(encode_f32le(bad), specs)


def test_spec_checks_name_the_first_difference():
    specs = specs_of(state())
    check_specs(specs, specs)
    with pytest.raises(InvalidUpdateError, match="name"):
        check_specs([TensorSpec("x", (3, 2)), specs[1]], specs)
    with pytest.raises(InvalidUpdateError, match="shape"):
        check_specs([TensorSpec("b.weight", (2, 3)), specs[1]], specs)
    with pytest.raises(InvalidUpdateError, match="dtype"):
        check_specs([TensorSpec("b.weight", (3, 2), "float64"), specs[1]], specs)
    with pytest.raises(InvalidUpdateError, match="tensors"):
        check_specs(specs[:1], specs)


def test_garbage_is_not_a_checkpoint_and_reordering_checks_keys():
    with pytest.raises(InvalidUpdateError):
        load_checkpoint_bytes(b"\x80\x04pickle-ish garbage")
    with pytest.raises(InvalidUpdateError, match="missing"):
        in_order(state(), ["b.weight", "a.bias", "c"])
