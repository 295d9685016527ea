"""Forgetting-risk indicators on matrices with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from ftaudit.analyses import indicators
from ftaudit.analyses.indicators import (
    classify_update,
    effective_rank,
    energy_rank,
    intruder_strength,
    numerical_rank,
    row_norm_drift,
    spectral_spike,
    storage_eps,
    subspace_drift,
)
from ftaudit.blockwise import pair_sums
from ftaudit.spectral import left_spectrum

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These matrices are tiny; on a busy 2-core machine MKL's threaded eigvalsh of a 192×192
    matrix was seen to take 2.7 s instead of 2 ms (threads spinning against other processes)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def orthonormal(n: int, k: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, k, dtype=F64, generator=gen(seed)))
    return q


def lora_pair(shape, rank, rel, storage, seed, round_base):
    """W0 (optionally already stored in `storage`) and Wt = W0 + B·A stored in `storage`, both upcast."""
    g = gen(seed)
    m, n = shape
    w0 = 0.02 * torch.randn(m, n, dtype=F64, generator=g)
    if round_base:
        w0 = w0.to(storage).to(F64)
    update = torch.randn(m, rank, dtype=F64, generator=g) @ torch.randn(rank, n, dtype=F64, generator=g)
    update *= rel * torch.linalg.matrix_norm(w0) / torch.linalg.matrix_norm(update)
    wt = (w0 + update).to(storage).to(F64)
    return w0, wt


def delta_spectrum(w0, wt):
    return indicators.delta_spectrum(pair_sums(w0, wt))


def relative_update_norm(w0, wt):
    return indicators.relative_update_norm(pair_sums(w0, wt, with_gram=False))


def rounding_noise_floor(w0, wt, eps):
    return indicators.rounding_noise_floor(pair_sums(w0, wt, with_gram=False), eps)


def estimated_rank(w0, wt, storage):
    sigma = delta_spectrum(w0, wt)
    return numerical_rank(sigma, tuple(w0.shape), rounding_noise_floor(w0, wt, storage_eps(storage)))


# delta_spectrum


@pytest.mark.parametrize("shape", [(50, 50), (30, 70), (70, 30)])
def test_delta_spectrum_matches_svdvals(shape):
    g = gen(11)
    w0 = torch.randn(*shape, dtype=F64, generator=g)
    wt = w0 + 0.3 * torch.randn(*shape, dtype=F64, generator=g)
    got = delta_spectrum(w0, wt)
    want = torch.linalg.svdvals(wt - w0)
    assert got.shape == want.shape
    assert torch.all(got[:-1] >= got[1:])
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-9 * want[0].item())


# numerical rank: the storage rounding noise floor


@pytest.mark.parametrize("storage", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(256, 192), (128, 320)])
@pytest.mark.parametrize("round_base", [False, True])
def test_a_merged_lora_has_its_rank(storage, shape, round_base):
    w0, wt = lora_pair(shape, 8, 0.05, storage, seed=7, round_base=round_base)
    assert estimated_rank(w0, wt, storage) == 8
    assert energy_rank(delta_spectrum(w0, wt)) <= 8
    if storage != torch.float32:
        # Without the storage floor, 16-bit rounding noise makes the same update look full rank.
        assert numerical_rank(delta_spectrum(w0, wt), shape) == min(shape)


def test_an_exact_float64_low_rank_update_has_its_rank():
    w0, wt = lora_pair((120, 90), 5, 0.01, F64, seed=3, round_base=False)
    assert estimated_rank(w0, wt, F64) == 5


@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(96, 48), (48, 96), (64, 64)])
def test_a_dense_update_is_full_rank(storage, shape):
    g = gen(5)
    w0 = torch.randn(*shape, dtype=F64, generator=g).to(storage).to(F64)
    wt = (w0 + 0.3 * torch.randn(*shape, dtype=F64, generator=g)).to(storage).to(F64)
    rank = estimated_rank(w0, wt, storage)
    if storage == torch.bfloat16 and shape[0] == shape[1]:
        # A square random matrix's smallest singular values go to 0 (≈ scale/√n), so the last
        # one or two sink into the BF16 rounding noise: they are not resolvable from the weights.
        assert min(shape) - 3 <= rank <= min(shape)
    else:
        assert rank == min(shape)
    assert classify_update([relative_update_norm(w0, wt)], [rank], [shape])["type"] == "full"


def test_resaving_in_a_coarser_dtype_is_rank_zero():
    w0 = torch.randn(80, 60, dtype=F64, generator=gen(2))
    wt = w0.to(torch.bfloat16).to(F64)
    assert relative_update_norm(w0, wt) > 0
    assert estimated_rank(w0, wt, torch.bfloat16) == 0


def test_storage_eps_takes_the_coarsest_dtype():
    assert storage_eps("F32") == 2.0**-23
    assert storage_eps(torch.float32, "BF16") == 2.0**-7
    assert storage_eps("F16", torch.float32) == 2.0**-10
    assert storage_eps(F64) == torch.finfo(F64).eps


# identical weights, zero base


def test_identical_weights_give_zeros():
    w = torch.randn(40, 24, dtype=F64, generator=gen(1))
    sigma = delta_spectrum(w, w.clone())
    assert torch.all(sigma == 0)
    assert spectral_spike(sigma, torch.linalg.svdvals(w)[0].item()) == 0.0
    assert energy_rank(sigma) == 0
    assert effective_rank(sigma) == 0.0
    assert numerical_rank(sigma, (40, 24), rounding_noise_floor(w, w, storage_eps("BF16"))) == 0
    assert relative_update_norm(w, w) == 0.0
    drift = row_norm_drift(w, w.clone())
    assert drift == {"mean_norm_ratio": 1.0, "median_relative_change": 0.0, "max_relative_change": 0.0, "zero_base_rows": 0.0}
    assert subspace_drift(left_spectrum(w).U, left_spectrum(w).U, 5) == pytest.approx([0.0] * 5, abs=1e-6)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_row_norm_drift_is_none_for_a_matrix_with_a_nan_or_inf(bad):
    base = torch.randn(50, 8, generator=gen(6))
    tuned = base.clone()
    tuned[17, 3] = bad
    assert row_norm_drift(base, tuned) is None
    assert row_norm_drift(tuned, base) is None


def test_all_zero_base():
    base = torch.zeros(20, 30, dtype=F64)
    tuned = torch.randn(20, 30, dtype=F64, generator=gen(4))
    sigma = delta_spectrum(base, tuned)
    assert spectral_spike(sigma, 0.0) is None
    assert relative_update_norm(base, tuned) is None
    assert numerical_rank(sigma, (20, 30)) == 20
    drift = row_norm_drift(base, tuned)
    assert drift["mean_norm_ratio"] is None
    assert drift["median_relative_change"] is None and drift["max_relative_change"] is None
    assert drift["zero_base_rows"] == 20
    assert intruder_strength([2.0, 1.0], [0.1, 0.9], 0.5, 0.0) == [{"rank": 1, "sigma": 2.0, "relative_sigma": None}]
    # Zero base, zero update: nothing happened.
    assert spectral_spike(delta_spectrum(base, base), 0.0) == 0.0
    assert row_norm_drift(base, base)["mean_norm_ratio"] == 1.0


# spectrum shape indicators


def test_effective_rank_known_values():
    assert effective_rank(torch.ones(4, dtype=F64)) == pytest.approx(4.0, abs=1e-12)
    assert effective_rank(torch.tensor([1.0, 0.0, 0.0], dtype=F64)) == pytest.approx(1.0, abs=1e-12)
    assert effective_rank(torch.zeros(3, dtype=F64)) == 0.0


def test_energy_rank_known_values():
    sigma = torch.tensor([3.0, 2.0, 1.0, 0.0], dtype=F64)  # energies 9, 4, 1: total 14
    assert energy_rank(sigma, 0.5) == 1  # 9/14 = 0.64
    assert energy_rank(sigma, 0.9) == 2  # 13/14 = 0.93
    assert energy_rank(sigma, 0.95) == 3
    assert energy_rank(sigma, 1.0) == 3
    with pytest.raises(ValueError):
        energy_rank(sigma, 0.0)


def test_spectral_spike_of_a_boost_along_the_top_direction():
    U, V = orthonormal(30, 10, 1), orthonormal(20, 10, 2)
    s = torch.linspace(5.0, 1.0, 10, dtype=F64)
    w0 = U @ torch.diag(s) @ V.T
    wt = w0 + 2.5 * torch.outer(U[:, 0], V[:, 0])
    sigma = delta_spectrum(w0, wt)
    assert spectral_spike(sigma, torch.linalg.svdvals(w0)[0].item()) == pytest.approx(0.5, rel=1e-12)
    assert numerical_rank(sigma, (30, 20)) == 1
    assert energy_rank(sigma) == 1
    assert effective_rank(sigma) == pytest.approx(1.0, abs=1e-6)


# subspace drift


@pytest.mark.parametrize("degrees", [1e-3, 0.5, 20.0, 60.0, 89.0])
@pytest.mark.parametrize("shape", [(40, 25), (25, 40)])
def test_rotating_the_kth_direction_out_of_the_top_k(degrees, shape):
    m, n = shape
    r, k = min(shape), 5
    U, V = orthonormal(m, r, 8), orthonormal(n, r, 9)
    s = torch.linspace(10.0, 1.0, r, dtype=F64)
    w0 = U @ torch.diag(s) @ V.T
    # Rotate u_k towards u_{k+3} (outside the top k) in their plane; U stays orthonormal.
    theta = math.radians(degrees)
    Ut = U.clone()
    Ut[:, k - 1] = math.cos(theta) * U[:, k - 1] + math.sin(theta) * U[:, k + 2]
    Ut[:, k + 2] = -math.sin(theta) * U[:, k - 1] + math.cos(theta) * U[:, k + 2]
    wt = Ut @ torch.diag(s) @ V.T
    angles = subspace_drift(left_spectrum(w0).U, left_spectrum(wt).U, k)
    assert angles == pytest.approx([0.0] * (k - 1) + [degrees], abs=1e-6)
    assert angles == sorted(angles)


def test_subspace_drift_caps_k():
    U = orthonormal(10, 4, 1)
    assert len(subspace_drift(U, U, 9)) == 4
    assert subspace_drift(U, U, 0) == []


def test_spans_of_different_dimensions_are_90_degrees_apart():
    """A side of rank under k has fewer vectors (`top_left`, `base_basis`): its span cannot be the other's."""
    U = orthonormal(10, 4, 1)
    assert subspace_drift(U, U[:, :1], 3) == pytest.approx([0.0, 90.0], abs=1e-6)
    assert subspace_drift(U[:, :0], U, 3) == [90.0]
    assert subspace_drift(U, U[:, :1], 1) == pytest.approx([0.0], abs=1e-6)  # both have the one vector k asks for


