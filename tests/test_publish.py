"""Publishing: a real audit of models on the fake Hub, its card pushed back as a pull request or a commit;
GitHub Actions outputs."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner
from huggingface_hub import CommitOperationAdd, HfApi, close_session

from ftaudit import frontmatter, policy
from ftaudit import publish as publish_module
from ftaudit.audit import AuditOptions
from ftaudit.cardfile import card_data_from_report, update_card
from ftaudit.check import Target, check
from ftaudit.cli import main
from ftaudit.errors import AccessError, FtauditError, UsageError
from ftaudit.publish import push_card, write_github_outputs
from ftaudit.renderers.badge import render_badge_svg, shields_endpoint
from ftaudit.renderers.card import render_card_section
from ftaudit.renderers.heatmap import render_heatmap_svg
from ftaudit.renderers.markdown import render_job_summary
from ftaudit.report import Report
from tests.hubserver import HubServer
from tests.models import card, folder_files, llama_like, low_rank_update, small_update, write_model

TOKEN = "hf_WrItEtOkEn1234567890abcdef"
READ_TOKEN = "hf_ReAdOnLyToKeN1234567890abcd"
ALICE = "hf_AlIcEsToKeN1234567890abcdefg"  # a person's, with write access too
BEGIN, END = "<!-- ftaudit:begin -->", "<!-- ftaudit:end -->"
BODY = "# A model\n\nSome text.\n"


@pytest.fixture(autouse=True)
def fresh_client() -> Iterator[None]:
    """A push makes huggingface_hub's shared client take FTAUDIT_HTTP_TIMEOUT as set then: close it after each test,
    so that the next test's is built anew."""
    yield
    close_session()


@pytest.fixture(autouse=True)
def tokens(hub_env: HubServer) -> None:
    """Write tokens of the CI's user and of a person, and a read-only token, for org/tuned."""
    hub_env.add_token(TOKEN, ["org/tuned"], write=True, user="ci-bot")
    hub_env.add_token(ALICE, ["org/tuned"], write=True, user="alice")
    hub_env.add_token(READ_TOKEN, ["org/tuned"], user="ci-bot")


def publish(
    hub: HubServer, tmp_path: Path, *, readme: str | None = card("org/base", tags=["lora"]), update=low_rank_update
) -> str:
    """Put a base and a tuned model on the Hub; return the tuned model's commit."""
    base = llama_like()
    hub.add_repo("org/base", folder_files(write_model(tmp_path / "base", base)))
    return hub.add_repo("org/tuned", folder_files(write_model(tmp_path / "tuned", update(base), readme=readme)))


def audit(model: str = "org/tuned", base: str | None = None) -> Report:
    return check(Target(model, base), AuditOptions(device="cpu"), policy.load(None))


def read(hub: HubServer, path: str, revision: str = "main") -> str:
    local = HfApi(endpoint=hub.url, token=TOKEN).hf_hub_download("org/tuned", path, revision=revision)
    return Path(local).read_text(encoding="utf-8")


def files(hub: HubServer, revision: str) -> list[str]:
    info = HfApi(endpoint=hub.url, token=TOKEN).model_info("org/tuned", revision=revision)
    return [s.rfilename for s in info.siblings or []]


def section(readme: str) -> str:
    assert readme.count(BEGIN) == 1 and readme.count(END) == 1
    return readme[readme.index(BEGIN) : readme.index(END) + len(END)]


def outside(readme: str) -> str:
    """The card without its front matter and ftaudit section."""
    return frontmatter.FRONT_MATTER.sub("", readme).replace(section(readme), "")


def test_push_opens_a_pull_request_with_the_card_badge_and_heatmap(hub_env, tmp_path):
    sha = publish(hub_env, tmp_path)
    report = audit()
    assert report.model.revision == sha and report.verdict.status == "fail"

    pushed = push_card(report, token=TOKEN)
    assert (pushed.url, pushed.action) == (f"{hub_env.url}/org/tuned/discussions/1", "opened")
    api = HfApi(endpoint=hub_env.url, token=TOKEN)
    assert api.model_info("org/tuned").sha == sha  # main is unchanged
    pr = api.list_repo_refs("org/tuned", include_pull_requests=True).pull_requests or []
    assert [p.ref for p in pr] == ["refs/pr/1"]

    readme = read(hub_env, "README.md", "refs/pr/1")
    meta = frontmatter.read(readme)
    assert meta["base_model"] == "org/base" and meta["license"] == "apache-2.0" and meta["tags"] == ["lora"]
    for key, value in card_data_from_report(report).items():
        assert meta["ftaudit"][key] == value
    assert "ftaudit/badge.svg" in section(readme) and "ftaudit/heatmap.svg" in section(readme)
    assert outside(readme).split() == BODY.split()  # the rest of the card stays
    assert read(hub_env, "ftaudit/badge.svg", "refs/pr/1") == render_badge_svg(report)
    assert read(hub_env, "ftaudit/heatmap.svg", "refs/pr/1") == render_heatmap_svg(report)
    assert json.loads(read(hub_env, "ftaudit/badge.json", "refs/pr/1")) == shields_endpoint(report)
    assert files(hub_env, "refs/pr/1") == sorted(files(hub_env, "main") + [
        "ftaudit/badge.json", "ftaudit/badge.svg", "ftaudit/heatmap.svg"
    ])
    assert read(hub_env, "README.md") == card("org/base", tags=["lora"])


