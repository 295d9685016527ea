"""Mutated safetensors files: the only outcomes are a valid parse or ftaudit's own error.

Bounded for CI; `FTAUDIT_FUZZ_EXAMPLES=20000 pytest tests/test_fuzz_safetensors.py` runs longer.
"""

from __future__ import annotations

import json
import os
import struct

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ftaudit.errors import FtauditError
from ftaudit.sources import safetensors
from tests.models import safetensors_bytes

EXAMPLES = int(os.environ.get("FTAUDIT_FUZZ_EXAMPLES", "300"))
SEED_FILE = safetensors_bytes({"a": torch.randn(3, 4), "b": torch.randn(2).to(torch.bfloat16), "c": torch.zeros(0, 5)})
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def parse_and_load(blob: bytes) -> None:
    n = safetensors.header_length(blob[:8], len(blob), "fuzz")
    header = safetensors.parse_header(blob[8 : 8 + n], len(blob), "fuzz")
    for info in header.tensors.values():
        assert 8 + n <= info.start <= info.end <= len(blob)
        if info.dtype in safetensors.FLOAT_DTYPES:
            assert safetensors.decode(blob[info.start : info.end], info).shape == info.shape


@FUZZ
@given(st.data())
def test_byte_mutations(data):
    blob = bytearray(SEED_FILE)
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(blob) - 1))
        blob[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(blob)))
    try:
        parse_and_load(bytes(blob[:cut]))
    except FtauditError:
        pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
entries = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.sampled_from(["F32", "BF16", "F16", "I64", "U8", "F4", "", "f32"]) | json_values,
        "shape": st.lists(st.integers(-2, 6), max_size=3) | json_values,
        "data_offsets": st.lists(st.integers(-4, 200), max_size=3) | json_values,
    },
)


@FUZZ
@given(st.dictionaries(st.text(max_size=6), entries | json_values, max_size=5), st.integers(0, 160))
def test_structured_headers(header, data_len):
    raw = json.dumps(header).encode()
    blob = struct.pack("<Q", len(raw)) + raw + bytes(data_len)
    try:
        parse_and_load(blob)
    except FtauditError:
        pass
