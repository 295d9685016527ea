"""bitsandbytes' 4-bit weights (NF4 or FP4), as transformers saves a model loaded with load_in_4bit, read as the
weights they stand for: what bitsandbytes dequantizes them to, value for value.

Each such matrix X.weight is stored as its 4-bit codes, two to a byte, the first in the high nibble (X.weight,
uint8); the 16 values the codes stand for (X.weight.quant_map); one scale for each block of `blocksize` values
(X.weight.absmax); and a JSON description (X.weight.quant_state.bitsandbytes__nf4 or __fp4: the dtype, shape and
blocksize). With double quantization (bnb_4bit_use_double_quant) the scales are themselves 8-bit codes, standing for
the values of X.weight.nested_quant_map, scaled by X.weight.nested_absmax for each block of `nested_blocksize`, plus
`nested_offset`. Every value is computed as bitsandbytes computes it: code value × scale in float32, then rounded once
to the matrix's dtype.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeGuard

import torch

from ftaudit.errors import InvalidWeightsError
from ftaudit.sources.checkpoint import Checkpoint
from ftaudit.sources.fingerprint import READERS
from ftaudit.sources.safetensors import FLOAT_DTYPES, TensorInfo, over

QUANT_STATE = re.compile(r"^(?P<weight>.+)\.quant_state\.bitsandbytes__(?P<kind>nf4|fp4)$")
"""The name of a 4-bit matrix's JSON description: its weight's name, and the kind of codes."""
DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
"""The dtypes a 4-bit matrix stands for, as its description names them, by their safetensors names."""
CHUNK = 1 << 20
"""Values dequantized at a time (a whole number of blocks and of bytes), so that no float32 copy of a whole matrix is
made."""


def dequantize_4bit(weights: Checkpoint, label: str) -> list[str]:
    """Read each bitsandbytes 4-bit matrix of `weights` as the weights it stands for (`Checkpoint.decode_as`); the kinds
    of codes found ("fp4", "nf4"), none where there is no such matrix."""
    infos = weights.infos
    described = {name: found for name in sorted(infos) if (found := QUANT_STATE.match(name))}
    with ThreadPoolExecutor(max_workers=READERS, thread_name_prefix="ftaudit-4bit") as pool:  # small reads, maybe remote
        states = pool.map(lambda name: _state(weights, name, label), described)
    kinds: set[str] = set()
    for (state_name, found), state in zip(described.items(), states):
        weight = found["weight"]
        parts = {part: f"{weight}.{part}" for part in ("absmax", "quant_map", "nested_absmax", "nested_quant_map")}
        parts = {part: name for part, name in parts.items() if name in infos}
        info = _checked(infos, weight, parts, state, f"{label}: {weight}")
        weights.decode_as(weight, info, [weight, state_name, *parts.values()], partial(_dequantized, weight, parts, state))
        kinds.add(found["kind"])
    return sorted(kinds)


def _state(weights: Checkpoint, name: str, label: str) -> dict[str, Any]:
    """The JSON description stored as tensor `name` (its UTF-8 bytes, as uint8)."""
    size = weights.stored_size(name)
    try:
        state = json.loads(bytes(weights.read_stored(name, 0, size)).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise InvalidWeightsError(f"{label}: {name} is not the JSON description of a 4-bit matrix") from None
    if not isinstance(state, dict):
        raise InvalidWeightsError(f"{label}: {name} is not the JSON description of a 4-bit matrix")
    return state


def _checked(infos: dict[str, TensorInfo], weight: str, parts: dict[str, str], state: dict[str, Any],
             label: str) -> TensorInfo:
    """The entry of the matrix that 4-bit matrix `weight` stands for; InvalidWeightsError where its stored parts and
    description do not fit one another."""
    shape, dtype, blocksize = state.get("shape"), state.get("dtype"), state.get("blocksize")
    if not (isinstance(shape, list) and len(shape) == 2 and all(_positive(n) for n in shape) and dtype in DTYPES
            and _positive(blocksize)):
        raise InvalidWeightsError(f"{label}: its 4-bit description does not give a 2-D shape, a float dtype "
                                  f"(bfloat16, float16, float32) and a block size ({state!r:.200})")
    count = math.prod(shape)
    nested = "nested_absmax" in parts or "nested_quant_map" in parts
    expected = {"absmax": ("U8" if nested else "F32", math.ceil(count / blocksize)), "quant_map": ("F32", 16)}
    if nested:
        nested_blocksize = state.get("nested_blocksize")
        if not (_positive(nested_blocksize) and isinstance(state.get("nested_offset"), (int, float))):
            raise InvalidWeightsError(f"{label}: its 4-bit description gives no nested block size and offset")
        blocks = expected["absmax"][1]
        expected |= {"nested_absmax": ("F32", math.ceil(blocks / nested_blocksize)), "nested_quant_map": ("F32", 256)}
    stored = {"weight": weight, **parts}
    for part, (kind, size) in {"weight": ("U8", math.ceil(count / 2)), **expected}.items():
        info = infos.get(stored.get(part, ""))
        if info is None or info.dtype != kind or math.prod(info.shape) != size:
            found = "missing" if info is None else f"{info.dtype} {list(info.shape)}"
            raise InvalidWeightsError(f"{label}: its 4-bit {part} is {found}, not {size} values of {kind} for a "
                                      f"{shape} matrix in blocks of {blocksize}")
    packed = infos[weight]
    return TensorInfo(weight, DTYPES[dtype], (shape[0], shape[1]), packed.start, packed.end)


def _positive(n: object) -> TypeGuard[int]:
    return isinstance(n, int) and not isinstance(n, bool) and n > 0


def _dequantized(weight: str, parts: dict[str, str], state: dict[str, Any],
                 read: Callable[[str], bytes | bytearray]) -> torch.Tensor:
    """The matrix that the stored parts of 4-bit matrix `weight` (their bytes by name from `read`) stand for."""
    def stored(name: str, dtype: torch.dtype) -> torch.Tensor:
        return over(read(name), dtype)

    scales = stored(parts["absmax"], torch.uint8 if "nested_absmax" in parts else torch.float32)
    if "nested_absmax" in parts:
        nested_code = stored(parts["nested_quant_map"], torch.float32)
        scales = _scaled(nested_code.index_select(0, scales.int()), stored(parts["nested_absmax"], torch.float32),
                         state["nested_blocksize"])
        scales += torch.tensor(float(state["nested_offset"]), dtype=torch.float32)
    code = stored(parts["quant_map"], torch.float32)
    pairs = torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=1)  # byte b: code[b >> 4], code[b & 15]
    packed = stored(weight, torch.uint8)
    rows, cols = state["shape"]
    count, blocksize = rows * cols, state["blocksize"]
    out = torch.empty(count, dtype=FLOAT_DTYPES[DTYPES[state["dtype"]]])
    step = max(1, CHUNK // (2 * blocksize)) * 2 * blocksize  # whole blocks and whole bytes
    for start in range(0, count, step):
        length = min(step, count - start)
        values = pairs.index_select(0, packed[start // 2 : (start + length + 1) // 2].int()).view(-1)[:length]
        out[start : start + length] = _scaled(values, scales[start // blocksize :], blocksize)
    return out.view(rows, cols)


def _scaled(values: torch.Tensor, scales: torch.Tensor, blocksize: int) -> torch.Tensor:
    """`values` (float32), each block of `blocksize` times its scale, the first of `scales`' for the first block."""
    full = values.numel() // blocksize * blocksize
    out = (values[:full].view(-1, blocksize) * scales[: full // blocksize, None]).view(-1)
    return torch.cat([out, values[full:] * scales[full // blocksize]]) if full < values.numel() else out
