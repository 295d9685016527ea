"""The paper's headline on a real pre-trained model: all-MiniLM-L6-v2 fine-tuned for real in the test.

LoRA fine-tunes carry intruder dimensions, a full fine-tune (nearly) none; ftaudit agrees with the
float64 full-SVD reference; auditing a PEFT adapter gives what auditing peft's merged model gives.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file

from examples import minilm_finetunes as ft
import ftaudit.audit as audit_module
from ftaudit.cli import main
from tests import reference
from tests.hubserver import HubServer
from tests.models import folder_files

BASE = ft.base_model_dir()


@pytest.fixture(scope="module")
def tunes(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("minilm")
    ft.make_lora(root / "lora8", rank=8, save="both")
    ft.make_lora(root / "rslora", rank=8, use_rslora=True, save="both", steps=40)
    ft.make_lora(root / "pattern", rank=8, rank_pattern={"value": 2, "intermediate.dense": 16}, save="both", steps=40)
    ft.make_full(root / "full")
    return {
        "lora": root / "lora8" / "adapter", "merged": root / "lora8" / "merged", "full": root / "full",
        "rslora": root / "rslora" / "adapter", "rslora_merged": root / "rslora" / "merged",
        "pattern": root / "pattern" / "adapter", "pattern_merged": root / "pattern" / "merged",
    }


def audit(model: Path, *args: object) -> dict:
    out = model.with_suffix(".json")
    result = CliRunner().invoke(main, ["check", str(model), "--base", str(BASE), "--json", str(out), *map(str, args)])
    assert result.exit_code in (0, 1), result.stderr
    return json.loads(out.read_text())


def assert_matches_reference(report: dict, tuned_weights: dict) -> None:
    """max |Δ max_cos| ≤ 1e-3, and identical counts at every ε unless a value sits within 1e-3 of it."""
    base = load_file(BASE / "model.safetensors")
    for m in report["matrices"]:
        expected = reference.max_cos(base[m["name"]], tuned_weights[m["name"]], report["settings"]["k"])
        assert m["max_cos"] == pytest.approx(expected, abs=1e-3)
        for eps in report["settings"]["epsilons"]:
            if all(abs(c - eps) > 1e-3 for c in expected):
                assert sum(c < eps for c in m["max_cos"]) == sum(c < eps for c in expected)


def test_lora_has_intruders_full_fine_tuning_has_almost_none(tunes):
    lora, full = audit(tunes["merged"]), audit(tunes["full"])
    assert lora["summary"]["matrices_analysed"] == full["summary"]["matrices_analysed"] == 36
    assert lora["summary"]["intruder_curve"]["0.5"] >= 3 * max(1, full["summary"]["intruder_curve"]["0.5"])
    assert full["summary"]["intruder_curve"]["0.5"] <= 1
    assert lora["summary"]["update"]["type"] == "low-rank" and lora["summary"]["update"]["rank"] == 8
    assert full["summary"]["update"]["type"] == "full"
    assert_matches_reference(lora, load_file(tunes["merged"] / "model.safetensors"))
    assert_matches_reference(full, load_file(tunes["full"] / "model.safetensors"))


@pytest.mark.parametrize("name", ["lora", "rslora", "pattern"])
def test_adapter_audit_equals_the_merged_model_audit(tunes, name):
    adapter = audit(tunes[name])
    merged = audit(tunes["merged" if name == "lora" else f"{name}_merged"])
    assert adapter["model"]["adapter"]["type"] == "lora"
    assert [m["name"] for m in adapter["matrices"]] == [m["name"] for m in merged["matrices"]]
    for a, b in zip(adapter["matrices"], merged["matrices"]):
        assert a["max_cos"] == pytest.approx(b["max_cos"], abs=1e-3)
        assert a["intruders"] == b["intruders"] or any(abs(c - 0.5) < 1e-3 for c in b["max_cos"])
    assert adapter["summary"]["intruder_curve"] == merged["summary"]["intruder_curve"]


def test_adapter_report_gives_rank_alpha_and_scaling_per_module(tunes):
    pattern = audit(tunes["pattern"])
    lora = {m["name"]: m["lora"] for m in pattern["matrices"]}
    assert lora["encoder.layer.0.attention.self.value.weight"] == {"rank": 2, "alpha": 16.0, "scaling": 8.0}
    assert lora["encoder.layer.3.intermediate.dense.weight"] == {"rank": 16, "alpha": 16.0, "scaling": 1.0}
    assert lora["encoder.layer.3.attention.self.query.weight"] == {"rank": 8, "alpha": 16.0, "scaling": 2.0}
    rs = audit(tunes["rslora"])
    assert rs["model"]["adapter"]["use_rslora"] is True
    assert rs["matrices"][0]["lora"]["scaling"] == pytest.approx(16 / 8**0.5)


def test_adapter_from_the_hub_fetches_only_the_targeted_base_tensors(tunes, hub: HubServer, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    hub.add_repo(ft.BASE_ID, folder_files(BASE))
    hub.add_repo("me/minilm-lora", folder_files(tunes["lora"]))
    out = tunes["lora"].parent / "remote.json"
    result = CliRunner().invoke(main, ["check", "me/minilm-lora", "--json", str(out)])
    assert result.exit_code in (0, 1), result.stderr
    report = json.loads(out.read_text())
    assert report["base"] == {"id": ft.BASE_ID, "revision": report["base"]["revision"], "declared_by": "card",
                              "fingerprint": None, "quantization": None}  # a Hub commit names the weights
    base_reads = [r for r in hub.requests if r.method == "GET" and ft.BASE_ID in r.path and r.path.endswith(".safetensors")]
    tensor_bytes = sum(r.bytes_sent for r in base_reads)
    weights = load_file(BASE / "model.safetensors")
    targeted = sum(weights[m["name"]].numel() * 4 for m in report["matrices"])
    assert report["summary"]["matrices_analysed"] == 36 and report["summary"]["heads"] == {}
    headers = sum(r.bytes_sent for r in base_reads if r.range in ("bytes=0-7",) or r.range.startswith("bytes=8-"))
    assert tensor_bytes - headers == targeted


def test_pairs_analysed_at_once_give_the_report_of_one_at_a_time(tunes, monkeypatch):
    monkeypatch.setattr(audit_module, "worker_count", lambda device, shapes: 1)
    serial = audit(tunes["full"])
    monkeypatch.setattr(audit_module, "worker_count", lambda device, shapes: 3)
    parallel = audit(tunes["full"])
    assert [m["name"] for m in parallel["matrices"]] == [m["name"] for m in serial["matrices"]]
    for a, b in zip(parallel["matrices"], serial["matrices"]):
        assert a["max_cos"] == pytest.approx(b["max_cos"], abs=1e-9)
        assert a["intruders"] == b["intruders"] and a["match"] == b["match"]
        assert a["indicators"] == pytest.approx(b["indicators"], rel=1e-9, abs=1e-12)
    assert parallel["summary"]["heads"].keys() == serial["summary"]["heads"].keys()
    for name, drift in serial["summary"]["heads"].items():
        assert parallel["summary"]["heads"][name] == pytest.approx(drift, rel=1e-9)
    assert parallel["summary"]["intruder_curve"] == serial["summary"]["intruder_curve"]
