"""Forgetting-risk indicators of the update ΔW = Wt − W0."""

from __future__ import annotations

import torch


def relative_update_norm(base: torch.Tensor, tuned: torch.Tensor) -> float | None:
    """‖Wt − W0‖_F / ‖W0‖_F: 0 for identical matrices, None when the base is all zeros."""
    delta = torch.linalg.matrix_norm(tuned - base).item()
    scale = torch.linalg.matrix_norm(base).item()
    if scale == 0.0:
        return 0.0 if delta == 0.0 else None
    return delta / scale
