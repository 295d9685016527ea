"""A safetensors checkpoint (single file or sharded) read tensor by tensor from any Storage."""

from __future__ import annotations

import json
import logging
import re
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import PurePosixPath

import torch

from ftaudit.errors import InvalidWeightsError, NotFoundError, UnsupportedError
from ftaudit.sources import safetensors
from ftaudit.sources.safetensors import TensorInfo
from ftaudit.sources.storage import Storage

log = logging.getLogger("ftaudit")

LFS_POINTER = b"version https://git-lfs.github.com/spec/"
"""How the text file that Git LFS stores in place of a file begins (a checkout that did not fetch LFS files)."""
TRAINER_STATE = "trainer_state.json"
"""What transformers' Trainer saves in every checkpoint folder, its other state (optimizer.pt, ...) or not."""
POINTER_MAX_BYTES = 1024
"""Larger than any Git LFS pointer (about 130 bytes)."""
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
OTHER_FORMATS = (".gguf", ".onnx", ".h5", ".msgpack", ".tflite")
"""Weights in formats ftaudit does not read: GGUF (llama.cpp), ONNX, TensorFlow, Flax, TensorFlow Lite."""
TRAINING_STATE = re.compile(
    r"training_args\.bin|(optimizer|scheduler|sampler)(_\d+)?\.(pt|bin)|scaler\.pt|rng_state(_\d+)?\.pth"
    r"|random_states_\d+\.pkl"
)
"""Files that transformers' Trainer and accelerate save beside the weights in a checkpoint folder: the run's
arguments, optimizer, scheduler, sampler, scaler and random states, not weights."""


class MissingShardError(InvalidWeightsError):
    """A shard index names a file that the snapshot lacks."""


Decoder = Callable[[Callable[[str], bytes | bytearray]], torch.Tensor]
"""The tensor that some stored tensors stand for (a quantized matrix's, from its parts), from a reader of the bytes of
each it needs, by name."""


@dataclass(frozen=True)
class TensorRef:
    """A tensor and the file that holds it."""

    file: str
    info: TensorInfo


