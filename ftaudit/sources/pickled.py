"""Pickle checkpoints (pytorch_model.bin), read only when asked, with torch.load(weights_only=True).

A pickle can run code when loaded; `weights_only=True` restricts unpickling to tensors and plain
containers. Files are memory-mapped where the format allows, so tensors are still read one at a time.
"""

from __future__ import annotations

import pickle
import warnings

import torch

from ftaudit.errors import InvalidWeightsError
from ftaudit.sources.checkpoint import LFS_POINTER, lfs_pointer
from ftaudit.sources.local import cannot_read
from ftaudit.sources.safetensors import TensorInfo
from ftaudit.sources.storage import Storage

_TORCH_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu", "C64": "complex64",
}
DTYPE_CODES = {getattr(torch, name): code for code, name in _TORCH_NAMES.items() if hasattr(torch, name)}
"""Torch dtypes by the safetensors name of the same values (those this torch has), so that a tensor is described alike
in either format."""


class PickleCheckpoint:
    """The tensors of one or more pickle files, loaded lazily through mmap."""

    def __init__(self, storage: Storage, files: list[str]) -> None:
        self._tensors: dict[str, torch.Tensor] = {}
        self.copies: dict[str, str] = {}
        """Tensors read as the one whose values they hold (tie)."""
        self.aliases: dict[str, str] = {}
        """Names that a tensor not stored under them is read under too (alias)."""
        for name in files:
            for key, value in _load(storage, name).items():
                if isinstance(value, torch.Tensor):
                    self._tensors[key] = value

    @property
    def infos(self) -> dict[str, TensorInfo]:
        return {
            n: TensorInfo(n, DTYPE_CODES.get(t.dtype, str(t.dtype)), tuple(t.shape), 0, 0)
            for n, t in [*self._tensors.items(), *((a, self._tensors[n]) for a, n in self.aliases.items())]
            if n not in self.copies
        }

    def tie(self, copy: str, tensor: str) -> None:
        """Read tensor `copy`, which holds `tensor`'s values, as `tensor` itself (ftaudit.sources.tied): `infos` leaves
        it out."""
        self.copies[copy] = tensor

    def alias(self, name: str, tensor: str) -> None:
        """Read tensor `tensor` under name `name` too, which no stored tensor has (ftaudit.sources.tied)."""
        self.aliases[name] = tensor

    def restack(self, name: str, shape: tuple[int, int, int]) -> None:
        """Read 2-D tensor `name` as the stack of `shape` its rows make, its experts' matrices one above the other."""
        self._tensors[name] = self._tensors[name].view(shape)

    def load(self, name: str, expert: int | None = None) -> torch.Tensor:
        """One tensor, or one expert's matrix of a stack (a view of the mapped file)."""
        tensor = self._tensors[self.aliases.get(name, name)]
        return tensor if expert is None else tensor[expert]

    def stored_size(self, name: str) -> int:
        """The bytes tensor `name` takes as stored."""
        tensor = self._tensors[name]
        return tensor.numel() * tensor.element_size()

    def read_stored(self, name: str, start: int, length: int) -> bytes:
        """`length` bytes of tensor `name` as stored, from its byte `start` (only those pages of the mapped file)."""
        flat = self._tensors[name].reshape(-1).view(torch.uint8)
        return flat[start : start + length].numpy().tobytes()


def _load(storage: Storage, name: str) -> dict[str, object]:
    path = storage.local_path(name)
    label = f"{storage.label}/{name}"
    try:
        with open(path, "rb") as f:
            if f.read(len(LFS_POINTER)) == LFS_POINTER:
                raise lfs_pointer(label)
        with warnings.catch_warnings():  # torch warns of pickle protocols it did not write: not the user's concern
            warnings.simplefilter("ignore")
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        raise cannot_read(label, e) from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        raise InvalidWeightsError(f"{label}: refused by torch.load(weights_only=True): {_reason(e)}") from None
    if not isinstance(state, dict):
        raise InvalidWeightsError(f"{label}: holds a {type(state).__name__}, not a mapping of tensors")
    return state


_ADVICE = ("Weights only load failed", "Please file an issue", "Check the documentation", "(1)", "(2)")
"""How torch's own lines begin around the reason: its advice (among it, to load with weights_only=False,
which runs whatever code the file holds) is not repeated."""


def _reason(error: BaseException) -> str:
    """What torch says the file holds (`Unsupported global: GLOBAL getattr was not an allowed global by default.`,
    `Unsupported operand 103`), without its advice on how to load it anyway."""
    for line in str(error).splitlines():
        line = line.strip()
        if "WeightsUnpickler error:" in line:
            line = line.split("WeightsUnpickler error:", 1)[1].strip()
        if line and not line.startswith(_ADVICE):
            return line.split(" Please use ")[0]
    return f"{type(error).__name__}: not a plain tensor checkpoint"
