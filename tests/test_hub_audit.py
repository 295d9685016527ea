"""Remote audits through huggingface_hub against the fake Hub: Range streaming, revisions, faults, secrets."""

from __future__ import annotations

import base64
import io
import json
import re
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from huggingface_hub import hf_hub_download

import ftaudit.audit as audit_module
from ftaudit.sources import checkpoint
from tests import hubserver
from tests.hubserver import HubServer
from tests.invoke import run
from tests.models import (
    card, folder_files, llama_like, low_rank_update, safetensors_bytes, small_update, write_model,
)

TOKEN = "hf_SeCrEtToKeN1234567890abcdef"


@pytest.fixture
def env(hub_env: HubServer) -> HubServer:
    return hub_env


def publish(hub: HubServer, tmp_path: Path, *, layers: int = 2, shards: int = 1, private: bool = False,
            gated: bool = False, update=low_rank_update) -> tuple[str, str]:
    base = llama_like(layers=layers)
    base_dir = write_model(tmp_path / "base", base, shards=shards)
    tuned_dir = write_model(tmp_path / "tuned", update(base), readme=card("org/base"), shards=shards)
    hub.add_repo("org/base", folder_files(base_dir))
    sha = hub.add_repo("org/tuned", folder_files(tuned_dir), private=private, gated=gated)
    return sha, str(tuned_dir)


def test_remote_audit_streams_tensors_by_range_and_matches_the_local_audit(env, tmp_path):
    sha, local = publish(env, tmp_path, shards=2)
    remote_json, local_json = tmp_path / "remote.json", tmp_path / "local.json"
    code, stdout, stderr = run("check", "org/tuned", "--json", remote_json)
    assert code == 1, stderr
    assert run("check", local, "--base", tmp_path / "base", "--json", local_json)[0] == 1
    remote, here = json.loads(remote_json.read_text()), json.loads(local_json.read_text())
    assert remote["model"]["revision"] == sha and remote["base"]["declared_by"] == "card"
    assert len(remote["base"]["revision"]) == 40
    assert [m["max_cos"] for m in remote["matrices"]] == [m["max_cos"] for m in here["matrices"]]

    weight_gets = [r for r in env.requests if r.method == "GET" and r.path.endswith(".safetensors")]
    assert weight_gets and all(r.range and r.status == 206 for r in weight_gets)
    largest_file = max(len(b) for b in folder_files(tmp_path / "tuned").values())
    assert max(r.bytes_sent for r in weight_gets) < largest_file / 4
    # Header reads are tiny; every other read is exactly one tensor of the model or base: the analysed
    # matrices, plus the embeddings and head whose row-norm drift is measured.
    tensor_reads = [r for r in weight_gets if r.bytes_sent > 8 and not r.range.startswith("bytes=8-")]
    assert set(remote["summary"]["heads"]) == {"model.embed_tokens.weight", "lm_head.weight"}
    assert len(tensor_reads) == 2 * (remote["summary"]["matrices_analysed"] + 2)
    assert all(f"/resolve/{sha}/" in r.path for r in weight_gets if "org/tuned" in r.path)


def test_memory_holds_a_bounded_number_of_tensors(env, tmp_path, monkeypatch):
    publish(env, tmp_path, layers=6)
    live: set[int] = set()
    peak = [0]
    decode = checkpoint.safetensors.decode

    def tracked(buf, info):
        tensor = decode(buf, info)
        key = id(tensor)
        live.add(key)
        weakref.finalize(tensor, live.discard, key)
        peak[0] = max(peak[0], len(live))
        return tensor

    monkeypatch.setattr(checkpoint.safetensors, "decode", tracked)
    monkeypatch.setattr(audit_module, "worker_count", lambda device, shapes: 2)
    out = tmp_path / "r.json"
    assert run("check", "org/tuned", "--json", out)[0] == 1
    analysed = json.loads(out.read_text())["summary"]["matrices_analysed"]
    # Two pairs being analysed and one read ahead: never more, whatever the depth.
    assert analysed == 42 and 2 <= peak[0] <= 2 * (2 + 1)


def test_revision_and_base_revision_are_resolved_to_shas(env, tmp_path):
    first, _ = publish(env, tmp_path, update=small_update)
    base = llama_like()
    second = env.add_repo("org/tuned", folder_files(write_model(tmp_path / "t2", low_rank_update(base), readme=card("org/base"))))
    out = tmp_path / "r.json"
    assert run("check", "org/tuned", "--revision", first, "--json", out)[0] == 0
    assert json.loads(out.read_text())["model"]["revision"] == first
    assert run("check", "org/tuned", "--json", out)[0] == 1
    assert json.loads(out.read_text())["model"]["revision"] == second
    code, _, stderr = run("check", "org/tuned", "--revision", "v9")
    assert code == 2 and "revision v9 not found" in stderr


