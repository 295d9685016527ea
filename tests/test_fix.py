"""`ftaudit fix` on a real LoRA fine-tune of the packaged MiniLM: the adapter, its merge, and a full model.

The full-model input is the example adapter merged into the base by hand, stored in bfloat16 in two
shards with an index, so that the output's dtype, sharding and untouched bytes can be checked.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from examples import minilm_finetunes as ft
from ftaudit.report import Report
from ftaudit.spectral import top_left
from tests.invoke import run
from tests.models import (
    TRAINER_STATE, card, folder_files, llama_like, low_rank_update, trainer_run, write_model, write_trainer_state,
)

BASE = ft.base_model_dir()
ADAPTER = Path(__file__).resolve().parent.parent / "examples" / "minilm-lora-r8"
SCALING = 16 / 8
PEFT_PREFIX = "base_model.model."


def merged_weights() -> dict[str, torch.Tensor]:
    """The example adapter merged into the base, W0 + scaling·B·A, in float64 (adapted matrices only)."""
    base, adapter = load_file(BASE / "model.safetensors"), load_file(ADAPTER / "adapter_model.safetensors")
    out = {}
    for name, a in adapter.items():
        if ".lora_A." in name:
            module = name[len(PEFT_PREFIX):].split(".lora_A.")[0]
            b = adapter[name.replace(".lora_A.", ".lora_B.")]
            out[f"{module}.weight"] = base[f"{module}.weight"].double() + SCALING * (b.double() @ a.double())
    return out


def write_full_model(folder: Path) -> Path:
    """The merged fine-tune as a bfloat16 checkpoint in two shards, with the base's other files and a card."""
    tensors = {**load_file(BASE / "model.safetensors"), **merged_weights()}
    tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()}
    folder.mkdir()
    names, weight_map = sorted(tensors), {}
    for i in range(2):
        file = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in names[i::2]}, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names[i::2], file))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for name in ["config.json", *ft.TOKENIZER_FILES]:
        shutil.copy(BASE / name, folder / name)
    shutil.copy(ADAPTER / ft.HEAD_FILE, folder / ft.HEAD_FILE)
    (folder / "README.md").write_text(card(str(BASE)))
    (folder / "onnx").mkdir()
    (folder / "onnx" / "model.onnx").write_bytes(b"an export that would keep the unpatched weights")
    return folder


def small_fine_tune(root: Path) -> Path:
    """root/model: a small Llama-shaped model with intruders, whose card names root/base, its base."""
    base = llama_like(layers=1)
    write_model(root / "base", base)
    return write_model(root / "model", low_rank_update(base), readme=card(str(root / "base")))


