"""The safetensors format: header parsing, complete validation, tensor decoding, and headers to write.

Layout: 8-byte little-endian header length N, N bytes of JSON, then the data. Every tensor entry
is checked (dtype, shape, offsets, sizes, coverage of the data) before any byte of data is used.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass

import torch

from ftaudit.errors import InvalidWeightsError

MAX_HEADER_BYTES = 100_000_000
"""Headers larger than this are refused (the reference implementation uses the same cap)."""

ITEM_BITS: dict[str, int] = {
    "F64": 64, "F32": 32, "F16": 16, "BF16": 16,
    "I64": 64, "I32": 32, "I16": 16, "I8": 8,
    "U64": 64, "U32": 32, "U16": 16, "U8": 8, "BOOL": 8,
    "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "C64": 64,
    "F6_E2M3": 6, "F6_E3M2": 6, "F4": 4,
}
"""Every dtype the format defines, by its size in bits: a tensor of sub-byte values fills whole bytes."""

FLOAT_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
}
"""Dtypes whose matrices ftaudit analyses."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in its file: absolute byte range, dtype and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    def part(self, index: int) -> TensorInfo:
        """The entry of `tensor[index]` along the first dimension: a contiguous part of the byte range."""
        size = self.nbytes // self.shape[0]
        start = self.start + index * size
        return TensorInfo(self.name, self.dtype, self.shape[1:], start, start + size)


@dataclass(frozen=True)
class Header:
    """A validated safetensors header."""

    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int