@pytest.mark.parametrize("option", ["--revision", "--base-revision"])
def test_an_empty_revision_is_refused_before_any_request(env, tmp_path, option):
    # An unset variable in a script: the Hub resolves no such revision, while the Hugging Face cache takes it for main.
    publish(env, tmp_path)
    for args in (["check"], ["fix", "--out", tmp_path / "fixed"]):
        code, stdout, stderr = run(*args, "org/tuned", option, "")
        assert (code, stdout, len(stderr.splitlines())) == (2, "", 1) and stderr.startswith(
            f"ftaudit: error: Invalid value for '{option}': empty: pass a branch, tag or commit, or leave the option "
            "out. (see "
        ), stderr
    assert not env.requests


def test_server_that_ignores_range_never_yields_wrong_bytes(env, tmp_path):
    publish(env, tmp_path)
    good = tmp_path / "good.json"
    assert run("check", "org/tuned", "--json", good)[0] == 1
    env.ignore_range = True
    bad = tmp_path / "bad.json"
    code, _, stderr = run("check", "org/tuned", "--json", bad)
    assert code == 1 and stderr.count("ignores HTTP Range") == 1  # for the model and the base, on one server
    assert json.loads(bad.read_text())["matrices"] == json.loads(good.read_text())["matrices"]


def test_transient_failures_are_retried_then_reported(env, tmp_path, monkeypatch):
    publish(env, tmp_path)
    env.fail_next(2, status=503, path_contains=".safetensors")
    env.fail_next(1, status=429, path_contains="/api/models/")
    env.drop_next(2, path_contains=".safetensors")
    assert run("check", "org/tuned")[0] == 1
    monkeypatch.setenv("FTAUDIT_HTTP_RETRIES", "3")
    env.fail_next(3, status=500, path_contains="model.safetensors")
    code, _, stderr = run("check", "org/tuned")
    assert code == 2 and "still failing after 3 attempts (HTTP 500)" in stderr
    assert len(stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("private", "gated", "token", "message"),
    [
        (True, False, None, "or it is private: pass --token"),
        (True, False, "wrong", "rejected the token"),
        (False, True, None, "gated repository"),
        (True, False, "granted-elsewhere", "or the token cannot read it"),
    ],
)
def test_access_errors_say_what_to_do_and_never_leak_the_token(env, tmp_path, private, gated, token, message):
    publish(env, tmp_path, private=private, gated=gated)
    env.add_token(TOKEN, repos=["org/base"])
    env.add_token("granted-elsewhere-" + TOKEN, repos=["org/base"])
    args = ["check", "org/tuned", "--debug"]
    if token == "wrong":
        args += ["--token", TOKEN + "x"]
    elif token:
        args += ["--token", "granted-elsewhere-" + TOKEN]
    code, stdout, stderr = run(*args)
    assert code == 2 and message in stderr
    assert TOKEN not in stdout + stderr


def test_token_grants_access_and_stays_out_of_every_output(env, tmp_path, monkeypatch):
    publish(env, tmp_path, private=True)
    env.add_token(TOKEN, repos=["org/tuned", "org/base"])
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    out = tmp_path / "r.json"
    code, stdout, stderr = run("check", "org/tuned", "--json", out, "--debug")
    assert code == 1, stderr
    assert all(r.has_auth for r in env.requests if "org/tuned" in r.path)
    assert TOKEN not in stdout + stderr + out.read_text()


def test_a_stalled_server_times_out_is_retried_then_reported(env, tmp_path, monkeypatch):
    # The first request, the model's info, waits for the timeout too: huggingface_hub's own has none.
    publish(env, tmp_path)
    monkeypatch.setenv("FTAUDIT_HTTP_TIMEOUT", "0.3")
    monkeypatch.setenv("FTAUDIT_HTTP_RETRIES", "2")
    env.delay = 4.0
    code, _, stderr = run("check", "org/tuned")
    assert code == 2
    assert stderr == "ftaudit: error: org/tuned: revision main: still failing after 2 attempts (ReadTimeout)\n"


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("FTAUDIT_HTTP_RETRIES", "abc", "FTAUDIT_HTTP_RETRIES must be a whole number of attempts, at least 1, not 'abc'"),
        ("FTAUDIT_HTTP_RETRIES", "0", "FTAUDIT_HTTP_RETRIES must be a whole number of attempts, at least 1, not '0'"),
        ("FTAUDIT_HTTP_BACKOFF", "x", "FTAUDIT_HTTP_BACKOFF must be a number of seconds, at least 0, not 'x'"),
        ("FTAUDIT_HTTP_BACKOFF", "-1", "FTAUDIT_HTTP_BACKOFF must be a number of seconds, at least 0, not '-1'"),
        ("FTAUDIT_HTTP_TIMEOUT", "nan", "FTAUDIT_HTTP_TIMEOUT must be a number of seconds above 0, not 'nan'"),
        ("FTAUDIT_HTTP_TIMEOUT", "0", "FTAUDIT_HTTP_TIMEOUT must be a number of seconds above 0, not '0'"),
        ("FTAUDIT_HTTP_MAX_WAIT", "-2", "FTAUDIT_HTTP_MAX_WAIT must be a number of seconds, at least 0, not '-2'"),
        ("HF_ENDPOINT", "hub.example", "HF_ENDPOINT must be an http:// or https:// URL, not 'hub.example'"),
        ("HF_ENDPOINT", "ftp://hub.example", "HF_ENDPOINT must be an http:// or https:// URL, not 'ftp://hub.example'"),
    ],
)
def test_bad_settings_are_one_line_errors_before_any_request(env, tmp_path, monkeypatch, name, value, message):
    publish(env, tmp_path)
    monkeypatch.setenv(name, value)
    code, _, stderr = run("check", "org/tuned")
    assert code == 2 and stderr == f"ftaudit: error: {message}\n"
    assert not env.requests