LAYERS_4_5 = ["--exclude", "encoder.layer.[0-3].*"]
LAYER_0 = ["--exclude", "encoder.layer.[1-5].*"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    """Every fix the tests look at, run once through the CLI with one shared base-spectrum cache.

    Most runs analyse a few layers only (--exclude), to keep the audits before and after short.
    """
    root = tmp_path_factory.mktemp("fix")
    full = write_full_model(root / "full")
    (root / "adapter1").mkdir()  # an empty --out folder is accepted
    jobs = {
        "adapter75": (ADAPTER, []),
        "adapter0": (ADAPTER, ["--lambda", 0, "--only-top", 1, *LAYERS_4_5]),
        "adapter1": (ADAPTER, ["--lambda", 1, *LAYER_0]),
        "merged0": (ADAPTER, ["--lambda", 0, "--merge", *LAYERS_4_5]),
        "full0": (full, ["--lambda", 0, "--card", root / "full0-card.md", *LAYER_0]),
    }
    out: dict[str, dict] = {"full": {"path": full}}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FTAUDIT_CACHE", str(root / "spectra"))
        for name, (model, args) in jobs.items():
            path, record = root / name, root / f"{name}.json"
            code, stdout, stderr = run("fix", model, "--base", BASE, "--out", path, "--json", record, *args)
            assert code in (0, 1), stderr
            out[name] = {"path": path, "code": code, "stdout": stdout, "record": json.loads(record.read_text())}
    return out


def patched(w: torch.Tensor, directions: list[int], lam: float) -> torch.Tensor:
    """W with the singular values of these top-10 singular vectors (as the audit computes them) times λ."""
    u = top_left(w, 10).U[:, directions]
    v = w.T @ u / torch.linalg.vector_norm(w.T @ u, dim=0)
    sigma = torch.linalg.vector_norm(w.T @ u, dim=0)
    return w + (lam - 1) * (u * sigma) @ v.T


def data_ranges(path: Path) -> tuple[bytes, dict[str, bytes]]:
    """A safetensors file's header bytes, and each tensor's raw data bytes."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    start = 8 + n
    return raw[:start], {k: raw[start + v["data_offsets"][0] : start + v["data_offsets"][1]] for k, v in header.items()}


def changed_tensors(record: dict) -> set[str]:
    return {t for c in record["changes"] for t in c["tensors"]}


def test_adapter_fix_scales_the_intruders_and_keeps_the_rank(runs):
    record, out = runs["adapter75"]["record"], runs["adapter75"]["path"]
    before, after = record["before"]["summary"], record["after"]["summary"]
    assert record["output"]["format"] == "adapter" and record["settings"]["lambda"] == 0.75
    assert record["summary"]["directions_scaled"] == before["intruder_dimensions"] == 35
    assert record["summary"]["matrices_changed"] == before["matrices_with_intruders"]
    assert after["intruder_dimensions"] < before["intruder_dimensions"]
    assert after["intruder_strength_max"] < before["intruder_strength_max"]
    for c in record["changes"]:
        assert c["sigma_after"] == pytest.approx([0.75 * s for s in c["sigma_before"]])
        assert all(m < 0.5 for m in c["max_cos"]) and 0 < c["truncation_error"] < 0.5
    assert runs["adapter75"]["code"] == (1 if record["after"]["verdict"]["status"] == "fail" else 0)

    header_in, data_in = data_ranges(ADAPTER / "adapter_model.safetensors")
    header_out, data_out = data_ranges(out / "adapter_model.safetensors")
    assert header_out == header_in  # same names, dtypes, shapes (rank 8) and offsets
    changed = changed_tensors(record)
    assert len(changed) == 2 * record["summary"]["matrices_changed"]
    for name in data_in:
        assert (data_out[name] == data_in[name]) == (name not in changed), name
    for name in ("adapter_config.json", ft.HEAD_FILE):
        assert (out / name).read_bytes() == (ADAPTER / name).read_bytes()


def test_adapter_factors_hold_the_patch_up_to_the_reported_rank_cut(runs):
    record, out = runs["adapter0"]["record"], runs["adapter0"]["path"]
    base, merged = load_file(BASE / "model.safetensors"), merged_weights()
    new = load_file(out / "adapter_model.safetensors")
    assert record["changes"]
    for c in record["changes"]:
        a_name, b_name = c["tensors"]
        assert new[a_name].shape[0] == new[b_name].shape[1] == 8
        w = merged[c["name"]]
        patched_update = patched(w, c["directions"], 0.0) - base[c["name"]].double()
        written = SCALING * new[b_name].double() @ new[a_name].double()
        error = torch.linalg.norm(written - patched_update) / torch.linalg.norm(patched_update)
        assert error.item() == pytest.approx(c["truncation_error"], abs=1e-6)
        best = torch.linalg.svdvals(patched_update)  # the cut is the best rank-8 one: Eckart–Young
        assert error.item() == pytest.approx((best[8:].square().sum() / best.square().sum()).sqrt().item(), abs=1e-6)


def test_only_top_scales_the_strongest_intruder_of_each_matrix(runs):
    record = runs["adapter0"]["record"]
    before = {m["name"]: m for m in record["before"]["matrices"]}
    assert record["settings"]["only_top"] == 1 and len(before) == 12
    assert {c["name"] for c in record["changes"]} == {n for n, m in before.items() if m["intruders"]}
    for c in record["changes"]:
        m = before[c["name"]]
        first = next(i for i, cos in enumerate(m["max_cos"]) if cos < 0.5)
        assert c["directions"] == [first] and c["sigma_after"] == [0.0]


def test_adapter_output_loads_with_peft(runs):
    model = ft._load_encoder(runs["adapter75"]["path"])
    new = load_file(runs["adapter75"]["path"] / "adapter_model.safetensors")
    module = model.base_model.model.encoder.layer[5].attention.output.dense
    name = f"{PEFT_PREFIX}encoder.layer.5.attention.output.dense.lora_A.weight"
    assert torch.equal(module.lora_A["default"].weight.detach(), new[name])
    assert module.r["default"] == 8


def test_lambda_zero_removes_each_intruder_found(runs):
    for name in ("full0", "merged0"):
        record, out = runs[name]["record"], runs[name]["path"]
        weights = {}
        for file in sorted(out.glob("*.safetensors")):
            weights.update(load_file(file))
        shards = sorted(runs["full"]["path"].glob("model-*.safetensors"))
        source = merged_weights() if name == "merged0" else {k: v for f in shards for k, v in load_file(f).items()}
        for c in record["changes"]:
            svd = torch.linalg.svd(source[c["name"]].double(), full_matrices=False)
            u = svd.U[:, c["directions"]]
            left = torch.linalg.norm(u.T @ weights[c["name"]].double(), dim=1) / svd.S[c["directions"]]
            assert left.max().item() < (1e-2 if name == "full0" else 1e-4), c["name"]  # bf16 / f32 rounding
        before, after = record["before"]["summary"], record["after"]["summary"]
        assert record["summary"]["directions_scaled"] == before["intruder_dimensions"] >= 5
        # directions that were below the top k can move up into it: a few may be intruders too
        assert after["intruder_dimensions"] * 5 <= before["intruder_dimensions"]
        assert record["after"]["verdict"]["status"] != "fail" and runs[name]["code"] == 0


def test_full_model_keeps_dtype_sharding_and_untouched_bytes(runs):
    full, record, out = runs["full"]["path"], runs["full0"]["record"], runs["full0"]["path"]
    assert record["output"]["format"] == "model"
    changed = changed_tensors(record)
    assert changed and all(c["truncation_error"] is None for c in record["changes"])
    shards = sorted(p.name for p in full.glob("*.safetensors"))
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    seen = set()
    for shard in shards:
        header_in, data_in = data_ranges(full / shard)
        header_out, data_out = data_ranges(out / shard)
        assert header_out == header_in
        for name in data_in:
            assert (data_out[name] == data_in[name]) == (name not in changed), name
        seen |= set(data_in)
    assert changed <= seen
    for name in ["model.safetensors.index.json", "config.json", ft.HEAD_FILE, *ft.TOKENIZER_FILES]:
        assert (out / name).read_bytes() == (full / name).read_bytes()
    assert record["output"]["files_left_out"] == ["onnx/model.onnx"] and not (out / "onnx").exists()


def test_outputs_load_with_safetensors_and_transformers(runs):
    from transformers import AutoModel

    for name in ("full0", "merged0"):
        out = runs[name]["path"]
        source = BASE if name == "merged0" else runs["full"]["path"]
        stored = {}
        for file in sorted(out.glob("model*.safetensors")):
            with safe_open(file, "pt") as f, safe_open(source / file.name, "pt") as g:
                assert f.metadata() == g.metadata()
                stored.update({k: f.get_tensor(k) for k in f.keys()})
        model = AutoModel.from_pretrained(out, local_files_only=True)
        state = model.state_dict()
        for c in runs[name]["record"]["changes"]:
            assert torch.equal(state[c["name"]], stored[c["name"]].to(state[c["name"]].dtype))


def test_the_shards_beside_a_single_file_are_left_out_and_the_single_file_patched_as_transformers_loads_it(tmp_path):
    from transformers import AutoModel

    full = write_full_model(tmp_path / "full")
    shards = {}
    for file in sorted(full.glob("model-*.safetensors")):
        shards.update(load_file(file))
    save_file(shards, full / "model.safetensors", metadata={"format": "pt"})  # what transformers loads first
    out, record_path = tmp_path / "fixed", tmp_path / "fix.json"
    code, _, stderr = run("fix", full, "--base", BASE, "--out", out, "--json", record_path, "--lambda", 0, *LAYER_0)
    assert code in (0, 1), stderr
    record = json.loads(record_path.read_text())
    stale = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
    assert record["changes"] and set(stale) <= set(record["output"]["files_left_out"])
    assert not any((out / name).exists() for name in stale) and all(name in stderr for name in stale)
    state = AutoModel.from_pretrained(out, local_files_only=True).state_dict()
    stored = load_file(out / "model.safetensors")
    for c in record["changes"]:
        assert torch.equal(state[c["name"]], stored[c["name"]].to(state[c["name"]].dtype))
        assert not torch.equal(stored[c["name"]], shards[c["name"]])


def test_merge_writes_the_patched_merged_matrices_over_the_base(runs):
    record, out = runs["merged0"]["record"], runs["merged0"]["path"]
    assert record["output"]["format"] == "merged"
    merged, base = merged_weights(), load_file(BASE / "model.safetensors")
    header_in, data_in = data_ranges(BASE / "model.safetensors")
    header_out, data_out = data_ranges(out / "model.safetensors")
    assert header_out == header_in
    written = load_file(out / "model.safetensors")
    changes = {c["name"]: c for c in record["changes"]}
    assert set(changes) <= set(merged)
    for name, w in merged.items():
        if name in changes:
            w = patched(w, changes[name]["directions"], 0.0)
        assert torch.allclose(written[name].double(), w, atol=1e-6), name
    for name in set(base) - set(merged):
        assert data_out[name] == data_in[name]
    assert (out / "config.json").read_bytes() == (BASE / "config.json").read_bytes()
    assert (out / ft.HEAD_FILE).read_bytes() == (ADAPTER / ft.HEAD_FILE).read_bytes()
    assert not (out / "adapter_config.json").exists()


def test_lambda_one_reproduces_the_input_exactly(runs):
    assert folder_files(runs["adapter1"]["path"]) == folder_files(ADAPTER)
    record = runs["adapter1"]["record"]
    assert record["before"]["summary"]["intruder_dimensions"] > 0 and record["changes"] == []
    assert record["after"]["summary"] == record["before"]["summary"]


def test_card_section_and_record_describe_the_fix(runs, tmp_path):
    readme = (runs["adapter75"]["path"] / "README.md").read_text()
    original = (ADAPTER / "README.md").read_text()
    assert original.split("---\n", 2)[2].strip() in readme  # the card's own text is kept
    assert readme.count("<!-- ftaudit:begin -->") == 1 and "## Fine-tuning audit (ftaudit)" in readme
    assert "### Intruder dimensions reduced (ftaudit fix)" in readme and "**λ = 0.75**" in readme
    assert "| Intruder dimensions (ε = 0.5) | 35 | " in readme
    assert "ftaudit fix " in readme and "--lambda 0.75" in readme
    front = readme.split("---\n")[1]
    assert "fix:\n    lambda: 0.75\n" in front and "directions_scaled: 35" in front
    full0 = runs["full0"]
    assert (runs["full0"]["path"] / "README.md").read_text().endswith(
        "<!-- ftaudit:end -->\n") and "onnx/model.onnx" in (full0["path"] / "README.md").read_text()
    section = (full0["path"].parent / "full0-card.md").read_text()
    assert section.strip() in (full0["path"] / "README.md").read_text()
    for name in ("adapter75", "full0"):
        record = runs[name]["record"]
        assert record["schema_version"] == "1" and record["kind"] == "fix"
        for side in ("before", "after"):
            assert Report.from_dict(record[side]).summary.matrices_analysed == (36 if name == "adapter75" else 6)
        assert record["after"]["model"]["id"] == str(runs[name]["path"])
        assert record["after"]["base"] == record["before"]["base"]
    stdout = runs["adapter75"]["stdout"]
    assert "before" in stdout and "after" in stdout and "Intruder dimensions (ε = 0.5)" in stdout


def test_bad_inputs_are_one_line_errors_and_write_nothing(runs, tmp_path):
    taken = tmp_path / "hf_secrettoken123"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    cases = [
        (["fix", ADAPTER, "--base", BASE, "--out", taken, "--token", "hf_secrettoken123"], "not empty"),
        (["fix", ADAPTER, "--base", BASE, "--out", a_file], "not a folder"),
        (["fix", runs["full"]["path"], "--base", BASE, "--out", tmp_path / "m", "--merge"], "--merge applies only"),
        (["fix", tmp_path / "missing", "--base", BASE, "--out", tmp_path / "n"], "no such folder"),
        (["fix", ADAPTER, "--base", BASE, "--out", tmp_path / "o", "--json", tmp_path / "no" / "r.json"],
         "r.json: cannot write (no folder"),
        (["fix", ADAPTER, "--base", BASE, "--out", tmp_path / "o", "--card", tmp_path], "cannot write (a folder is there)"),
        (["fix", ADAPTER, "--base", BASE, "--out", tmp_path / "o", "--lambda", "nan"], "nan is not a finite number"),
    ]
    for args, message in cases:
        code, stdout, stderr = run(*args)
        assert code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1, stderr
        assert "Traceback" not in stderr and "hf_secrettoken123" not in stderr + stdout
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "hf_secrettoken123"]


def test_the_current_folder_is_refused_as_out_before_the_audit(tmp_path, monkeypatch):
    here = tmp_path / "empty"
    here.mkdir()
    monkeypatch.chdir(here)
    code, stdout, stderr = run("fix", ADAPTER, "--base", BASE, "--out", ".")
    assert (code, stdout) == (2, "")
    assert stderr == "ftaudit: error: .: is the current folder, which the finished model cannot replace; choose a new --out\n"
    assert not any(here.iterdir()) and sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_a_card_that_cannot_take_the_fix_is_refused_before_any_write(tmp_path, monkeypatch):
    from ftaudit import writer

    adapter = tmp_path / "adapter"
    shutil.copytree(ADAPTER, adapter)
    (adapter / "README.md").write_text("---\n- a list, not a mapping\n---\n# My adapter\n")
    written = []
    monkeypatch.setattr(writer.ModelFolder, "write_safetensors", lambda *args: written.append(args))
    code, _, stderr = run("fix", adapter, "--base", BASE, "--out", tmp_path / "out", *LAYERS_4_5)
    assert code == 2 and not written and not (tmp_path / "out").exists()
    assert stderr == f"ftaudit: error: {adapter}/README.md: the card's front matter is not a YAML mapping: fix it first\n"
    monkeypatch.undo()
    code, _, stderr = run("fix", adapter, "--base", BASE, "--out", tmp_path / "same", "--lambda", 1, *LAYERS_4_5)
    assert code in (0, 1) and folder_files(tmp_path / "same") == folder_files(adapter)  # nothing to change: a copy


def test_a_failure_mid_write_leaves_no_output(tmp_path, monkeypatch):
    from ftaudit import writer

    calls = []

    def failing(tensor: torch.Tensor, info: object) -> bytes:
        calls.append(info)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer, "encode", failing)
    code, _, stderr = run("fix", ADAPTER, "--base", BASE, "--out", tmp_path / "out", "--k", 2, *LAYERS_4_5)
    assert code == 2 and len(calls) == 1 and "No space left on device" in stderr
    assert list(tmp_path.iterdir()) == []


def test_fix_of_a_hub_adapter_streams_it_and_writes_what_a_local_fix_writes(runs, hub_env, tmp_path):
    hub_env.add_repo(ft.BASE_ID, folder_files(BASE))
    hub_env.add_repo("me/minilm-lora", folder_files(ADAPTER))
    record_path = tmp_path / "fix.json"
    code, _, stderr = run("fix", "me/minilm-lora", "--out", tmp_path / "out", "--json", record_path,
                          "--lambda", 0, "--only-top", 1, *LAYERS_4_5)
    assert code in (0, 1), stderr
    record = json.loads(record_path.read_text())
    assert record["model"]["revision"] and record["base"]["declared_by"] == "card"
    local = runs["adapter0"]["path"]
    for name in ("adapter_model.safetensors", "adapter_config.json", ft.HEAD_FILE):
        assert (tmp_path / "out" / name).read_bytes() == (local / name).read_bytes()
    base_reads = [r for r in hub_env.requests if ft.BASE_ID in r.path and r.path.endswith("model.safetensors")]
    assert all(r.range for r in base_reads if r.method == "GET")  # only tensors, by Range: never the whole file


def test_the_audit_files_a_push_left_are_rewritten_for_the_output(tmp_path):
    """A model whose repo holds ftaudit/ files from `check --push`: the output's badge, shields.io endpoint and
    heatmap describe the audit of the output, as its card does, not the input's."""
    base = llama_like(layers=2)
    write_model(tmp_path / "base", base)
    model = write_model(tmp_path / "model", low_rank_update(base), readme=card(str(tmp_path / "base")))
    (model / "ftaudit").mkdir()
    code, _, stderr = run("check", model, "--badge", model / "ftaudit/badge.svg", "--quiet",
                          "--heatmap", model / "ftaudit/heatmap.svg", "--badge-json", model / "ftaudit/badge.json")
    assert code == 1, stderr
    before = (model / "ftaudit/badge.json").read_text()
    out, record = tmp_path / "fixed", tmp_path / "fix.json"
    code, _, stderr = run("fix", model, "--out", out, "--lambda", 0, "--json", record, "--quiet")
    assert code in (0, 1), stderr
    after = Report.from_dict(json.loads(record.read_text())["after"])
    endpoint = json.loads((out / "ftaudit/badge.json").read_text())
    assert endpoint["message"] == f"{after.verdict.status} · {after.summary.intruder_dimensions} intruders"
    assert (out / "ftaudit/badge.json").read_text() != before
    assert f"{after.summary.intruder_dimensions} intruders" in (out / "ftaudit/badge.svg").read_text()
    assert "<svg" in (out / "ftaudit/heatmap.svg").read_text()
    assert "(ftaudit/badge.svg)" in (out / "README.md").read_text()  # the card shows them, as a push's does


def test_sigterm_mid_write_removes_the_unfinished_output(tmp_path):
    """A cancelled CI job, `timeout` or `docker stop` sends SIGTERM: it ends `fix` as Ctrl-C does, with one line,
    exit code 2 and nothing of the unfinished output left."""
    import signal
    import subprocess
    import sys
    import time

    ready = tmp_path / "writing"
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from ftaudit import writer\n"
        "from ftaudit.cli import run\n"
        "ready = Path(sys.argv[1])\n"
        "def stalled(tensor, info):\n"
        "    ready.touch()\n"
        "    time.sleep(120)\n"
        "writer.encode = stalled\n"
        "sys.argv = ['ftaudit', *sys.argv[2:]]\n"
        "run()\n"
    )
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-c", script, ready, "fix", ADAPTER, "--base", BASE, "--out", out, "--k", "2", "--quiet",
         *LAYERS_4_5], stderr=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent)
    deadline = time.monotonic() + 120
    while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ready.exists(), proc.stderr.read() if proc.poll() is not None else "never reached the write"
    assert list(tmp_path.glob(".out.ftaudit-partial-*/*.safetensors"))  # the output is being written
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert (proc.returncode, stderr) == (2, "ftaudit: error: interrupted\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["writing"]


def test_a_failed_fix_leaves_no_folder_it_made_for_out(tmp_path, monkeypatch):
    from ftaudit import writer

    def failing(tensor: torch.Tensor, info: object) -> bytes:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer, "encode", failing)
    code, _, stderr = run("fix", ADAPTER, "--base", BASE, "--out", tmp_path / "new" / "models" / "out", "--k", 2,
                          *LAYERS_4_5)
    assert code == 2 and "No space left on device" in stderr
    assert list(tmp_path.iterdir()) == []