def encode_header(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The length prefix and header of a file holding the float `tensors`' bytes back to back, in order."""
    names = {dtype: name for name, dtype in FLOAT_DTYPES.items()}
    entries = [(name, names[t.dtype], tuple(t.shape), t.numel() * t.element_size()) for name, t in tensors.items()]
    return _encoded({"__metadata__": metadata}, 0, entries)


def appended_header(header: Header, added: list[TensorInfo]) -> bytes:
    """The length prefix and header of a file holding `header`'s tensors, in data order, then the tensors `added`
    (their dtypes, shapes and sizes) back to back."""
    entries: dict[str, object] = {"__metadata__": header.metadata} if header.metadata else {}
    end = 0
    for info in sorted(header.tensors.values(), key=lambda t: t.start):
        end = info.end - header.data_start
        entries[info.name] = {"dtype": info.dtype, "shape": list(info.shape),
                              "data_offsets": [info.start - header.data_start, end]}
    return _encoded(entries, end, [(info.name, info.dtype, info.shape, info.nbytes) for info in added])


def _encoded(entries: dict[str, object], offset: int, added: list[tuple[str, str, tuple[int, ...], int]]) -> bytes:
    """The length prefix and header of `entries`, then of the tensors `added` (name, dtype, shape, size) from data
    offset `offset` on."""
    for name, dtype, shape, size in added:
        entries[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    return struct.pack("<Q", len(text)) + text


def header_length(prefix: bytes | bytearray, file_size: int, label: str) -> int:
    """Read and check the 8-byte header length against the file size."""
    if file_size < 8 or len(prefix) < 8:
        raise InvalidWeightsError(f"{label}: truncated safetensors file ({file_size} bytes, no header)")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n < 2 or n > MAX_HEADER_BYTES:
        raise InvalidWeightsError(f"{label}: implausible safetensors header length {n} bytes")
    if 8 + n > file_size:
        raise InvalidWeightsError(
            f"{label}: truncated safetensors file (header of {n} bytes, file of {file_size} bytes)"
        )
    return n


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise InvalidWeightsError(f"duplicate key {key!r} in safetensors header")
        out[key] = value
    return out


def parse_header(raw: bytes | bytearray, file_size: int, label: str) -> Header:
    """Parse and completely validate header JSON `raw` of a file of `file_size` bytes."""
    data_start = 8 + len(raw)
    data_len = file_size - data_start
    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except InvalidWeightsError as e:
        raise InvalidWeightsError(f"{label}: {e}") from None
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise InvalidWeightsError(f"{label}: safetensors header is not valid JSON") from None
    if not isinstance(doc, dict):
        raise InvalidWeightsError(f"{label}: safetensors header is not a JSON object")
    if _has_lone_surrogate(doc):
        raise InvalidWeightsError(f"{label}: safetensors header holds a lone surrogate (a \\uD800-\\uDFFF escape "
                                  "that is no Unicode text) in a name or string")
    metadata = doc.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise InvalidWeightsError(f"{label}: __metadata__ must map strings to strings")
    tensors = {name: _tensor_info(name, entry, data_start, label) for name, entry in doc.items()}
    _check_coverage(tensors, data_start, data_len, label)
    return Header(tensors=tensors, metadata=metadata, data_start=data_start)


def _has_lone_surrogate(doc: dict[str, object]) -> bool:
    """Whether a string of the parsed header holds a lone surrogate (JSON's escapes allow one; UTF-8 cannot hold it)."""
    try:
        json.dumps(doc, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _tensor_info(name: str, entry: object, data_start: int, label: str) -> TensorInfo:
    where = f"{label}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise InvalidWeightsError(f"{where}: entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in ITEM_BITS:
        raise InvalidWeightsError(f"{where}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise InvalidWeightsError(f"{where}: shape must be a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise InvalidWeightsError(f"{where}: data_offsets must be two non-negative integers")
    begin, end = offsets
    if begin > end:
        raise InvalidWeightsError(f"{where}: data_offsets end before they begin")
    bits = math.prod(shape) * ITEM_BITS[dtype]
    if bits % 8:
        raise InvalidWeightsError(f"{where}: {dtype} {shape} is not a whole number of bytes")
    expected = bits // 8
    if end - begin != expected:
        raise InvalidWeightsError(
            f"{where}: holds {end - begin} bytes but {dtype} {shape} needs {expected}"
        )
    return TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end)


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _check_coverage(tensors: dict[str, TensorInfo], data_start: int, data_len: int, label: str) -> None:
    """Tensors must tile the data exactly: in order, without overlap, gap or overrun."""
    cursor = data_start
    for info in sorted(tensors.values(), key=lambda t: (t.start, t.end)):
        if info.start < cursor:
            raise InvalidWeightsError(f"{label}: tensor {info.name!r} overlaps another tensor")
        if info.start > cursor:
            raise InvalidWeightsError(f"{label}: unused bytes before tensor {info.name!r}")
        cursor = info.end
    if cursor - data_start > data_len:
        raise InvalidWeightsError(
            f"{label}: truncated safetensors file (tensors need {cursor - data_start} bytes of data, "
            f"the file has {data_len})"
        )
    if cursor - data_start < data_len:
        raise InvalidWeightsError(f"{label}: {data_len - (cursor - data_start)} unused bytes after the last tensor")


def over(buf: bytes | bytearray, dtype: torch.dtype) -> torch.Tensor:
    """A 1-D CPU tensor of `dtype` over a bytearray's own memory (bytes are copied first)."""
    return torch.frombuffer(buf if isinstance(buf, bytearray) else bytearray(buf), dtype=dtype)


def decode(buf: bytes | bytearray, info: TensorInfo) -> torch.Tensor:
    """Turn the raw bytes of a floating-point tensor into a CPU tensor of its stored dtype
    (over a bytearray's own memory; bytes are copied first)."""
    if len(buf) != info.nbytes:
        raise InvalidWeightsError(f"tensor {info.name!r}: got {len(buf)} bytes, expected {info.nbytes}")
    dtype = FLOAT_DTYPES.get(info.dtype)
    if dtype is None:
        raise InvalidWeightsError(f"tensor {info.name!r}: dtype {info.dtype} is not a float dtype")
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=dtype)
    return over(buf, dtype).reshape(info.shape)