def test_a_password_in_the_endpoint_stays_out_of_messages(env, tmp_path, monkeypatch):
    publish(env, tmp_path)
    env.proxy_auth = "Basic " + base64.b64encode(b"mirror:s3cr3t-Passw0rd").decode()
    monkeypatch.setenv("HF_ENDPOINT", env.url.replace("://", "://mirror:s3cr3t-Passw0rd@"))
    code, stdout, stderr = run("check", "org/tuned", "--base", "org/missing", "--debug")
    assert code == 2 and "no such model repository on http://mirror:***@127.0.0.1" in stderr, stderr
    assert "s3cr3t-Passw0rd" not in stdout + stderr


def quantize(tensors: dict[str, torch.Tensor], scheme: str) -> dict[str, torch.Tensor]:
    """The attention and MLP weights stored as a quantized checkpoint stores them (the values are random: only the
    layout matters)."""
    out = {}
    for name, w in tensors.items():
        if w.ndim != 2 or "proj" not in name:
            out[name] = w
        elif scheme == "gptq":  # 4-bit values packed 8 to an int32, transposed; scales beside
            out[name.replace(".weight", ".qweight")] = torch.randint(0, 2**31 - 1, (w.shape[1] // 8, w.shape[0]),
                                                                     dtype=torch.int32)
            out[name.replace(".weight", ".scales")] = torch.ones(1, w.shape[0], dtype=torch.float16)
        elif scheme in ("bnb-4bit", "int8"):  # 4-bit values, 2 to a byte, block scales, a description; int8, row scales
            out |= bitsandbytes(name, w, scheme)[0]
        else:  # fp8, with a scale
            out[name] = w.to(torch.float8_e4m3fn)
            out[name + "_scale"] = torch.ones(())
    return out


def bitsandbytes(name: str, w: torch.Tensor, scheme: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Matrix `name` as bitsandbytes stores it in 4 bits (`bnb-4bit`: NF4, double quantization) or 8 (`int8`:
    LLM.int8), and what it dequantizes to."""
    bnb = pytest.importorskip("bitsandbytes.functional")
    if scheme == "int8":
        values, scales, _ = bnb.int8_vectorwise_quant(w)
        return {name: values, name.replace(".weight", ".SCB"): scales}, bnb.int8_vectorwise_dequant(values, scales)
    packed, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    return ({name: packed, **{f"{name}.{k}": v for k, v in state.as_dict(packed=True).items()}},
            bnb.dequantize_4bit(packed, state))


def lora_adapter(base: dict[str, torch.Tensor], base_id: str, rank: int = 4) -> dict[str, bytes]:
    """A PEFT LoRA adapter of the q projections, declaring `base_id`."""
    g = torch.Generator().manual_seed(5)
    factors = {}
    for name, w in base.items():
        if name.endswith("q_proj.weight"):
            module = "base_model.model." + name.removesuffix(".weight")
            factors[f"{module}.lora_A.weight"] = torch.randn(rank, w.shape[1], generator=g)
            factors[f"{module}.lora_B.weight"] = torch.randn(w.shape[0], rank, generator=g)
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 8, "target_modules": ["q_proj"],
              "base_model_name_or_path": base_id}
    return {"adapter_model.safetensors": safetensors_bytes(factors), "adapter_config.json": json.dumps(config).encode()}


def test_a_declared_base_that_names_no_repo_nor_folder_says_where_it_is_declared(env, tmp_path):
    base = llama_like()
    env.add_repo("org/base", folder_files(write_model(tmp_path / "base", base)))
    tuned = write_model(tmp_path / "tuned", small_update(base), readme=card("https://huggingface.co/org/base"))
    tuned_sha = env.add_repo("org/tuned", folder_files(tuned))
    adapter_sha = env.add_repo("org/adapter", lora_adapter(base, "/home/trainer/models/base"))  # the trainer's folder
    start = len(env.requests)

    code, stdout, stderr = run("check", "org/tuned")
    assert (code, stdout) == (2, "") and stderr == (
        f"ftaudit: error: org/tuned@{tuned_sha[:12]}: the card declares base_model 'https://huggingface.co/org/base', "
        "which is not a Hub repository id (org/name), and a Hub repo's declaration is never opened as a path on this "
        "machine: pass the base with --base\n"
    )
    code, stdout, stderr = run("check", "org/adapter")
    assert (code, stdout) == (2, "") and stderr == (
        f"ftaudit: error: org/adapter@{adapter_sha[:12]}: adapter_config.json declares base_model_name_or_path "
        "'/home/trainer/models/base', which is not a Hub repository id (org/name), and a Hub repo's declaration is "
        "never opened as a path on this machine: pass the base with --base\n"
    )
    assert not any("org/base" in r.path for r in env.requests[start:])  # no name was guessed from the URL
    assert run("check", "org/tuned", "--base", "org/base")[0] == 0
    assert run("check", "org/adapter", "--base", "org/base")[0] in (0, 1)


@pytest.mark.parametrize(
    ("front_matter", "problem"),
    [
        ("base_model: [org/base\n", "the card's front matter is not valid YAML (while parsing a flow sequence)"),
        ("base_model: org/base\ndate: 2024-02-30\n",
         "the card's front matter is not valid YAML (not a date: day is out of range for month)"),
        ("base_model:\n  id: org/base\n", "the card's base_model is a mapping, not a Hub repository id"),
        ("base_model: [7]\n", "the card's base_model is a number, not a Hub repository id"),
    ],
)
def test_a_card_whose_base_model_cannot_be_read_says_why(env, tmp_path, front_matter, problem):
    base = llama_like()
    env.add_repo("org/base", folder_files(write_model(tmp_path / "base", base)))
    files = folder_files(write_model(tmp_path / "tuned", small_update(base)))
    sha = env.add_repo("org/tuned", {**files, "README.md": f"---\n{front_matter}---\n\n# A model\n".encode()})
    code, stdout, stderr = run("check", "org/tuned")
    assert (code, stdout) == (2, "") and stderr == (
        f"ftaudit: error: org/tuned@{sha[:12]}: {problem}: fix the card (base_model: org/name), or pass the base "
        "with --base\n"
    )
    assert run("check", "org/tuned", "--base", "org/base")[0] == 0


def test_a_hub_repo_that_declares_a_path_here_is_refused_and_a_repo_id_is_never_a_folder(
    env, tmp_path, monkeypatch
):
    base = llama_like()
    here = write_model(tmp_path / "base", base)  # a folder on this machine, which a Hub repo must not reach
    hub_base = env.add_repo("org/base", folder_files(write_model(tmp_path / "hub-base", base)))
    tuned_sha = env.add_repo("org/tuned", folder_files(write_model(tmp_path / "tuned", small_update(base),
                                                                   readme=card(str(here)))))
    adapter_sha = env.add_repo("org/adapter", lora_adapter(base, str(here)))
    for repo, sha, where in (("org/tuned", tuned_sha, "the card declares base_model"),
                             ("org/adapter", adapter_sha, "adapter_config.json declares base_model_name_or_path")):
        code, stdout, stderr = run("check", repo)
        assert (code, stdout) == (2, "") and stderr == (
            f"ftaudit: error: {repo}@{sha[:12]}: {where} '{here}', which is not a Hub repository id (org/name), and a "
            "Hub repo's declaration is never opened as a path on this machine: pass the base with --base\n"
        )
    assert run("check", "org/tuned", "--base", here)[0] == 0  # given explicitly, a folder is fine
    env.add_repo("org/tuned", folder_files(write_model(tmp_path / "tuned2", small_update(base), readme=card("org/base"))))
    write_model(tmp_path / "org" / "base", llama_like(seed=7))  # a folder that happens to bear the repo's name
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "r.json"
    code, _, stderr = run("check", "org/tuned", "--json", out)
    assert code == 0, stderr
    assert json.loads(out.read_text())["base"]["revision"] == hub_base


@pytest.mark.parametrize("scheme", ["gptq", "fp8"])
def test_quantized_weights_are_refused_with_a_message_that_says_so(env, tmp_path, scheme):
    base = llama_like()
    env.add_repo("org/base", folder_files(write_model(tmp_path / "base", base)))
    env.add_repo("org/base-q", {"model.safetensors": safetensors_bytes(quantize(base, scheme))})
    quantized = quantize(low_rank_update(base), scheme)
    env.add_repo("org/tuned-q", {"model.safetensors": safetensors_bytes(quantized), "README.md": card("org/base").encode()})
    env.add_repo("org/qlora", lora_adapter(base, "org/base-q"))  # trained on a quantized base, as QLoRA is

    code, _, stderr = run("check", "org/tuned-q")
    assert code == 2 and "org/tuned-q@" in stderr and "quantized weights (model.layers.0." in stderr, stderr
    assert "audit the model before quantization" in stderr and len(stderr.splitlines()) == 1
    for args in (["org/qlora"], ["org/tuned-q", "--base", "org/base-q"]):
        code, _, stderr = run("check", *args)
        assert code == 2 and "org/base-q@" in stderr and "quantized weights" in stderr, stderr
        assert "pass the full-precision base with --base" in stderr
    assert run("check", "org/qlora", "--base", "org/base")[0] in (0, 1)  # the same adapter on the full base


@pytest.mark.parametrize(("scheme", "quantization"), [("bnb-4bit", "bitsandbytes 4-bit (nf4)"),
                                                     ("int8", "bitsandbytes 8-bit (LLM.int8)")])
def test_a_qlora_adapter_is_audited_against_the_quantized_base_it_declares_as_against_what_that_dequantizes_to(
        env, tmp_path, scheme, quantization):
    """A 4-bit or 8-bit base on the Hub is read by Range requests like any other, each matrix's parts as it comes; the
    model itself quantized is still refused. (Rows are whole blocks: bitsandbytes' own CPU kernel, the reference here,
    dequantizes rows of a part of a block wrongly.)"""
    base = llama_like(hidden=64, ffn=128)
    stored: dict[str, torch.Tensor] = {}
    dequantized = dict(base)
    for name, w in base.items():
        if w.ndim == 2 and "proj" in name:
            parts, dequantized[name] = bitsandbytes(name, w, scheme)
            stored |= parts
        else:
            stored[name] = w
    env.add_repo("org/base-q", {"model.safetensors": safetensors_bytes(stored)})
    env.add_repo("org/base-dq", {"model.safetensors": safetensors_bytes(dequantized)})
    env.add_repo("org/qlora", lora_adapter(base, "org/base-q"))
    reports = []
    for args in (["org/qlora"], ["org/qlora", "--base", "org/base-dq"]):
        code, out, stderr = run("check", *args, "--format", "json", "--no-cache")
        assert code in (0, 1), stderr
        reports.append(json.loads(out))
    assert reports[0]["base"]["id"] == "org/base-q" and reports[0]["base"]["quantization"] == quantization
    assert reports[0]["matrices"] == reports[1]["matrices"] and reports[0]["summary"]["intruder_dimensions"] > 0
    env.add_repo("org/tuned-q", {"model.safetensors": safetensors_bytes(quantize(low_rank_update(base), scheme))})
    code, _, stderr = run("check", "org/tuned-q", "--base", "org/base-dq")
    assert code == 2 and "org/tuned-q@" in stderr and "quantized weights (model.layers.0." in stderr, stderr


def test_an_adapter_is_audited_against_the_base_revision_its_config_names_card_or_not(env, tmp_path):
    base = llama_like()
    trained_on = env.add_repo("org/base", folder_files(write_model(tmp_path / "base", base)))
    env.add_repo("org/base", folder_files(write_model(tmp_path / "base2", llama_like(seed=9))))  # main moved on
    files = lora_adapter(base, "org/base")
    files["adapter_config.json"] = json.dumps({**json.loads(files["adapter_config.json"]), "revision": trained_on}).encode()
    env.add_repo("org/adapter", files)
    env.add_repo("org/adapter-with-card", {**files, "README.md": card("org/base", library_name="peft").encode()})
    reports = {}
    for repo in ("org/adapter", "org/adapter-with-card"):
        out = tmp_path / f"{repo.split('/')[1]}.json"
        code, _, stderr = run("check", repo, "--json", out)
        assert code in (0, 1), stderr
        reports[repo] = json.loads(out.read_text())
    for repo, declared_by in (("org/adapter", "adapter_config"), ("org/adapter-with-card", "card")):
        # a Hub commit names the weights: no fingerprint
        assert reports[repo]["base"] == {"id": "org/base", "revision": trained_on, "declared_by": declared_by,
                                         "fingerprint": None, "quantization": None}
        assert reports[repo]["model"]["fingerprint"] is None
    assert reports["org/adapter-with-card"]["matrices"] == reports["org/adapter"]["matrices"]


def pickle_repo(hub: HubServer, tmp_path: Path) -> str:
    """org/base, and org/tuned with its weights only in a pickle (which huggingface_hub downloads whole); the sha."""
    base = llama_like()
    hub.add_repo("org/base", folder_files(write_model(tmp_path / "base", base)))
    pickled = io.BytesIO()
    torch.save(low_rank_update(base), pickled)
    return hub.add_repo("org/tuned", {"pytorch_model.bin": pickled.getvalue(), "README.md": card("org/base").encode()})


def test_the_hub_clients_own_warnings_are_ftaudit_warnings_with_the_endpoint_password_masked(
    env, tmp_path, monkeypatch, capfd
):
    # huggingface_hub logs the warnings a server sends (X-HF-Warning), which a mirror's may fill with the URL asked for.
    publish(env, tmp_path)
    env.proxy_auth = "Basic " + base64.b64encode(b"mirror:s3cr3t-Passw0rd").decode()
    endpoint = env.url.replace("://", "://mirror:s3cr3t-Passw0rd@")
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    warning = {"X-HF-Warning": f"stale-mirror; {endpoint}/api/models/org/tuned is not served here"}
    env.fail_next(1, status=404, path_contains="/api/models/org/tuned", headers=warning)
    code, stdout, stderr = run("check", "org/tuned", "--quiet")
    assert (code, stdout) == (2, "")
    assert stderr == (
        f"ftaudit: WARNING: {env.url.replace('://', '://mirror:***@')}/api/models/org/tuned is not served here\n"
        "ftaudit: error: org/tuned: revision main: the server answered HTTP 404\n"
    )
    outside = capfd.readouterr()
    assert "s3cr3t-Passw0rd" not in stdout + stderr + outside.out + outside.err


@pytest.mark.parametrize("attempts", [1, 3])
@pytest.mark.parametrize(
    ("method", "status", "reason"),
    [
        ("HEAD", 503, "HTTP 503"),  # huggingface_hub's download asks the file's metadata again, with retries
        ("GET", 429, "HTTP 429"),  # and retries its GET on 429
        ("GET", None, "RemoteProtocolError"),  # and resumes a body cut short
    ],
)
def test_a_whole_download_is_attempted_as_often_as_the_setting_says_in_all(
    env, tmp_path, monkeypatch, attempts, method, status, reason
):
    sha = pickle_repo(env, tmp_path)
    monkeypatch.setenv("FTAUDIT_HTTP_RETRIES", str(attempts))
    if status is None:
        env.drop_next(1000, ".bin", method=method)
    else:
        env.fail_next(1000, status, ".bin", method=method)
    code, stdout, stderr = run("check", "org/tuned", "--allow-pickle")
    assert (code, stdout) == (2, "")
    assert stderr == (f"ftaudit: error: org/tuned@{sha[:12]}: pytorch_model.bin: still failing after {attempts} "
                      f"attempts ({reason})\n")
    assert len([r for r in env.requests if r.method == method and r.path.endswith(".bin")]) == attempts


@pytest.mark.parametrize("cuts", [1, 1000])
def test_a_whole_download_cut_short_is_attempted_again(env, tmp_path, monkeypatch, cuts):
    """A body shorter than the file's size, in an answer that says it is complete (a proxy that cut it), fails
    huggingface_hub's consistency check: a failure of the network, retried, then one line."""
    sha = pickle_repo(env, tmp_path)
    monkeypatch.setenv("FTAUDIT_HTTP_RETRIES", "3")
    env.cut_next(cuts, ".bin", method="GET")
    code, stdout, stderr = run("check", "org/tuned", "--allow-pickle")
    if cuts == 1:
        assert (code, stderr) == (1, "")  # the tuned model fails the policy: it was audited
        assert run("check", "org/tuned", "--allow-pickle")[1] == stdout  # from the file in the cache, whole
    else:
        assert (code, stdout) == (2, "")
        assert stderr == (f"ftaudit: error: org/tuned@{sha[:12]}: pytorch_model.bin: still failing after 3 attempts "
                          "(the download ended short of the file's size)\n")
    assert len([r for r in env.requests if r.method == "GET" and r.path.endswith(".bin")]) == min(cuts, 3) + (cuts == 1)


@pytest.mark.parametrize(("status", "method", "headers"), [(503, "HEAD", {}), (429, "GET", {"Retry-After": "3600"})])
def test_huggingface_hub_called_beside_ftaudit_keeps_its_own_retries(env, tmp_path, monkeypatch, status, method, headers):
    """Requests outside ftaudit's reads (the push's LFS uploads run in huggingface_hub's worker threads) keep its
    retries, their waits within FTAUDIT_HTTP_MAX_WAIT."""
    publish(env, tmp_path)
    monkeypatch.setenv("FTAUDIT_HTTP_MAX_WAIT", "1")
    assert run("check", "org/tuned")[0] == 1  # huggingface_hub's shared client is ftaudit's now
    start = len(env.requests)
    env.fail_next(1, status, "README.md", method=method, headers=headers)
    started = time.monotonic()
    path = finished_within(60, lambda: hf_hub_download("org/tuned", "README.md", endpoint=env.url,
                                                       cache_dir=tmp_path / "elsewhere"))
    assert time.monotonic() - started < 30
    assert Path(path).read_text() == card("org/base")
    assert [r.status for r in env.requests[start:] if r.method == method] == [status, 200]


def finished_within(seconds: float, fn: Callable[[], Any]) -> Any:
    """fn()'s result, or a failed test when it has not returned after `seconds` (it is left running, a daemon)."""
    results: list[Any] = []
    worker = threading.Thread(target=lambda: results.append(fn()), daemon=True)
    worker.start()
    worker.join(seconds)
    assert results, f"still running after {seconds} s"
    return results[0]


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        (".bin", {"Retry-After": "3600"}),  # a whole download, which huggingface_hub makes
        (".bin", {"RateLimit": '"api";r=0;t=3600', "RateLimit-Policy": '"fixed window";"api";q=500;w=3600'}),
        ("/api/models/", {"Retry-After": "3600"}),
    ],
)
def test_a_server_asking_for_an_hour_between_attempts_waits_at_most_the_max_wait(
    env, tmp_path, monkeypatch, path, headers
):
    pickle_repo(env, tmp_path)
    monkeypatch.setenv("FTAUDIT_HTTP_MAX_WAIT", "1")
    env.fail_next(1, status=429, path_contains=path, method="GET", headers=headers)  # with Retry-After: 0 too
    started = time.monotonic()
    code, _, stderr = finished_within(60, lambda: run("check", "org/tuned", "--allow-pickle", "--debug"))
    assert code == 1, stderr
    assert time.monotonic() - started < 30
    assert stderr.count(": HTTP 429; retrying in 1.0s\n") == 1  # what the server asks, at most the max wait
    assert [r.status for r in env.requests if r.method == "GET" and path in r.path][:2] == [429, 200]


