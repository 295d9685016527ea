"""Updating a model card in place: markers, front-matter key, byte-for-byte preservation, idempotency."""

from __future__ import annotations

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from ftaudit import frontmatter
from ftaudit import policy as policy_mod
from ftaudit.audit import AuditOptions
from ftaudit.cardfile import (
    BEGIN,
    END,
    card_data_from_report,
    section_block,
    update_card,
    update_card_file,
)
from ftaudit.check import Target, check
from ftaudit.errors import UsageError
from ftaudit.renderers.card import render_card_section
from tests.models import card, llama_like, low_rank_update, write_model

DATA = {"status": "fail", "risk": "high", "intruder_dimensions": 35}
USER_FRONT = ("---\n# a comment the user wrote\nlicense: apache-2.0\nbase_model: org/base   # aligned\n"
              "tags:\n  - x\n---\n")
BODY = "\n# My model\n\nText that must stay.\n"


def read_card_data(card_text: str) -> object:
    """The `ftaudit:` entry of a card's front matter, as the Hub reads it."""
    return frontmatter.read(card_text).get("ftaudit")


KEY_BLOCK = yaml.safe_dump({"ftaudit": DATA}, sort_keys=False)


@pytest.mark.parametrize(
    "card",
    [USER_FRONT + BODY, BODY, "", USER_FRONT, (USER_FRONT + BODY).replace("\n", "\r\n"),
     USER_FRONT + BODY + f"\n{BEGIN}\nold section\n{END}\n\n## After\n"],
)
def test_update_is_in_place_and_idempotent(card):
    once = update_card(card, "## Audit\n\nnew section", DATA)
    assert update_card(once, "## Audit\n\nnew section", DATA) == once
    assert once.count(BEGIN) == once.count(END) == 1 and "new section" in once and "old section" not in once
    meta = frontmatter.read(once.replace("\r\n", "\n"))
    assert meta["ftaudit"] == DATA
    if "license" in card:
        assert meta["license"] == "apache-2.0" and meta["base_model"] == "org/base"
        assert once.startswith(USER_FRONT[:-4].replace("\n", "\r\n" if "\r\n" in card else "\n"))
    before_section = card.split(BEGIN)[0].rstrip("\r\n")
    if card.startswith("---"):
        body = before_section.split("---", 2)[-1]
    else:
        body = before_section[len(card) - len(card.lstrip()):]
    assert body in once  # everything after the front matter, byte for byte
    if "## After" in card:
        assert once.endswith(card.split(END)[1])
    if "\r\n" in card:
        assert "\n" not in once.replace("\r\n", "")


def test_new_data_replaces_the_old_key():
    first = update_card(USER_FRONT + BODY, "s", DATA)
    second = update_card(first, "s", {**DATA, "status": "pass"})
    assert frontmatter.read(second)["ftaudit"]["status"] == "pass"
    assert second.count("\nftaudit:") == 1
    assert second.replace(yaml.safe_dump({"ftaudit": {**DATA, "status": "pass"}}, sort_keys=False), "") == \
        first.replace(yaml.safe_dump({"ftaudit": DATA}, sort_keys=False), "")


def test_a_card_without_front_matter_gets_one_with_only_the_key():
    out = update_card(BODY, "s", DATA)
    assert out == "---\n" + KEY_BLOCK + "---\n" + BODY + "\n" + section_block("s") + "\n"


def test_the_section_is_appended_after_exactly_one_blank_line():
    block = section_block("s")
    assert update_card(USER_FRONT + "text\n", "s", DATA).endswith("\ntext\n\n" + block + "\n")
    assert update_card(USER_FRONT + "text", "s", DATA).endswith("\ntext\n\n" + block + "\n")
    assert update_card(USER_FRONT + "text\n\n", "s", DATA).endswith("\ntext\n\n" + block + "\n")
    assert update_card(USER_FRONT, "s", DATA).endswith("---\n\n" + block + "\n")


