"""The report records the policy that judged it (`verdict.policy`), and the card, the text output and the job summary
say which one; `merge` records its own and warns when the shards were judged under another; reports written before
the field existed are still read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ftaudit import policy as policy_mod
from ftaudit.audit import AuditOptions
from ftaudit.check import Target
from ftaudit.check import check as audit
from tests.invoke import json_report, run
from tests.models import card, llama_like, low_rank_update, write_model

DEFAULT_CONTENT = {
    "k": 10, "epsilon": 0.5,
    "risk": {"intruder_rate": {"medium": 0.02, "high": 0.08}, "spectral_spike_max": {"medium": 0.5, "high": 2.5},
             "relative_update_norm_max": {"medium": 0.3, "high": 1.0}},
    "warn_at": "medium", "fail_at": "high", "fail_on_nonfinite": True, "fail_on_missing": False,
}


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A base and a low-rank fine-tune of it that declares it (high risk: fails under the default policy), and a
    policy that never fails."""
    root = tmp_path_factory.mktemp("policy")
    base = llama_like()
    write_model(root / "base", base)
    lenient = root / "lenient.yaml"
    lenient.write_text("verdict:\n  fail_at: never\n")
    return {"root": root, "base": root / "base", "lenient": lenient,
            "lora": write_model(root / "lora", low_rank_update(base), readme=card(str(root / "base")))}


def check(pair: dict[str, Path], *args: object) -> dict:
    return json_report("check", pair["lora"], "--no-cache", "--format", "json", *args)


def shards(pair: dict[str, Path], name: str, *args: object) -> list[Path]:
    paths = [pair["root"] / f"{name}-{i}.json" for i in (1, 2)]
    for i, path in enumerate(paths, 1):
        code, _, stderr = run("check", pair["lora"], "--no-cache", "--shard", f"{i}/2", "--json", path, *args)
        assert code in (0, 1), stderr
    return paths


def without_policy(path: Path) -> Path:
    """The report at `path` as an ftaudit that did not record the policy wrote it."""
    report = json.loads(path.read_text())
    del report["verdict"]["policy"]
    old = path.with_name(f"old-{path.name}")
    old.write_text(json.dumps(report))
    return old


def test_the_report_records_the_default_policy_and_its_digest(pair):
    policy = check(pair)["verdict"]["policy"]
    digest = policy.pop("digest")
    assert policy == {"source": "default", **DEFAULT_CONTENT}
    assert len(digest) == 12 and int(digest, 16) >= 0
    assert check(pair, "--k", 4)["verdict"]["policy"]["digest"] == digest  # what was measured is in the settings


def test_the_report_records_a_custom_policy_by_its_path_as_given_and_its_effective_content(pair, tmp_path):
    policy = tmp_path / "p.yaml"
    policy.write_text("k: 6\nrisk:\n  intruder_rate: {high: 0.5}\nverdict:\n  warn_at: never\n")
    report = check(pair, "--policy", policy)
    recorded = report["verdict"]["policy"]
    assert recorded["source"] == str(policy)
    assert {key: value for key, value in recorded.items() if key not in ("source", "digest")} == {
        **DEFAULT_CONTENT, "k": 6, "risk": {"intruder_rate": {"high": 0.5}}, "warn_at": "never"}
    assert report["settings"]["k"] == 6 and report["verdict"]["status"] == "pass"


def test_the_digest_follows_the_content_not_the_path(pair, tmp_path):
    default = check(pair)["verdict"]["policy"]["digest"]
    same = tmp_path / "same.yaml"
    same.write_text(policy_mod.default_text())
    looser = tmp_path / "looser.yaml"
    looser.write_text(policy_mod.default_text().replace("high: 0.08", "high: 0.09"))
    digests = [check(pair, "--policy", path)["verdict"]["policy"]["digest"] for path in (same, looser)]
    assert digests[0] == default and digests[1] != default
    lenient = check(pair, "--policy", pair["lenient"])["verdict"]["policy"]["digest"]
    assert len({default, digests[1], lenient}) == 3


def test_a_policy_file_named_default_is_not_recorded_as_the_built_in_one(pair, tmp_path, monkeypatch):
    (tmp_path / "default").write_text("verdict:\n  fail_at: never\n")
    monkeypatch.chdir(tmp_path)
    code, stdout, stderr = run("check", pair["lora"], "--no-cache", "--policy", "default", "--card", "card.md")
    assert code == 0, stderr
    assert "Policy: ./default (digest " in stdout
    assert "--policy ./default\n" in (tmp_path / "card.md").read_text()


def test_a_secret_shaped_path_is_masked_wherever_the_policy_is_shown(pair, tmp_path):
    folder = tmp_path / "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"
    folder.mkdir()
    (folder / "p.yaml").write_text("verdict:\n  fail_at: never\n")
    out = tmp_path / "out"
    out.mkdir()
    code, stdout, stderr = run("check", pair["lora"], "--no-cache", "--policy", folder / "p.yaml",
                               "--json", out / "r.json", "--card", out / "card.md")
    assert code == 0, stderr
    assert json.loads((out / "r.json").read_text())["verdict"]["policy"]["source"] == str(tmp_path / "***" / "p.yaml")
    for text in (stdout, (out / "r.json").read_text(), (out / "card.md").read_text()):
        assert "hf_" not in text and "/***/p.yaml" in text
    report = audit(Target(str(pair["lora"])), AuditOptions(), policy_mod.load(folder / "p.yaml"))
    assert report.verdict.policy.source == str(tmp_path / "***" / "p.yaml")  # in the library's report too