@pytest.mark.parametrize(
    ("headers", "failure"),
    [({"Location": "/loop"}, "TooManyRedirects"), ({"Content-Encoding": "gzip"}, "DecodingError")],
)
def test_a_redirect_loop_or_an_undecodable_body_is_retried_then_reported(env, tmp_path, monkeypatch, headers, failure):
    publish(env, tmp_path)
    monkeypatch.setenv("FTAUDIT_HTTP_RETRIES", "2")
    status = 302 if "Location" in headers else 200  # a 200 body that claims gzip and is not
    env.fail_next(1000, status, "/loop", headers=headers)
    env.fail_next(1000, status, "model.safetensors", method="GET", headers=headers)
    code, stdout, stderr = run("check", "org/tuned", "--quiet")
    assert (code, stdout) == (2, "")
    assert stderr.endswith(f": model.safetensors: still failing after 2 attempts ({failure})\n"), stderr


@pytest.mark.parametrize(
    ("status", "message"),
    [(200, "could not download pytorch_model.bin from {url} (FileMetadataError)"),  # no X-Repo-Commit: not a Hub
     (404, "pytorch_model.bin: the server answered HTTP 404")],
)
def test_a_download_the_hub_client_cannot_use_is_a_one_line_error(env, tmp_path, status, message):
    sha = pickle_repo(env, tmp_path)
    env.fail_next(1000, status, ".bin", method="HEAD")
    code, stdout, stderr = run("check", "org/tuned", "--allow-pickle")
    assert (code, stdout) == (2, "")
    assert stderr == f"ftaudit: error: org/tuned@{sha[:12]}: {message.format(url=env.url)}\n"


