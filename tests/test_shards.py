"""An audit split into shards (`check --shard I/N`) and joined again (`merge`) gives the whole audit's report."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from examples import minilm_finetunes as ft
from ftaudit.shards import Shard
from tests.hubserver import HubServer
from tests.invoke import run
from tests.models import folder_files, llama_like, low_rank_update, small_update, write_model

EXPERTS = "model.layers.0.mlp.experts.down_proj"
ADAPTER = Path(__file__).resolve().parent.parent / "examples" / "minilm-lora-r8"
NAN = "model.layers.0.self_attn.q_proj.weight"
"""The fixture's matrix holding NaN."""
EMBEDDING = "model.embed_tokens.weight"


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A model with every kind of entry a report lists: analysed matrices (some with intruders), each expert's
    matrix of a stack, an unchanged matrix, a NaN one, and a head (holding an inf) and an embedding measured for their
    row norms."""
    root = tmp_path_factory.mktemp("shards")
    g = torch.Generator().manual_seed(5)
    base = llama_like(layers=3) | {EXPERTS: torch.randn(5, 32, 48, generator=g) / 6}
    tuned = low_rank_update(small_update(base), only="layers.1.")
    tuned[EXPERTS] = base[EXPERTS] + 0.05 * torch.randn(5, 32, 48, generator=g)
    tuned[EXPERTS][3] += 2 * torch.randn(32, 1, generator=g) @ torch.randn(1, 48, generator=g)
    tuned["model.layers.2.self_attn.o_proj.weight"] = base["model.layers.2.self_attn.o_proj.weight"]
    tuned["model.layers.0.self_attn.q_proj.weight"] = torch.full((32, 32), float("nan"))
    tuned["lm_head.weight"][1, 1] = float("inf")  # a head measured for its row norms, which then have no figure
    return {"base": write_model(root / "base", base), "tuned": write_model(root / "tuned", tuned), "root": root}


def audit(pair: dict[str, Path], *args: object) -> tuple[int, str, str]:
    return run("check", pair["tuned"], "--base", pair["base"], "--no-cache", *args)


def shard_reports(pair: dict[str, Path], count: int, *args: object) -> list[Path]:
    paths = []
    for index in range(1, count + 1):
        path = pair["root"] / f"shard-{index}-of-{count}{len(args)}.json"
        code, _, stderr = audit(pair, "--shard", f"{index}/{count}", "--json", path, *args)
        assert code in (0, 1), stderr
        paths.append(path)
    return paths


def without_time(path: Path) -> dict:
    report = json.loads(path.read_text())
    assert report.pop("created_at")
    return report


@pytest.mark.parametrize("count", [1, 3, 30])
def test_the_shards_merged_give_the_whole_audits_report(pair, count):
    whole = pair["root"] / "whole.json"
    code, _, stderr = audit(pair, "--json", whole)
    shards = shard_reports(pair, count)
    merged = pair["root"] / f"merged-{count}.json"
    merge_code, stdout, _ = run("merge", *reversed(shards), "--json", merged)
    assert (code, merge_code) == (1, 1), stderr  # the NaN matrix fails the verdict, in the whole and in the merge
    expected = without_time(whole)
    assert expected["tensors"]["nonfinite"] == ["lm_head.weight", "model.layers.0.self_attn.q_proj.weight"]
    assert expected["summary"]["heads"]["lm_head.weight"]["mean_norm_ratio"] is None
    assert expected["tensors"]["unchanged"] == ["model.layers.2.self_attn.o_proj.weight"]
    assert {"lm_head.weight", "model.embed_tokens.weight"} <= expected["summary"]["heads"].keys()
    assert f"{EXPERTS}[3]" in [m["name"] for m in expected["matrices"] if m["intruders"]]
    assert expected["model"]["fingerprint"] and expected["base"]["fingerprint"] and expected["assignment"] is None
    assert without_time(merged) == expected
    assert f"{expected['summary']['matrices_analysed']} matrices analysed" in stdout


def test_each_matrix_is_in_one_shard_and_the_work_is_balanced(pair):
    shards = [json.loads(p.read_text()) for p in shard_reports(pair, 4)]
    names = [m["name"] for s in shards for m in s["matrices"]]
    code, stdout, _ = audit(pair, "--format", "json")
    assert sorted(names) == sorted(m["name"] for m in json.loads(stdout)["matrices"]) and len(set(names)) == len(names)
    work = [sum(m["shape"][0] * m["shape"][1] * min(m["shape"]) for m in s["matrices"]) for s in shards]
    largest = max(m["shape"][0] * m["shape"][1] * min(m["shape"]) for s in shards for m in s["matrices"])
    assert max(work) - min(work) <= largest
    assert [s["settings"]["shard"] for s in shards] == [{"index": i, "count": 4} for i in range(1, 5)]
    heads = [name for s in shards for name in s["summary"]["heads"]]
    assert sorted(heads) == ["lm_head.weight", "model.embed_tokens.weight"]


def test_the_split_takes_the_costliest_first_and_is_the_same_in_every_shard():
    costs = [1, 8, 3, 8, 2, 5]
    taken = [Shard(i, 3).take(list(range(len(costs))), lambda i: costs[i]) for i in (1, 2, 3)]
    # by cost: 1 and 3 (8), 5 (5), 2 (3), 4 (2), 0 (1), each to the shard with the least so far, the first if tied
    assert taken == [[1, 4], [0, 3], [2, 5]]
    assert sorted(i for part in taken for i in part) == list(range(len(costs)))


def test_the_split_takes_time_and_memory_by_the_items_not_by_the_count_of_shards():
    items = list(range(200))
    assert Shard(3, 10**12).take(items, float) == [197]  # a list of 10**12 loads: a MemoryError
    assert [Shard(i, 10**12).take(items, float) for i in (200, 201)] == [[0], []]


def test_a_shard_says_so_and_merge_writes_what_check_writes(pair):
    code, stdout, _ = audit(pair, "--shard", "2/3")
    assert "shard 2 of 3: the numbers and the verdict cover its matrices only" in stdout
    code, markdown, _ = audit(pair, "--shard", "2/3", "--format", "markdown")
    assert "`\n\nShard 2 of 3: the numbers and the verdict cover this shard's matrices only" in markdown  # a paragraph
    out = pair["root"] / "outputs"
    out.mkdir()
    code, stdout, stderr = run("merge", *shard_reports(pair, 2), "--card", out / "card.md", "--badge", out / "b.svg",
                               "--badge-json", out / "b.json", "--heatmap", out / "h.svg", "--format", "markdown")
    assert code == 1, stderr
    assert "ftaudit: FAIL" in stdout and "Shard" not in stdout
    assert "<svg" in (out / "b.svg").read_text() and "<svg" in (out / "h.svg").read_text()
    assert json.loads((out / "b.json").read_text())["message"] and "intruder" in (out / "card.md").read_text()


def test_merge_judges_under_the_policy_it_is_given(pair, tmp_path):
    policy = tmp_path / "lenient.yaml"
    policy.write_text("verdict:\n  fail_on_nonfinite: false\n  fail_at: never\n  warn_at: never\n")
    code, stdout, stderr = run("merge", *shard_reports(pair, 2), "--policy", policy, "--format", "json")
    assert code == 0, stderr
    assert json.loads(stdout)["verdict"]["status"] == "pass"


@pytest.mark.parametrize("shard", ["0/3", "4/3", "2", "a/b", "1/0", "-1/2"])
def test_a_bad_shard_is_one_line_and_exit_code_2(pair, shard):
    code, stdout, stderr = audit(pair, "--shard", shard)
    assert (code, stdout) == (2, "")
    assert stderr.startswith("ftaudit: error: --shard ") and len(stderr.splitlines()) == 1


@pytest.mark.parametrize("option", [("--card", "c.md"), ("--badge", "b.svg"), ("--heatmap", "h.svg"), ("--push",)])
def test_a_shard_writes_nothing_that_shows_the_whole_model(pair, tmp_path, option):
    args = [str(tmp_path / a) if a.endswith(("md", "svg")) else a for a in option]
    code, stdout, stderr = audit(pair, "--shard", "1/2", *args)
    assert (code, stdout) == (2, "")
    assert f"{option[0]} shows the whole model, but a shard's report covers part of it" in stderr
    assert not list(tmp_path.iterdir())


def test_merge_refuses_what_is_not_every_shard_of_one_audit(pair, tmp_path):
    two = shard_reports(pair, 2)
    three = shard_reports(pair, 3)
    other_k = shard_reports(pair, 2, "--k", "4")
    whole = tmp_path / "whole.json"
    audit(pair, "--json", whole)
    other_model = tmp_path / "other.json"
    report = json.loads(two[1].read_text())
    report["model"].update(id="org/other", revision="0" * 40, fingerprint=None)
    other_model.write_text(json.dumps(report))
    overlapping = tmp_path / "overlapping.json"
    report = json.loads(two[1].read_text())
    report["matrices"].append(json.loads(two[0].read_text())["matrices"][0])
    overlapping.write_text(json.dumps(report))
    edited = {}
    shards = {"beyond": {"index": 3, "count": 2}, "half": {"index": 2}, "huge": {"index": 2, "count": 10**12}}
    for name, shard in shards.items():
        report = json.loads(two[1].read_text())
        report["settings"]["shard"] = shard
        edited[name] = tmp_path / f"{name}.json"
        edited[name].write_text(json.dumps(report))
    cases = {
        (two[0], edited["beyond"]): "settings.shard 3/2 is not a shard of 2",
        (two[0], edited["half"]): "settings.shard must be {'index': I, 'count': N}, not {'index': 2}",
        (two[0],): "the reports are shards 1/2: merge needs each of 1/N to N/N once",
        (two[0], two[0]): "the reports are shards 1/2, 1/2: merge needs each",
        (two[0], three[1]): "the reports are shards 1/2, 2/3: merge needs each",
        (edited["huge"], two[0]): "the reports are shards 2/1000000000000, 1/2: merge needs each",
        (*two, three[2]): "the reports are shards 1/2, 2/2, 3/3",
        (two[0], whole): "merge takes the reports of `ftaudit check --shard I/N`: one is the report of a whole audit",
        (two[0], other_k[1]): f"shards 1/2 ({two[0]}) and 2/2 ({other_k[1]}) differ in their settings: they are not "
                              "shards of one audit",
        (two[0], overlapping): f"shards 1/2 ({two[0]}) and 2/2 ({overlapping}) both measured model.",
        (two[0], other_model): f"shards 1/2 ({two[0]}) and 2/2 ({other_model}) differ in their model: they are not "
                               "shards of one audit",
        (two[0], tmp_path / "absent.json"): "absent.json: cannot read the report",
    }
    for reports, message in cases.items():
        code, stdout, stderr = run("merge", *reports)
        assert (code, stdout) == (2, ""), reports
        assert stderr.startswith("ftaudit: error: ") and message in stderr and len(stderr.splitlines()) == 1
    code, _, stderr = run("merge")
    assert code == 2 and "Missing argument 'REPORTS...'" in stderr


def test_shards_that_hold_no_matrix_are_audited_and_their_merge_refused_when_none_has_one(pair):
    """A shard may get no matrix (more shards than matrices); an audit that compares none is refused at the merge, as
    `check` refuses it."""
    empty = shard_reports(pair, 2, "--exclude", "model.layers.*")
    assert all(json.loads(p.read_text())["summary"]["matrices_analysed"] == 0 for p in empty)
    code, stdout, stderr = run("merge", *empty)
    assert (code, stdout) == (2, "")
    assert stderr == ("ftaudit: error: the selection (--include/--exclude) leaves no weight matrix to analyse: exclude "
                      "fewer, or --include other module kinds\n")


def test_merge_refuses_to_push_a_local_folder_audited_elsewhere_before_writing_anything(pair, tmp_path):
    shards = []
    for path in shard_reports(pair, 2):  # as in a job where the folder the shards audited is not
        report = json.loads(path.read_text())
        report["model"]["id"] = "checkout/tuned"
        shards.append(tmp_path / path.name)
        shards[-1].write_text(json.dumps(report))
    code, stdout, stderr = run("merge", *shards, "--push", "--json", tmp_path / "merged.json")
    assert (code, stdout) == (2, "")
    assert stderr == "ftaudit: error: --push needs a Hub repository: checkout/tuned is a local folder\n"
    assert not (tmp_path / "merged.json").exists()


def edited(path: Path, to: Path, edit: Callable[[dict], object]) -> Path:
    """A copy at `to` of the report at `path`, edited by `edit`."""
    report = json.loads(path.read_text())
    edit(report)
    to.write_text(json.dumps(report))
    return to


def test_merge_refuses_a_shard_whose_report_lacks_a_matrix_or_head_it_was_given(pair, tmp_path):
    """A report edited by hand or cut short loses an entry: the shard's assignment, its count and the digest of its
    names, says so."""
    reports = shard_reports(pair, 3)
    data = [json.loads(p.read_text()) for p in reports]
    assert [d["assignment"]["all_matrices"] for d in data] == [26] * 3  # the experts' 5 among them
    assert sum(d["assignment"]["matrices"] for d in data) == 26 and data[0]["assignment"]["names_sha256"]
    where = {  # the shard (from 0) whose report holds each kind of entry, and how to take one out
        "matrix": (0, lambda r: r["matrices"].pop(1)),
        "nonfinite": (next(i for i, d in enumerate(data) if NAN in d["tensors"]["nonfinite"]),
                      lambda r: r["tensors"]["nonfinite"].remove(NAN)),
        "unchanged": (next(i for i, d in enumerate(data) if d["tensors"]["unchanged"]),
                      lambda r: r["tensors"]["unchanged"].pop()),
        "head": (next(i for i, d in enumerate(data) if EMBEDDING in d["summary"]["heads"]),
                 lambda r: r["summary"]["heads"].pop(EMBEDDING)),
    }
    for what, (i, take_out) in where.items():
        given = data[i]["assignment"]
        cut = edited(reports[i], tmp_path / f"{what}.json", take_out)
        others = [p for j, p in enumerate(reports) if j != i]
        code, stdout, stderr = run("merge", *others, cut)
        lacking = (given["matrices"] - (what != "head"), given["heads"] - (what == "head"))
        assert (code, stdout) == (2, ""), what
        assert stderr == (f"ftaudit: error: shard {i + 1}/3 ({cut}) lists {lacking[0]} matrices and {lacking[1]} heads "
                          f"where its audit had {given['matrices']} and {given['heads']} (assignment): the report was "
                          "edited or cut short; audit the shard again\n")


def test_merge_refuses_shards_a_matrix_was_moved_between_or_renamed_in(pair, tmp_path):
    one, two = shard_reports(pair, 2)
    moved = json.loads(one.read_text())["matrices"][0]
    from_one = edited(one, tmp_path / "from-one.json", lambda r: r["matrices"].pop(0))
    to_two = edited(two, tmp_path / "to-two.json", lambda r: r["matrices"].append(moved))
    code, stdout, stderr = run("merge", from_one, to_two)
    assert (code, stdout) == (2, "")
    assert stderr.startswith(f"ftaudit: error: shard 1/2 ({from_one}) lists ") and "where its audit had" in stderr
    code, stdout, stderr = run("merge", one, to_two)
    assert f"shards 1/2 ({one}) and 2/2 ({to_two}) both measured {moved['name']}" in stderr
    renamed = edited(two, tmp_path / "renamed.json", lambda r: r["matrices"][0].update(name="model.layers.9.q"))
    code, stdout, stderr = run("merge", one, renamed)
    assert (code, stdout) == (2, "")
    assert stderr == (f"ftaudit: error: shard 2/2 ({renamed}) lists other matrices or heads than its audit had "
                      "(assignment): the report was edited or cut short; audit the shard again\n")


def test_merge_refuses_shards_that_together_lack_matrices_of_the_whole_audit(pair, tmp_path):
    def more(report: dict) -> None:
        report["assignment"]["all_matrices"] += 1

    shards = [edited(p, tmp_path / p.name, more) for p in shard_reports(pair, 2)]
    code, stdout, stderr = run("merge", *shards)
    assert (code, stdout) == (2, "")
    assert stderr == ("ftaudit: error: the shards list 26 matrices of the 27 their audit split among them "
                      "(assignment.all_matrices): they are not parts of one split\n")
    code, stdout, stderr = run("merge", shards[0], shard_reports(pair, 2)[1])
    assert "differ in their number of matrices split (assignment.all_matrices)" in stderr


@pytest.mark.parametrize("field", ["assignment", "model.fingerprint", "base.fingerprint"])
def test_merge_refuses_the_reports_of_an_ftaudit_that_did_not_record_what_it_checks(pair, tmp_path, field):
    def drop(report: dict) -> None:
        *path, key = field.split(".")
        (report[path[0]] if path else report).pop(key)

    one, two = shard_reports(pair, 2)
    older = edited(two, tmp_path / "older.json", drop)
    code, stdout, stderr = run("merge", one, older)
    assert (code, stdout) == (2, "")
    assert stderr == (f"ftaudit: error: shard 2/2 ({older}) records no {field}, by which merge checks the shards (a "
                      "report of an earlier ftaudit, or edited): audit the shard again with this ftaudit\n")


@pytest.mark.parametrize("side", ["tuned", "base"])
def test_merge_refuses_shards_of_a_local_folder_whose_weights_changed_between_their_audits(tmp_path, side):
    """A folder re-exported (the same names and shapes, other values) between two shards' jobs is caught; the same
    bytes written again (a fresh checkout: new mtimes) are not."""
    base = llama_like(layers=2)
    tensors = {"base": base, "tuned": low_rank_update(small_update(base), only="layers.1.")}
    folders = {name: write_model(tmp_path / name, t) for name, t in tensors.items()}

    def shard(index: int) -> Path:
        path = tmp_path / f"shard-{index}.json"
        code, _, stderr = run("check", folders["tuned"], "--base", folders["base"], "--no-cache", "--shard",
                              f"{index}/2", "--json", path)
        assert code in (0, 1), stderr
        return path

    first = shard(1)
    write_model(folders[side], tensors[side])  # the same bytes, new mtimes
    second = shard(2)
    code, _, stderr = run("merge", first, second)
    assert code == 1, stderr
    changed = dict(tensors[side])
    changed["model.layers.0.mlp.up_proj.weight"] = low_rank_update(changed, only="layers.0.mlp.up")[
        "model.layers.0.mlp.up_proj.weight"]  # one matrix of the shard already audited, as `ftaudit fix` changes it
    write_model(folders[side], changed)
    second = shard(2)
    code, stdout, stderr = run("merge", first, second)
    assert (code, stdout) == (2, "")
    role = "model" if side == "tuned" else "base"
    assert stderr == (f"ftaudit: error: shards 1/2 ({first}) and 2/2 ({second}) read different weights from "
                      f"{folders[side]} (their {role}.fingerprint differs): the folder changed between their audits; "
                      "audit every shard from the same files\n")


def test_merge_takes_shards_that_reached_the_same_folders_by_other_paths(pair, tmp_path, monkeypatch):
    """Jobs that name the folders otherwise (`tuned`, `/abs/tuned`) or check them out elsewhere read the same weights,
    as their fingerprints say: the merge is the whole audit's report, naming the folders as shard 1/N does."""
    checkout = tmp_path / "checkout"  # another job's checkout of the same commit: the same bytes, new mtimes
    for side in ("base", "tuned"):
        shutil.copytree(pair[side], checkout / side)
    monkeypatch.chdir(pair["root"])
    reached = [("tuned", "./base"), (pair["tuned"], pair["base"]), (checkout / "tuned", checkout / "base")]
    shards = []
    for index, (tuned, base) in enumerate(reached, 1):
        shards.append(tmp_path / f"shard-{index}.json")
        code, _, stderr = run("check", tuned, "--base", base, "--no-cache", "--shard", f"{index}/3", "--json",
                              shards[-1])
        assert code == 1, stderr
    assert len({json.loads(s.read_text())["model"]["id"] for s in shards}) == 3
    whole = tmp_path / "whole.json"
    assert run("check", "tuned", "--base", "./base", "--no-cache", "--json", whole)[0] == 1
    merged = tmp_path / "merged.json"
    code, _, stderr = run("merge", *reversed(shards), "--json", merged)
    assert code == 1, stderr
    assert without_time(merged) == without_time(whole)
    assert (without_time(merged)["model"]["id"], without_time(merged)["base"]["id"]) == ("tuned", "./base")