class Checkpoint:
    """The tensors of one model: validated headers first, then bytes on demand."""

    def __init__(self, storage: Storage, weight_files: list[str], weight_map: dict[str, str] | None = None) -> None:
        self.storage = storage
        self.tensors: dict[str, TensorRef] = {}
        self.copies: dict[str, str] = {}
        """Tensors read as the one whose values they hold (tie)."""
        self.aliases: dict[str, str] = {}
        """Names that a tensor not stored under them is read under too (alias)."""
        self._decoded: dict[str, tuple[list[TensorRef], Decoder]] = {}
        """Tensors read as what their stored parts stand for (`decode_as`): the parts, and how."""
        self._last: tuple[tuple[str, int | None], weakref.ref[torch.Tensor]] | None = None
        self._lock = threading.Lock()
        for name in weight_files:
            for info in read_header(storage, name).tensors.values():
                if info.name in self.tensors:
                    raise InvalidWeightsError(
                        f"{storage.label}: tensor {info.name!r} appears in both "
                        f"{self.tensors[info.name].file} and {name}"
                    )
                self.tensors[info.name] = TensorRef(name, info)
        for tensor, file in (weight_map or {}).items():
            ref = self.tensors.get(tensor)
            if ref is None or ref.file != file:
                raise InvalidWeightsError(f"{storage.label}: the shard index puts {tensor!r} in {file}, which lacks it")

    @property
    def infos(self) -> dict[str, TensorInfo]:
        infos = {name: ref.info for name, ref in self.tensors.items() if name not in self.copies}
        return {**infos, **{name: replace(infos[tensor], name=name) for name, tensor in self.aliases.items()}}

    def tie(self, copy: str, tensor: str) -> None:
        """Read tensor `copy`, which holds `tensor`'s values, as `tensor` itself (ftaudit.sources.tied): `infos` leaves
        it out, and a writer writes it as `tensor`."""
        self.copies[copy] = tensor

    def alias(self, name: str, tensor: str) -> None:
        """Read tensor `tensor` under name `name` too, which no stored tensor has (ftaudit.sources.tied): `infos` lists
        it, and a writer writes nothing of it."""
        self.aliases[name] = tensor

    def restack(self, name: str, shape: tuple[int, int, int]) -> None:
        """Read 2-D tensor `name` as the stack of `shape` its rows make, its experts' matrices one above the other (the
        same bytes); so is each expert's matrix read alone."""
        ref = self.tensors[name]
        self.tensors[name] = TensorRef(ref.file, replace(ref.info, shape=shape))

    def decode_as(self, name: str, info: TensorInfo, parts: list[str], decode: Decoder) -> None:
        """Read tensor `name` as `info` (its dtype and shape) says, its values what `decode` makes of the stored bytes
        of tensors `parts` (`name` among them, where it is stored); `infos` no longer lists the parts."""
        refs = [self.tensors[part] for part in parts]
        for part in parts:
            del self.tensors[part]
        self.tensors[name] = TensorRef(refs[0].file, info)
        self._decoded[name] = (refs, decode)

    def _stored(self, name: str) -> list[TensorRef]:
        """Where tensor `name`'s stored bytes lie: its own range, or its parts' one after another."""
        decoded = self._decoded.get(name)
        return decoded[0] if decoded is not None else [self.tensors[name]]

    def stored_size(self, name: str) -> int:
        """The bytes tensor `name` takes as stored (its parts' together, for one read as they decode)."""
        return sum(ref.info.nbytes for ref in self._stored(name))

    def read_stored(self, name: str, start: int, length: int) -> bytes | bytearray:
        """`length` bytes of tensor `name` as stored, from its byte `start` (of its parts' bytes one after another)."""
        out = bytearray()
        for ref in self._stored(name):
            if length <= len(out):
                break
            size = ref.info.nbytes
            if start < size:
                take = min(size - start, length - len(out))
                out += self.storage.read(ref.file, ref.info.start + start, take)
            start = max(0, start - size)
        return out

    def load(self, name: str, expert: int | None = None) -> torch.Tensor:
        """One tensor, or one expert's matrix of a stack (only its bytes are read), as a CPU tensor of its
        stored dtype; a repeated load of the last one, while it is still in use, returns it again (an
        adapter's tuned side loads the base tensor just loaded)."""
        name = self.aliases.get(name, name)
        with self._lock:
            key = (name, expert)
            last = self._last[1]() if self._last is not None and self._last[0] == key else None
            if last is not None:
                return last
            tensor = self._decode(name, expert) if name in self._decoded else self._read(name, expert)
            self._last = (key, weakref.ref(tensor))
            return tensor

    def _read(self, name: str, expert: int | None) -> torch.Tensor:
        """Tensor `name` (or expert `expert`'s matrix of it) from its stored bytes."""
        ref = self.tensors[name]
        info = ref.info if expert is None else ref.info.part(expert)
        data = self.storage.read(ref.file, info.start, info.nbytes)
        try:
            return safetensors.decode(data, info)
        except InvalidWeightsError as e:  # an integer tensor where a float one is needed (an adapter's factor)
            raise InvalidWeightsError(f"{self.storage.label}/{ref.file}: {e}") from None

    def _decode(self, name: str, expert: int | None) -> torch.Tensor:
        """Tensor `name` (`decode_as`) decoded whole from its parts, in the shape `restack` may since have given it."""
        refs, decode = self._decoded[name]
        by_name = {ref.info.name: ref for ref in refs}
        tensor = decode(lambda part: self.storage.read(by_name[part].file, by_name[part].info.start,
                                                      by_name[part].info.nbytes))
        shaped = tensor.view(self.tensors[name].info.shape)
        return shaped if expert is None else shaped[expert]


