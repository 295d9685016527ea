"""Header parsing and validation against files written by the safetensors library, and corruptions."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load

from ftaudit.errors import InvalidWeightsError
from ftaudit.sources import safetensors as st
from tests.models import safetensors_bytes


def parse(blob: bytes) -> st.Header:
    n = st.header_length(blob[:8], len(blob), "f")
    return st.parse_header(blob[8 : 8 + n], len(blob), "f")


def build(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def test_parses_what_the_library_writes_and_decodes_every_float_dtype():
    tensors = {
        "a": torch.randn(3, 4),
        "b": torch.randn(5, 2).to(torch.bfloat16),
        "c": torch.randn(2, 2).to(torch.float16),
        "d": torch.randn(4, 1, dtype=torch.float64),
        "ids": torch.arange(6),
    }
    blob = safetensors_bytes(tensors)
    header = parse(blob)
    assert set(header.tensors) == set(tensors)
    for name in ("a", "b", "c", "d"):
        info = header.tensors[name]
        assert info.shape == tuple(tensors[name].shape)
        assert torch.equal(st.decode(blob[info.start : info.end], info), tensors[name])
    with pytest.raises(InvalidWeightsError, match="not a float dtype"):
        info = header.tensors["ids"]
        st.decode(blob[info.start : info.end], info)


def test_an_encoded_header_and_the_raw_bytes_make_a_file_that_both_readers_accept():
    tensors = {
        "V": torch.randn(5, 3),
        "S": torch.rand(3, dtype=torch.float64),
        "h": torch.randn(2, 7).to(torch.bfloat16),
        "e": torch.empty(0, 4, dtype=torch.float16),
    }
    blob = st.encode_header(tensors, {"digest": "abc"}) + b"".join(
        t.view(torch.uint8).reshape(-1).numpy().tobytes() for t in tensors.values())
    header = parse(blob)
    assert header.metadata == {"digest": "abc"} and header.data_start % 8 == 0
    for name, t in tensors.items():
        info = header.tensors[name]
        assert torch.equal(st.decode(blob[info.start : info.end], info), t)
    loaded = load(blob)
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[n], t) for n, t in tensors.items())


GOOD = {"x": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}


@pytest.mark.parametrize(
    ("header", "data", "message"),
    [
        ({"x": {"dtype": "F33", "shape": [2, 2], "data_offsets": [0, 16]}}, bytes(16), "unknown dtype"),
        ({"x": {"dtype": "F32", "shape": [2, -2], "data_offsets": [0, 16]}}, bytes(16), "shape"),
        ({"x": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0]}}, bytes(16), "data_offsets"),
        ({"x": {"dtype": "F32", "shape": [2, 2], "data_offsets": [8, 4]}}, bytes(16), "end before"),
        ({"x": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}, bytes(16), "needs 16"),
        ({"x": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}, bytes(8), "truncated"),
        ({"x": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}, bytes(20), "unused bytes"),
        ({**GOOD, "y": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, bytes(16), "overlaps"),
        ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, bytes(16), "unused bytes before"),
        ({**GOOD, "__metadata__": {"a": 1}}, bytes(16), "__metadata__"),
        ({"x": [1, 2]}, bytes(16), "not an object"),
    ],
)
def test_rejects_inconsistent_headers(header, data, message):
    with pytest.raises(InvalidWeightsError, match=message):
        parse(build(header, data))


def test_rejects_duplicate_names_non_json_and_non_objects():
    raw = b'{"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "x": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}'
    with pytest.raises(InvalidWeightsError, match="duplicate key 'x'"):
        parse(struct.pack("<Q", len(raw)) + raw + bytes(8))
    with pytest.raises(InvalidWeightsError, match="not valid JSON"):
        parse(struct.pack("<Q", 5) + b"{nope" + bytes(4))
    with pytest.raises(InvalidWeightsError, match="not a JSON object"):
        parse(struct.pack("<Q", 2) + b"[]")


def test_rejects_bad_header_lengths_without_allocating():
    with pytest.raises(InvalidWeightsError, match="truncated"):
        st.header_length(b"\x01\x02", 2, "f")
    with pytest.raises(InvalidWeightsError, match="implausible"):
        st.header_length(struct.pack("<Q", 2**62), 10**6, "f")
    with pytest.raises(InvalidWeightsError, match="truncated"):
        st.header_length(struct.pack("<Q", 500), 100, "f")


def test_parses_the_newer_dtypes_the_library_writes_and_sizes_sub_byte_ones_in_bits():
    tensors = {
        "freqs_cis": torch.randn(4, 3, dtype=torch.complex64),
        "scales": torch.ones(4, 2).to(torch.float8_e8m0fnu),
        "packed": torch.zeros(4, 3, dtype=torch.uint8).view(torch.float4_e2m1fn_x2),  # two F4 values a byte
        "w": torch.randn(3, 4),
    }
    blob = safetensors_bytes(tensors)
    header = parse(blob)
    sizes = {name: info.nbytes for name, info in header.tensors.items()}
    assert sizes == {name: t.numel() * t.element_size() for name, t in tensors.items()}
    assert header.tensors["packed"].dtype == "F4" and header.tensors["packed"].shape == (4, 6)
    with pytest.raises(InvalidWeightsError, match=r"F4 \[3\] is not a whole number of bytes"):
        parse(build({"x": {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}}, bytes(2)))


def test_a_model_with_a_buffer_in_a_newer_dtype_is_audited(tmp_path):
    from tests.invoke import run
    from tests.models import llama_like, low_rank_update, write_model

    base = llama_like(layers=1)
    buffer = {"model.rotary_emb.freqs_cis": torch.randn(8, 4, dtype=torch.complex64)}
    write_model(tmp_path / "base", {**base, **buffer})
    write_model(tmp_path / "tuned", {**low_rank_update(base), **buffer})
    code, _, stderr = run("check", tmp_path / "tuned", "--base", tmp_path / "base", "--quiet")
    assert code == 1 and stderr == "", stderr


def test_a_name_holding_a_lone_surrogate_is_refused_as_the_library_refuses_it(tmp_path):
    from safetensors import SafetensorError

    from tests.invoke import run
    from tests.models import llama_like, write_model

    write_model(tmp_path / "base", llama_like(layers=1))
    blob = (tmp_path / "base" / "model.safetensors").read_bytes()
    n = st.header_length(blob[:8], len(blob), "f")
    # `\ud800`, as long as the module name it replaces: the JSON escape of a lone surrogate, which is no Unicode text
    blob = blob[:8] + blob[8 : 8 + n].replace(b"q_proj", b"\\ud800") + blob[8 + n :]
    (tmp_path / "tuned").mkdir()
    (tmp_path / "tuned" / "model.safetensors").write_bytes(blob)
    with pytest.raises(SafetensorError):
        load(blob)
    with pytest.raises(InvalidWeightsError, match="^f: safetensors header holds a lone surrogate"):
        parse(blob)
    code, stdout, stderr = run("check", tmp_path / "tuned", "--base", tmp_path / "base", "--quiet")
    assert (code, stdout) == (2, "")
    assert stderr.count("\n") == 1 and "model.safetensors: safetensors header holds a lone surrogate" in stderr
