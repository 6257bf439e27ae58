"""The documentation stays true: every command has help with an example and is documented in docs/commands.md;
README opens with the two commands a new machine needs (the test one is what CI runs), stays short, names the main
commands and links every docs/ page; every relative link in README.md and docs/*.md reaches its file and heading."""
from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from ingest.cli import cli as ingest_cli
from search.cli import cli as search_cli

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
COMMANDS_DOC = (ROOT / "docs" / "commands.md").read_text()
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

MAIN_JOB = ("python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/ingest load caltech101 "
            "&& .venv/bin/search report --out report")
TEST_COMMAND = "python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && .venv/bin/pytest"


def commands(group: click.Group, prefix: str):
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from commands(command, f"{prefix} {name}")
        else:
            yield f"{prefix} {name}", command


ALL = list(commands(ingest_cli, "ingest")) + list(commands(search_cli, "search"))


@pytest.mark.parametrize("name, command", ALL, ids=[n for n, _ in ALL])
def test_command_has_help_with_example_and_is_in_the_commands_doc(name, command):
    assert command.help and "Example:" in command.help, f"{name} needs help text with an Example:"
    assert f"`{name}" in COMMANDS_DOC, f"{name} is not documented in docs/commands.md"


def test_readme_names_the_main_commands():
    for name in ("ingest load folder", "ingest load caltech101", "search similar", "search serve", "search report"):
        assert name in README, f"README.md does not show `{name}`"


def test_readme_opens_with_the_main_job_then_the_test_command():
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", README, re.S | re.M)
    assert [b.strip() for b in blocks[:2]] == [MAIN_JOB, TEST_COMMAND]
    before = README[:README.index(TEST_COMMAND)]
    assert before.count("\n") < 20, "the two commands belong on README's first screen"


def test_ci_runs_the_test_command_from_readme():
    ci = (ROOT / ".ci" / "run").read_text()
    assert ".venv/bin/pip install --quiet -e '.[test]'" in ci and ".venv/bin/pytest" in ci
    assert TEST_COMMAND in README


def test_readme_stays_under_300_lines():
    assert len(README.splitlines()) < 300, "README is the first two minutes; move reference material into docs/"


def test_readme_names_no_path_outside_the_project():
    assert "../" not in README


def test_readme_links_every_docs_page():
    linked = set(re.findall(r"\]\(docs/([\w.-]+\.md)", README))
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert pages <= linked, f"docs pages README does not link: {sorted(pages - linked)}"


def without_code(text: str) -> str:
    """Markdown with fenced blocks and inline code removed: links and headings inside them are examples."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (code marks too), spaces become hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for line in re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M).splitlines():
        if m := re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line):
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def relative_links(page: Path) -> list[str]:
    targets = re.findall(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", without_code(page.read_text()))
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t)]  # http:, https:, mailto: are not ours


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_relative_link_reaches_its_file_and_heading(page):
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no file {file.relative_to(ROOT) if file.is_relative_to(ROOT) else file}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading #{anchor} in {file.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_docs_speak_to_users_not_to_a_tracker(page):
    text = page.read_text()
    assert not re.search(r"\b(issues? \d+|wave \d+|the issue's)", text, re.I), page.name