def test_the_card_and_outputs_say_which_policy_judged_and_reproduce_it(pair, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    code, stdout, _ = run("check", pair["lora"], "--no-cache", "--card", out / "default.md")
    assert code == 1
    digest = check(pair)["verdict"]["policy"]["digest"]
    assert f"Verdict: FAIL   Policy: default (digest {digest})\n" in stdout
    default = (out / "default.md").read_text()
    assert f"\n\nJudged under ftaudit's default policy (digest `{digest}`).\n\n" in default
    assert f"\nftaudit check {pair['lora']} --base {pair['base']} --k 10 --epsilon 0.5\n" in default
    assert "audit's own policy file" not in default

    lenient = pair["lenient"]
    code, summary, _ = run("check", pair["lora"], "--no-cache", "--policy", lenient, "--card", out / "lenient.md",
                           "--format", "markdown")
    assert code == 0
    custom = check(pair, "--policy", lenient)["verdict"]["policy"]["digest"]
    text = (out / "lenient.md").read_text()
    assert (f"- relative\\_update\\_norm\\_max = 1.357 reaches the high-risk threshold 1\n\nJudged under a custom policy, "
            f"`{lenient}` (digest `{custom}`); the JSON report's `verdict.policy` holds its thresholds.\n") in text
    command = f"ftaudit check {pair['lora']} --base {pair['base']} --k 10 --epsilon 0.5 --policy {lenient}"
    assert (f"\n{command}\n```\n\n`{lenient}` is the audit's own policy file, by the path the report records: the "
            f"command needs that file (digest `{custom}`).\n") in text
    assert f" · ε = 0.5 · policy `{lenient}` (digest `{custom}`) · device `cpu` · " in summary


def test_card_update_shows_the_saved_reports_policy_and_reads_one_without_it(pair, tmp_path):
    report = tmp_path / "r.json"
    assert run("check", pair["lora"], "--no-cache", "--policy", pair["lenient"], "--json", report)[0] == 0
    readme = tmp_path / "README.md"
    readme.write_text(card("org/base"))
    code, _, stderr = run("card", "update", readme, "--report", report)
    assert code == 0, stderr
    assert f"--policy {pair['lenient']}\n" in readme.read_text()
    assert "Judged under a custom policy" in readme.read_text()

    code, _, stderr = run("card", "update", readme, "--report", without_policy(report))
    assert code == 0, stderr
    text = readme.read_text()
    assert "\n\nThe report does not record the policy that judged it.\n\n" in text
    assert "--policy" not in text and "Judged under" not in text and "status: warn" in text


@pytest.mark.parametrize("policy, error", [
    ("a policy", "TypeError: Verdict.policy must be a JSON object or null, not \"a policy\")"),
    ({"source": "default", "digest": "x"}, "missing"),
    ({**DEFAULT_CONTENT, "source": "default", "digest": "x", "fail_at": "sometimes"},
     "AppliedPolicy.fail_at must be one of medium, high, never, not \"sometimes\""),
    ({**DEFAULT_CONTENT, "source": "default", "digest": "x", "k": "10"}, "AppliedPolicy.k must be int, not \"10\""),
])
def test_a_report_whose_policy_is_malformed_is_refused_in_one_line(pair, tmp_path, policy, error):
    report = check(pair)
    report["verdict"]["policy"] = policy
    path = tmp_path / "r.json"
    path.write_text(json.dumps(report))
    readme = tmp_path / "README.md"
    readme.write_text(card("org/base"))
    code, _, stderr = run("card", "update", readme, "--report", path)
    assert code == 2 and stderr.startswith(f"ftaudit: error: {path}: not an ftaudit report (") and error in stderr
    assert stderr.count("\n") == 1 and readme.read_text() == card("org/base")


def test_merge_records_its_own_policy_and_warns_when_the_shards_were_judged_under_another(pair):
    lenient = pair["lenient"]
    judged = shards(pair, "lenient", "--policy", lenient)
    code, stdout, stderr = run("merge", *judged, "--format", "json")
    merged = json.loads(stdout)
    shard = json.loads(judged[0].read_text())["verdict"]["policy"]
    assert code == 1 and merged["verdict"]["status"] == "fail"
    assert merged["verdict"]["policy"] == check(pair)["verdict"]["policy"]
    assert stderr == (f"ftaudit: WARNING: shard 1/2 ({judged[0]}) was judged under policy {lenient} (digest {shard['digest']}), the "
                      f"merge under policy default (digest {merged['verdict']['policy']['digest']}): the verdict is "
                      "the merge's; give merge the shards' --policy to judge the whole as they were\n")

    code, stdout, stderr = run("merge", *judged, "--policy", lenient, "--format", "json")
    assert code == 0 and stderr == ""
    assert json.loads(stdout)["verdict"]["policy"] == shard


def test_merge_under_a_policy_the_default_judged_shards_were_not_given_says_to_leave_it_out(pair):
    judged = shards(pair, "default")
    code, _, stderr = run("merge", *judged, "--policy", pair["lenient"], "--format", "json")
    assert code == 0 and stderr.startswith(f"ftaudit: WARNING: shard 1/2 ({judged[0]}) was judged under policy default")
    assert stderr.endswith("the verdict is the merge's; give merge no --policy to judge the whole as they were\n")


def test_merge_reads_shards_written_without_the_policy(pair):
    old = [without_policy(path) for path in shards(pair, "old")]
    code, stdout, stderr = run("merge", *old, "--policy", pair["lenient"], "--format", "json")
    assert code == 0 and stderr == ""  # nothing to compare the merge's policy with
    recorded = json.loads(stdout)["verdict"]["policy"]
    assert recorded["source"] == str(pair["lenient"]) and recorded["fail_at"] == "never"