def test_commit_mode_changes_main_and_a_second_push_replaces_the_section(hub_env, tmp_path):
    first_sha = publish(hub_env, tmp_path)
    pushed = push_card(audit(), token=TOKEN, mode="commit")
    main = HfApi(endpoint=hub_env.url, token=TOKEN).model_info("org/tuned").sha
    assert main != first_sha and (pushed.url, pushed.action) == (f"{hub_env.url}/org/tuned/commit/{main}", "committed")
    first = read(hub_env, "README.md")
    assert "ftaudit/badge.svg" in files(hub_env, "main")

    second_report = audit()  # the audit of the new main, whose card already has a section
    assert second_report.model.revision == main
    push_card(second_report, token=TOKEN, mode="commit", heatmap=False)
    second = read(hub_env, "README.md")
    assert section(second) != section(first) and "heatmap.svg" not in section(second)
    assert outside(second) == outside(first)
    for key, value in card_data_from_report(second_report).items():
        assert frontmatter.read(second)["ftaudit"][key] == value

    push_card(audit(), token=TOKEN)  # a pull request on top of a card that has a section
    assert section(read(hub_env, "README.md", "refs/pr/1"))


def test_a_crlf_card_keeps_its_line_endings_and_bom(hub_env, tmp_path):
    original = "\ufeff" + card("org/base", tags=["lora"]).replace("\n", "\r\n")
    publish(hub_env, tmp_path, readme=original)
    push_card(audit(base="org/base"), token=TOKEN)
    local = HfApi(endpoint=hub_env.url, token=TOKEN).hf_hub_download("org/tuned", "README.md", revision="refs/pr/1")
    pushed = Path(local).read_bytes().decode("utf-8")
    assert "\n" not in pushed.replace("\r\n", "") and pushed.startswith("\ufeff---\r\nlicense: apache-2.0\r\n")
    assert pushed.replace(section(pushed), "").startswith(original.split("# A model")[0].split("tags:")[0])
    assert original.split("---\r\n", 2)[2] in pushed  # the body, byte for byte


def test_repo_without_a_card_gets_a_new_one(hub_env, tmp_path):
    publish(hub_env, tmp_path, readme=None, update=small_update)
    report = audit(base="org/base")
    push_card(report, token=TOKEN, badge=False)
    readme = read(hub_env, "README.md", "refs/pr/1")
    assert section(readme) and "badge.svg" not in section(readme)
    for key, value in card_data_from_report(report).items():
        assert frontmatter.read(readme)["ftaudit"][key] == value
    assert "ftaudit/badge.svg" not in files(hub_env, "refs/pr/1")
    assert "README.md" not in files(hub_env, "main")


@pytest.mark.parametrize("mode", ["pr", "commit"])
def test_a_token_without_write_access_is_refused(hub_env, tmp_path, monkeypatch, mode):
    sha = publish(hub_env, tmp_path)
    report = audit()
    messages = []
    with pytest.raises(AccessError) as read_only:
        push_card(report, token=READ_TOKEN, mode=mode)
    messages.append(str(read_only.value))
    with pytest.raises(AccessError) as anonymous:
        push_card(report, token=None, mode=mode)
    messages.append(str(anonymous.value))
    monkeypatch.setenv("HF_TOKEN", READ_TOKEN)  # the token from the environment
    with pytest.raises(AccessError) as from_env:
        push_card(report, token=None, mode=mode)
    messages.append(str(from_env.value))
    with pytest.raises(AccessError) as unknown:
        push_card(report, token=TOKEN + "x", mode=mode)
    messages.append(str(unknown.value))
    assert all("WRITE access to org/tuned" in m for m in messages[:3])
    assert not any(secret in m for m in messages for secret in (TOKEN, READ_TOKEN))
    assert HfApi(endpoint=hub_env.url).model_info("org/tuned").sha == sha
    assert not (HfApi(endpoint=hub_env.url).list_repo_refs("org/tuned", include_pull_requests=True).pull_requests)


def test_an_environment_token_no_header_can_carry_is_refused_before_any_request(hub_env, tmp_path, monkeypatch):
    publish(hub_env, tmp_path)
    report = audit()
    start = len(hub_env.requests)
    monkeypatch.setenv("HF_TOKEN", "hf_WrîteToKeN1234567890abcdef")
    with pytest.raises(UsageError, match="^HF_TOKEN holds a control or non-ASCII character, which no HTTP header can "
                       "carry: set it to the token as the Hub shows it$"):
        push_card(report, token=None)
    assert len(hub_env.requests) == start