def read_header(storage: Storage, name: str) -> safetensors.Header:
    """Fetch and validate the header of one safetensors file."""
    label = f"{storage.label}/{name}"
    size = storage.size(name)
    prefix = storage.read(name, 0, min(size, 8))
    if prefix == LFS_POINTER[:8] and storage.read(name, 0, min(size, len(LFS_POINTER))) == LFS_POINTER:
        raise lfs_pointer(label)
    n = safetensors.header_length(prefix, size, label)
    return safetensors.parse_header(storage.read(name, 8, n), size, label)


def refuse_lfs_pointer(storage: Storage, name: str) -> None:
    """Raise `lfs_pointer`'s error where weights file `name` is a Git LFS pointer (a small text file), read or not."""
    size = storage.size(name)
    if size < POINTER_MAX_BYTES and storage.read(name, 0, min(size, len(LFS_POINTER))) == LFS_POINTER:
        raise lfs_pointer(f"{storage.label}/{name}")


def lfs_pointer(label: str) -> InvalidWeightsError:
    """The error for the Git LFS pointer found in place of weights file `label`."""
    return InvalidWeightsError(
        f"{label}: a Git LFS pointer, not the file: fetch the LFS files "
        "(git lfs pull; in GitHub Actions, actions/checkout with lfs: true)"
    )


@dataclass(frozen=True)
class WeightFiles:
    """Where a snapshot keeps its weights, and in which format."""

    format: str
    files: list[str]
    weight_map: dict[str, str] | None


def is_training_state(name: str) -> bool:
    """Whether file `name` (a path in a snapshot) is a training run's state saved beside the weights."""
    return TRAINING_STATE.fullmatch(PurePosixPath(name).name) is not None


def training_checkpoints(names: set[str]) -> list[str]:
    """The outermost subfolders (as `checkpoint-500/`) that hold a training run's state: a Trainer's checkpoint
    folders, earlier states of the run with weights of their own, which the audit does not read."""
    folders = {str(PurePosixPath(name).parent) + "/" for name in names
               if "/" in name and (PurePosixPath(name).name == TRAINER_STATE or is_training_state(name))}
    return sorted(f for f in folders if not any(f != other and f.startswith(other) for other in folders))


def unread_weights(storage: Storage) -> list[str]:
    """The weight files in subfolders that the audit does not read (a sentence-transformers model's `2_Dense/`),
    those of training checkpoint folders aside."""
    files = storage.files()
    checkpoints = tuple(training_checkpoints(set(files)))
    return sorted(f for f in _nested_weights(files) if not f.startswith(checkpoints))


def _nested_weights(files: list[str]) -> list[str]:
    """The weight files in subfolders among `files`, training state aside."""
    return [f for f in files if "/" in f and f.endswith((".safetensors", *PICKLE_SUFFIXES)) and not is_training_state(f)]


