"""A small, fast GGUF (v2/v3) parser over a memory map, and torch dequantization of common types.

Why not ``gguf.GGUFReader``: it builds a numpy view per array element, so SmolLM2's 49k tokens and
49k merges take ~3 s to parse; this parser reads them with ``struct`` in ~0.1 s. Tensor bytes
stay in the memory map until dequantized. Q4_0/Q4_1/Q8_0 and float types dequantize in torch
(vectorized, ~5x faster than gguf.quants); any other type falls back to ``gguf.quants``.
Any inconsistency (bad magic, truncated header or data) raises ``GGUFError``.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


class GGUFError(ValueError):
    pass


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
STRING, ARRAY = 8, 9
F32, F16, Q4_0, Q4_1, Q8_0, BF16 = 0, 1, 2, 3, 8, 30


@dataclass
class GGUFTensor:
    name: str
    shape: tuple[int, ...]   # HF orientation (GGUF dims reversed): [rows, cols]
    ggml_type: int
    data: np.ndarray         # raw bytes (uint8) in the memory map


class GGUFFile:
    def __init__(self, path: str) -> None:
        self.path = path
        with open(path, "rb") as f:
            try:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError as e:  # empty file
                raise GGUFError(f"cannot map {path}: {e}") from e
        self._pos = 0
        try:
            self._parse()
        except (struct.error, UnicodeDecodeError, IndexError, OverflowError) as e:
            raise GGUFError(f"truncated or corrupt header ({type(e).__name__}: {e})") from e

    def _parse(self) -> None:
        if self._mm[:4] != b"GGUF":
            raise GGUFError("bad magic (not a GGUF file)")
        self._pos = 4
        version = self._scalar(4)
        if version not in (2, 3):
            raise GGUFError(f"unsupported GGUF version {version}")
        n_tensors, n_kv = self._scalar(10), self._scalar(10)
        if n_tensors > 1 << 20 or n_kv > 1 << 20:
            raise GGUFError(f"implausible counts ({n_tensors} tensors, {n_kv} keys)")
        self.fields: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            self.fields[key] = self._value(self._scalar(4))
        infos = [self._tensor_info() for _ in range(n_tensors)]
        align = int(self.fields.get("general.alignment", 32))
        data_start = (self._pos + align - 1) // align * align
        self.tensors = [self._tensor(name, dims, kind, data_start + off) for name, dims, kind, off in infos]

    def _scalar(self, kind: int) -> Any:
        fmt = _SCALARS[kind]
        (v,) = struct.unpack_from(fmt, self._mm, self._pos)
        self._pos += struct.calcsize(fmt)
        return v

    def _string(self) -> str:
        n = self._scalar(10)
        if self._pos + n > len(self._mm):
            raise GGUFError("string runs past the end of the file")
        s = self._mm[self._pos:self._pos + n].decode("utf-8")
        self._pos += n
        return s

    def _value(self, kind: int) -> Any:
        if kind == STRING:
            return self._string()
        if kind == ARRAY:
            item, count = self._scalar(4), self._scalar(10)
            if item == STRING:
                return [self._string() for _ in range(count)]
            if item in _NUMPY:
                arr = np.frombuffer(self._mm, dtype=_NUMPY[item], count=count, offset=self._pos)
                self._pos += arr.nbytes
                return arr.tolist()
            return [self._value(item) for _ in range(count)]
        if kind not in _SCALARS:
            raise GGUFError(f"unknown metadata value type {kind}")
        return self._scalar(kind)

    def _tensor_info(self) -> tuple[str, tuple[int, ...], int, int]:
        name = self._string()
        n_dims = self._scalar(4)
        dims = tuple(self._scalar(10) for _ in range(n_dims))
        return name, dims, self._scalar(4), self._scalar(10)

    def _tensor(self, name: str, dims: tuple[int, ...], kind: int, start: int) -> GGUFTensor:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
        except (ValueError, KeyError) as e:
            raise GGUFError(f"tensor {name}: unknown ggml type {kind}") from e
        n = int(np.prod(dims)) if dims else 1
        nbytes = n // block * type_size
        if start + nbytes > len(self._mm):
            raise GGUFError(f"tensor {name} runs past the end of the file (truncated download?)")
        data = np.frombuffer(self._mm, dtype=np.uint8, count=nbytes, offset=start)
        return GGUFTensor(name, tuple(reversed(dims)), kind, data)

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)


def dequantize(t: GGUFTensor, dtype: torch.dtype) -> torch.Tensor:
    """The tensor as ``dtype`` in HF orientation ``t.shape``."""
    raw = torch.frombuffer(bytearray(t.data), dtype=torch.uint8) if t.ggml_type not in (F32, F16, BF16) else None
    if t.ggml_type == F32:
        out = torch.from_numpy(t.data.view(np.float32).copy())
    elif t.ggml_type == F16:
        out = torch.from_numpy(t.data.view(np.float16).copy())
    elif t.ggml_type == BF16:
        out = torch.from_numpy(t.data.view(np.int16).copy()).view(torch.bfloat16)
    elif t.ggml_type == Q8_0:
        blocks = raw.view(-1, 34)  # [n_blocks, f16 d | 32 x int8]
        d = blocks[:, :2].contiguous().view(torch.float16).float()
        out = d * blocks[:, 2:].contiguous().view(torch.int8).float()
    elif t.ggml_type in (Q4_0, Q4_1):
        head = 2 if t.ggml_type == Q4_0 else 4  # f16 d (, f16 m)
        blocks = raw.view(-1, head + 16)
        scales = blocks[:, :head].contiguous().view(torch.float16).float()  # [n_blocks, 1 or 2]
        qs = blocks[:, head:]
        q = torch.cat([qs & 0x0F, qs >> 4], dim=1).float()  # [n_blocks, 32]: low nibbles, then high
        out = scales[:, :1] * (q - 8) if t.ggml_type == Q4_0 else scales[:, :1] * q + scales[:, 1:2]
    else:
        from gguf.quants import dequantize as gguf_dequantize
        rows = t.data.reshape(-1, t.data.size // max(1, int(np.prod(t.shape[:-1]))))
        out = torch.from_numpy(np.ascontiguousarray(gguf_dequantize(rows, t.ggml_type)))
    return out.reshape(t.shape).to(dtype)