def test_local_folders_and_stale_audits_cannot_be_pushed(hub_env, tmp_path):
    publish(hub_env, tmp_path)
    local = audit(str(tmp_path / "tuned"), base=str(tmp_path / "base"))
    with pytest.raises(UsageError, match="--push needs a Hub repository"):
        push_card(local, token=TOKEN)
    report = audit()
    hub_env.add_repo("org/tuned", {"README.md": b"moved on"})
    with pytest.raises(UsageError, match="is not the head of any branch"):
        push_card(report, token=TOKEN)
    with pytest.raises(UsageError, match="--push-mode"):
        push_card(report, token=TOKEN, mode="force")


def test_push_of_a_local_folder_is_refused_before_the_audit(hub_env, tmp_path):
    publish(hub_env, tmp_path)
    report = tmp_path / "r.json"
    result = CliRunner().invoke(main, ["check", str(tmp_path / "tuned"), "--base", str(tmp_path / "base"), "--push",
                                       "--json", str(report)])
    assert result.exit_code == 2
    assert result.stderr == f"ftaudit: error: --push needs a Hub repository: {tmp_path / 'tuned'} is a local folder\n"
    assert not report.exists()  # refused before the audit, not after it


def test_network_failures_are_reported(hub_env, tmp_path):
    publish(hub_env, tmp_path)
    report = audit()
    hub_env.fail_next(status=500, path_contains="/commit/")
    with pytest.raises(FtauditError, match="HTTP 500") as failed:
        push_card(report, token=TOKEN)
    assert TOKEN not in str(failed.value)
    hub_env.stop()
    with pytest.raises(FtauditError, match=r"branch list: still failing after 5 attempts \(ConnectError\)"):
        push_card(report, token=TOKEN)


def pull_requests(hub: HubServer) -> list[str]:
    refs = HfApi(endpoint=hub.url, token=TOKEN).list_repo_refs("org/tuned", include_pull_requests=True)
    return [p.ref for p in refs.pull_requests or []]


def requests_to(hub: HubServer, start: int, method: str, path: str) -> list[int]:
    """The statuses of the requests since `start` with `method` whose target contains `path`."""
    return [r.status for r in hub.requests[start:] if r.method == method and path in r.path]


@pytest.mark.parametrize("status", [503, 429])
@pytest.mark.parametrize(
    ("method", "path"), [("GET", "/refs"), ("GET", "/README.md"), ("HEAD", "/README.md"), ("POST", "/preupload/")]
)
def test_the_push_retries_its_reads_and_its_upload(hub_env, tmp_path, status, method, path):
    sha = publish(hub_env, tmp_path)
    report = audit()
    start = len(hub_env.requests)
    hub_env.fail_next(3, status=status, path_contains=path, method=method)  # within the 5 attempts
    assert push_card(report, token=TOKEN).url == f"{hub_env.url}/org/tuned/discussions/1"
    assert requests_to(hub_env, start, method, path) == [status] * 3 + [200]
    assert pull_requests(hub_env) == ["refs/pr/1"]
    assert section(read(hub_env, "README.md", "refs/pr/1")) and read(hub_env, "README.md", sha) == card(
        "org/base", tags=["lora"]
    )


def test_the_push_reads_give_up_after_the_retries(hub_env, tmp_path, monkeypatch):
    publish(hub_env, tmp_path)
    report = audit()
    monkeypatch.setenv("FTAUDIT_HTTP_RETRIES", "2")
    start = len(hub_env.requests)
    hub_env.fail_next(2, status=503, path_contains="/refs")
    with pytest.raises(FtauditError) as failed:
        push_card(report, token=TOKEN)
    assert str(failed.value) == (
        f"org/tuned@{report.model.revision[:12]}: branch list: still failing after 2 attempts (HTTP 503)"
    )
    assert requests_to(hub_env, start, "GET", "/refs") == [503, 503]
    assert requests_to(hub_env, start, "POST", "/commit/") == []


@pytest.mark.parametrize("attempts", [1, 3])
@pytest.mark.parametrize(
    ("method", "path", "status", "what"),
    [
        ("HEAD", "/resolve/", 503, "README.md"),  # huggingface_hub's download asks the file's metadata again, with retries
        ("GET", "/resolve/", 429, "README.md"),  # and retries its GET on 429
        ("POST", "/preupload/", 503, "upload of the card's files"),  # its commit retries the question how to upload
    ],
)
def test_every_request_of_the_push_is_attempted_as_often_as_the_setting_says_in_all(
    hub_env, tmp_path, monkeypatch, attempts, method, path, status, what
):
    publish(hub_env, tmp_path)
    report = audit()
    monkeypatch.setenv("FTAUDIT_HTTP_RETRIES", str(attempts))
    start = len(hub_env.requests)
    hub_env.fail_next(1000, status=status, path_contains=path, method=method)
    with pytest.raises(FtauditError) as failed:
        push_card(report, token=TOKEN)
    assert str(failed.value) == (
        f"org/tuned@{report.model.revision[:12]}: {what}: still failing after {attempts} attempts (HTTP {status})"
    )
    assert requests_to(hub_env, start, method, path) == [status] * attempts
    assert requests_to(hub_env, start, "POST", "/commit/") == []


