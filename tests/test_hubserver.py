"""The fake Hub answers the real huggingface_hub client the way the Hub does."""

import hashlib
import json
import time
from pathlib import Path

import httpx2
import pytest
import torch
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    constants,
    get_hf_file_metadata,
    get_session,
    hf_hub_download,
    hf_hub_url,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors.torch import save

from tests.hubserver import HubServer

README = b"---\nbase_model: org/base\nlicense: mit\ntags: [lora]\n---\n# A fine-tune\n"
WEIGHTS = save({"a.weight": torch.zeros(2, 3), "b.bias": torch.arange(4, dtype=torch.int64)})
DATA = bytes(range(256)) * 4


def url(hub: HubServer, repo_id: str, filename: str) -> str:
    return hf_hub_url(repo_id, filename, endpoint=hub.url)


def download(
    hub: HubServer, cache: Path, repo_id: str, filename: str, revision: str | None = None, token: str | bool = False
) -> bytes:
    path = hf_hub_download(repo_id, filename, revision=revision, token=token, cache_dir=cache, endpoint=hub.url)
    return Path(path).read_bytes()


def test_model_info(hub: HubServer) -> None:
    sha = hub.add_repo("org/ft", {"README.md": README, "model.safetensors": WEIGHTS, "config.json": b"{}"})
    api = HfApi(endpoint=hub.url, token=False)

    info = api.model_info("org/ft")
    assert (info.id, info.sha, info.private, info.gated) == ("org/ft", sha, False, False)
    assert info.card_data is not None and info.card_data.base_model == "org/base"
    assert info.tags == ["lora"]
    assert [s.rfilename for s in info.siblings or []] == ["README.md", "config.json", "model.safetensors"]
    assert api.model_info("org/ft", revision=sha).sha == sha

    sizes = {s.rfilename: (s.size, s.lfs) for s in api.model_info("org/ft", files_metadata=True).siblings or []}
    assert sizes["config.json"] == (2, None)
    size, lfs = sizes["model.safetensors"]
    assert size == len(WEIGHTS) and lfs is not None and lfs.sha256 == hashlib.sha256(WEIGHTS).hexdigest()


def test_explicit_card_data(hub: HubServer) -> None:
    hub.add_repo("org/ft", {"README.md": README}, card_data={"base_model": "other/base"})
    info = HfApi(endpoint=hub.url, token=False).model_info("org/ft")
    assert info.card_data is not None and info.card_data.base_model == "other/base"


def test_card_data_from_crlf_readme(hub: HubServer) -> None:
    hub.add_repo("org/ft", {"README.md": b"---\r\nbase_model: org/base\r\ntags: lora\r\n---\r\ntext\r\n"})
    info = HfApi(endpoint=hub.url, token=False).model_info("org/ft")
    assert info.card_data is not None and info.card_data.base_model == "org/base" and info.tags == ["lora"]


def test_new_commit_moves_branch_old_sha_stays(hub: HubServer, tmp_path: Path) -> None:
    first = hub.add_repo("org/ft", {"config.json": b"1"})
    second = hub.add_repo("org/ft", {"config.json": b"2", "extra.txt": b""})
    pr = hub.add_repo("org/ft", {"config.json": b"pr"}, revision_name="refs/pr/1")
    assert len({first, second, pr}) == 3 and all(len(s) == 40 for s in (first, second, pr))
    api = HfApi(endpoint=hub.url, token=False)

    assert api.model_info("org/ft").sha == second
    assert [s.rfilename for s in api.model_info("org/ft", revision=first).siblings or []] == ["config.json"]
    assert api.model_info("org/ft", revision="refs/pr/1").sha == pr
    assert download(hub, tmp_path, "org/ft", "config.json", revision=first) == b"1"
    assert download(hub, tmp_path, "org/ft", "config.json") == b"2"
    assert download(hub, tmp_path, "org/ft", "config.json", revision="refs/pr/1") == b"pr"


def test_same_content_gives_same_sha() -> None:
    with HubServer() as one, HubServer() as other:
        assert one.add_repo("a/b", {"x": b"1"}) == other.add_repo("a/b", {"x": b"1"})


