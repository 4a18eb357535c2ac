"""Links between the docs: every relative link names a file that exists, and every #anchor a
heading of that file (GitHub's anchor rules), so a renamed section cannot leave a reader on a
link that goes nowhere."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")
FENCE = re.compile(r"^(```|~~~)")


def anchors(page: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens, -N for repeats."""
    found: set[str] = set()
    fenced = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
        match = None if fenced else HEADING.match(line)
        if match is None:
            continue
        text = re.sub(r"`|\*\*|\[([^\]]*)\]\([^)]*\)", r"\1", match[1]).strip().lower()
        slug = re.sub(r"[^\w\- ]", "", text).replace(" ", "-")
        candidate, n = slug, 0
        while candidate in found:
            n += 1
            candidate = f"{slug}-{n}"
        found.add(candidate)
    return found


def links(page: Path) -> list[str]:
    fenced = False
    result = []
    for line in page.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            result += LINK.findall(line)
    return result


def test_every_relative_link_and_anchor_in_the_docs_resolves() -> None:
    broken = []
    checked = 0
    for page in PAGES:
        for target in links(page):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            checked += 1
            if not file.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert checked > 50  # the scan found the docs' links
    assert not broken, "\n".join(broken)


def test_the_readme_names_every_debian_package_the_bootstrap_installs() -> None:
    bootstrap = (ROOT / "scripts" / "bootstrap").read_text()
    listed = re.search(r"debian_packages=\(([^)]*)\)", bootstrap)
    assert listed is not None
    packages = listed[1].split()
    quick_start = (ROOT / "README.md").read_text().split("## Quick start", 1)[1]
    quick_start = " ".join(quick_start.split("```", 1)[0].split())

    assert {"dcmtk", "orthanc"} <= set(packages)
    missing = [p for p in packages if not re.search(rf"[\s`]{re.escape(p)}[\s`]", quick_start)]
    assert not missing, f"README's quick start does not name {missing}"