def test_an_out_whose_partial_folder_cannot_be_made_leaves_no_folder_it_made(tmp_path):
    """A name of 240 characters is a folder's name, but the partial folder's, longer, is not: the folders made to
    hold --out before that failure are removed, as after any other."""
    out = tmp_path / "new" / "models" / ("x" * 240)
    code, _, stderr = run("fix", ADAPTER, "--base", BASE, "--out", out, *LAYERS_4_5)
    assert (code, stderr) == (2, f"ftaudit: error: {out}: cannot write there (File name too long)\n")
    assert list(tmp_path.iterdir()) == []


def test_an_out_that_cannot_be_written_fails_before_the_audit(tmp_path):
    from tests.invoke import run_unprivileged

    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    try:
        result = run_unprivileged("fix", ADAPTER, "--base", BASE, "--out", locked / "out", *LAYERS_4_5)
    finally:
        locked.chmod(0o755)
    assert result.returncode == 2, result.stderr
    assert result.stderr == f"ftaudit: error: {locked / 'out'}: cannot write there (Permission denied)\n"
    assert not list(Path(os.environ["FTAUDIT_CACHE"]).rglob("*.safetensors"))  # no base spectrum: nothing audited
    assert list(locked.iterdir()) == []


@pytest.mark.parametrize(("options", "message"), [
    ({"lam": float("nan")}, "λ must be a number from 0 to 1, not nan"),
    ({"lam": 1.5}, "λ must be a number from 0 to 1, not 1.5"),
    ({"lam": -0.25}, "λ must be a number from 0 to 1, not -0.25"),
    ({"only_top": 0}, "only_top must be at least 1, not 0"),
])
def test_the_library_refuses_a_lambda_or_only_top_the_command_line_would(options, message):
    from ftaudit.errors import UsageError
    from ftaudit.fix import FixOptions

    with pytest.raises(UsageError, match=f"^{message}$"):
        FixOptions(**options)