@pytest.mark.parametrize("mode", ["pr", "commit"])
def test_the_write_is_not_retried_and_its_failure_says_what_was_written(hub_env, tmp_path, mode):
    sha = publish(hub_env, tmp_path)
    report = audit()
    api = HfApi(endpoint=hub_env.url, token=TOKEN)
    then = {
        "pr": "so the Hub may have opened the pull request: push again, which finds it rather than opening another",
        "commit": "so the Hub may have made it: look at the repo's commits before pushing again (a second push could "
                  "make a duplicate)",
    }[mode]

    start = len(hub_env.requests)
    hub_env.fail_next(1, status=429, path_contains="/commit/", method="POST")  # refused: nothing written
    with pytest.raises(FtauditError) as refused:
        push_card(report, token=TOKEN, mode=mode)
    assert str(refused.value) == "org/tuned: the Hub refused the change (HTTP 429); nothing was written"
    hub_env.fail_next(1, status=503, path_contains="/validate-yaml", method="POST")  # before the commit was sent
    with pytest.raises(FtauditError) as before:
        push_card(report, token=TOKEN, mode=mode)
    assert str(before.value) == "org/tuned: the push failed (HTTP 503); nothing was written: run again later"
    assert requests_to(hub_env, start, "POST", "/commit/") == [429]
    assert pull_requests(hub_env) == [] and api.model_info("org/tuned").sha == sha

    hub_env.fail_next(1, status=503, path_contains="/commit/", method="POST")  # sent, then failed: cannot be told
    with pytest.raises(FtauditError) as unknown:
        push_card(report, token=TOKEN, mode=mode)
    assert str(unknown.value) == f"org/tuned: the push failed (HTTP 503) after the change was sent, {then}"
    assert requests_to(hub_env, start, "POST", "/commit/") == [429, 503]

    hub_env.drop_next(1, path_contains="/commit/", method="POST")  # made, but the answer was lost
    with pytest.raises(FtauditError) as lost:
        push_card(report, token=TOKEN, mode=mode)
    assert str(lost.value).endswith(f"after the change was sent, {then}")
    assert TOKEN not in str(lost.value) and "\n" not in str(lost.value)
    assert requests_to(hub_env, start, "POST", "/commit/") == [429, 503, 200]  # one write, not retried
    if mode == "pr":
        assert pull_requests(hub_env) == ["refs/pr/1"] and api.model_info("org/tuned").sha == sha
        assert push_card(report, token=TOKEN).action == "unchanged"  # as the message says: pushing again finds it
        assert pull_requests(hub_env) == ["refs/pr/1"] and requests_to(hub_env, start, "POST", "/commit/")[3:] == []
    else:
        assert pull_requests(hub_env) == [] and api.model_info("org/tuned").sha != sha


def test_a_failed_write_to_a_branch_with_a_slash_is_known_to_have_been_sent(hub_env, tmp_path):
    base = llama_like()
    hub_env.add_repo("org/base", folder_files(write_model(tmp_path / "base", base)))
    files = folder_files(write_model(tmp_path / "tuned", low_rank_update(base), readme=card("org/base")))
    hub_env.add_repo("org/tuned", files, revision_name="feature/x")
    report = check(Target("org/tuned", revision="feature/x"), AuditOptions(device="cpu"), policy.load(None))
    start = len(hub_env.requests)
    hub_env.fail_next(1, status=503, path_contains="/commit/", method="POST")
    with pytest.raises(FtauditError) as unknown:
        push_card(report, token=TOKEN)
    assert requests_to(hub_env, start, "POST", "/commit/") == [503]
    assert "after the change was sent, so the Hub may have opened" in str(unknown.value)


def test_a_redirect_loop_answering_the_write_is_a_failure_that_may_have_written(hub_env, tmp_path):
    publish(hub_env, tmp_path)
    report = audit()
    commit = "/api/models/org/tuned/commit/main"
    hub_env.fail_next(1000, status=307, path_contains=commit, headers={"Location": commit})
    with pytest.raises(FtauditError) as unknown:
        push_card(report, token=TOKEN)
    assert str(unknown.value).startswith(
        "org/tuned: the push failed (TooManyRedirects from http://127.0.0.1:"
    ) and "after the change was sent, so the Hub may have opened" in str(unknown.value)


