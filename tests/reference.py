"""The paper's definition written the plain way: full float64 SVDs of both matrices."""

from __future__ import annotations

import pytest
import torch

from ftaudit.spectral import CERTIFIED_SIN


def max_cos(w0: torch.Tensor, wt: torch.Tensor, k: int = 10) -> list[float]:
    """For each of the top-k left singular vectors of wt, its largest |cos| with any of w0's."""
    u0 = torch.linalg.svd(w0.double(), full_matrices=False).U
    ut = torch.linalg.svd(wt.double(), full_matrices=False).U[:, :k]
    return (u0.T @ ut).abs().max(dim=0).values.tolist()


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
