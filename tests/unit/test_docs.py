"""The README stays short, every docs/ page is reachable from it, and no relative link or anchor is broken."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
PAGES = sorted((REPO / "docs").glob("*.md"))  # docs/drafts/ are the coordinator's inbox, not pages
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
COMMENT = re.compile(r"<!--.*?-->", re.S)


def _text(path: Path) -> str:
    """The Markdown a reader sees: no fenced code, no HTML comments."""
    return COMMENT.sub("", FENCE.sub("", path.read_text(encoding="utf-8")))


def _anchors(path: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens, repeats numbered -1, -2, ..."""
    ids: set[str] = set()
    for line in _text(path).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-")
            n, unique = 0, slug
            while unique in ids:
                n += 1
                unique = f"{slug}-{n}"
            ids.add(unique)
    return ids


def _broken_links(path: Path) -> list[str]:
    broken = []
    for target in LINK.findall(_text(path)):
        if re.match(r"[a-z]+:", target):  # https:, mailto: ...: not ours to check offline
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading '#{anchor}' in {dest.name}")
    return broken


def test_readme_is_short():
    lines = len(README.read_text(encoding="utf-8").splitlines())
    assert lines <= 250, f"README.md has {lines} lines: move detail to docs/ (limit 250, aim ~200)"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(REPO / t.partition("#")[0]).resolve() for t in LINK.findall(_text(README))}
    assert PAGES, "docs/ has no pages"
    missing = [p.name for p in PAGES if p.resolve() not in linked]
    assert not missing, f"docs pages not linked from README.md: {missing}"


def test_relative_links_and_anchors_resolve():
    broken = {str(p.relative_to(REPO)): _broken_links(p) for p in [README, *PAGES]}
    broken = {page: links for page, links in broken.items() if links}
    assert not broken, f"broken links: {broken}"


def test_the_link_check_catches_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n[ok](#title) [gone](missing.md) [bad anchor](#nope)\n```\n[code](x.md)\n```\n")
    assert _broken_links(page) == ["missing.md: no such file", "#nope: no heading '#nope' in page.md"]
