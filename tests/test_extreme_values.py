"""Float64 weights at the edges of float64's range are measured as the same weights at an ordinary scale."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from ftaudit.spectral import CERTIFIED_SIN
from tests import reference
from tests.invoke import json_report, run
from tests.models import write_model

NAME = "model.layers.0.mlp.down_proj.weight"


def f64_pair(shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A float64 base and the base plus a strong rank-1 update (an intruder)."""
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(*shape, generator=g, dtype=torch.float64)
    update = torch.randn(shape[0], 1, generator=g, dtype=torch.float64) @ torch.randn(1, shape[1], generator=g, dtype=torch.float64)
    return w0, w0 + 3 * update


def audit(tmp_path, base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor]) -> dict:
    """The JSON report of a model with `tuned` tensors against a base with `base` ones."""
    write_model(tmp_path / "base", base)
    write_model(tmp_path / "tuned", tuned)
    return json_report("check", tmp_path / "tuned", "--base", tmp_path / "base", "--format", "json", "--no-cache")


@pytest.mark.parametrize("scale", [1e-200, 1e-160, 1e160, 1e200])
@pytest.mark.parametrize("shape", [(48, 32), (32, 48)])
def test_float64_weights_whose_squares_leave_float64s_range(tmp_path, scale, shape):
    w0, wt = f64_pair(shape)
    plain = audit(tmp_path / "plain", {NAME: w0}, {NAME: wt})
    report = audit(tmp_path / "scaled", {NAME: w0 * scale}, {NAME: wt * scale})
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


@pytest.mark.parametrize("scale", [1e-200, 1e200])
def test_a_float64_heads_row_norms_at_the_edges_of_float64s_range(tmp_path, scale):
    w0, wt = f64_pair((48, 32))
    head = w0 * torch.linspace(0.5, 2.0, 48, dtype=torch.float64)[:, None]
    plain = audit(tmp_path / "plain", {NAME: w0, "lm_head.weight": w0.clone()}, {NAME: wt, "lm_head.weight": head})
    report = audit(tmp_path / "scaled", {NAME: w0 * scale, "lm_head.weight": w0 * scale},
                   {NAME: wt * scale, "lm_head.weight": head * scale})
    expected = plain["summary"]["heads"]["lm_head.weight"]
    assert expected["mean_norm_ratio"] == pytest.approx(1.25, abs=0.05) and expected["zero_base_rows"] == 0
    assert report["summary"]["heads"]["lm_head.weight"] == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("scale", [1e-200, 1e200])
def test_fix_scales_the_intruders_of_float64_weights_at_the_edges_of_float64s_range(tmp_path, scale):
    w0, wt = f64_pair((48, 32))
    records = {}
    for label, factor in (("plain", 1.0), ("scaled", scale)):
        write_model(tmp_path / label / "base", {NAME: w0 * factor})
        write_model(tmp_path / label / "tuned", {NAME: wt * factor})
        code, _, stderr = run("fix", tmp_path / label / "tuned", "--base", tmp_path / label / "base",
                              "--out", tmp_path / label / "fixed", "--json", tmp_path / label / "fix.json", "--no-cache")
        assert code in (0, 1), stderr
        records[label] = {**json.loads((tmp_path / label / "fix.json").read_text()), "code": code}
        records[label]["fixed"] = load_file(tmp_path / label / "fixed" / "model.safetensors")[NAME] / factor
    [change], [expected] = records["scaled"]["changes"], records["plain"]["changes"]
    assert records["scaled"]["code"] == records["plain"]["code"]
    assert change["directions"] == expected["directions"] == [0]
    assert change["sigma_before"] == pytest.approx([s * scale for s in expected["sigma_before"]], rel=1e-9)
    assert torch.allclose(records["scaled"]["fixed"], records["plain"]["fixed"], rtol=1e-9, atol=1e-12)


def test_singular_values_beyond_float64s_range_are_a_one_line_error(tmp_path):
    w0, wt = (w.clamp(-1.0, 1.0) * 1.7e308 for w in f64_pair((48, 32)))
    write_model(tmp_path / "base", {NAME: w0})
    write_model(tmp_path / "tuned", {NAME: wt})
    code, _, stderr = run("check", tmp_path / "tuned", "--base", tmp_path / "base", "--no-cache")
    assert code == 2
    assert stderr == f"ftaudit: error: matrix {NAME!r}: its singular values exceed float64's range\n"