@pytest.mark.parametrize("allow", [["--allow-pickle"], []])
def test_a_git_lfs_pointer_in_place_of_a_pickle_says_so(env, tmp_path, allow):
    # A repo pushed without Git LFS holds the pointer as the file; not "refused by torch.load", which means code,
    # nor "pass --allow-pickle", which would only lead to this
    pickle_repo(env, tmp_path)
    pickled = io.BytesIO()
    torch.save(low_rank_update(llama_like()), pickled)
    pointer = hubserver._blob("pytorch_model.bin", pickled.getvalue()).pointer
    sha = env.add_repo("org/tuned", {"pytorch_model.bin": pointer, "README.md": card("org/base").encode()})
    code, stdout, stderr = run("check", "org/tuned", *allow)
    assert (code, stdout) == (2, "") and stderr == (
        f"ftaudit: error: org/tuned@{sha[:12]}/pytorch_model.bin: a Git LFS pointer, not the file: fetch the LFS files "
        "(git lfs pull; in GitHub Actions, actions/checkout with lfs: true)\n"
    )


def test_a_pickle_the_hugging_face_cache_cannot_take_is_a_one_line_error(env, tmp_path, monkeypatch):
    # A pickle is downloaded whole into the cache: one that cannot be written there (a read-only home, a full disk,
    # HF_HUB_CACHE naming a file) says so.
    sha = pickle_repo(env, tmp_path)
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(blocked))
    code, stdout, stderr = run("check", "org/tuned", "--allow-pickle")
    assert (code, stdout) == (2, "")
    assert stderr.splitlines()[-1] == (
        f"ftaudit: error: org/tuned@{sha[:12]}/pytorch_model.bin: cannot download it into the Hugging Face cache "
        f"({blocked}): Not a directory; set HF_HUB_CACHE (or HF_HOME) to a folder this user can write"
    ), stderr