@pytest.mark.parametrize("side", ["tuned", "base"])
def test_merge_refuses_shards_that_read_other_weights_from_other_paths(pair, tmp_path, side):
    changed = load_file(pair[side] / "model.safetensors")
    changed["model.layers.0.mlp.up_proj.weight"] = low_rank_update(changed, only="layers.0.mlp.up")[
        "model.layers.0.mlp.up_proj.weight"]
    folders = dict(pair, **{side: write_model(tmp_path / side, changed)})
    first, second = shard_reports(pair, 2)[0], tmp_path / "shard-2.json"
    code, _, stderr = run("check", folders["tuned"], "--base", folders["base"], "--no-cache", "--shard", "2/2",
                          "--json", second)
    assert code == 1, stderr
    code, stdout, stderr = run("merge", first, second)
    assert (code, stdout) == (2, "")
    role = "model" if side == "tuned" else "base"
    assert stderr == (f"ftaudit: error: shards 1/2 ({first}) and 2/2 ({second}) read different weights, from "
                      f"{pair[side]} and from {folders[side]} (their {role}.fingerprint differs): other files, or the "
                      "folder changed between their audits; audit every shard from the same files\n")


def test_merge_compares_hub_models_by_id_and_revision(pair, tmp_path, hub_env: HubServer):
    """The same files in another repository, or in another commit, are another model; a local copy of them too."""
    files = folder_files(pair["tuned"])
    sha = hub_env.add_repo("org/tuned", files)
    hub_env.add_repo("org/copy", files)

    def shard(name: str, index: int, model: object, *revision: str) -> Path:
        path = tmp_path / f"{name}.json"
        code, _, stderr = run("check", model, *revision, "--base", pair["base"], "--no-cache", "--shard",
                              f"{index}/2", "--json", path)
        assert code == 1, stderr
        return path

    first = shard("first", 1, "org/tuned", "--revision", sha)
    assert run("merge", first, shard("second", 2, "org/tuned"))[0] == 1
    hub_env.add_repo("org/tuned", files)  # main moves on to a commit of the same files
    others = (shard("copy", 2, "org/copy"), shard("later", 2, "org/tuned"), shard("local", 2, pair["tuned"]))
    for other in others:
        code, stdout, stderr = run("merge", first, other)
        assert (code, stdout) == (2, "")
        assert stderr == (f"ftaudit: error: shards 1/2 ({first}) and 2/2 ({other}) differ in their model: they are "
                          "not shards of one audit\n")


