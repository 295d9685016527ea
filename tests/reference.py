"""The paper's definition written the plain way: full float64 SVDs of both matrices."""

from __future__ import annotations

import torch


def max_cos(w0: torch.Tensor, wt: torch.Tensor, k: int = 10) -> list[float]:
    """For each of the top-k left singular vectors of wt, its largest |cos| with any of w0's."""
    u0 = torch.linalg.svd(w0.double(), full_matrices=False).U
    ut = torch.linalg.svd(wt.double(), full_matrices=False).U[:, :k]
    return (u0.T @ ut).abs().max(dim=0).values.tolist()
