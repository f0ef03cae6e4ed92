"""The README and docs cite only what the repository holds: every relative link and image resolves,
every anchor names a heading of its page, every repository path written in backticks exists, and
every Markdown file named anywhere (prose, docstrings, comments) is in the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.md", *ROOT.glob("CONTRIBUTING.md"), *(ROOT / "docs").glob("*.md")])
SOURCES = sorted(
    p
    for top in ("lora_monitor", "tests", "examples", "benchmarks")
    for p in (ROOT / top).rglob("*.py")
    if p != Path(__file__).resolve()  # this file names files that must not exist, in its patterns
)

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
CODE_PATH = re.compile(r"`((?:lora_monitor|tests|examples|benchmarks|docs|\.ci)/[\w./-]*)")
#: A file name ending in .md, not the tail of a longer path or of a name built at run time.
MARKDOWN_NAME = re.compile(r"(?<![\w/.{}-])(\w[\w./-]*\.md)\b")


def _page_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def anchors(page: Path) -> set[str]:
    """GitHub's anchors for the headings of ``page``: lower case, punctuation dropped (letters of
    any script kept), spaces to hyphens, ``-1``, ``-2`` … for repeats."""
    seen: dict[str, int] = {}
    result = set()
    in_code = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code or not line.startswith("#"):
            continue
        text = line.lstrip("#").strip()
        slug = re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        result.add(slug if count == 0 else f"{slug}-{count}")
    return result


def test_anchor_rule_matches_github():
    # The rule on headings like this project's: punctuation and backticks dropped, Greek kept.
    page = ROOT / "docs" / "maths.md"
    assert "what-δw-is-under-each-peft-variant" in anchors(page)
    assert "normalized-subspace-similarity-φ" in anchors(page)


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_every_relative_link_and_anchor_resolves(page):
    text = page.read_text(encoding="utf-8")
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no file {file}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading with anchor #{anchor} in {_page_id(file)}")
    assert broken == []


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_every_repository_path_in_backticks_exists(page):
    missing = []
    for written in CODE_PATH.findall(page.read_text(encoding="utf-8")):
        path = re.split(r"::|:\d", written)[0].rstrip(".")
        if "*" not in path and not (ROOT / path).exists():
            missing.append(written)
    assert missing == []


@pytest.mark.parametrize("source", [*PAGES, *SOURCES], ids=_page_id)
def test_every_markdown_file_named_is_in_the_repository(source):
    missing = set()
    for name in MARKDOWN_NAME.findall(source.read_text(encoding="utf-8")):
        if not any((where / name).exists() for where in (source.parent, ROOT, ROOT / "docs")):
            missing.add(name)
    assert missing == set()