def test_a_stalled_server_times_out_instead_of_holding_the_push(hub_env, tmp_path, monkeypatch):
    publish(hub_env, tmp_path)
    report = audit()
    monkeypatch.setenv("FTAUDIT_HTTP_TIMEOUT", "0.3")
    monkeypatch.setenv("FTAUDIT_HTTP_RETRIES", "2")
    hub_env.delay = 3.0
    with pytest.raises(FtauditError, match=r"still failing after 2 attempts \(ReadTimeout\)"):
        push_card(report, token=TOKEN)
    hub_env.delay = 0.0
    assert not HfApi(endpoint=hub_env.url).list_repo_refs("org/tuned", include_pull_requests=True).pull_requests


def test_github_outputs_and_job_summary(hub_env, tmp_path):
    publish(hub_env, tmp_path)
    report = audit()
    outputs, summary = tmp_path / "output", tmp_path / "summary"
    outputs.write_text("earlier=1\n")
    env = {"GITHUB_OUTPUT": str(outputs), "GITHUB_STEP_SUMMARY": str(summary)}
    write_github_outputs(report, tmp_path / "r.json", env)
    assert outputs.read_text() == (
        f"earlier=1\nstatus=fail\nrisk={report.summary.risk}\nintruders={report.summary.intruder_dimensions}\n"
        f"report={tmp_path / 'r.json'}\n"
    )
    assert summary.read_text() == render_job_summary(report).rstrip("\n") + "\n"

    forged = tmp_path / "a\nstatus=pass"  # a path cannot forge another output
    write_github_outputs(report, forged, {"GITHUB_OUTPUT": str(outputs)})
    lines = outputs.read_text().splitlines()[5:]
    delimiter = lines[3].removeprefix("report<<")
    assert delimiter.startswith("ghadelimiter_") and lines[4:] == [str(tmp_path / "a"), "status=pass", delimiter]
    write_github_outputs(report, None, {})  # outside GitHub Actions: nothing to do


@pytest.mark.parametrize(("variable", "problem"), [("GITHUB_OUTPUT", "a folder is there"),
                                                 ("GITHUB_STEP_SUMMARY", "no folder {missing}")])
def test_github_outputs_that_cannot_be_written_are_refused_before_the_audit_and_the_push(
        hub_env, tmp_path, monkeypatch, variable, problem):
    publish(hub_env, tmp_path)
    missing = tmp_path / "missing"
    path = tmp_path if variable == "GITHUB_OUTPUT" else missing / "summary"
    monkeypatch.setenv(variable, str(path))
    report = tmp_path / "r.json"
    result = CliRunner().invoke(main, ["check", "org/tuned", "--push", "--token", TOKEN, "--format", "github",
                                       "--json", str(report)])
    assert result.exit_code == 2
    assert result.stderr == (
        f"::error title=ftaudit::{path}: cannot write GitHub Actions output ({problem.format(missing=missing)})\n")
    assert not report.exists() and pull_requests(hub_env) == []  # the step failed before anything was done
    merged = CliRunner().invoke(main, ["merge", str(tmp_path / "shard-1.json"), "--format", "github"])
    assert merged.exit_code == 2 and "cannot write GitHub Actions output" in merged.stderr  # before reading reports


def test_the_merge_of_a_hub_models_shards_pushes_the_whole_audits_card(hub_env, tmp_path):
    sha = publish(hub_env, tmp_path)
    shards = [tmp_path / f"shard-{i}.json" for i in (1, 2)]
    for i, path in enumerate(shards, 1):
        result = CliRunner().invoke(main, ["check", "org/tuned", "--shard", f"{i}/2", "--json", str(path)])
        assert result.exit_code == 1, result.stderr
    result = CliRunner().invoke(main, ["merge", *map(str, shards), "--push", "--token", TOKEN, "--json",
                                       str(tmp_path / "merged.json")])
    assert result.exit_code == 1, result.stderr
    merged = Report.read(tmp_path / "merged.json")
    assert merged.model.revision == sha and merged.summary.matrices_analysed == audit().summary.matrices_analysed
    readme = read(hub_env, "README.md", "refs/pr/1")
    assert frontmatter.read(readme)["ftaudit"] == card_data_from_report(merged)
    assert read(hub_env, "ftaudit/badge.svg", "refs/pr/1") == render_badge_svg(merged)


def test_the_timeout_holds_for_the_client_huggingface_hub_rebuilds(hub_env, tmp_path, monkeypatch):
    # huggingface_hub closes its shared client after a connection error, and its next request builds a new one.
    publish(hub_env, tmp_path)
    report = audit()
    monkeypatch.setenv("FTAUDIT_HTTP_TIMEOUT", "0.3")
    readme = publish_module._readme

    def then_reconnect(*args):
        text = readme(*args)
        close_session()
        return text

    monkeypatch.setattr(publish_module, "_readme", then_reconnect)
    hub_env.stall_next(1, 5.0, "/preupload/", method="POST")
    start = time.monotonic()
    assert push_card(report, token=TOKEN).url == f"{hub_env.url}/org/tuned/discussions/1"  # huggingface_hub retried
    assert time.monotonic() - start < 3.0