def test_an_existing_section_is_replaced_exactly():
    before = USER_FRONT + "# Title\n\nintro  \n\n  " + BEGIN + "  \nold\n" + END + " \ntail\n\n## More\n"
    out = update_card(before, "new", DATA)
    start, end = before.index(BEGIN), before.index(END) + len(END)
    new_front_end = out.index("---\n", 4) + 4
    assert out[new_front_end:] == before[len(USER_FRONT):start] + section_block("new") + before[end:]


@pytest.mark.parametrize("nl", ["\n", "\r\n"])
def test_a_repeated_section_is_dropped_and_the_first_replaced(nl):
    card = (USER_FRONT + f"# T\n\n{BEGIN}\nold 1\n{END}\n\nuser text\n\n  {BEGIN}\nold 2\n{END}\n"
            f"## After\n\n```\n{BEGIN}\nexample\n{END}\n```\n").replace("\n", nl)
    out = update_card(card, "new", DATA)
    assert "old 1" not in out and "old 2" not in out and out.count(section_block("new", nl)) == 1
    assert out.endswith(f"{section_block('new', nl)}{nl}{nl}user text{nl}{nl}## After{nl}{nl}```{nl}{BEGIN}{nl}"
                        f"example{nl}{END}{nl}```{nl}")
    assert update_card(out, "new", DATA) == out


def test_markers_in_code_fences_or_inline_are_not_the_section():
    doc = (f"# Docs\n\nThe section is wrapped in `{BEGIN}` and `{END}`:\n\n"
           f"```markdown\n{BEGIN}\nexample\n{END}\n```\n\n~~~\n{BEGIN}\n~~~\n")
    out = update_card(doc, "real", DATA)
    assert out.endswith(doc + "\n" + section_block("real") + "\n")
    assert update_card(out, "real", DATA) == out


def test_front_matter_keeps_its_text_and_only_the_key_block_changes():
    front = (
        "---\n"
        "language:\n- en\n"           # compact sequence at column 0
        "ftaudit:\n  status: pass\n  nested:\n    - 1\n\n  after_blank: true\n"
        "# about the license\n"
        "license: \"apache-2.0\"\n"
        "ftaudit_other: keep me\n"
        "model-index:\n  - name: x\n    ftaudit: not top level\n"
        "---\n"
    )
    out = update_card(front + BODY, "s", DATA)
    expected_front = front.replace(
        "ftaudit:\n  status: pass\n  nested:\n    - 1\n\n  after_blank: true\n", KEY_BLOCK)
    assert out.startswith(expected_front + BODY)
    meta = frontmatter.read(out)
    assert meta["ftaudit"] == DATA and meta["ftaudit_other"] == "keep me" and meta["language"] == ["en"]
    assert meta["model-index"] == [{"name": "x", "ftaudit": "not top level"}]


@pytest.mark.parametrize("entry", ["ftaudit: {status: pass}\n", '"ftaudit":\n  status: pass\n',
                                   "ftaudit:\n- old\n- list\n", "ftaudit: null\n"])
def test_any_form_of_an_existing_key_is_replaced(entry):
    out = update_card("---\nlicense: mit\n" + entry + "tags: [a]\n---\n" + BODY, "s", DATA)
    assert out.startswith("---\nlicense: mit\n" + KEY_BLOCK + "tags: [a]\n---\n" + BODY)


def test_duplicate_keys_collapse_into_one():
    out = update_card("---\nftaudit: 1\nlicense: mit\nftaudit: 2\n---\n", "s", DATA)
    assert out.startswith("---\n" + KEY_BLOCK + "license: mit\n---\n")


