"""On a CUDA device, `check` and `fix` give what they give on the CPU.

These run where torch sees a GPU (`pytest tests/test_cuda.py` on a GPU machine, as bench/gpu.sh does);
CI has none, and the CPU path they compare against is what the rest of the suite covers. The inputs
take every path of the analysis: the tuned top k certified from the iterated start (matrices 512
wide), a tall base kept as its right vectors and one so ill-conditioned that its vectors come from
a QR, an adapter's factors, non-finite weights, a cold and a warm base-spectrum cache, and rank-deficient
matrices on either side (a constant and a zeroed tuned matrix, a zero and a rank-deficient base), whose nonzero
singular vectors come from a full SVD.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.invoke import run
from tests.models import card, llama_like, low_rank_update, small_update, write_model

DEVICE = "cuda"
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TARGETS = ("q_proj", "v_proj", "gate_proj", "down_proj")
RELATIVE = 1e-6
"""Largest relative difference between the two devices' numbers (both compute in float64)."""


def ill_conditioned(rows: int, cols: int, seed: int) -> torch.Tensor:
    """A tall matrix with σ1/σn = 1e6, beyond the Gram's limit: its basis comes from a QR."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(cols, cols, generator=g, dtype=torch.float64)).Q
    return (u * torch.logspace(0, -6, cols, dtype=torch.float64)) @ v.T


def degenerate(base: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A base and a tuned model whose attention matrices are rank-deficient on one side or the other."""
    base, tuned = dict(base), dict(base)
    q, k, v, o = (f"model.layers.0.self_attn.{m}_proj.weight" for m in "qkvo")
    tuned[q] = torch.full_like(base[q], 0.05)  # rank 1
    tuned[k] = torch.zeros_like(base[k])  # pruned
    base[v] = torch.zeros_like(base[v])  # zero-initialised, tuned into a full matrix
    base[o] = base[o].clone()
    base[o][[3, 70]] = 0  # dead outputs, one revived
    tuned[o] = base[o].clone()
    tuned[o][3] = 3 * torch.randn(base[o].shape[1], generator=torch.Generator().manual_seed(5))
    return base, tuned


def lora_adapter(folder: Path, base: dict[str, torch.Tensor], base_dir: Path, rank: int = 4) -> Path:
    """A PEFT LoRA adapter on TARGETS, with updates strong enough to make intruders."""
    g = torch.Generator().manual_seed(3)
    tensors = {}
    for name, w in base.items():
        if w.ndim == 2 and any(t in name for t in TARGETS):
            module = "base_model.model." + name.removesuffix(".weight")
            tensors[f"{module}.lora_A.weight"] = torch.randn(rank, w.shape[1], generator=g) / w.shape[1] ** 0.5
            tensors[f"{module}.lora_B.weight"] = torch.randn(w.shape[0], rank, generator=g)
    folder.mkdir(parents=True)
    save_file(tensors, folder / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(TARGETS),
              "base_model_name_or_path": str(base_dir)}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cuda-models")
    base = llama_like(layers=1, hidden=512, ffn=1376, vocab=300, dtype=torch.bfloat16)
    base_dir = write_model(root / "base", base)
    steep = dict(base, **{"model.layers.0.mlp.up_proj.weight": ill_conditioned(1376, 512, 4).float()})
    steep_dir = write_model(root / "steep-base", steep)
    broken = small_update(base)
    broken["model.layers.0.self_attn.k_proj.weight"][3, 5] = float("nan")
    low_base, low_tuned = degenerate(base)
    low_base_dir = write_model(root / "low-base", low_base)
    return {
        "low-rank": write_model(root / "low-rank", low_tuned, readme=card(str(low_base_dir))),
        "base": base_dir,
        "full": write_model(root / "full", small_update(base), readme=card(str(base_dir))),
        "intruded": write_model(root / "intruded", low_rank_update(base), readme=card(str(base_dir))),
        "steep": write_model(root / "steep", low_rank_update(steep), readme=card(str(steep_dir))),
        "broken": write_model(root / "broken", broken, readme=card(str(base_dir))),
        "adapter": lora_adapter(root / "adapter", base, base_dir),
    }