# intruder strength


def test_intruder_strength_ranks_and_relative_sigma():
    sigma = [8.0, 6.0, 4.0, 2.0]
    max_cos = [0.95, 0.3, 0.8, 0.1]
    found = intruder_strength(sigma, max_cos, 0.5, base_sigma1=4.0)
    assert found == [
        {"rank": 2, "sigma": 6.0, "relative_sigma": 1.5},
        {"rank": 4, "sigma": 2.0, "relative_sigma": 0.5},
    ]
    assert intruder_strength(sigma, max_cos, 0.05, 4.0) == []


# head / embedding row norms


def test_row_norm_drift_of_a_head_scaled_by_two():
    head = torch.randn(100, 32, dtype=F64, generator=gen(6))
    drift = row_norm_drift(head, 2 * head)
    assert drift["mean_norm_ratio"] == pytest.approx(2.0, rel=1e-12)
    assert drift["median_relative_change"] == pytest.approx(1.0, rel=1e-12)
    assert drift["max_relative_change"] == pytest.approx(1.0, rel=1e-12)


def test_row_norm_drift_skips_zero_rows_and_reports_the_largest_change():
    base = torch.ones(5, 4, dtype=F64)
    base[4] = 0.0  # e.g. an unused token, then trained
    tuned = base.clone()
    tuned[0] *= 0.25  # −75 %
    tuned[1] *= 1.5
    tuned[4] = 1.0
    drift = row_norm_drift(base, tuned)
    assert drift["median_relative_change"] == pytest.approx(0.0, abs=1e-12)
    assert drift["max_relative_change"] == pytest.approx(0.75)
    assert drift["zero_base_rows"] == 1.0
    assert drift["mean_norm_ratio"] == pytest.approx((0.5 + 3 + 2 + 2 + 2) / 8)


