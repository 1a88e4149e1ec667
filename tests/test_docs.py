"""The documentation's links resolve: README.md and docs/*.md link only to files, folders and headings
that exist in the repository, the README stays a front door, and no page cites a file the repository lacks."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README_MAX_LINES = 200
MISSING_DOC = "DES" + "IGN.md"  # design notes outside the repository (split: a grep finds no citation)

FENCE = re.compile(r"^(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
# a repository path written inline (`scripts/x.py`, docs/x.md, src/...), relative to the repository root
REPO_PATH = re.compile(r"(?<![\w/.~-])((?:docs|scripts|src|tests|benchmarks)/[^\s`'\"()\[\],;|]*)")
PLACEHOLDER = set("*{}$<>")


def doc_files(repo: Path = REPO) -> list[Path]:
    return [repo / "README.md", *sorted((repo / "docs").glob("*.md"))]


def split_fences(text: str) -> tuple[list[str], list[str]]:
    """(lines outside fenced code blocks, lines inside them)."""
    prose, code, fenced = [], [], False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        (code if fenced else prose).append(line)
    return prose, code


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but '-' and '_' dropped, spaces as '-'."""
    text = re.sub(r"[`*]", "", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in split_fences(path.read_text(encoding="utf-8"))[0]:
        match = HEADING.match(line)
        if match:
            base = slug(match.group(2))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(path: Path, repo: Path = REPO) -> list[str]:
    """Every relative link or inline repository path of ``path`` that does not resolve, as readable lines."""
    text = path.read_text(encoding="utf-8")
    prose, code = split_fences(text)
    problems = []
    for line in prose:
        for target in LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
                continue
            file_part, _, fragment = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            if not dest.exists():
                problems.append(f"{path.name}: link {target!r}: {file_part} does not exist")
            elif fragment and (dest.suffix != ".md" or fragment not in anchors(dest)):
                problems.append(f"{path.name}: link {target!r}: no heading #{fragment} in {dest.name}")
    for line in prose + code:
        for raw in REPO_PATH.findall(line):
            candidate = raw.partition("#")[0].rstrip(".:")  # a #fragment is the link check's business
            if PLACEHOLDER & set(candidate):
                continue
            if not (repo / candidate).exists():
                problems.append(f"{path.name}: path {candidate!r} does not exist in the repository")
    return problems


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_and_repository_path_resolves(doc):
    assert broken_links(doc) == []


def test_the_readme_is_a_front_door():
    lines = (REPO / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail into docs/"


def test_every_docs_page_is_in_the_index():
    index = (REPO / "docs" / "README.md").read_text(encoding="utf-8")
    pages = {p.name for p in (REPO / "docs").glob("*.md")} - {"README.md"}
    assert pages and all(f"({page})" in index for page in pages)


def test_no_page_or_module_cites_a_file_the_repository_lacks():
    assert not (REPO / MISSING_DOC).exists()
    files = doc_files() + [p for d in ("src", "scripts", "tests") for p in (REPO / d).rglob("*")
                           if p.suffix in {".py", ".yaml", ".sh", ".sbatch", ".md"}] + [REPO / "Makefile"]
    citing = [str(p.relative_to(REPO)) for p in files if MISSING_DOC in p.read_text(encoding="utf-8")]
    assert citing == []


def test_the_checker_finds_broken_links(tmp_path):
    """The checks above can fail: a page with a missing file, a missing heading and a missing inline path."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "there.py").write_text("")
    page = tmp_path / "docs" / "page.md"
    page.write_text("# Title\n\n## A section (`x=y`)\n\n"
                    "[ok](#a-section-xy) [ok](../scripts/there.py) `scripts/there.py` [web](https://example.org)\n"
                    "[gone](missing.md) [no anchor](#nowhere) [no anchor](page.md#title-2)\n"
                    "`scripts/gone.py` `scripts/bench_*.py` `src/<placeholder>/x.py`\n", encoding="utf-8")
    problems = broken_links(page, repo=tmp_path)
    assert len(problems) == 4, problems
    assert any("missing.md" in p for p in problems) and any("#nowhere" in p for p in problems)
    assert any("#title-2" in p for p in problems) and any("scripts/gone.py" in p for p in problems)