def find_weight_files(storage: Storage, stem: str = "model") -> WeightFiles:
    """The files that hold the weights: safetensors first, else pickles; of each, the single file where there is one,
    else the shards of its index, as transformers loads them (a single file beside a shard index, the index maybe
    left from an earlier save, is what it loads)."""
    files = storage.files()
    top_level = [f for f in files if "/" not in f]
    pickle_stem = "pytorch_model" if stem == "model" else stem
    for fmt, index, single, suffixes in (
        ("safetensors", f"{stem}.safetensors.index.json", f"{stem}.safetensors", (".safetensors",)),
        ("pickle", f"{pickle_stem}.bin.index.json", f"{pickle_stem}.bin", PICKLE_SUFFIXES),
    ):
        if single in files:
            return WeightFiles(fmt, [single], None)
        if index in files:
            weight_map = _weight_map(storage, index)
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if s not in files]
            if missing:
                raise MissingShardError(f"{storage.label}/{index}: names shard {missing[0]}, which is not in the snapshot")
            return WeightFiles(fmt, shards, weight_map)
        found = sorted(f for f in top_level if f.endswith(suffixes) and not is_training_state(f))
        if found:
            return _variant(storage, files, single, found) or WeightFiles(fmt, found, None)
    adapters = sorted(f.removesuffix("adapter_config.json") for f in files if f.endswith("/adapter_config.json"))
    if adapters:  # PEFT saves an adapter not named `default` in a subfolder of its name
        raise NotFoundError(
            f"{storage.label}: no weights at its top level, but PEFT adapters in subfolders ({', '.join(adapters)}): "
            "pass one of those folders (of a Hub repository, download it first: hf download REPO --include 'FOLDER/*')")
    nested = _nested_weights(files)
    if nested and "model_index.json" in files:
        folders = ", ".join(sorted({f.split("/")[0] + "/" for f in nested}))
        raise NotFoundError(
            f"{storage.label}: a diffusers pipeline (model_index.json), whose models are in subfolders ({folders}): "
            "pass one model's folder (of a Hub repository, download it first: hf download REPO --include 'FOLDER/*')")
    other = [f for f in files if f.endswith(OTHER_FORMATS)]
    if other and not nested:
        raise NotFoundError(f"{storage.label}: no weights found (no .safetensors or pickle files, but {some_of(other)}, "
                            "a format ftaudit does not read): audit the safetensors weights it was made from")
    where = "" if not nested else f" at its top level; subfolders are not read: {some_of(nested)}"
    raise NotFoundError(f"{storage.label}: no weights found (no .safetensors or pickle files{where})")


def some_of(names: list[str], shown: int = 1) -> str:
    """The first `shown` of `names`, and how many more."""
    rest = len(names) - shown
    return ", ".join(names[:shown]) + (f" and {rest} more" if rest > 0 else "")


def _variant(storage: Storage, files: list[str], single: str, found: list[str]) -> WeightFiles | None:
    """The files of the one variant of `single` among `found` (`model.fp16.safetensors`, or its shards
    `model.fp16-00001-of-00002.safetensors` and index `model.safetensors.index.fp16.json`), which transformers loads
    with `variant=` only, read with a warning; None when `found` holds no variant, UnsupportedError when several."""
    stem, _, suffix = single.partition(".")
    pattern = re.compile(rf"{re.escape(stem)}\.([^.]+?)(-\d+-of-\d+)?\.{re.escape(suffix)}")
    by_variant: dict[str, list[str]] = {}
    for name in found:
        match = pattern.fullmatch(name)
        if match:
            by_variant.setdefault(match[1], []).append(name)
    if not by_variant:
        return None
    if len(by_variant) > 1:
        names = sorted(by_variant)
        raise UnsupportedError(
            f"{storage.label}: no {single}, only its variants {', '.join(names)} ({by_variant[names[0]][0]} ...), "
            "which transformers loads with variant=: keep one variant's files in a folder of their own and pass that")
    (variant, chosen), = by_variant.items()
    log.warning("%s: no %s, only its %s variant (%s), which transformers loads with variant=%r: reading that",
                storage.label, single, variant, chosen[0] + (" ..." if len(chosen) > 1 else ""), variant)
    index = f"{single}.index.{variant}.json"
    fmt = "safetensors" if suffix == "safetensors" else "pickle"
    return WeightFiles(fmt, chosen, _weight_map(storage, index) if index in files else None)


def _weight_map(storage: Storage, index: str) -> dict[str, str]:
    label = f"{storage.label}/{index}"
    try:
        doc = json.loads(storage.read_text(index) or "")
    except (ValueError, RecursionError):  # RecursionError: nested too deeply
        raise InvalidWeightsError(f"{label}: not valid JSON") from None
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise InvalidWeightsError(f"{label}: weight_map must map tensor names to file names")
    return weight_map
