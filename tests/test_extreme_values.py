"""Float64 weights at the edges of float64's range are measured as the same weights at an ordinary scale."""

from __future__ import annotations

import pytest
import torch

from ftaudit.spectral import CERTIFIED_SIN
from tests import reference
from tests.invoke import json_report
from tests.models import write_model

NAME = "model.layers.0.mlp.down_proj.weight"


def f64_pair(shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A float64 base and the base plus a strong rank-1 update (an intruder)."""
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(*shape, generator=g, dtype=torch.float64)
    update = torch.randn(shape[0], 1, generator=g, dtype=torch.float64) @ torch.randn(1, shape[1], generator=g, dtype=torch.float64)
    return w0, w0 + 3 * update


def audit(tmp_path, w0: torch.Tensor, wt: torch.Tensor) -> dict:
    write_model(tmp_path / "base", {NAME: w0})
    write_model(tmp_path / "tuned", {NAME: wt})
    return json_report("check", tmp_path / "tuned", "--base", tmp_path / "base", "--format", "json", "--no-cache")


@pytest.mark.parametrize("scale", [1e-200, 1e-160, 1e160, 1e200])
@pytest.mark.parametrize("shape", [(48, 32), (32, 48)])
def test_float64_weights_whose_squares_leave_float64s_range(tmp_path, scale, shape):
    w0, wt = f64_pair(shape)
    plain = audit(tmp_path / "plain", w0, wt)
    report = audit(tmp_path / "scaled", w0 * scale, wt * scale)
    assert report["tensors"]["unchanged"] == report["tensors"]["nonfinite"] == []
    [matrix], [expected] = report["matrices"], plain["matrices"]
    assert matrix["max_cos"] == pytest.approx(reference.max_cos(w0, wt), abs=CERTIFIED_SIN)
    assert matrix["max_cos"] == pytest.approx(expected["max_cos"], abs=1e-9)
    assert matrix["sigma"] == pytest.approx([s * scale for s in expected["sigma"]], rel=1e-9)
    assert matrix["indicators"] == pytest.approx(expected["indicators"], rel=1e-6)
    assert len(matrix["intruder_strength"]) == len(expected["intruder_strength"])
    for found, unscaled in zip(matrix["intruder_strength"], expected["intruder_strength"]):
        assert found == pytest.approx({**unscaled, "sigma": unscaled["sigma"] * scale}, rel=1e-9)
    assert report["summary"]["intruder_dimensions"] == plain["summary"]["intruder_dimensions"] > 0
    assert report["verdict"] == plain["verdict"]