def open_pull_requests(hub: HubServer) -> list[tuple[int, str]]:
    """The number and author of each open pull request on org/tuned, newest first."""
    listed = HfApi(endpoint=hub.url, token=TOKEN).get_repo_discussions(
        "org/tuned", discussion_type="pull_request", discussion_status="open")
    return [(pr.num, pr.author) for pr in listed]


def pr_heads(hub: HubServer) -> dict[str, str]:
    refs = HfApi(endpoint=hub.url, token=TOKEN).list_repo_refs("org/tuned", include_pull_requests=True)
    return {pr.ref: pr.target_commit for pr in refs.pull_requests or []}


def test_pushing_again_on_the_same_commit_leaves_its_pull_request_as_it_is(hub_env, tmp_path):
    sha = publish(hub_env, tmp_path)
    report = audit()
    first = push_card(report, token=TOKEN)
    heads = pr_heads(hub_env)
    start = len(hub_env.requests)
    rerun = replace(audit(), created_at="2031-02-03T04:05:06+00:00")  # the job run again: the same audit, later
    again = push_card(rerun, token=TOKEN)
    assert open_pull_requests(hub_env) == [(1, "ci-bot")] and pr_heads(hub_env) == heads
    assert requests_to(hub_env, start, "POST", "/commit/") == []
    assert (again.url, again.action) == (first.url, "unchanged")
    assert f"audited {report.created_at}" in read(hub_env, "README.md", "refs/pr/1")
    assert HfApi(endpoint=hub_env.url).model_info("org/tuned").sha == sha


def test_the_push_needs_no_writable_hugging_face_cache(hub_env, tmp_path, monkeypatch):
    # The push reads the card, and pushed again its pull request's files, from the Hub: a Hugging Face cache that
    # cannot be written (a read-only home in a container, HF_HUB_CACHE naming a file) does not stop it.
    publish(hub_env, tmp_path)
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(blocked))
    first = push_card(audit(), token=TOKEN)
    again = push_card(replace(audit(), created_at="2031-02-03T04:05:06+00:00"), token=TOKEN)
    assert (first.action, again.action, again.url) == ("opened", "unchanged", first.url)
    assert open_pull_requests(hub_env) == [(1, "ci-bot")]


def test_a_draft_pull_request_of_ftaudits_is_found_too(hub_env, tmp_path):
    """The Hub's `open` filter may leave drafts out (the fake's does): the pull requests are listed whatever their
    status, and ftaudit's is taken while it is open or a draft."""
    publish(hub_env, tmp_path)
    first = push_card(audit(), token=TOKEN)
    hub_env._repos["org/tuned"].discussions[1].status = "draft"
    again = push_card(replace(audit(), created_at="2031-02-03T04:05:06+00:00"), token=TOKEN)
    assert (again.url, again.action) == (first.url, "unchanged")
    assert pull_requests(hub_env) == ["refs/pr/1"]


def test_a_new_audit_of_the_same_commit_updates_its_pull_request(hub_env, tmp_path):
    sha = publish(hub_env, tmp_path)
    first = push_card(audit(), token=TOKEN)
    edited = read(hub_env, "README.md", "refs/pr/1").replace("Some text.", "Some better text.")
    HfApi(endpoint=hub_env.url, token=ALICE).create_commit(  # a reviewer's edit in the pull request
        "org/tuned", [CommitOperationAdd("README.md", edited.encode())], commit_message="Reword",
        revision="refs/pr/1")
    edited_head = pr_heads(hub_env)["refs/pr/1"]
    stricter = check(Target("org/tuned"), AuditOptions(device="cpu", epsilon=0.3), policy.load(None))

    pushed = push_card(stricter, token=TOKEN)
    assert open_pull_requests(hub_env) == [(1, "ci-bot")] and pr_heads(hub_env)["refs/pr/1"] != edited_head
    assert (pushed.url, pushed.action) == (first.url, "updated")
    readme = read(hub_env, "README.md", "refs/pr/1")
    assert frontmatter.read(readme)["ftaudit"] == card_data_from_report(stricter)
    assert "ε = 0.3" in section(readme) and "Some better text." in readme  # the reviewer's edit stays
    assert read(hub_env, "ftaudit/heatmap.svg", "refs/pr/1") == render_heatmap_svg(stricter)
    assert read(hub_env, "ftaudit/badge.svg", "refs/pr/1") == render_badge_svg(stricter)
    assert HfApi(endpoint=hub_env.url).model_info("org/tuned").sha == sha
    assert push_card(stricter, token=TOKEN).action == "unchanged"


@pytest.mark.parametrize("other", ["opened by a person", "titled by a person", "of an older commit", "closed",
                                   "merged"])