def test_hf_hub_download_and_file_metadata(hub: HubServer, tmp_path: Path) -> None:
    sha = hub.add_repo("org/ft", {"model.safetensors": WEIGHTS, "config.json": b"{}"})
    assert download(hub, tmp_path, "org/ft", "model.safetensors") == WEIGHTS

    lfs = get_hf_file_metadata(url(hub, "org/ft", "model.safetensors"), token=False)
    assert (lfs.commit_hash, lfs.etag, lfs.size) == (sha, hashlib.sha256(WEIGHTS).hexdigest(), len(WEIGHTS))
    regular = get_hf_file_metadata(url(hub, "org/ft", "config.json"), token=False)
    assert (regular.etag, regular.size) == (hashlib.sha1(b"blob 2\0{}").hexdigest(), 2)  # git blob id


def test_safetensors_metadata_single_file(hub: HubServer) -> None:
    hub.add_repo("org/ft", {"model.safetensors": WEIGHTS})
    meta = HfApi(endpoint=hub.url, token=False).get_safetensors_metadata("org/ft")
    assert not meta.sharded
    assert meta.files_metadata["model.safetensors"].tensors["a.weight"].shape == [2, 3]
    gets = [r for r in hub.requests if r.method == "GET"]
    assert [(r.range, r.status, r.bytes_sent) for r in gets] == [("bytes=0-100000", 206, len(WEIGHTS))]


