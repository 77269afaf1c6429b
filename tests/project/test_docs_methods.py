"""The methods table of docs/configuration.md is `pyramiddrop.methods.TABLE` (issue 33): one row per method and per
refused name, where it drops, whether it merges, what it ranks by and what it needs as the table says, and every row
linked to a subsection that exists; README's methods list names every method. Edit methods.py and the docs together."""

import re
from pathlib import Path

import pytest

from pyramiddrop.methods import BY_NAME, REFUSED, TABLE

ROOT = Path(__file__).resolve().parents[2]
COLUMNS = [
    "name",
    "where it drops",
    "ranks by",
    "merges?",
    "needs",
    "FLOPs convention",
    "paper / release",
    "test oracle",
]


def section(path: Path, heading: str) -> str:
    """The text of `heading` (a `## ` line) up to the next `## ` heading."""
    text = path.read_text()
    start = text.index(f"\n{heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]


def table_rows(text: str) -> list[list[str]]:
    """The cells of the first table whose header is COLUMNS (header and separator left out)."""
    lines = text.splitlines()
    header = "| " + " | ".join(COLUMNS) + " |"
    first = lines.index(header) + 2
    rows = []
    for line in lines[first:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split(" | ")])
    return rows


def plain(cell: str) -> str:
    return cell.replace("`", "")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading made of words, backticks and hyphens."""
    return re.sub(r"[^a-z0-9 -]", "", heading.lower()).replace(" ", "-")


@pytest.fixture(scope="module")
def methods_section() -> str:
    return section(ROOT / "docs" / "configuration.md", "## Selection methods")


@pytest.fixture(scope="module")
def rows(methods_section) -> dict[str, list[str]]:
    found = {}
    for cells in table_rows(methods_section):
        assert len(cells) == len(COLUMNS), cells
        name = re.fullmatch(r"\[`([a-z0-9-]+)`\]\(#([a-z0-9-]+)\)", cells[0])
        assert name, f"the name cell {cells[0]!r} is not [`name`](#subsection)"
        assert name.group(1) not in found, f"{name.group(1)} has two rows"
        found[name.group(1)] = cells
    return found


def test_every_method_and_refused_name_has_one_row_and_every_row_names_one(rows):
    assert set(rows) == {method.name for method in TABLE} | set(REFUSED)


def test_the_rows_say_what_the_table_says(rows):
    for name, cells in rows.items():
        if name in REFUSED:
            assert cells[1] == "refused", name
            continue
        method = BY_NAME[name]
        drops, ranks_by, merges, needs = (plain(cells[index]) for index in (1, 2, 3, 4))
        assert drops.startswith(method.drops), (name, drops, method.drops)
        assert ranks_by == method.ranks_by, name
        assert merges.startswith("yes" if method.merge else "no"), (name, merges)
        assert needs == method.needs, name


def test_every_row_links_to_a_subsection(methods_section, rows):
    anchors = {slug(line[4:]) for line in methods_section.splitlines() if line.startswith("### ")}
    for name, cells in rows.items():
        target = re.search(r"\(#([a-z0-9-]+)\)", cells[0]).group(1)
        assert target in anchors, f"{name} links to #{target}, which is no ### heading of the section"


def test_readme_lists_every_method():
    listed = set(re.findall(r"`([a-z0-9-]+)`", section(ROOT / "README.md", "## Methods")))
    assert {method.name for method in TABLE} | set(REFUSED) <= listed