def test_a_pull_request_that_is_not_the_open_one_ftaudit_made_for_the_commit_is_left_alone(hub_env, tmp_path, other):
    publish(hub_env, tmp_path)
    report = audit()
    if other == "opened by a person":  # ftaudit's pull request for this commit, but a person's: alice ran it
        push_card(report, token=ALICE)
    elif other == "titled by a person":  # ftaudit's change, but a pull request the CI's user opened by hand
        readme = update_card(card("org/base", tags=["lora"]), render_card_section(report),
                             card_data_from_report(report))
        HfApi(endpoint=hub_env.url, token=TOKEN).create_commit(
            "org/tuned", [CommitOperationAdd("README.md", readme.encode())], commit_message="Add the audit",
            create_pr=True)
    elif other == "of an older commit":
        push_card(report, token=TOKEN)
        hub_env.add_repo("org/tuned", {**folder_files(tmp_path / "tuned"), "notes.txt": b"v2"})
        report = audit()
    elif other == "closed":
        push_card(report, token=TOKEN)
        HfApi(endpoint=hub_env.url, token=TOKEN).change_discussion_status("org/tuned", 1, "closed")
    else:  # merged into main; the audited commit is still the head of release
        hub_env.add_repo("org/tuned", folder_files(tmp_path / "tuned"), revision_name="release")
        push_card(report, token=TOKEN)
        HfApi(endpoint=hub_env.url, token=TOKEN).merge_pull_request("org/tuned", 1)
    heads = pr_heads(hub_env)

    pushed = push_card(report, token=TOKEN)
    assert (pushed.url, pushed.action) == (f"{hub_env.url}/org/tuned/discussions/2", "opened")
    assert pr_heads(hub_env) == {**heads, "refs/pr/2": pr_heads(hub_env)["refs/pr/2"]}  # #1 as it was
    assert open_pull_requests(hub_env)[0] == (2, "ci-bot")
    assert frontmatter.read(read(hub_env, "README.md", "refs/pr/2"))["ftaudit"] == card_data_from_report(report)


@pytest.mark.parametrize(("method", "path"), [("GET", "/discussions"), ("GET", "/whoami-v2"),
                                              ("GET", "/resolve/"), ("HEAD", "/resolve/")])
def test_pushing_again_retries_the_reads_that_find_the_pull_request(hub_env, tmp_path, method, path):
    publish(hub_env, tmp_path)
    report = audit()
    push_card(report, token=TOKEN)
    start = len(hub_env.requests)
    hub_env.fail_next(3, status=503, path_contains=path, method=method)
    assert push_card(report, token=TOKEN).action == "unchanged"
    assert requests_to(hub_env, start, method, path)[:4] == [503] * 3 + [200]
    assert open_pull_requests(hub_env) == [(1, "ci-bot")]


def test_the_update_of_a_pull_request_is_not_retried(hub_env, tmp_path):
    publish(hub_env, tmp_path)
    push_card(audit(), token=TOKEN)
    stricter = check(Target("org/tuned"), AuditOptions(device="cpu", epsilon=0.3), policy.load(None))
    start = len(hub_env.requests)
    hub_env.fail_next(1, status=503, path_contains="/commit/refs%2Fpr%2F1", method="POST")
    with pytest.raises(FtauditError) as unknown:
        push_card(stricter, token=TOKEN)
    assert str(unknown.value) == (
        "org/tuned: the push failed (HTTP 503) after the change was sent, so the Hub may have updated pull request #1: "
        "push again, which leaves it as it is if it holds the change"
    )
    assert requests_to(hub_env, start, "POST", "/commit/") == [503]
    assert push_card(stricter, token=TOKEN).action == "updated" and open_pull_requests(hub_env) == [(1, "ci-bot")]


def test_the_command_says_what_the_push_did(hub_env, tmp_path):
    publish(hub_env, tmp_path)
    url = f"{hub_env.url}/org/tuned/discussions/1"
    said = []
    for _ in range(2):
        result = CliRunner().invoke(main, ["check", "org/tuned", "--push", "--token", TOKEN])
        assert result.exit_code == 1, result.stderr
        said.append(result.stderr.splitlines()[-1])
    assert said == [f"ftaudit: INFO: pull request opened: {url}", "ftaudit: INFO: pull request left as it is (the one "
                    f"open for this commit already holds this audit): {url}"]
    assert open_pull_requests(hub_env) == [(1, "ci-bot")]


