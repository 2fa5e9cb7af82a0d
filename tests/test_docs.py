"""The docs hold together: every relative link points at a file (and heading) that exists, and
docs/configure.md's settings table is the settings model's."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from devtools.harness import ROOT

pytestmark = pytest.mark.unit

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
PAGES = sorted(
    [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "scripts").glob("*.md")]
    + [p for p in (ROOT / "deploy").rglob("README.md") if "node_modules" not in p.parts]
)


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    heads = re.findall(r"^#+ (.+)$", page.read_text(), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path) -> None:
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        missing_heading = anchor and dest.suffix == ".md" and anchor not in anchors(dest)
        if not dest.exists() or missing_heading:
            broken.append(target)
    assert broken == []


def test_configure_md_lists_every_setting_as_the_model_describes_it() -> None:
    table = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "settings-doc")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    doc = (ROOT / "docs" / "configure.md").read_text()
    committed = doc.split("<!-- settings-table:begin -->\n")[1].split(
        "<!-- settings-table:end -->"
    )[0]
    assert committed == table, "run: scripts/settings-doc, and paste it into docs/configure.md"


def test_readme_starts_with_the_two_commands() -> None:
    first = (ROOT / "README.md").read_text().split("```sh\n", 1)[1].split("```", 1)[0]
    assert [line.split()[0] for line in first.splitlines()] == ["scripts/demo", "scripts/test"]
