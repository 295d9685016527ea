"""Updating a model card in place: markers, front-matter key, byte-for-byte preservation, idempotency."""

from __future__ import annotations

import pytest
import yaml

from ftaudit import frontmatter
from ftaudit.cardfile import BEGIN, END, update_card

DATA = {"status": "fail", "risk": "high", "intruder_dimensions": 35}
USER_FRONT = "---\n# a comment the user wrote\nlicense: apache-2.0\nbase_model: org/base   # aligned\ntags:\n  - x\n---\n"
BODY = "\n# My model\n\nText that must stay.\n"


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
    body = before_section[len(card) - len(card.lstrip()):] if not card.startswith("---") else before_section.split("---", 2)[-1]
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