def audit(model: Path, device: str, out: Path, *args: object) -> dict:
    code, _, err = run("check", model, "--device", device, "--json", out, "--quiet", *args)
    assert code in (0, 1), err
    return json.loads(out.read_text())


def assert_same(cpu: object, gpu: object, where: str = "report") -> None:
    """Equal structure, strings and integers; floats within RELATIVE (absolute 1e-9 near zero)."""
    if isinstance(cpu, dict):
        assert isinstance(gpu, dict) and cpu.keys() == gpu.keys(), where
        for key in cpu.keys() - {"created_at", "device"}:
            assert_same(cpu[key], gpu[key], f"{where}.{key}")
    elif isinstance(cpu, list):
        assert isinstance(gpu, list) and len(cpu) == len(gpu), where
        for i, (a, b) in enumerate(zip(cpu, gpu)):
            assert_same(a, b, f"{where}[{i}]")
    elif isinstance(cpu, float) and not isinstance(gpu, bool) and isinstance(gpu, (int, float)):
        assert math.isclose(cpu, gpu, rel_tol=RELATIVE, abs_tol=1e-9), f"{where}: cpu {cpu}, {DEVICE} {gpu}"
    else:
        assert cpu == gpu, f"{where}: cpu {cpu!r}, {DEVICE} {gpu!r}"


@pytest.mark.parametrize("name", ["full", "intruded", "steep", "broken", "adapter", "low-rank"])
def test_the_gpu_report_is_the_cpu_report(models, tmp_path, name):
    args = ("--base", models["base"]) if name == "adapter" else ()
    cpu = audit(models[name], "cpu", tmp_path / "cpu.json", "--no-cache", *args)
    gpu = audit(models[name], DEVICE, tmp_path / "gpu.json", "--no-cache", *args)
    assert gpu["settings"]["device"].startswith("cuda")
    assert cpu["summary"]["matrices_analysed"] + len(cpu["tensors"]["nonfinite"]) == (4 if name in ("adapter", "low-rank") else 7)
    assert_same(cpu, gpu)


def test_cold_and_warm_cache_on_the_gpu_give_the_cpu_report(models, tmp_path):
    cpu = audit(models["intruded"], "cpu", tmp_path / "cpu.json", "--no-cache")
    cache = Path(os.environ["FTAUDIT_CACHE"])
    cold = audit(models["intruded"], DEVICE, tmp_path / "cold.json")
    entries = sorted(p for p in cache.rglob("*") if p.is_file())
    warm = audit(models["intruded"], DEVICE, tmp_path / "warm.json")
    assert len(entries) >= 7 and entries == sorted(p for p in cache.rglob("*") if p.is_file())
    for report in (cold, warm):
        assert_same(cpu, report)
    assert cold["matrices"] == warm["matrices"]  # cached bases give the very same numbers


def test_cache_filled_on_the_cpu_answers_the_gpu(models, tmp_path):
    cpu = audit(models["adapter"], "cpu", tmp_path / "cpu.json", "--base", models["base"])
    gpu = audit(models["adapter"], DEVICE, tmp_path / "gpu.json", "--base", models["base"])
    assert_same(cpu, gpu)


def test_fix_on_the_gpu_writes_what_it_writes_on_the_cpu(models, tmp_path):
    written = {}
    for i, device in enumerate(("cpu", DEVICE)):
        out = tmp_path / f"out-{i}"
        code, _, err = run("fix", models["adapter"], "--base", models["base"], "--out", out, "--device", device,
                           "--no-cache", "--quiet")
        assert code in (0, 1), err
        written[device] = load_file(out / "adapter_model.safetensors")
    cpu, gpu = written["cpu"], written[DEVICE]
    assert cpu.keys() == gpu.keys()
    given = load_file(models["adapter"] / "adapter_model.safetensors")
    changed = [name for name in cpu if not torch.equal(cpu[name], given[name])]
    assert changed, "the fix changed no factor"
    for name in cpu:
        torch.testing.assert_close(gpu[name], cpu[name], rtol=1e-5, atol=1e-7, msg=name)