def test_crlf_card_stays_crlf_byte_for_byte():
    crlf = (USER_FRONT + BODY + f"\n{BEGIN}\nold\n{END}\n\n## After\n").replace("\n", "\r\n")
    out = update_card(crlf, "## Audit\n\nnew\n", DATA)
    assert "\n" not in out.replace("\r\n", "") and "\r\r" not in out
    assert out.startswith(USER_FRONT[:-4].replace("\n", "\r\n") + KEY_BLOCK.replace("\n", "\r\n") + "---\r\n")
    assert out.endswith(f"{END}\r\n\r\n## After\r\n")
    assert section_block("## Audit\n\nnew\n", "\r\n") in out
    assert update_card(out, "## Audit\n\nnew\n", DATA) == out


def test_bom_and_empty_front_matter():
    out = update_card("\ufeff---\n---\nhello\n", "s", DATA)
    assert out.startswith("\ufeff---\n" + KEY_BLOCK + "---\nhello\n")
    assert update_card(out, "s", DATA) == out


@pytest.mark.parametrize("lead", ["\n", "\n\n", "  \n", "\r\n"])
def test_front_matter_after_blank_lines_is_the_one_the_hub_reads(lead):
    from huggingface_hub import ModelCard

    text = (lead + USER_FRONT + BODY).replace("\n", "\r\n" if lead == "\r\n" else "\n").replace("\r\r", "\r")
    assert ModelCard(text).data.to_dict()["license"] == "apache-2.0"  # the Hub's own parser sees the front matter
    assert frontmatter.read(text)["base_model"] == "org/base"
    once = update_card(text, "s", DATA)
    assert once.startswith(text.split("tags:")[0]) and once.count("---") == 2
    assert ModelCard(once).data.to_dict() == {**ModelCard(text).data.to_dict(), "ftaudit": DATA}
    assert read_card_data(once) == DATA and update_card(once, "s", DATA) == once


def test_cards_that_cannot_be_updated_without_guessing():
    with pytest.raises(UsageError, match="begin.*no.*end|no <!-- ftaudit:end -->"):
        update_card(f"# T\n\n{BEGIN}\nuser text that must not be lost\n", "s", DATA)
    with pytest.raises(UsageError, match="not a YAML mapping"):
        update_card("---\n- a list\n---\n", "s", DATA)
    with pytest.raises(UsageError, match="not valid YAML"):
        update_card("---\nkey: [unclosed\n---\n", "s", DATA)
    with pytest.raises(UsageError, match=r"not valid YAML \(not a date: month must be in 1\.\.12\)"):
        update_card("---\nreleased: 2024-13-01\n---\n", "s", DATA)
    with pytest.raises(UsageError, match="flow-style"):
        update_card("---\n{license: mit}\n---\n", "s", DATA)


def test_a_section_passed_with_its_markers_is_not_wrapped_twice():
    once = update_card(BODY, section_block("inner"), DATA)
    assert once == update_card(BODY, "inner", DATA)


LINES = st.sampled_from([
    "# Title", "", "text", "  indented", "---", "```", "~~~", "| a | b |", "ftaudit: in body", "<!-- comment -->",
    "- item", "\t", "ünïcode ✓",
])


@settings(max_examples=150, deadline=None)
@given(front=st.booleans(), lines=st.lists(LINES, max_size=12), crlf=st.booleans(), trailing=st.booleans())
def test_any_card_keeps_everything_else_and_updates_idempotently(front, lines, crlf, trailing):
    nl = "\r\n" if crlf else "\n"
    text = nl.join(lines) + (nl if trailing and lines else "")
    if front:
        text = nl.join(["---", "license: mit", "tags:", "- a", "---"]) + nl + text
    existing = frontmatter.FRONT_MATTER.match(text)
    if existing:
        try:
            meta = yaml.safe_load(existing[1])
        except yaml.YAMLError:
            meta = "invalid"
        if not isinstance(meta, (dict, type(None))):  # e.g. "---\ntext\n---": not a card's metadata
            with pytest.raises(UsageError, match="front matter"):
                update_card(text, "s", DATA)
            return
    once = update_card(text, "## Audit\n\nbody", DATA)
    assert update_card(once, "## Audit\n\nbody", DATA) == once
    assert update_card(once, "## Audit\n\nother", DATA) == once.replace("\nbody", "\nother")
    meta = frontmatter.read(once)
    assert meta["ftaudit"] == DATA and (not front or meta["license"] == "mit")
    existing = frontmatter.FRONT_MATTER.match(text)
    rest = text[existing.end():] if existing else text
    assert rest in once
    if crlf and nl in text:
        assert "\n" not in once.replace("\r\n", "")