@pytest.mark.parametrize("failure", ["read-only token", "card not YAML"])
def test_a_failed_push_leaves_the_verdict_in_the_job_summary_outputs_and_log(hub_env, tmp_path, monkeypatch, failure):
    base = llama_like()
    hub_env.add_repo("org/base", folder_files(write_model(tmp_path / "base", base)))
    readme = card("org/base") if failure == "read-only token" else "---\nbase_model: org/base\ntags: [lora\n---\n# A\n"
    tuned = write_model(tmp_path / "tuned", low_rank_update(base), readme=readme)
    hub_env.add_repo("org/tuned", folder_files(tuned), card_data={})
    outputs, summary, path = tmp_path / "output", tmp_path / "summary", tmp_path / "r.json"
    monkeypatch.setenv("GITHUB_OUTPUT", str(outputs))
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    result = CliRunner().invoke(main, ["check", "org/tuned", "--base", "org/base", "--push", "--format", "github",
                                       "--json", str(path),
                                       "--token", READ_TOKEN if failure == "read-only token" else TOKEN])

    assert result.exit_code == 2  # the push failed
    assert result.stderr.splitlines()[-1] == "::error title=ftaudit::" + (
        "org/tuned: the Hub refused the change (HTTP 403): --push needs a token with WRITE access to org/tuned (a "
        "fine-grained token with write permission on the repo, or a token with the write role)"
        if failure == "read-only token" else
        "the card's front matter is not valid YAML (while parsing a flow sequence): fix it first")
    report = Report.read(path)
    assert report.verdict.status == "fail" and pull_requests(hub_env) == []
    assert outputs.read_text() == (f"status=fail\nrisk={report.summary.risk}\n"
                                   f"intruders={report.summary.intruder_dimensions}\nreport={path}\n")
    assert summary.read_text() == render_job_summary(report).rstrip("\n") + "\n"
    assert result.stdout.startswith("::error")  # the verdict's annotations


def test_without_a_token_the_pull_request_is_not_looked_up_and_the_push_is_refused(hub_env, tmp_path):
    publish(hub_env, tmp_path)
    report = audit()
    push_card(report, token=TOKEN)
    heads = pr_heads(hub_env)
    start = len(hub_env.requests)
    with pytest.raises(AccessError, match="--push needs a token with WRITE access to org/tuned"):
        push_card(report, token=None)
    assert requests_to(hub_env, start, "GET", "/whoami-v2") == [] and pr_heads(hub_env) == heads


def test_a_pull_request_into_another_branch_than_the_one_chosen_now_is_left_alone(hub_env, tmp_path):
    """The audited commit was the head of main and release, so the pull request went into main; main moved on since,
    so a push now targets release, and opens a pull request into it rather than updating the one into main."""
    sha = publish(hub_env, tmp_path)
    hub_env.add_repo("org/tuned", folder_files(tmp_path / "tuned"), revision_name="release")
    report = audit()
    first = push_card(report, token=TOKEN)
    hub_env.add_repo("org/tuned", {**folder_files(tmp_path / "tuned"), "notes.txt": b"v2"})
    heads = pr_heads(hub_env)

    pushed = push_card(report, token=TOKEN)
    assert (pushed.url, pushed.action) == (f"{hub_env.url}/org/tuned/discussions/2", "opened") != (first.url, "opened")
    prs = hub_env._repos["org/tuned"].discussions
    assert (prs[1].target, prs[2].target) == ("main", "release")
    assert pr_heads(hub_env) == {**heads, "refs/pr/2": pr_heads(hub_env)["refs/pr/2"]}  # #1 as it was
    assert frontmatter.read(read(hub_env, "README.md", "refs/pr/2"))["ftaudit"]["revision"] == sha
    assert push_card(report, token=TOKEN).action == "unchanged"  # the one into release is found


@pytest.mark.parametrize("status", [403, 404])
def test_a_refused_list_of_pull_requests_warns_and_opens_one(hub_env, tmp_path, caplog, status):
    """A token that may push but not read the discussions, or a repo whose discussions are turned off: the look-up
    of ftaudit's pull request is skipped, with a warning, and a pull request opens."""
    publish(hub_env, tmp_path)
    hub_env.fail_next(1, status=status, path_contains="/discussions", method="GET")
    pushed = push_card(audit(), token=TOKEN)
    assert (pushed.url, pushed.action) == (f"{hub_env.url}/org/tuned/discussions/1", "opened")
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"org/tuned: the Hub refused to list its pull requests (HTTP {status}): ftaudit's own pull request for this "
        "commit is not looked for"]
    assert open_pull_requests(hub_env) == [(1, "ci-bot")]


def test_a_commit_says_that_ftaudits_pull_request_for_the_commit_is_still_open(hub_env, tmp_path):
    publish(hub_env, tmp_path)
    report = audit()
    opened = push_card(report, token=TOKEN)
    pushed = push_card(report, token=TOKEN, mode="commit")
    main = HfApi(endpoint=hub_env.url, token=TOKEN).model_info("org/tuned").sha
    assert str(pushed) == (f"committed: {hub_env.url}/org/tuned/commit/{main}; pull request #1 for this commit is "
                           f"still open: close it unless it holds edits to keep: {opened.url}")
    assert open_pull_requests(hub_env) == [(1, "ci-bot")]
    assert str(push_card(audit(), token=TOKEN, mode="commit")).startswith("committed: ")  # the new head has none