def test_a_mount_point_as_out_is_refused_before_the_audit(tmp_path):
    """An empty volume mounted at --out (a container's output folder) cannot be replaced by the finished model."""
    import subprocess
    import sys

    from tests.invoke import tmpfs_in_a_user_namespace

    out = tmp_path / "volume"
    out.mkdir()
    if not tmpfs_in_a_user_namespace(out):
        pytest.skip("cannot mount a tmpfs in a user namespace here")
    script = 'mount -t tmpfs tmpfs "$OUT" && "$@"'
    proc = subprocess.run(
        ["unshare", "-Urm", "sh", "-c", script, "sh", sys.executable, "-m", "ftaudit", "fix", str(ADAPTER),
         "--base", str(BASE), "--out", str(out), *LAYERS_4_5],
        env={**os.environ, "OUT": str(out)}, capture_output=True, text=True, timeout=300,
        cwd=Path(__file__).resolve().parent.parent)
    assert (proc.returncode, proc.stderr) == (
        2, f"ftaudit: error: {out}: is a mount point, which the finished model cannot replace; choose a new --out "
           "inside it\n")
    assert not list(Path(os.environ["FTAUDIT_CACHE"]).rglob("*.safetensors"))  # no base spectrum: nothing audited


@pytest.mark.parametrize("option", ["--json", "--card"])
def test_a_record_or_card_path_naming_out_is_refused_before_the_work(tmp_path, option):
    out = tmp_path / "fixed"
    code, _, stderr = run("fix", ADAPTER, "--base", BASE, "--out", out, option, tmp_path / "." / "fixed", *LAYERS_4_5)
    assert (code, stderr) == (2, f"ftaudit: error: {tmp_path / 'fixed'}: {option} names the --out folder; "
                                 "choose another file\n")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("option", "name"), [("--card", "README.md"), ("--json", "model.safetensors"),
                                              ("--json", "fix.json")])
