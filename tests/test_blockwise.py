"""Block-at-a-time arithmetic on stored matrices against the same sums done whole in float64."""

from __future__ import annotations

import math

import pytest
import torch

from ftaudit import blockwise


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Blocks of 7 and Gram pieces of 6, so every matrix here spans several of each and ragged last ones."""
    monkeypatch.setattr(blockwise, "BLOCK", 7)
    monkeypatch.setattr(blockwise, "PIECE", 6)


@pytest.mark.parametrize("shape", [(20, 45), (45, 20), (30, 30)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_gram_and_products_match_the_whole_float64_computation(shape, dtype):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(*shape, generator=g).to(dtype)
    v = torch.randn(*shape, generator=g).to(dtype)
    w64, delta = w.double(), w.double() - v.double()
    small = delta @ delta.mT if shape[0] <= shape[1] else delta.mT @ delta
    assert blockwise.gram(w, v).dtype == torch.float64
    assert torch.equal(blockwise.gram(w, v), blockwise.gram(w, v).mT)
    assert torch.allclose(blockwise.gram(w, v), small, rtol=1e-13, atol=1e-12)
    right = torch.randn(shape[1], 3, dtype=torch.float64, generator=g)
    product = blockwise.times(w, right, torch.float32)
    assert product.dtype == torch.float32
    assert torch.allclose(product, (w64 @ right).float(), rtol=1e-6, atol=1e-6)
    thin = torch.randn(shape[0], 3, dtype=torch.float64, generator=g)
    assert torch.allclose(blockwise.transposed_times(w, thin), w64.mT @ thin, rtol=1e-13, atol=1e-12)
    assert torch.allclose(blockwise.gram_times(w, thin), w64 @ (w64.mT @ thin), rtol=1e-13, atol=1e-11)
    single = blockwise.gram(w, dtype=torch.float32)
    assert single.dtype == torch.float32
    assert torch.allclose(single.double(), blockwise.gram(w), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("rows", [0, 1, 7, 30])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_row_norms_are_the_whole_float64_row_norms(rows, dtype):
    w = torch.randn(rows, 9, generator=torch.Generator().manual_seed(2)).to(dtype)
    norms = blockwise.row_norms(w)
    assert norms.dtype == torch.float64 and norms.shape == (rows,)
    assert torch.allclose(norms, torch.linalg.vector_norm(w.double(), dim=1), rtol=1e-15, atol=0)


def test_a_float64_input_is_never_written_to():
    w = torch.randn(12, 9, dtype=torch.float64)
    v = torch.randn(12, 9, dtype=torch.float64)
    kept = w.clone(), v.clone()
    blockwise.gram(w, v), blockwise.pair_sums(v, w), blockwise.gram_times(w, torch.eye(12, dtype=torch.float64))
    assert torch.equal(w, kept[0]) and torch.equal(v, kept[1])


@pytest.mark.parametrize("shape", [(20, 45), (45, 20), (30, 30)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_pair_sums_gather_every_norm_and_the_update_gram_in_one_pass(shape, dtype):
    g = torch.Generator().manual_seed(2)
    base = torch.randn(*shape, generator=g).to(dtype)
    tuned = (base.double() + 0.1 * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)
    b64, t64 = base.double(), tuned.double()
    sums = blockwise.pair_sums(base, tuned)
    for got, want in (
        (sums.base_rows, b64.square().sum(1)), (sums.base_cols, b64.square().sum(0)),
        (sums.tuned_rows, t64.square().sum(1)), (sums.tuned_cols, t64.square().sum(0)),
    ):
        assert got.dtype == torch.float64 and torch.allclose(got, want, rtol=1e-13)
    assert sums.delta_square == pytest.approx((t64 - b64).square().sum().item(), rel=1e-13)
    assert torch.equal(sums.delta_gram, blockwise.gram(tuned, base))
    assert sums.finite
    assert blockwise.pair_sums(base, tuned, with_gram=False).delta_gram is None


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("side", ["base", "tuned"])
def test_pair_sums_are_not_finite_when_a_matrix_holds_a_nan_or_inf(bad, side):
    base, tuned = torch.randn(20, 45).bfloat16(), torch.randn(20, 45).bfloat16()
    (base if side == "base" else tuned)[13, 31] = bad
    assert not blockwise.pair_sums(base, tuned).finite
    assert not blockwise.pair_sums(base, tuned, with_gram=False).finite
