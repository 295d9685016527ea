"""The Hugging Face cache: files it holds at the audited commit are read from it, and in offline mode
(HF_HUB_OFFLINE) Hub ids are resolved in it alone; its snapshots (files that link to blobs) audit as folders."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from huggingface_hub import HfApi, constants, hf_hub_download

from ftaudit.errors import InvalidWeightsError
from ftaudit.sources.local import LocalStorage
from tests.hubserver import HubServer
from tests.invoke import run
from tests.models import card, folder_files, llama_like, low_rank_update, write_model


def publish(hub: HubServer, tmp_path: Path, shards: int = 1) -> dict[str, str]:
    """org/base, and org/tuned (declaring it) on branches main and v1; the sha of each."""
    base = llama_like(layers=2)
    hub.add_repo("org/base", folder_files(write_model(tmp_path / "base", base)))
    tuned = folder_files(write_model(tmp_path / "tuned", low_rank_update(base), readme=card("org/base"), shards=shards))
    return {"main": hub.add_repo("org/tuned", tuned), "v1": hub.add_repo("org/tuned", tuned, revision_name="v1")}


def download(hub: HubServer, repo: str, revision: str = "main", skip: str = "") -> Path:
    """Every file of `repo` (but `skip`) into the Hugging Face cache, one by one as transformers fetches them; the
    snapshot folder."""
    info = HfApi(endpoint=hub.url).model_info(repo, revision=revision)
    for name in sorted(s.rfilename for s in info.siblings or [] if s.rfilename != skip):
        hf_hub_download(repo, name, revision=revision, endpoint=hub.url)
    return Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}" / "snapshots" / str(info.sha)


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def test_an_offline_audit_of_cached_repos_matches_the_online_one_without_a_request(hub_env, tmp_path, monkeypatch):
    shas = publish(hub_env, tmp_path)
    code, _, stderr = run("check", "org/tuned", "--json", tmp_path / "online.json")
    assert code == 1, stderr
    snapshot = download(hub_env, "org/tuned")
    download(hub_env, "org/base")
    assert (snapshot / "model.safetensors").is_symlink()  # the cache's layout: links into blobs/
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    before = len(hub_env.requests)
    code, stdout, stderr = run("check", "org/tuned", "--json", tmp_path / "offline.json")
    assert code == 1, stderr
    assert len(hub_env.requests) == before
    online, offline = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("online", "offline"))
    assert offline["model"] == online["model"] and offline["model"]["revision"] == shas["main"]
    assert offline["base"] == online["base"] and offline["base"]["declared_by"] == "card"
    assert offline["matrices"] == online["matrices"] and offline["verdict"] == online["verdict"]
    assert "org/tuned" in stdout


def test_an_online_audit_reads_what_the_cache_holds_and_requests_only_the_rest(hub_env, tmp_path):
    publish(hub_env, tmp_path, shards=2)
    code, _, stderr = run("check", "org/tuned", "--json", tmp_path / "uncached.json")
    assert code == 1, stderr
    download(hub_env, "org/tuned", skip="model-00002-of-00002.safetensors")
    before = len(hub_env.requests)
    code, _, stderr = run("check", "org/tuned", "--json", tmp_path / "cached.json", "--debug")
    assert code == 1, stderr
    reads = [r.path for r in hub_env.requests[before:] if r.method == "GET" and "/resolve/" in r.path]
    assert {p.rsplit("/", 1)[1] for p in reads if "org/tuned" in p} == {"model-00002-of-00002.safetensors"}
    assert any("org/base" in p and p.endswith("model.safetensors") for p in reads)  # not in the cache: by range
    assert "model-00001-of-00002.safetensors: read from the Hugging Face cache" in stderr
    uncached, cached = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("uncached", "cached"))
    assert cached["model"] == uncached["model"] and cached["matrices"] == uncached["matrices"]


def test_offline_revisions_resolve_through_the_cache(hub_env, tmp_path, offline):
    shas = publish(hub_env, tmp_path)
    constants.HF_HUB_OFFLINE = False
    download(hub_env, "org/tuned", "v1")
    download(hub_env, "org/base")
    constants.HF_HUB_OFFLINE = True
    for revision in ("v1", shas["v1"]):
        code, _, stderr = run("check", "org/tuned", "--revision", revision, "--json", tmp_path / "r.json")
        assert code == 1, stderr
        assert json.loads((tmp_path / "r.json").read_text())["model"]["revision"] == shas["v1"]
    code, _, stderr = run("check", "org/tuned", "--revision", "v2")
    assert code == 2 and stderr == (
        f"ftaudit: error: org/tuned@v2: not in the Hugging Face cache ({constants.HF_HUB_CACHE}), and HF_HUB_OFFLINE "
        "is set: download it first, or unset HF_HUB_OFFLINE\n")


def test_offline_without_the_base_in_the_cache_names_it(hub_env, tmp_path, offline):
    publish(hub_env, tmp_path)
    constants.HF_HUB_OFFLINE = False
    download(hub_env, "org/tuned")
    constants.HF_HUB_OFFLINE = True
    code, _, stderr = run("check", "org/tuned")
    assert code == 2 and stderr.startswith("ftaudit: error: org/base@main: not in the Hugging Face cache")
    assert len(stderr.splitlines()) == 1


@pytest.mark.parametrize(("shards", "skip"), [(1, "model.safetensors"), (2, "model-00002-of-00002.safetensors")])
def test_offline_a_partly_cached_model_is_a_clear_error(hub_env, tmp_path, offline, shards, skip):
    # transformers fetches a sharded model's index, then its shards one by one: a download cut short lacks some
    publish(hub_env, tmp_path, shards=shards)
    constants.HF_HUB_OFFLINE = False
    download(hub_env, "org/tuned", skip=skip)
    download(hub_env, "org/base")
    constants.HF_HUB_OFFLINE = True
    code, _, stderr = run("check", "org/tuned")
    assert code == 2 and stderr.startswith("ftaudit: error: org/tuned@main: only part of it is in the Hugging Face "
                                           "cache, and HF_HUB_OFFLINE is set: download it whole first"), stderr
    assert len(stderr.splitlines()) == 1


def test_offline_a_model_cached_without_its_card_says_the_card_is_missing(hub_env, tmp_path, offline):
    # transformers fetches the weights and configs, never README.md, which declares the base
    shas = publish(hub_env, tmp_path)
    constants.HF_HUB_OFFLINE = False
    download(hub_env, "org/tuned", skip="README.md")
    download(hub_env, "org/base")
    constants.HF_HUB_OFFLINE = True
    code, stdout, stderr = run("check", "org/tuned")
    assert (code, stdout) == (2, "") and stderr == (
        f"ftaudit: error: org/tuned@{shas['main'][:12]} (Hugging Face cache): has no card (README.md) and no "
        "adapter_config.json to declare its base model; pass the base with --base\n"
    )
    assert run("check", "org/tuned", "--base", "org/base")[0] == 1


def test_fix_offline_writes_the_patched_model_from_the_cache(hub_env, tmp_path, offline):
    publish(hub_env, tmp_path)
    constants.HF_HUB_OFFLINE = False
    download(hub_env, "org/tuned")
    download(hub_env, "org/base")
    constants.HF_HUB_OFFLINE = True
    out = tmp_path / "fixed"
    code, _, stderr = run("fix", "org/tuned", "--out", out, "--json", tmp_path / "fix.json")
    assert code in (0, 1), stderr
    record = json.loads((tmp_path / "fix.json").read_text())
    assert record["kind"] == "fix" and (out / "model.safetensors").is_file() and not (out / "model.safetensors").is_symlink()


def test_push_offline_is_refused_before_the_audit(hub_env, tmp_path, offline, monkeypatch):
    publish(hub_env, tmp_path)
    audited = []
    monkeypatch.setattr("ftaudit.cli.check", lambda *a: audited.append(a))
    code, _, stderr = run("check", "org/tuned", "--push")
    assert code == 2 and stderr == "ftaudit: error: --push writes to the Hub, which HF_HUB_OFFLINE turns off\n"
    assert not audited


def test_a_cache_snapshot_folder_audits_as_a_local_folder(hub_env, tmp_path):
    publish(hub_env, tmp_path)
    tuned, base = download(hub_env, "org/tuned"), download(hub_env, "org/base")
    code, _, stderr = run("check", tuned, "--base", base, "--json", tmp_path / "r.json")
    assert code == 1, stderr
    assert json.loads((tmp_path / "r.json").read_text())["summary"]["matrices_analysed"] > 0


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", "a/../../b", "..\\b"])
def test_a_local_folder_refuses_names_that_leave_it(tmp_path, name):
    (tmp_path / "outside.safetensors").write_bytes(b"x" * 16)
    folder = tmp_path / "model"
    folder.mkdir()
    with pytest.raises(InvalidWeightsError, match="points outside the snapshot"):
        LocalStorage(folder).read(name, 0, 1)


def test_a_repo_whose_index_names_a_file_outside_it_is_refused_before_any_lookup(hub_env, tmp_path):
    publish(hub_env, tmp_path, shards=2)
    files = folder_files(tmp_path / "tuned")
    index = json.loads(files["model.safetensors.index.json"])
    index["weight_map"] = {k: "../" + v for k, v in index["weight_map"].items()}
    files["model.safetensors.index.json"] = json.dumps(index).encode()
    files.update({"../" + name: data for name, data in list(files.items()) if name.startswith("model-")})
    hub_env.add_repo("org/tuned", files)
    code, _, stderr = run("check", "org/tuned")
    assert code == 2 and "file name '../model-0000" in stderr and "points outside the snapshot" in stderr, stderr
    assert not any("/../" in r.path or "%2E%2E" in r.path.upper() for r in hub_env.requests)


@pytest.mark.parametrize("relative", [False, True])
def test_offline_a_cached_ref_that_is_no_sha_is_refused(hub_env, tmp_path, offline, relative):
    # A ref file holds what a server's X-Repo-Commit said: it must not lead out of the repo's snapshots.
    publish(hub_env, tmp_path)
    constants.HF_HUB_OFFLINE = False
    snapshot = download(hub_env, "org/tuned")
    download(hub_env, "org/base")
    constants.HF_HUB_OFFLINE = True
    repo = snapshot.parent.parent
    outside = tmp_path / "outside"
    outside.symlink_to(snapshot)  # a folder that holds a model, outside the cache
    (repo / "refs" / "main").write_text(os.path.relpath(outside, repo / "snapshots") if relative else str(outside))
    code, stdout, stderr = run("check", "org/tuned")
    assert (code, stdout) == (2, "") and stderr.startswith("ftaudit: error: org/tuned@main: the Hugging Face cache "
                                                           "names commit "), stderr
    assert "which is not a commit sha (40 hex digits)" in stderr and len(stderr.splitlines()) == 1