def test_the_shards_of_an_adapter_merged_give_the_whole_audits_report(tmp_path):
    """The matrices an adapter leaves as the base has them are the pairing's: every shard lists them as unchanged."""
    adapter = tmp_path / "adapter"
    shutil.copytree(ADAPTER, adapter)
    tensors = load_file(adapter / "adapter_model.safetensors")
    save_file({n: t for n, t in tensors.items() if ".attention.self.query." in n}, adapter / "adapter_model.safetensors")
    whole = tmp_path / "whole.json"
    code, _, stderr = run("check", adapter, "--base", ft.base_model_dir(), "--no-cache", "--json", whole)
    assert code in (0, 1), stderr
    shards = []
    for index in (1, 2, 3):
        shards.append(tmp_path / f"shard-{index}.json")
        code, _, stderr = run("check", adapter, "--base", ft.base_model_dir(), "--no-cache", "--shard", f"{index}/3",
                              "--json", shards[-1])
        assert code in (0, 1), stderr
    assert len(without_time(whole)["tensors"]["unchanged"]) == 30  # 36 attention and MLP matrices, 6 adapted
    assert [json.loads(s.read_text())["assignment"]["all_matrices"] for s in shards] == [36] * 3
    merged = tmp_path / "merged.json"
    code, _, stderr = run("merge", *shards, "--json", merged)
    assert code in (0, 1), stderr
    assert without_time(merged) == without_time(whole)
    assert without_time(whole)["model"]["fingerprint"] and without_time(whole)["base"]["fingerprint"]


def test_card_update_refuses_a_shards_report_and_takes_the_merged_one(pair, tmp_path):
    """A shard's numbers and verdict cover its part: a card shows the whole model, as `--card` does with `--shard`."""
    card = tmp_path / "README.md"
    card.write_text("# A model\n")
    shards = shard_reports(pair, 2)
    code, stdout, stderr = run("card", "update", card, "--report", shards[1])
    assert (code, stdout) == (2, "")
    assert stderr == (f"ftaudit: error: {shards[1]}: the report of shard 2/2, which covers part of the model, but a "
                      "card shows the whole model: give every shard's report to `ftaudit merge` and the merged one "
                      "to `card update`\n")
    assert card.read_text() == "# A model\n"
    merged = tmp_path / "merged.json"
    assert run("merge", *shards, "--json", merged)[0] == 1
    code, _, stderr = run("card", "update", card, "--report", merged)
    assert code == 0, stderr
    assert "ftaudit:begin" in card.read_text()