def test_safetensors_metadata_sharded(hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # the index goes to the default cache
    first, second = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    index = {"metadata": {"total_size": 32}, "weight_map": {"a": first, "b": second}}
    files = {first: save({"a": torch.ones(3)}), second: save({"b": torch.ones(5)})}
    sha = hub.add_repo("org/ft", files | {"model.safetensors.index.json": json.dumps(index).encode()})

    meta = HfApi(endpoint=hub.url, token=False).get_safetensors_metadata("org/ft", revision=sha)
    assert meta.sharded and meta.metadata == {"total_size": 32}
    assert meta.files_metadata[second].tensors["b"].shape == [5]
    assert all(r.range is not None for r in hub.requests if r.method == "GET" and r.path.endswith(".safetensors"))


@pytest.mark.parametrize(
    ("header", "status", "content_range", "body"),
    [
        ("bytes=2-5", 206, "bytes 2-5/1024", DATA[2:6]),
        ("bytes=1000-", 206, "bytes 1000-1023/1024", DATA[1000:]),
        ("bytes=-3", 206, "bytes 1021-1023/1024", DATA[-3:]),
        ("bytes=-5000", 206, "bytes 0-1023/1024", DATA),
        ("bytes=1020-5000", 206, "bytes 1020-1023/1024", DATA[1020:]),
        ("bytes=1024-", 416, "bytes */1024", b""),
        ("bytes=-0", 416, "bytes */1024", b""),
        ("bytes=0-1,4-5", 200, None, DATA),  # multi-range: ignored
        ("bytes=5-2", 200, None, DATA),  # invalid: ignored
    ],
)
def test_range(hub: HubServer, header: str, status: int, content_range: str | None, body: bytes) -> None:
    hub.add_repo("org/ft", {"data.bin": DATA})
    response = get_session().get(url(hub, "org/ft", "data.bin"), headers={"Range": header})
    assert (response.status_code, response.headers.get("Content-Range")) == (status, content_range)
    assert response.content == body
    assert response.headers["Accept-Ranges"] == "bytes"
    assert hub.requests[-1].bytes_sent == len(body)


def test_missing_repo_revision_file(hub: HubServer, tmp_path: Path) -> None:
    hub.add_repo("org/ft", {"config.json": b"{}"})
    api = HfApi(endpoint=hub.url, token=False)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("org/nope")
    with pytest.raises(RepositoryNotFoundError):
        download(hub, tmp_path, "org/nope", "config.json")
    with pytest.raises(RevisionNotFoundError):
        api.model_info("org/ft", revision="nope")
    with pytest.raises(RevisionNotFoundError):
        download(hub, tmp_path, "org/ft", "config.json", revision="0" * 40)
    with pytest.raises(EntryNotFoundError):
        download(hub, tmp_path, "org/ft", "nope.json")
    with pytest.raises(EntryNotFoundError):
        get_hf_file_metadata(url(hub, "org/ft", "nope.json"), token=False)
    assert not api.file_exists("org/ft", "nope.json")


def test_private_repo(hub: HubServer, tmp_path: Path) -> None:
    hub.add_repo("org/private", {"config.json": b"{}"}, private=True)
    hub.add_token("granted", ["org/private"])
    hub.add_token("other")

    with pytest.raises(RepositoryNotFoundError) as anonymous:
        HfApi(endpoint=hub.url, token=False).model_info("org/private")
    assert anonymous.value.response.status_code == 401
    with pytest.raises(RepositoryNotFoundError) as not_granted:
        HfApi(endpoint=hub.url, token="other").model_info("org/private")
    assert not_granted.value.response.status_code == 404
    with pytest.raises(RepositoryNotFoundError):
        download(hub, tmp_path, "org/private", "config.json")
    with pytest.raises(HfHubHTTPError) as invalid:  # the Hub's answer to an unknown token, on any repo
        HfApi(endpoint=hub.url, token="unknown").model_info("org/private")
    assert invalid.value.response.status_code == 401 and not isinstance(invalid.value, RepositoryNotFoundError)

    assert HfApi(endpoint=hub.url, token="granted").model_info("org/private").private is True
    assert download(hub, tmp_path, "org/private", "config.json", token="granted") == b"{}"
    assert hub.requests[-1].has_auth


def test_gated_repo(hub: HubServer, tmp_path: Path) -> None:
    hub.add_repo("org/gated", {"config.json": b"{}"}, gated=True)
    hub.add_token("granted", ["org/gated"])
    hub.add_token("other")

    assert HfApi(endpoint=hub.url, token=False).model_info("org/gated").gated == "auto"  # info stays public
    with pytest.raises(GatedRepoError) as anonymous:
        download(hub, tmp_path, "org/gated", "config.json")
    assert anonymous.value.response.status_code == 401
    with pytest.raises(GatedRepoError) as not_granted:
        download(hub, tmp_path, "org/gated", "config.json", token="other")
    assert not_granted.value.response.status_code == 403
    assert download(hub, tmp_path, "org/gated", "config.json", token="granted") == b"{}"


def test_ignore_range(hub: HubServer) -> None:
    hub.add_repo("org/ft", {"data.bin": DATA})
    hub.ignore_range = True
    response = get_session().get(url(hub, "org/ft", "data.bin"), headers={"Range": "bytes=0-9"})
    assert (response.status_code, response.content) == (200, DATA)
    assert (hub.requests[-1].range, hub.requests[-1].bytes_sent) == ("bytes=0-9", len(DATA))


def test_fail_next(hub: HubServer) -> None:
    hub.add_repo("org/ft", {"data.bin": DATA, "config.json": b"{}"})
    hub.fail_next(2, status=503, path_contains="data.bin")
    session = get_session()
    assert session.get(url(hub, "org/ft", "config.json")).status_code == 200
    assert [session.get(url(hub, "org/ft", "data.bin")).status_code for _ in range(3)] == [503, 503, 200]
    assert [r.status for r in hub.requests] == [200, 503, 503, 200]
    hub.fail_next(status=502)
    with pytest.raises(HfHubHTTPError):  # model_info does not retry
        HfApi(endpoint=hub.url, token=False).model_info("org/ft")


def test_fail_next_429_retry_after(hub: HubServer) -> None:
    hub.add_repo("org/ft", {"config.json": b"{}"})
    hub.fail_next(status=429)
    response = get_session().get(url(hub, "org/ft", "config.json"))
    assert (response.status_code, response.headers["Retry-After"]) == (429, "0")


def test_fail_next_head_is_retried_by_hf_hub_download(hub: HubServer, tmp_path: Path) -> None:
    hub.add_repo("org/ft", {"config.json": b"{}"})
    hub.fail_next(status=500)
    assert download(hub, tmp_path, "org/ft", "config.json") == b"{}"
    assert [(r.method, r.status) for r in hub.requests] == [("HEAD", 500), ("HEAD", 200), ("GET", 200)]


def test_drop_next(hub: HubServer) -> None:
    hub.add_repo("org/ft", {"data.bin": DATA})
    hub.drop_next(2, path_contains="data.bin")
    with pytest.raises(httpx2.RemoteProtocolError):  # headers, then half the body
        get_session().get(url(hub, "org/ft", "data.bin"))
    with pytest.raises(httpx2.RemoteProtocolError):  # nothing at all
        get_session().head(url(hub, "org/ft", "data.bin"))
    assert [(r.method, r.status, r.bytes_sent, r.dropped) for r in hub.requests] == [
        ("GET", 200, len(DATA) // 2, True),
        ("HEAD", 200, 0, True),
    ]
    assert get_session().get(url(hub, "org/ft", "data.bin")).content == DATA


def test_cut_next(hub: HubServer) -> None:
    hub.add_repo("org/ft", {"data.bin": DATA})
    hub.cut_next(1, path_contains="data.bin")
    first = get_session().get(url(hub, "org/ft", "data.bin"))
    assert (first.status_code, first.content, first.headers["Content-Length"]) == (200, DATA[: len(DATA) // 2],
                                                                                  str(len(DATA) // 2))
    assert get_session().get(url(hub, "org/ft", "data.bin")).content == DATA


def test_drop_mid_body_retried_by_hf_hub_download(hub: HubServer, tmp_path: Path) -> None:
    hub.add_repo("org/ft", {"model.safetensors": WEIGHTS})
    hub.redirect_lfs = True
    hub.drop_next(path_contains="/lfs/")  # the GET of the weights, not the HEAD before it
    assert download(hub, tmp_path, "org/ft", "model.safetensors") == WEIGHTS
    # The partial body is below the client's 10 MiB chunk, so it is discarded and fetched again in full.
    assert [(r.status, r.dropped) for r in hub.requests if r.path.startswith("/lfs/")] == [(200, True), (200, False)]


def test_delay(hub: HubServer) -> None:
    hub.add_repo("org/ft", {"config.json": b"{}"})
    hub.delay = 0.2
    start = time.monotonic()
    get_session().head(url(hub, "org/ft", "config.json"))
    assert time.monotonic() - start >= 0.2


def test_redirect_lfs(hub: HubServer, tmp_path: Path) -> None:
    sha = hub.add_repo("org/private", {"model.safetensors": WEIGHTS, "config.json": b"{}"}, private=True)
    hub.add_token("granted", ["org/private"])
    hub.redirect_lfs = True

    metadata = get_hf_file_metadata(url(hub, "org/private", "model.safetensors"), token="granted")
    assert metadata.location.startswith(hub.cdn_url) and (metadata.commit_hash, metadata.size) == (sha, len(WEIGHTS))
    headers = {"Range": "bytes=8-15", "Authorization": "Bearer granted"}
    assert get_session().get(url(hub, "org/private", "model.safetensors"), headers=headers).content == WEIGHTS[8:16]
    assert [(r.path.split("/")[1], r.status, r.range, r.has_auth) for r in hub.requests[-2:]] == [
        ("org", 302, "bytes=8-15", True),
        ("lfs", 206, "bytes=8-15", False),  # httpx drops Authorization on a cross-origin redirect
    ]
    assert download(hub, tmp_path, "org/private", "config.json", token="granted") == b"{}"  # not LFS: no redirect
    assert hub.requests[-1].path.startswith("/org/private/resolve/")
    assert HfApi(endpoint=hub.url, token="granted").get_safetensors_metadata("org/private").files_metadata


def test_stop_closes_connections() -> None:
    with HubServer() as server:
        server.add_repo("org/ft", {"config.json": b"{}"})
        assert get_session().get(url(server, "org/ft", "config.json")).status_code == 200
    with pytest.raises(httpx2.TransportError):
        get_session().get(url(server, "org/ft", "config.json"))


def add(path: str, data: bytes) -> CommitOperationAdd:
    return CommitOperationAdd(path_in_repo=path, path_or_fileobj=data)


def test_commit_moves_the_branch(hub: HubServer, tmp_path: Path) -> None:
    first = hub.add_repo("org/ft", {"README.md": README, "config.json": b"{}", "old/a.txt": b"a"})
    hub.add_token("writer", ["org/ft"], write=True)
    api = HfApi(endpoint=hub.url, token="writer")

    info = api.create_commit(
        "org/ft",
        [add("README.md", b"---\nbase_model: org/other\n---\n"), add("new.txt", b"n"),
         CommitOperationDelete("config.json"), CommitOperationDelete("old/")],
        commit_message="Update",
        parent_commit=first,
    )
    assert info.pr_url is None and info.oid == api.model_info("org/ft").sha != first
    assert info.commit_url == f"{hub.url}/org/ft/commit/{info.oid}"
    model = api.model_info("org/ft")
    assert [s.rfilename for s in model.siblings or []] == ["README.md", "new.txt"]
    assert model.card_data is not None and model.card_data.base_model == "org/other"
    assert download(hub, tmp_path, "org/ft", "new.txt") == b"n"
    assert [s.rfilename for s in api.model_info("org/ft", revision=first).siblings or []][1] == "config.json"
    commits = [r for r in hub.requests if r.method == "POST"]
    assert [r.path.split("?")[0] for r in commits] == [
        "/api/validate-yaml", "/api/models/org/ft/preupload/main", "/api/models/org/ft/commit/main"
    ]


def test_pull_requests(hub: HubServer, tmp_path: Path) -> None:
    first = hub.add_repo("org/ft", {"README.md": README, "config.json": b"{}"})
    hub.add_repo("org/ft", {"README.md": README, "config.json": b"{\"v\": 2}"})
    hub.add_token("writer", ["org/ft"], write=True)
    api = HfApi(endpoint=hub.url, token="writer")
    main = api.model_info("org/ft").sha

    one = api.create_commit("org/ft", [add("card.md", b"1")], commit_message="PR", create_pr=True)
    two = api.create_commit("org/ft", [add("card.md", b"2")], commit_message="PR", create_pr=True, parent_commit=first)
    assert (one.pr_url, one.pr_revision, one.pr_num) == (f"{hub.url}/org/ft/discussions/1", "refs/pr/1", 1)
    assert (two.pr_revision, two.oid) == ("refs/pr/2", api.model_info("org/ft", revision="refs/pr/2").sha)
    assert api.model_info("org/ft").sha == main  # the PRs leave main alone
    assert download(hub, tmp_path, "org/ft", "card.md", revision="refs/pr/1") == b"1"
    assert download(hub, tmp_path, "org/ft", "config.json", revision="refs/pr/1") == b'{"v": 2}'
    assert download(hub, tmp_path, "org/ft", "config.json", revision="refs/pr/2") == b"{}"  # from parent_commit

    refs = api.list_repo_refs("org/ft", include_pull_requests=True)
    assert [(b.name, b.ref, b.target_commit) for b in refs.branches] == [("main", "refs/heads/main", main)]
    assert [(p.ref, p.target_commit) for p in refs.pull_requests or []] == [
        ("refs/pr/1", one.oid), ("refs/pr/2", two.oid)
    ]
    assert api.list_repo_refs("org/ft").pull_requests is None


def test_commit_needs_a_write_token(hub: HubServer) -> None:
    hub.add_repo("org/ft", {"config.json": b"{}"})
    hub.add_repo("org/private", {"config.json": b"{}"}, private=True)
    hub.add_token("reader", ["org/ft", "org/private"])
    hub.add_token("writer-elsewhere", ["org/other"], write=True)
    hub.add_token("writer", ["org/private"], write=True)

    def commit(token: str | bool, repo: str = "org/ft", create_pr: bool = False) -> None:
        HfApi(endpoint=hub.url, token=token).create_commit(
            repo, [add("x.txt", b"x")], commit_message="x", create_pr=create_pr
        )

    for token, status in [(False, 401), ("reader", 403), ("writer-elsewhere", 403)]:
        for create_pr in (False, True):
            with pytest.raises(HfHubHTTPError) as denied:
                commit(token, create_pr=create_pr)
            assert denied.value.response.status_code == status
    with pytest.raises(RepositoryNotFoundError):
        commit("writer-elsewhere", "org/private")
    commit("writer", "org/private", create_pr=True)
    assert HfApi(endpoint=hub.url, token="writer").model_info("org/private", revision="refs/pr/1").private


def test_commit_on_a_stale_parent_is_refused(hub: HubServer) -> None:
    first = hub.add_repo("org/ft", {"config.json": b"1"})
    second = hub.add_repo("org/ft", {"config.json": b"2"})
    hub.add_token("writer", ["org/ft"], write=True)
    api = HfApi(endpoint=hub.url, token="writer")
    with pytest.raises(HfHubHTTPError) as stale:
        api.create_commit("org/ft", [add("x.txt", b"x")], commit_message="x", parent_commit=first)
    assert stale.value.response.status_code == 412 and "A commit has happened since" in str(stale.value)
    with pytest.raises(RevisionNotFoundError):
        api.create_commit("org/ft", [add("x.txt", b"x")], commit_message="x", revision=second)  # not a branch
    assert api.model_info("org/ft").sha == second


def test_unchanged_files_are_not_committed_again(hub: HubServer) -> None:
    sha = hub.add_repo("org/ft", {"README.md": README})
    hub.add_token("writer", ["org/ft"], write=True)
    api = HfApi(endpoint=hub.url, token="writer")
    info = api.create_commit("org/ft", [add("README.md", README)], commit_message="x")
    assert info.oid == sha and not any("/commit/" in r.path for r in hub.requests)


def test_invalid_card_metadata_is_refused(hub: HubServer) -> None:
    hub.add_repo("org/ft", {"README.md": README})
    hub.add_token("writer", ["org/ft"], write=True)
    with pytest.raises(ValueError, match="Invalid metadata in README.md"):
        HfApi(endpoint=hub.url, token="writer").create_commit(
            "org/ft", [add("README.md", b"---\nbase_model: [unclosed\n---\n")], commit_message="x"
        )


def test_discussions_and_pull_requests_are_listed_newest_first(hub: HubServer) -> None:
    hub.add_repo("org/ft", {"README.md": README})
    hub.add_token("bot", ["org/ft"], write=True, user="ci-bot")
    hub.add_token("alice", ["org/ft"], write=True, user="alice")
    bot, alice = HfApi(endpoint=hub.url, token="bot"), HfApi(endpoint=hub.url, token="alice")
    first = bot.create_commit("org/ft", [add("a.txt", b"a")], commit_message="ftaudit: pass", create_pr=True)
    question = hub.add_discussion("org/ft", "Which base?", author="alice")
    second = alice.create_commit("org/ft", [add("b.txt", b"b")], commit_message="Add b", create_pr=True)
    assert (first.pr_num, question, second.pr_num) == (1, 2, 3)

    listed = list(HfApi(endpoint=hub.url, token=False).get_repo_discussions("org/ft"))
    assert [(d.num, d.title, d.author, d.status, d.is_pull_request, d.git_reference) for d in listed] == [
        (3, "Add b", "alice", "open", True, "refs/pr/3"),
        (2, "Which base?", "alice", "open", False, None),
        (1, "ftaudit: pass", "ci-bot", "open", True, "refs/pr/1"),
    ]
    assert listed[0].url == f"{hub.url}/org/ft/discussions/3" and listed[0].repo_id == "org/ft"
    assert all(d.created_at.tzinfo is not None for d in listed)

    def nums(**filters: str) -> list[int]:
        return [d.num for d in bot.get_repo_discussions("org/ft", **filters)]

    assert nums(discussion_type="pull_request") == [3, 1] and nums(discussion_type="discussion") == [2]
    assert nums(author="ci-bot") == [1] and nums(discussion_type="pull_request", author="alice") == [3]
    bot.change_discussion_status("org/ft", 3, "closed")
    assert nums(discussion_status="open") == [2, 1] and nums(discussion_status="closed") == [3]
    assert [d.status for d in bot.get_repo_discussions("org/ft")] == ["closed", "open", "open"]


def test_discussions_are_listed_a_page_at_a_time(hub: HubServer) -> None:
    hub.add_repo("org/ft", {"README.md": README})
    for i in range(5):
        hub.add_discussion("org/ft", f"question {i}")
    hub.page_size = 2
    listed = list(HfApi(endpoint=hub.url, token=False).get_repo_discussions("org/ft"))
    assert [d.title for d in listed] == [f"question {i}" for i in (4, 3, 2, 1, 0)]
    pages = [r.path for r in hub.requests if "/discussions" in r.path]
    assert [path.rsplit("p=", 1)[1] for path in pages] == ["0", "1", "2"]


def test_discussions_of_a_private_repo_need_its_token(hub: HubServer) -> None:
    hub.add_repo("org/private", {"README.md": README}, private=True)
    hub.add_token("reader", ["org/private"])
    hub.add_discussion("org/private", "hidden")
    with pytest.raises(RepositoryNotFoundError):
        list(HfApi(endpoint=hub.url, token=False).get_repo_discussions("org/private"))
    assert [d.title for d in HfApi(endpoint=hub.url, token="reader").get_repo_discussions("org/private")] == ["hidden"]


def test_a_commit_onto_a_pull_request_moves_its_ref(hub: HubServer, tmp_path: Path) -> None:
    main = hub.add_repo("org/ft", {"README.md": README})
    hub.add_token("writer", ["org/ft"], write=True)
    api = HfApi(endpoint=hub.url, token="writer")
    opened = api.create_commit("org/ft", [add("a.txt", b"1")], commit_message="PR", create_pr=True)

    update = api.create_commit("org/ft", [add("a.txt", b"2")], commit_message="again", revision="refs/pr/1",
                               parent_commit=opened.oid)
    assert update.pr_url is None and update.oid != opened.oid
    refs = api.list_repo_refs("org/ft", include_pull_requests=True)
    assert [(p.ref, p.target_commit) for p in refs.pull_requests or []] == [("refs/pr/1", update.oid)]
    assert [b.target_commit for b in refs.branches] == [main]
    assert download(hub, tmp_path, "org/ft", "a.txt", revision="refs/pr/1") == b"2"
    assert [d.num for d in api.get_repo_discussions("org/ft")] == [1]  # the same pull request, no new one

    with pytest.raises(HfHubHTTPError) as stale:  # the pull request moved on since opened.oid
        api.create_commit("org/ft", [add("a.txt", b"3")], commit_message="x", revision="refs/pr/1",
                          parent_commit=opened.oid)
    assert stale.value.response.status_code == 412
    assert api.list_repo_refs("org/ft", include_pull_requests=True).pull_requests[0].target_commit == update.oid


def test_whoami_names_the_tokens_user(hub: HubServer) -> None:
    hub.add_token("bot", write=True, user="ci-bot")
    hub.add_token("reader")
    assert HfApi(endpoint=hub.url, token="bot").whoami()["name"] == "ci-bot"
    assert HfApi(endpoint=hub.url, token="reader").whoami()["auth"]["accessToken"]["role"] == "read"
    with pytest.raises(HfHubHTTPError) as unknown:
        HfApi(endpoint=hub.url, token="nobody").whoami()
    assert unknown.value.response.status_code == 401


def test_closing_and_merging_pull_requests(hub: HubServer, tmp_path: Path) -> None:
    hub.add_repo("org/ft", {"README.md": README, "config.json": b"{}"})
    hub.add_token("writer", ["org/ft"], write=True, user="owner")
    hub.add_token("author", ["org/ft"], write=True, user="alice")
    hub.add_token("reader", ["org/ft"], user="bob")
    owner, reader = HfApi(endpoint=hub.url, token="writer"), HfApi(endpoint=hub.url, token="reader")
    one = owner.create_commit("org/ft", [add("a.txt", b"a")], commit_message="one", create_pr=True)
    two = HfApi(endpoint=hub.url, token="author").create_commit(
        "org/ft", [add("b.txt", b"b")], commit_message="two", create_pr=True)
    hub.add_token("author", ["org/ft"], user="alice")  # no longer a writer: may still close its own pull request

    for denied in (lambda: reader.change_discussion_status("org/ft", 1, "closed"),
                   lambda: reader.merge_pull_request("org/ft", 1),
                   lambda: HfApi(endpoint=hub.url, token="author").merge_pull_request("org/ft", 2)):
        with pytest.raises(HfHubHTTPError) as refused:
            denied()
        assert refused.value.response.status_code == 403
    event = HfApi(endpoint=hub.url, token="author").change_discussion_status("org/ft", 2, "closed")
    assert (event.new_status, event.author) == ("closed", "alice")

    owner.merge_pull_request("org/ft", 1)
    main = owner.model_info("org/ft")
    assert main.sha not in (one.oid, two.oid) and download(hub, tmp_path, "org/ft", "a.txt", revision=main.sha) == b"a"
    assert [(d.num, d.status) for d in owner.get_repo_discussions("org/ft")] == [(2, "closed"), (1, "merged")]
    for again in (lambda: owner.merge_pull_request("org/ft", 1), lambda: owner.merge_pull_request("org/ft", 2),
                  lambda: owner.change_discussion_status("org/ft", 1, "open")):
        with pytest.raises(HfHubHTTPError) as refused:
            again()
        assert refused.value.response.status_code == 400
    with pytest.raises(HfHubHTTPError) as missing:
        owner.change_discussion_status("org/ft", 9, "closed")
    assert missing.value.response.status_code == 404