def test_a_record_or_card_path_inside_an_empty_out_is_refused_before_the_work(tmp_path, option, name):
    """Written after the finished model has replaced the empty folder, it would replace the model's card (its front
    matter and text) or weights, or add a file the audit of the output never saw."""
    model = small_fine_tune(tmp_path)
    out = tmp_path / "fixed"
    out.mkdir()
    code, stdout, stderr = run("fix", model, "--out", out, option, out / name, "--lambda", 0)
    assert (code, stdout, stderr) == (2, "", f"ftaudit: error: {out / name}: {option} is inside the --out folder, "
                                             "which is to hold the fixed model only; choose a file outside it\n")
    assert list(out.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["base", "fixed", "model"]
    assert not list(Path(os.environ["FTAUDIT_CACHE"]).rglob("*.safetensors"))  # no base spectrum: nothing audited


@pytest.mark.parametrize(("inside", "declared"), [("model", False), ("base", False), ("base", True)])
def test_an_out_inside_an_input_folder_is_refused_before_the_audit(tmp_path, inside, declared):
    """The input would hold the output, whose weights a later fix would copy and a later audit would list."""
    model = small_fine_tune(tmp_path)
    before = {side: folder_files(tmp_path / side) for side in ("model", "base")}
    out = tmp_path / inside / "fixed" / "v1"
    code, stdout, stderr = run("fix", model, "--out", out, *([] if declared else ["--base", tmp_path / "base"]))
    message = f"{out}: is inside the {inside}'s folder {tmp_path / inside}; choose a --out outside it"
    assert (code, stdout, stderr) == (2, "", f"ftaudit: error: {message}\n")
    assert {side: folder_files(tmp_path / side) for side in ("model", "base")} == before
    assert not (tmp_path / inside / "fixed").exists()
    assert not list(Path(os.environ["FTAUDIT_CACHE"]).rglob("*.safetensors"))  # no base spectrum: nothing audited


def test_a_training_runs_state_beside_the_weights_is_copied_not_left_out_as_weights(tmp_path):
    """A Trainer's checkpoint folder: its arguments, optimizer, scheduler, scaler and random states are not weights."""
    model = write_trainer_state(small_fine_tune(tmp_path))
    out, record = tmp_path / "fixed", tmp_path / "fix.json"
    code, _, stderr = run("fix", model, "--out", out, "--lambda", 0, "--json", record, "--quiet")
    assert code in (0, 1), stderr
    fixed = json.loads(record.read_text())
    assert fixed["changes"] and fixed["output"]["files_left_out"] == []
    for name in [*TRAINER_STATE, "trainer_state.json"]:
        assert (out / name).read_bytes() == (model / name).read_bytes(), name
    assert "left out" not in stderr and "Left out" not in (out / "README.md").read_text()


def test_warnings_on_the_audit_of_the_output_name_out(tmp_path):
    """Not the unfinished folder it is written in, which is gone once the command ends."""
    model = small_fine_tune(tmp_path)
    (tmp_path / "base" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (model / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    out = tmp_path / "fixed"
    code, _, stderr = run("fix", model, "--out", out, "--lambda", 0, "--quiet")
    assert code in (0, 1), stderr
    other = "a llama one (config.json model_type): is it really its base?"
    assert f"WARNING: {model} is a mistral model and {tmp_path / 'base'} {other}" in stderr
    assert f"WARNING: {out} is a mistral model and {tmp_path / 'base'} {other}" in stderr
    assert "partial" not in stderr


def test_hidden_files_of_a_local_input_are_copied_as_a_hub_inputs_are_but_not_git_or_its_cache(tmp_path, hub_env):
    model = small_fine_tune(tmp_path)
    (model / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
    hub_env.add_repo("me/base", folder_files(tmp_path / "base"))
    hub_env.add_repo("me/model", folder_files(model))
    (model / ".git").mkdir()  # neither can be in a Hub repository
    (model / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (model / ".cache" / "huggingface").mkdir(parents=True)
    (model / ".cache" / "huggingface" / ".gitignore").write_text("*\n")
    written = {}
    for name, source, base in (("local", model, tmp_path / "base"), ("hub", "me/model", "me/base")):
        out = tmp_path / f"fixed-{name}"
        code, _, stderr = run("fix", source, "--base", base, "--out", out, "--lambda", 0, "--quiet")
        assert code in (0, 1), stderr
        written[name] = sorted(folder_files(out))
    assert written["local"] == written["hub"] == [".gitattributes", "README.md", "model.safetensors"]
    assert (tmp_path / "fixed-local" / ".gitattributes").read_bytes() == (model / ".gitattributes").read_bytes()


def test_a_tensor_name_cannot_write_lines_of_its_own_to_the_terminal(tmp_path):
    hostile = "model.layers.0.self_attn.q_proj\x1b[2K\r\n::notice title=ftaudit PASS::fine\n.weight"
    base = {(hostile if name == "model.layers.0.self_attn.q_proj.weight" else name): w
            for name, w in llama_like(layers=1).items()}
    write_model(tmp_path / "base", base)
    model = write_model(tmp_path / "model", low_rank_update(base))
    code, stdout, stderr = run("fix", model, "--base", tmp_path / "base", "--out", tmp_path / "out")
    assert code in (0, 1), stderr
    assert "q_proj\\x1b[2K\\r\\n::notice title=ftaudit PASS::fine\\n.weight" in stdout
    assert not any(line.lstrip().startswith("::") or "\r" in line for line in stdout.splitlines())


def test_a_trainers_checkpoint_folders_are_left_out_whole_from_a_folder_and_from_the_hub(tmp_path, hub_env):
    """A Trainer's output folder: the final model at the top, and checkpoint folders, earlier states of the same run,
    whose weights the audit does not read and the fix would not patch."""
    base = llama_like(layers=1)
    write_model(tmp_path / "base", base)
    run_dir = trainer_run(tmp_path / "run", low_rank_update(base))
    checkpoint = run_dir / "checkpoint-2"
    assert {"model.safetensors", "optimizer.pt", "trainer_state.json"} <= {p.name for p in checkpoint.iterdir()}
    hub_env.add_repo("me/base", folder_files(tmp_path / "base"))
    hub_env.add_repo("me/run", folder_files(run_dir))
    top_level = sorted(p.name for p in run_dir.iterdir() if p.is_file())
    for name, source, base_id in (("local", run_dir, tmp_path / "base"), ("hub", "me/run", "me/base")):
        out, record_path = tmp_path / f"fixed-{name}", tmp_path / f"fix-{name}.json"
        code, _, stderr = run("fix", source, "--base", base_id, "--out", out, "--lambda", 0, "--json", record_path,
                              "--quiet")
        assert code in (0, 1), stderr
        record = json.loads(record_path.read_text())
        assert record["changes"] and record["output"]["files_left_out"] == ["checkpoint-1/", "checkpoint-2/"]
        assert sorted(folder_files(out)) == sorted({*top_level, "README.md"})
        assert ("WARNING: left out 2 training checkpoint folder(s), earlier states of the run whose weights are "
                "not patched: checkpoint-1/, checkpoint-2/") in stderr
        assert "`checkpoint-1/`, `checkpoint-2/`" in (out / "README.md").read_text()
        assert (out / "training_args.bin").read_bytes() == (run_dir / "training_args.bin").read_bytes()
    assert not [r.path for r in hub_env.requests if "checkpoint-" in r.path]  # nothing of them was read


def test_safetensors_in_other_subfolders_are_copied_and_named_as_neither_audited_nor_patched(tmp_path):
    """A module of its own beside the model (sentence-transformers' Dense layer in `2_Dense/`), or another adapter
    (PEFT saves each adapter but the default in a subfolder of its name): not a copy of the weights, so copied, but
    the audit reads only the top-level weights, so the output's card and warnings say it was not patched."""
    model = small_fine_tune(tmp_path)
    (model / "2_Dense").mkdir()
    save_file({"linear.weight": torch.randn(8, 32)}, model / "2_Dense" / "model.safetensors")
    (model / "2_Dense" / "config.json").write_text(json.dumps({"in_features": 32, "out_features": 8}))
    out, record_path = tmp_path / "fixed", tmp_path / "fix.json"
    code, _, stderr = run("fix", model, "--out", out, "--lambda", 0, "--json", record_path, "--quiet")
    assert code in (0, 1), stderr
    record = json.loads(record_path.read_text())
    assert record["changes"] and record["output"]["files_left_out"] == []
    assert record["output"]["files_copied_unpatched"] == ["2_Dense/model.safetensors"]
    for name in ("2_Dense/model.safetensors", "2_Dense/config.json"):
        assert (out / name).read_bytes() == (model / name).read_bytes()
    assert ("WARNING: copied 1 safetensors file(s) in subfolders as they are, neither audited nor patched (the audit "
            "reads the top-level weights only): 2_Dense/model.safetensors") in stderr
    assert "`2_Dense/model.safetensors`" in (out / "README.md").read_text()


def test_an_adapters_training_checkpoint_goes_neither_into_its_fix_nor_into_the_merged_model(tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(ADAPTER, adapter)
    (adapter / "checkpoint-500").mkdir()
    checkpoint = write_trainer_state(adapter / "checkpoint-500")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        shutil.copy(ADAPTER / name, checkpoint / name)
    for merge in ([], ["--merge"]):
        out = tmp_path / f"fixed{len(merge)}"
        code, _, stderr = run("fix", adapter, "--base", BASE, "--out", out, "--lambda", 0, "--quiet", *merge,
                              *LAYER_0)
        assert code in (0, 1), stderr
        assert not (out / "checkpoint-500").exists() and "checkpoint-500/" in stderr


def test_a_full_models_weights_beside_an_adapter_are_left_out_of_its_fix(tmp_path):
    """An adapter folder that also holds the model merged with it: the audit reads the adapter, so the fixed adapter
    would sit beside the unpatched merged weights."""
    adapter = tmp_path / "adapter"
    shutil.copytree(ADAPTER, adapter)
    merged = {**load_file(BASE / "model.safetensors"), **{k: v.float() for k, v in merged_weights().items()}}
    save_file(merged, adapter / "model.safetensors")
    out, record_path = tmp_path / "fixed", tmp_path / "fix.json"
    code, _, stderr = run("fix", adapter, "--base", BASE, "--out", out, "--json", record_path, "--lambda", 0, "--quiet",
                          *LAYER_0)
    assert code in (0, 1), stderr
    record = json.loads(record_path.read_text())
    assert record["changes"] and record["output"]["files_left_out"] == ["model.safetensors"]
    assert not (out / "model.safetensors").exists() and "model.safetensors" in stderr
    assert (out / ft.HEAD_FILE).read_bytes() == (ADAPTER / ft.HEAD_FILE).read_bytes()


def test_a_sharded_full_model_beside_an_adapter_stays_out_of_the_merged_model(tmp_path):
    """The merged model's weights and index are the base's (one file here): the shards and index of a full model in
    the adapter's folder would otherwise be copied over them, and transformers would load that index first."""
    from transformers import AutoModel

    adapter = tmp_path / "adapter"
    shutil.copytree(ADAPTER, adapter)
    write_full_model(tmp_path / "full")
    for file in (tmp_path / "full").glob("model*"):
        shutil.copy(file, adapter / file.name)
    out, record_path = tmp_path / "merged", tmp_path / "fix.json"
    code, _, stderr = run("fix", adapter, "--base", BASE, "--out", out, "--json", record_path, "--lambda", 0, "--merge",
                          "--quiet", *LAYER_0)
    assert code in (0, 1), stderr
    record = json.loads(record_path.read_text())
    assert record["output"]["files_left_out"] == sorted(p.name for p in (tmp_path / "full").glob("model*"))
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]
    state = AutoModel.from_pretrained(out, local_files_only=True).state_dict()
    written = load_file(out / "model.safetensors")
    assert record["changes"] and all(torch.equal(state[c["name"]], written[c["name"]]) for c in record["changes"])


def test_an_adapter_whose_only_change_is_a_tensor_stored_whole_claims_no_rank_cut(tmp_path):
    """A head saved whole (modules_to_save) is patched exactly: no LoRA update was cut back to the adapter's rank,
    and the card says nothing of such a cut (it had said its largest error 'is n/a')."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False))
    model.save_pretrained(tmp_path / "base")
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    head = peft_model.base_model.model.lm_head.modules_to_save["default"].weight
    with torch.no_grad():
        head.add_(20 * torch.randn(64, 1) @ torch.randn(1, 32))  # the LoRA stays zero: q_proj is unchanged
    peft_model.save_pretrained(tmp_path / "adapter")
    out, record_path = tmp_path / "fixed", tmp_path / "fix.json"
    code, _, stderr = run("fix", tmp_path / "adapter", "--base", tmp_path / "base", "--out", out, "--include", "head",
                          "--lambda", 0, "--json", record_path, "--quiet")
    assert code in (0, 1), stderr
    record = json.loads(record_path.read_text())
    assert [c["name"] for c in record["changes"]] == ["lm_head.weight"] and record["output"]["format"] == "adapter"
    assert record["changes"][0]["truncation_error"] is None and record["summary"]["truncation_error_max"] is None
    card_text = (out / "README.md").read_text()
    assert "### Intruder dimensions reduced (ftaudit fix)" in card_text and "cut back" not in card_text
