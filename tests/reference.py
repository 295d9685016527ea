"""The paper's definition written the plain way: full float64 SVDs of both matrices."""

from __future__ import annotations

import pytest
import torch

from ftaudit.spectral import CERTIFIED_SIN


def nonzero_left(w: torch.Tensor, count: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `count` (default all) left singular vectors of w whose singular value is nonzero, and those values:
    above σ1·max(m, n)·ε64, float64's numerical rank. The others span the null space in no particular basis."""
    u, s, _ = torch.linalg.svd(w.double(), full_matrices=False)
    keep = s > s[0] * max(w.shape) * torch.finfo(torch.float64).eps
    return u[:, keep][:, :count], s[keep][:count]


def max_cos(w0: torch.Tensor, wt: torch.Tensor, k: int = 10) -> list[float]:
    """For each of the top-k left singular vectors of wt with nonzero singular value, its largest |cos| with any of
    w0's with nonzero singular value (0 when w0 is all zeros)."""
    u0, ut = nonzero_left(w0)[0], nonzero_left(wt, k)[0]
    if u0.shape[1] == 0:
        return [0.0] * ut.shape[1]
    return (u0.T @ ut).abs().max(dim=0).values.tolist()


def outside_span(w0: torch.Tensor, wt: torch.Tensor, k: int = 10) -> list[float]:
    """For the same vectors of wt as `max_cos`, the fraction of each one's energy outside w0's column space."""
    u0, ut = nonzero_left(w0)[0], nonzero_left(wt, k)[0]
    return (1.0 - (u0.T @ ut).square().sum(dim=0)).tolist()


def assert_audited_as_merged(from_adapter: dict, merged: dict, rank: int, alpha: float) -> None:
    """An adapter's JSON report against its merged model's: the same matrices, each with the same `max_cos` (within
    the certified bound), numerical rank `rank` and the adapter's rank and alpha; the same intruders and verdict."""
    by_name = {m["name"]: m for m in merged["matrices"]}
    assert {m["name"] for m in from_adapter["matrices"]} == set(by_name)
    for matrix in from_adapter["matrices"]:
        other = by_name[matrix["name"]]
        assert matrix["max_cos"] == pytest.approx(other["max_cos"], abs=2 * CERTIFIED_SIN), matrix["name"]
        assert matrix["indicators"]["numerical_rank"] == other["indicators"]["numerical_rank"] == rank
        assert matrix["lora"] == {"rank": rank, "alpha": alpha, "scaling": alpha / rank}
    assert from_adapter["summary"]["intruder_dimensions"] == merged["summary"]["intruder_dimensions"] > 0
    assert from_adapter["verdict"] == merged["verdict"]
