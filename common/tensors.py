"""Model tensors on the wire and on disk, without pickle.

Checkpoints are safetensors files (a JSON header plus raw buffers: loading one can never
execute code). Updates travel as one flat little-endian float32 vector whose layout is
given by a list of :class:`TensorSpec`; the receiver checks the list against the global
model's before it trusts a single byte of the payload.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from common.errors import InvalidUpdateError

# Only float32 tensors are exchanged: the models keep their state in float32 and a single
# dtype keeps the flat-vector layout trivial to check.
WIRE_DTYPE = "float32"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str = WIRE_DTYPE

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def specs_of(state: Mapping[str, torch.Tensor]) -> list[TensorSpec]:
    """The wire layout of ``state``: its tensors in the model's own order."""
    specs = []
    for name, tensor in state.items():
        if tensor.dtype != torch.float32:
            raise InvalidUpdateError(f"tensor {name!r} has dtype {tensor.dtype}, expected float32")
        specs.append(TensorSpec(name, tuple(int(d) for d in tensor.shape)))
    return specs


def in_order(state: Mapping[str, torch.Tensor], names: Sequence[str]) -> dict[str, torch.Tensor]:
    """``state`` re-keyed into ``names`` order (the model's own order, which is the wire
    layout); safetensors files store tensors in their own order."""
    if set(state) != set(names):
        missing = sorted(set(names) - set(state))[:3]
        extra = sorted(set(state) - set(names))[:3]
        raise InvalidUpdateError(
            f"state does not match the model: missing {missing}, unexpected {extra}"
        )
    return {name: state[name] for name in names}


def total_numel(specs: Sequence[TensorSpec]) -> int:
    return sum(s.numel for s in specs)


def check_specs(got: Sequence[TensorSpec], expected: Sequence[TensorSpec]) -> None:
    """Raise :class:`InvalidUpdateError` naming the first tensor that differs."""
    if len(got) != len(expected):
        raise InvalidUpdateError(f"update has {len(got)} tensors, the model has {len(expected)}")
    for g, e in zip(got, expected, strict=True):
        if g.name != e.name:
            raise InvalidUpdateError(f"tensor name {g.name!r} where the model has {e.name!r}")
        if g.shape != e.shape:
            raise InvalidUpdateError(f"tensor {g.name!r} has shape {g.shape}, expected {e.shape}")
        if g.dtype != e.dtype:
            raise InvalidUpdateError(f"tensor {g.name!r} has dtype {g.dtype}, expected {e.dtype}")


def flatten(state: Mapping[str, torch.Tensor]) -> np.ndarray:
    """Concatenate ``state`` into one float32 vector in spec order (a copy)."""
    parts = [t.detach().reshape(-1).to(torch.float32).cpu().numpy() for t in state.values()]
    if not parts:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate(parts).astype(np.float32, copy=False)


def unflatten(vector: np.ndarray, specs: Sequence[TensorSpec]) -> dict[str, torch.Tensor]:
    """Split a flat vector back into named tensors (views are copied so they own memory)."""
    if vector.shape != (total_numel(specs),):
        raise InvalidUpdateError(
            f"vector has {vector.size} values, the layout needs {total_numel(specs)}"
        )
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for spec in specs:
        chunk = vector[offset : offset + spec.numel]
        out[spec.name] = torch.from_numpy(np.array(chunk, dtype=np.float32).reshape(spec.shape))
        offset += spec.numel
    return out


def decode_f32le(
    payload: bytes | bytearray | memoryview, specs: Sequence[TensorSpec]
) -> np.ndarray:
    """Decode an ``f32le`` update payload, refusing a wrong length or any NaN/Inf."""
    expected = total_numel(specs) * 4
    if len(payload) != expected:
        raise InvalidUpdateError(f"payload is {len(payload)} bytes, the layout needs {expected}")
    vector = np.frombuffer(payload, dtype="<f4").astype(np.float32)
    if not np.isfinite(vector).all():
        bad = int((~np.isfinite(vector)).sum())
        raise InvalidUpdateError(f"update contains {bad} NaN or infinite values")
    return vector


def encode_f32le(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype="<f4").tobytes()


def checkpoint_bytes(state: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    """Serialise a model state as safetensors bytes (deterministic for equal inputs)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    raw = bytes(st_save(tensors, metadata=dict(metadata)))
    # safetensors writes its JSON header in hash-map order, so equal models could get
    # different bytes and thus different content addresses: re-emit it with sorted keys.
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    canonical = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    canonical += b" " * (-len(canonical) % 8)  # the format pads the header to 8 bytes
    return struct.pack("<Q", len(canonical)) + canonical + raw[8 + header_len :]


def _read_safetensors_metadata(data: bytes) -> dict[str, str]:
    if len(data) < 8:
        raise InvalidUpdateError("checkpoint is truncated")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > len(data) - 8:
        raise InvalidUpdateError("checkpoint header is truncated")
    header = json.loads(data[8 : 8 + header_len])
    meta = header.get("__metadata__", {}) or {}
    return {str(k): str(v) for k, v in meta.items()}


def load_checkpoint_bytes(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Parse safetensors bytes into (state, metadata); never unpickles anything."""
    try:
        state = st_load(data)
        metadata = _read_safetensors_metadata(data)
    except InvalidUpdateError:
        raise
    except Exception as exc:  # safetensors raises its own error types
        raise InvalidUpdateError(f"not a valid safetensors checkpoint: {exc}") from exc
    return dict(state), metadata


def load_checkpoint_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    return load_checkpoint_bytes(Path(path).read_bytes())