# model-level update type


def test_classify_untouched():
    got = classify_update([0.0, 0.0], [0, 0], [(64, 64), (64, 256)])
    assert got["type"] == "untouched" and got["changed"] == 0 and got["total"] == 2 and got["rank"] is None


def test_classify_partial():
    got = classify_update([0.0, 0.02, 0.0, 0.03], [0, 8, 0, 8], [(512, 512)] * 4)
    assert got["type"] == "partial" and got["update"] == "low-rank" and got["rank"] == 8
    assert (got["changed"], got["total"]) == (2, 4)


def test_classify_low_rank():
    shapes = [(4096, 4096)] * 3 + [(11008, 4096)] * 3
    got = classify_update([0.01] * 6, [8, 8, 8, 8, 7, 8], shapes)
    assert got == {
        "type": "low-rank", "update": "low-rank", "rank": 8, "changed": 6, "total": 6, "low_rank": 6, "within_rounding": 0,
    }


def test_classify_full():
    got = classify_update([0.01, 0.02, None], [4096, 4000, 100], [(4096, 4096), (4096, 4096), (100, 4096)])
    assert got["type"] == "full" and got["rank"] is None and got["changed"] == 3
    # One dense matrix among low-rank ones makes the update full; the count says how many were low-rank.
    mixed = classify_update([0.01] * 3, [8, 8, 1024], [(1024, 1024)] * 3)
    assert mixed["type"] == "full" and mixed["low_rank"] == 2


def test_classify_requantised_and_checks_lengths():
    got = classify_update([1e-3, 1e-3], [0, 0], [(64, 64)] * 2)
    assert got["type"] == "requantised" and got["within_rounding"] == 2
    with pytest.raises(ValueError):
        classify_update([0.0], [0, 0], [(4, 4)])


def test_classify_an_end_to_end_merged_lora():
    pairs = [lora_pair((256, 192), 8, 0.03, torch.bfloat16, seed=s, round_base=True) for s in range(3)]
    ranks = [estimated_rank(w0, wt, torch.bfloat16) for w0, wt in pairs]
    norms = [relative_update_norm(w0, wt) for w0, wt in pairs]
    got = classify_update(norms, ranks, [(256, 192)] * 3)
    assert got["type"] == "low-rank" and got["rank"] == 8
