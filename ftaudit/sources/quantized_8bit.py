"""bitsandbytes' 8-bit weights (LLM.int8, as transformers saves a model loaded with load_in_8bit), read as the weights
they stand for: what bitsandbytes dequantizes them to, value for value.

Each such matrix X.weight is stored as int8 (X.weight), one scale per row (X.SCB, float32: the row's largest
magnitude) and, from some versions on, the layout of the int8 values (X.weight_format, 0 for plain rows). A value
is int8 × its row's scale × (1/127) in float32, as bitsandbytes' int8_vectorwise_dequant computes it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch

from ftaudit.errors import InvalidWeightsError, UnsupportedError
from ftaudit.sources.checkpoint import Checkpoint
from ftaudit.sources.safetensors import TensorInfo, over

INVERSE_127 = 7.874015718698502e-3
"""1/127 as bitsandbytes writes it."""
ROW_FORMAT = 0
"""weight_format's value for int8 values stored row by row (the others are GPU tile layouts)."""


def dequantize_8bit(weights: Checkpoint, label: str) -> bool:
    """Read each bitsandbytes 8-bit matrix of `weights` as the weights it stands for (`Checkpoint.decode_as`); whether
    there was one."""
    infos = weights.infos
    found = False
    for scales in sorted(n for n in infos if n.endswith(".SCB")):
        module = scales.removesuffix(".SCB")
        weight, layout = f"{module}.weight", f"{module}.weight_format"
        stored, scale = infos.get(weight), infos[scales]
        if stored is None or stored.dtype != "I8" or len(stored.shape) != 2 or scale.dtype != "F32" or (
                math.prod(scale.shape) != stored.shape[0]):
            what = "missing" if stored is None else f"{stored.dtype} {list(stored.shape)}"
            raise InvalidWeightsError(f"{label}: {scales} {scale.dtype} {list(scale.shape)} scales no 8-bit matrix: "
                                      f"{weight} is {what}")
        parts = [weight, scales]
        if layout in infos:
            code = bytes(weights.read_stored(layout, 0, weights.stored_size(layout)))
            if code.rstrip(b"\0") != b"":  # 0 in whatever integer width it is stored in
                raise UnsupportedError(f"{label}: {weight} is stored in a GPU tile layout (weight_format "
                                       f"{int.from_bytes(code, 'little')}), not row by row: pass the full-precision "
                                       "base with --base")
            parts.append(layout)
        info = TensorInfo(weight, "F32", stored.shape, stored.start, stored.end)
        weights.decode_as(weight, info, parts, partial(_dequantized, weight, scales, stored.shape))
        found = True
    return found


def _dequantized(weight: str, scales: str, shape: tuple[int, ...], read: Callable[[str], bytes | bytearray]
                 ) -> torch.Tensor:
    """The float32 matrix that the int8 values `weight` and row scales `scales` (their bytes by name from `read`)
    stand for."""
    out = over(read(weight), torch.int8).view(shape).float()  # one float32 copy, scaled in place
    return out.mul_(over(read(scales), torch.float32).view(-1, 1)).mul_(INVERSE_127)
