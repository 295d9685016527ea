"""The fingerprint of a local folder's weights: the same for the same tensors in any files, written at any time; another
for other values; a few KiB read per tensor."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ftaudit.sources import open_weights
from ftaudit.sources.fingerprint import PIECE, fingerprint
from ftaudit.sources.local import LocalStorage
from tests.models import llama_like, low_rank_update, write_model
from tests.test_safetensors import build

STACK = "model.layers.0.mlp.experts.gate_up_proj"


def model() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return llama_like(layers=2) | {STACK: torch.randn(4, 32, 96, generator=g)}


def of(folder: Path, *texts: str) -> str:
    return fingerprint(open_weights(LocalStorage(folder), allow_pickle=True), *texts)


class CountingStorage(LocalStorage):
    """A folder that counts the bytes read from it."""

    read_bytes = 0
    reads = 0

    def read(self, name: str, start: int, length: int) -> bytearray:
        self.read_bytes += length
        self.reads += 1
        return super().read(name, start, length)


def test_the_same_tensors_give_the_same_fingerprint_in_any_files_written_at_any_time(tmp_path):
    tensors = model()
    reference = of(write_model(tmp_path / "one", tensors))
    assert len(reference) == 64 and int(reference, 16) >= 0
    assert of(write_model(tmp_path / "again", tensors)) == reference  # another path, new mtimes: a fresh checkout
    assert of(write_model(tmp_path / "sharded", tensors, shards=3)) == reference
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save(tensors, pickled / "pytorch_model.bin")
    assert of(pickled) == reference


def test_integer_and_boolean_tensors_give_the_same_fingerprint_pickled_or_in_safetensors(tmp_path):
    """Buffers a checkpoint holds beside its weights (position ids, masks) are named by their safetensors dtype in a
    pickle too."""
    tensors = model() | {"embeddings.position_ids": torch.arange(64).reshape(1, 64),
                         "attention.bias": torch.ones(1, 8, 8, dtype=torch.bool),
                         "scales": torch.arange(6, dtype=torch.int8), "counts": torch.arange(6, dtype=torch.uint8)}
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save(tensors, pickled / "pytorch_model.bin")
    assert of(pickled) == of(write_model(tmp_path / "safetensors", tensors))


def test_other_values_names_dtypes_or_adapter_settings_give_another_fingerprint(tmp_path):
    tensors = model()
    reference = of(write_model(tmp_path / "reference", tensors))
    q = "model.layers.1.self_attn.q_proj.weight"
    fixed = low_rank_update(tensors, rank=1, scale=0.01, only=q)[q]  # one matrix, as `ftaudit fix` changes it
    new_token = tensors["model.embed_tokens.weight"].clone()
    new_token[-1] += 0.1  # the last row alone, as when a token added is trained
    expert = tensors[STACK].clone()
    expert[2] *= 1.01  # one expert's matrix of a stack
    changes = {
        "fixed": tensors | {q: fixed},
        "new token": tensors | {"model.embed_tokens.weight": new_token},
        "expert": tensors | {STACK: expert},
        "bf16": {name: t.to(torch.bfloat16).to(torch.float32) for name, t in tensors.items()},
        "half": tensors | {q: tensors[q].to(torch.float16)},
        "renamed": {name.replace("lm_head", "output"): t for name, t in tensors.items()},
    }
    found = {what: of(write_model(tmp_path / what, t)) for what, t in changes.items()}
    assert reference not in found.values() and len(set(found.values())) == len(found)
    assert of(tmp_path / "reference", json.dumps({"lora_alpha": 16})) not in (reference, of(
        tmp_path / "reference", json.dumps({"lora_alpha": 32})))


def test_it_reads_a_few_pieces_of_each_tensor_not_the_weights(tmp_path):
    tensors = {f"layers.{i}.weight": torch.randn(1024, 1024) for i in range(3)} | {"norm": torch.ones(8)}
    storage = CountingStorage(write_model(tmp_path / "m", tensors))
    weights = open_weights(storage)
    headers = storage.read_bytes
    fingerprint(weights)
    assert storage.read_bytes - headers == 3 * 3 * PIECE + 8 * 4  # of 12 MiB: three pieces of each matrix, the norm


def test_the_small_parts_of_a_3d_tensor_are_read_together(tmp_path):
    """A 3-D tensor of many small parts (Mamba's convolutions, d_inner × 1 × d_conv) takes a read or a few, not one
    per part; its fingerprint still follows every part's values."""
    tensors = {f"layers.{i}.mixer.conv1d.weight": torch.randn(2048, 1, 4) for i in range(4)}
    storage = CountingStorage(write_model(tmp_path / "conv", tensors))
    weights = open_weights(storage)
    reads = storage.reads
    reference = fingerprint(weights)
    assert storage.reads - reads == 4
    tensors["layers.3.mixer.conv1d.weight"][1500, 0, 2] += 1
    assert of(write_model(tmp_path / "changed", tensors)) != reference


def test_every_byte_of_a_small_3d_tensor_of_sub_byte_values_counts(tmp_path):
    """Experts' matrices of 4-bit values need not each fill whole bytes (4 × 1 × 1: 2 bytes; 4 × 3 × 3: 18): the bytes
    of a small tensor are all read, however its parts split them."""
    header = {"a.scales": {"dtype": "F4", "shape": [4, 1, 1], "data_offsets": [0, 2]},
              "b.scales": {"dtype": "F4", "shape": [4, 3, 3], "data_offsets": [2, 20]}}

    def of_bytes(name: str, data: bytes) -> str:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(build(header, data))
        return of(tmp_path / name)

    reference = of_bytes("zeros", bytes(20))
    assert of_bytes("first", b"\x11" + bytes(19)) != reference
    assert of_bytes("last", bytes(19) + b"\x01") != reference
