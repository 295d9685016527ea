"""Parallel content digests: a two-level SHA-256 that follows every byte, label and boundary."""

from __future__ import annotations

import hashlib

import torch

from ftaudit import digest as digest_module
from ftaudit.digest import digest


def test_the_digest_is_sha256_over_the_label_the_sizes_and_each_piece(monkeypatch):
    monkeypatch.setattr(digest_module, "PIECE", 1000)
    a = torch.arange(700, dtype=torch.float32)  # 2800 bytes: pieces of 1000, 1000 and 800
    b = torch.arange(10, dtype=torch.bfloat16)
    raw_a, raw_b = a.numpy().tobytes(), b.view(torch.int16).numpy().tobytes()
    expected = hashlib.sha256(b"label")
    expected.update((2).to_bytes(8, "little") + len(raw_a).to_bytes(8, "little") + len(raw_b).to_bytes(8, "little"))
    for raw in (raw_a, raw_b):
        for start in range(0, len(raw), 1000):
            expected.update(hashlib.sha256(raw[start : start + 1000]).digest())
    assert digest("label", [a, b]) == expected.hexdigest()


def test_any_changed_byte_label_or_boundary_changes_the_digest(monkeypatch):
    monkeypatch.setattr(digest_module, "PIECE", 64)
    w = torch.randn(40, 30)
    reference = digest("x", [w])
    assert digest("x", [w.clone()]) == reference
    assert digest("x", [w.t().contiguous().t()]) == reference  # the values, not the layout
    changed = w.clone()
    changed.view(torch.uint8).view(-1)[1234] ^= 1
    assert digest("x", [changed]) != reference
    assert digest("y", [w]) != reference
    flat = w.reshape(-1)
    assert digest("x", [flat[:600], flat[600:]]) != digest("x", [flat[:601], flat[601:]])
    assert digest("x", [torch.empty(0)]) != digest("x", [])