def test_a_card_ending_in_an_open_code_fence_gets_it_closed():
    out = update_card("# T\n\n```python\nx = 1\n", "s", DATA)
    assert out.endswith("```python\nx = 1\n```\n\n" + section_block("s") + "\n")
    assert update_card(out, "s", DATA) == out


# --- from a real report --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("cardfile")
    base = llama_like()
    write_model(root / "base", base)
    write_model(root / "lora", low_rank_update(base), readme=card(str(root / "base")))
    return check(Target(str(root / "lora")), AuditOptions(), policy_mod.load(None))


def test_card_data_from_a_real_report(report):
    data = card_data_from_report(report)
    assert data == {
        "status": "fail", "risk": "high", "intruder_dimensions": report.summary.intruder_dimensions,
        "matrices_analysed": 14, "epsilon": 0.5, "k": 10, "revision": None, "base_model": report.base.id,
        "base_revision": None, "version": report.tool["version"],
    }
    readme = card(report.base.id, tags=["lora"])
    out = update_card(readme, render_card_section(report, "ftaudit/badge.svg"), data)
    assert read_card_data(out) == data and frontmatter.read(out)["tags"] == ["lora"]
    assert out.startswith(readme.split("---\n")[0] + "---\n" + readme.split("---\n")[1])
    assert "](ftaudit/badge.svg)" in out and out.index(BEGIN) > out.index("Some text.")


def test_update_card_file_keeps_bytes_and_reports_changes(report, tmp_path):
    path = tmp_path / "README.md"
    original = (USER_FRONT + BODY).replace("\n", "\r\n").encode()
    path.write_bytes(original)
    section, data = render_card_section(report), card_data_from_report(report)
    assert update_card_file(path, section, data) is True
    written = path.read_bytes()
    assert b"\r\n" in written and b"\n" not in written.replace(b"\r\n", b"")
    assert written.decode() == update_card(original.decode(), section, data)
    assert update_card_file(path, section, data) is False and path.read_bytes() == written
    fresh = tmp_path / "new" / "README.md"
    fresh.parent.mkdir()
    assert update_card_file(fresh, section, data) is True and read_card_data(fresh.read_text()) == data


def test_a_linked_card_is_updated_through_the_link_keeping_its_mode(report, tmp_path):
    real = tmp_path / "cards" / "model.md"
    real.parent.mkdir()
    real.write_text(USER_FRONT + BODY)
    real.chmod(0o640)
    link = tmp_path / "README.md"
    link.symlink_to(real)
    assert update_card_file(link, render_card_section(report), card_data_from_report(report)) is True
    assert link.is_symlink() and link.resolve() == real
    assert read_card_data(real.read_text()) == card_data_from_report(report)
    assert real.stat().st_mode & 0o777 == 0o640


def test_a_failed_card_write_leaves_the_card_and_no_temporary_file(report, tmp_path, monkeypatch):
    path = tmp_path / "README.md"
    path.write_text(USER_FRONT + BODY)

    def disk_full(self, target):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(path), "replace", disk_full)
    with pytest.raises(UsageError, match=r"README.md: cannot write the card \(No space left on device\)"):
        update_card_file(path, render_card_section(report), card_data_from_report(report))
    assert path.read_text() == USER_FRONT + BODY
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]
