"""Singular vectors of a zero singular value span a null space in no particular basis: rank-deficient matrices.

A tuned matrix of rank r < k has only r directions to examine, and a base matrix's null-space vectors are no base
direction to match; both sides keep the vectors whose singular value is above float64's numerical rank, as
`tests.reference` does with full SVDs.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ftaudit import low_rank
from ftaudit.analyses.matrix import StoredPair, analyse_pair
from ftaudit.low_rank import LowRankUpdate
from ftaudit.pairing import TensorPair
from ftaudit.report import MatrixResult
from ftaudit.spectral import CERTIFIED_SIN
from tests import reference
from tests.invoke import json_report, run
from tests.models import card, llama_like, write_model

K = 10
LAYER = "model.layers.0.self_attn"


def _random(rows: int, cols: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, cols, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) / cols**0.5


def _outside_column_space(w0: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """`count` orthonormal directions of R^m orthogonal to w0's column space."""
    u, _ = reference.nonzero_left(w0)
    x = torch.randn(w0.shape[0], count, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return torch.linalg.qr(x - u @ (u.T @ x)).Q


def _pair(shape: tuple[int, int]) -> TensorPair:
    return TensorPair(f"{LAYER}.q_proj.weight", f"{LAYER}.q_proj.weight", f"{LAYER}.q_proj.weight", "attention", 0,
                      shape)


def _analysed(w0: torch.Tensor, wt: torch.Tensor, update: LowRankUpdate | None = None) -> MatrixResult:
    found = analyse_pair(_pair(tuple(w0.shape)), StoredPair(w0, wt), K, 0.5, torch.device("cpu"), None, update)
    assert isinstance(found, MatrixResult)
    return found


def _assert_reference(found: MatrixResult, w0: torch.Tensor, wt: torch.Tensor) -> None:
    """The examined vectors are wt's top k of nonzero singular value, measured against w0's column space."""
    expected = reference.max_cos(w0, wt, K)
    assert len(found.max_cos) == len(found.sigma) == len(found.match) == len(found.outside_span) == len(expected)
    assert found.max_cos == pytest.approx(expected, abs=CERTIFIED_SIN)
    assert found.outside_span == pytest.approx(reference.outside_span(w0, wt, K), abs=2 * CERTIFIED_SIN)
    assert found.sigma == pytest.approx(reference.nonzero_left(wt, K)[1].tolist(), rel=1e-8)
    assert found.intruders == sum(c < 0.5 for c in expected)


SHAPES = [(520, 600), (600, 520)]
"""Wide and tall, each wide enough (≥ REFINE_MIN, FACTOR_ROUTE_MIN) for the certified start and the factor route."""


@pytest.mark.parametrize("shape", SHAPES)
def test_a_constant_tuned_matrix_has_one_direction_to_examine(shape):
    w0 = _random(*shape, seed=0)
    wt = torch.full(shape, 0.05, dtype=torch.float64)
    found = _analysed(w0, wt)
    _assert_reference(found, w0, wt)
    assert len(found.max_cos) == 1
    assert found.indicators["subspace_drift_deg"] == 90.0  # one direction left of the base's ten


@pytest.mark.parametrize("shape", SHAPES)
def test_a_zeroed_tuned_matrix_has_none(shape):
    w0 = _random(*shape, seed=0)
    found = _analysed(w0, torch.zeros(shape, dtype=torch.float64))
    assert found.max_cos == found.sigma == found.match == found.outside_span == found.intruder_strength == []
    assert found.intruders == 0
    assert found.indicators["subspace_drift_deg"] == 90.0


@pytest.mark.parametrize("shape", SHAPES)
def test_a_float32_outer_product_keeps_its_rounding_directions(shape):
    """Rounding to float32 makes a rank-1 product full rank, its other values ~1e-9·σ1: real, nonzero, examined."""
    g = torch.Generator().manual_seed(1)
    w0 = _random(*shape, seed=0)
    wt = (torch.randn(shape[0], 1, generator=g) @ torch.randn(1, shape[1], generator=g)).double()
    found = _analysed(w0, wt)
    assert len(found.max_cos) == K
    _assert_reference(found, w0, wt)


@pytest.mark.parametrize("shape", SHAPES)
def test_every_direction_of_a_zero_base_tuned_into_a_full_matrix_is_an_intruder(shape):
    w0 = torch.zeros(shape, dtype=torch.float64)
    wt = _random(*shape, seed=2)
    found = _analysed(w0, wt)
    assert found.max_cos == [0.0] * K and found.match == [None] * K
    assert found.outside_span == pytest.approx([1.0] * K, abs=1e-12)
    assert found.intruders == K and len(found.intruder_strength) == K
    assert found.indicators["subspace_drift_deg"] == 90.0
    _assert_reference(found, w0, wt)


@pytest.mark.parametrize("shape", SHAPES)
def test_a_new_direction_in_a_rank_deficient_base_is_an_intruder(shape):
    """The base loses 3 dimensions of its column space (rows or columns zeroed); the update puts its two strongest
    directions there, where the base has only null-space vectors, no direction."""
    w0 = _random(*shape, seed=0)
    if shape[0] < shape[1]:
        w0[[3, 50, 400]] = 0.0  # three dead outputs
    else:
        w0[:, [3, 50, 400]] = 0.0  # three dead inputs: a smaller column space of the tall matrix
    new = _outside_column_space(w0, 2, seed=3)
    wt = w0 + new @ (torch.tensor([[10.0], [5.0]], dtype=torch.float64) * _random(2, shape[1], seed=4))
    found = _analysed(w0, wt)
    _assert_reference(found, w0, wt)
    assert max(found.max_cos[:2]) < 0.1 and found.intruders == 2
    assert min(found.outside_span[:2]) > 0.9


@pytest.fixture
def factor_route(monkeypatch):
    """Counts the tuned matrices the factor route decomposes in full rather than from the factors."""
    calls: list[tuple[int, ...]] = []
    original = low_rank.left_spectrum
    monkeypatch.setattr(low_rank, "left_spectrum", lambda w, *a, **kw: calls.append(tuple(w.shape)) or original(w, *a, **kw))
    return calls


@pytest.mark.parametrize("shape", SHAPES)
def test_an_adapter_on_a_zero_base_has_its_rank_of_directions_all_intruders(shape, factor_route):
    w0 = torch.zeros(shape, dtype=torch.float64)
    update = LowRankUpdate(_random(shape[0], 4, seed=5), _random(4, shape[1], seed=6))
    wt = update.left @ update.right
    found = _analysed(w0, wt, update)
    assert len(found.max_cos) == 4 and found.intruders == 4
    _assert_reference(found, w0, wt)


@pytest.mark.parametrize("shape", SHAPES)
def test_an_adapter_into_a_rank_deficient_base_is_measured_from_its_factors(shape, factor_route):
    w0 = _random(*shape, seed=0)
    if shape[0] < shape[1]:
        w0[[3, 50, 400]] = 0.0
    else:
        w0[:, [3, 50, 400]] = 0.0
    new = _outside_column_space(w0, 1, seed=7)
    update = LowRankUpdate(torch.cat([4 * new, _random(shape[0], 3, seed=8)], 1), _random(4, shape[1], seed=9))
    wt = w0 + update.left @ update.right
    found = _analysed(w0, wt, update)
    _assert_reference(found, w0, wt)
    assert found.intruders >= 1 and factor_route == []


@pytest.mark.parametrize("shape", SHAPES)
def test_rank_deficient_bases_are_decomposed_again_only_when_the_gram_cannot_tell_zero(monkeypatch, shape):
    """A full-rank matrix takes no decomposition beyond its Gram's; one whose Gram holds values at zero's level,
    a full float64 SVD, which tells them apart: of the triangle of its QR on the smaller side, not of the matrix."""
    calls: list[tuple[int, ...]] = []
    original = torch.linalg.svd

    def counted(w0: torch.Tensor, wt: torch.Tensor) -> MatrixResult:
        with monkeypatch.context() as patched:
            patched.setattr(torch.linalg, "svd", lambda w, *a, **kw: calls.append(tuple(w.shape)) or original(w, *a, **kw))
            return _analysed(w0, wt)

    w0, wt = _random(*shape, seed=0), _random(*shape, seed=1)
    _assert_reference(counted(w0, wt), w0, wt)
    assert calls == []
    w0[:, 7] = 0.0
    w0[7] = 0.0
    _assert_reference(counted(w0, wt), w0, wt)
    assert calls == [(min(shape), min(shape))]


# Through the command line, on real safetensors files.


def _models(root: Path) -> tuple[Path, Path, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """A base and a tuned Llama-shaped model whose attention matrices are degenerate on one side or the other."""
    base = llama_like(layers=1)
    tuned = dict(base)
    q, k, v, o = (f"{LAYER}.{m}_proj.weight" for m in "qkvo")
    tuned[q] = torch.full_like(base[q], 0.05)  # rank 1
    tuned[k] = torch.zeros_like(base[k])  # pruned
    base[v] = torch.zeros_like(base[v])  # zero-initialised, then trained into a full matrix
    base[o] = base[o].clone()
    base[o][3] = 0.0  # a dead output
    tuned[o] = base[o].clone()
    tuned[o][3] = 3.0 * torch.randn(base[o].shape[1], generator=torch.Generator().manual_seed(5))  # revived
    base_dir = write_model(root / "base", base)
    model_dir = write_model(root / "model", tuned, readme=card(str(base_dir)))
    return base_dir, model_dir, {n: (base[n], tuned[n]) for n in (q, k, v, o)}


def test_the_cli_audits_degenerate_matrices_as_the_reference_does(tmp_path):
    base_dir, model_dir, pairs = _models(tmp_path)
    cold = json_report("check", model_dir, "--format", "json")
    code, stdout, stderr = run("check", model_dir, "--format", "json", "--debug")
    assert code in (0, 1) and "base-spectrum cache" in stderr and "4 hits, 0 misses" in stderr  # an all-zero base's too
    warm = json.loads(stdout)
    by_name = {m["name"]: m for m in cold["matrices"]}
    assert set(by_name) == set(pairs)
    for name, (w0, wt) in pairs.items():
        m = by_name[name]
        expected = reference.max_cos(w0, wt, K)
        assert m["max_cos"] == pytest.approx(expected, abs=CERTIFIED_SIN), name
        assert len(m["sigma"]) == len(m["match"]) == len(m["outside_span"]) == len(expected), name
        assert m["outside_span"] == pytest.approx(reference.outside_span(w0, wt, K), abs=2 * CERTIFIED_SIN), name
    q, k, v, o = (by_name[f"{LAYER}.{m}_proj.weight"] for m in "qkvo")
    assert len(q["max_cos"]) == 1
    assert k["max_cos"] == [] and k["intruders"] == 0
    assert v["intruders"] == K and v["max_cos"] == [0.0] * K and v["match"] == [None] * K
    assert o["max_cos"][0] < 0.5 and o["outside_span"][0] > 0.5
    summary = cold["summary"]
    assert summary["intruder_rate"] == pytest.approx(summary["intruder_dimensions"] / (1 + 0 + K + K))
    for report in (cold, warm):
        del report["created_at"]
    assert warm == cold


def test_renderers_and_merged_shards_take_matrices_with_few_or_no_directions(tmp_path):
    base_dir, model_dir, _ = _models(tmp_path)
    whole = json_report("check", model_dir, "--format", "json")
    outputs = {"--card": tmp_path / "card.md", "--badge": tmp_path / "b.svg", "--heatmap": tmp_path / "h.svg"}
    printed = {}
    for fmt in ("text", "markdown", "github"):
        code, printed[fmt], stderr = run("check", model_dir, "--format", fmt, *[a for o in outputs.items() for a in o])
        assert code in (0, 1) and printed[fmt] and "Traceback" not in stderr, stderr
    assert all(path.stat().st_size for path in outputs.values())
    # The pruned matrix has no direction examined: no lowest best match in the table of worst matrices.
    assert re.search(r"\| `model\.layers\.0\.self_attn\.k_proj\.weight` \| 0 \| n/a \|", printed["markdown"])
    shards = []
    for i in (1, 2):
        shards.append(tmp_path / f"r{i}.json")
        code, _, stderr = run("check", model_dir, "--shard", f"{i}/2", "--json", shards[-1], "--quiet")
        assert code in (0, 1), stderr
    merged = json_report("merge", *shards, "--format", "json")
    assert merged["matrices"] == whole["matrices"] and merged["summary"] == whole["summary"]


def test_fix_scales_only_real_directions(tmp_path):
    base_dir, model_dir, pairs = _models(tmp_path)
    out, record = tmp_path / "fixed", tmp_path / "fix.json"
    code, _, stderr = run("fix", model_dir, "--out", out, "--json", record, "--lambda", 0)
    assert code in (0, 1), stderr
    changes = {c["name"]: c for c in json.loads(record.read_text())["changes"]}
    q, k, v, o = (f"{LAYER}.{m}_proj.weight" for m in "qkvo")
    assert k not in changes  # a zero matrix has no direction to scale
    assert set(changes.get(q, {"directions": []})["directions"]) <= {0}  # the constant's one direction, if any
    assert changes[v]["directions"] == list(range(K))  # every direction of a matrix grown from zero
    assert all(s > 0 for c in changes.values() for s in c["sigma_before"])
    fixed = load_file(out / "model.safetensors")
    w = pairs[v][1].double()
    u = reference.nonzero_left(w, K)[0]
    assert torch.allclose(fixed[v].double(), w - u @ (u.T @ w), atol=1e-5)
    assert math.isclose(fixed[k].abs().sum().item(), 0.0)