def test_a_token_is_cleaned_like_huggingface_hub_cleans_hf_token_and_refused_if_no_header_can_carry_it(
    env, tmp_path, monkeypatch
):
    publish(env, tmp_path, private=True)
    env.add_token(TOKEN, repos=["org/tuned", "org/base"])
    assert run("check", "org/tuned", "--token", f" {TOKEN}\r\n")[0] == 1  # as read from a file
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert run("check", "org/tuned", "--token", "")[0] == 1  # an unset variable: the default applies
    start = len(env.requests)
    for token in ("hf_SéCrEtToKeN1234567890abcdef", "hf_SeCrEt\0ToKeN1234567890abcdef"):
        code, stdout, stderr = run("check", "org/tuned", "--token", token)
        assert (code, stdout, len(stderr.splitlines())) == (2, "", 1) and stderr.startswith(
            "ftaudit: error: Invalid value for '--token': holds a control or non-ASCII character, which no HTTP "
            "header can carry. (see "
        )
    assert len(env.requests) == start


@pytest.mark.parametrize("name", ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"])
def test_an_environment_token_no_header_can_carry_is_refused_without_being_shown(env, tmp_path, monkeypatch, name):
    publish(env, tmp_path, private=True)
    env.add_token(TOKEN, repos=["org/tuned", "org/base"])
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    for token in ("hf_SéCrEtToKeN1234567890abcdef", "hf_SeCrEt\x01ToKeN1234567890abcdef", "hf_SeCrEt\tToKeN12345678"):
        monkeypatch.setenv(name, token)
        code, stdout, stderr = run("check", "org/tuned")
        assert (code, stdout) == (2, "") and stderr == (
            f"ftaudit: error: {name} holds a control or non-ASCII character, which no HTTP header can carry: set it "
            "to the token as the Hub shows it\n"
        )
    assert not env.requests
    assert run("check", "org/tuned", "--token", TOKEN)[0] == 1  # the token given is sent instead
    monkeypatch.setenv(name, f" {TOKEN}\r\n")  # cleaned as huggingface_hub cleans it
    assert run("check", "org/tuned")[0] == 1


def test_the_timeout_setting_bounds_the_requests_for_file_sizes_too(env, tmp_path, monkeypatch):
    publish(env, tmp_path)
    monkeypatch.setenv("FTAUDIT_HTTP_TIMEOUT", "0.3")
    monkeypatch.setenv("FTAUDIT_HTTP_RETRIES", "2")
    env.stall_next(1000, 2.0, ".safetensors", method="HEAD")
    code, _, stderr = run("check", "org/tuned")
    assert code == 2 and stderr.endswith(": model.safetensors: still failing after 2 attempts (ReadTimeout)\n"), stderr


@pytest.mark.parametrize("sha", ["../..", "0" * 39, "ABCDEF" * 7])
def test_a_commit_that_is_no_sha_is_refused_before_it_names_a_cache_path(env, tmp_path, monkeypatch, sha):
    publish(env, tmp_path)
    info = hubserver._model_info
    monkeypatch.setattr(hubserver, "_model_info", lambda *a, **k: {**info(*a, **k), "sha": sha})
    looked_up = []
    monkeypatch.setattr("ftaudit.sources.hub.try_to_load_from_cache", lambda *a, **k: looked_up.append(k))
    code, stdout, stderr = run("check", "org/tuned")
    assert (code, stdout) == (2, "") and stderr == (
        f"ftaudit: error: org/tuned: the server named commit {sha!r} for main, which is not a commit sha "
        "(40 hex digits)\n"
    )
    assert not looked_up


def partial_answers(monkeypatch: pytest.MonkeyPatch, alter: Callable[[Any], None]) -> None:
    """The fake Hub's answers to Range requests (206) altered by `alter` before they are sent."""
    content = HubServer._content

    def altered(self, data, range_header, headers):
        response = content(self, data, range_header, headers)
        if response.status == 206:
            alter(response)
        return response

    monkeypatch.setattr(HubServer, "_content", altered)


def test_a_range_answer_longer_than_the_range_is_refused_without_reading_it_whole(env, tmp_path, monkeypatch):
    publish(env, tmp_path)
    padding = 64 << 20
    partial_answers(monkeypatch, lambda response: setattr(response, "body", response.body + bytes(padding)))
    code, stdout, stderr = run("check", "org/tuned")
    assert (code, stdout) == (2, "") and re.fullmatch(
        r"ftaudit: error: org/base@[0-9a-f]{12}/model\.safetensors: the server answered a Range request for bytes "
        r"0-7 with more than its 8 bytes\n", stderr
    ), stderr
    deadline = time.monotonic() + 10  # the server logs a body as sent whole until a write fails
    while any(r.bytes_sent >= padding for r in env.requests) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(r.bytes_sent < padding for r in env.requests)


def test_a_range_answer_of_other_bytes_names_the_file(env, tmp_path, monkeypatch):
    publish(env, tmp_path)
    partial_answers(monkeypatch, lambda response: response.headers.update({"Content-Range": "bytes 1-8/99"}))
    code, stdout, stderr = run("check", "org/tuned")
    assert (code, stdout) == (2, "") and re.fullmatch(
        r"ftaudit: error: org/base@[0-9a-f]{12}/model\.safetensors: the server answered a Range request for bytes "
        r"0-7 with range 'bytes 1-8/99'\n", stderr
    ), stderr
