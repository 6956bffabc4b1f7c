"""Links into the documentation resolve: every ``method.md#anchor`` (or any ``docs/*.md#anchor``)
written in the package, the README, the docs or the tests names a heading that exists, and every
relative link of a docs page points to a file of the repository.

Code and help texts cite the method as ``docs/method.md#4-refinement``; a renamed heading would
silently break those pointers, so they are checked here.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List, Set

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"


def github_slug(title: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces → hyphens."""
    t = re.sub(r"`", "", title.strip().lower())
    t = re.sub(r"[^\w\- ]", "", t)
    return t.replace(" ", "-")


def anchors(md: Path) -> Set[str]:
    """Anchors of a Markdown file: its headings (outside code fences) and explicit ``id=``s."""
    out: Set[str] = set()
    seen: Dict[str, int] = {}
    fenced = False
    for line in md.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        m = re.match(r"^#{1,6}\s+(.+?)\s*#*\s*$", line)
        if m and not fenced:
            slug = github_slug(m.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
        out.update(re.findall(r"""id=["']([^"']+)["']""", line))
    return out


REF = re.compile(r"(?:docs/)?([A-Za-z0-9_\-]+\.md)#([A-Za-z0-9_\-.]+)")


def references() -> List[tuple]:
    """``(where, file, anchor)`` for every ``<page>.md#anchor`` naming a page of docs/."""
    pages = {p.name for p in DOCS.glob("*.md")}
    sources = [*REPO.joinpath("weclip_infer").rglob("*.py"), *REPO.joinpath("weclip_infer").rglob("*.yaml"),
               *DOCS.glob("*.md"), REPO / "README.md", *REPO.joinpath("tests").glob("*.py")]
    out = []
    for src in sources:
        if not src.is_file() or src.resolve() == Path(__file__).resolve():  # this file's examples
            continue
        for i, line in enumerate(src.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            for page, anchor in REF.findall(line):
                if page in pages:
                    out.append((f"{src.relative_to(REPO)}:{i}", page, anchor))
        # in-page links of a docs page: [text](#anchor)
        if src.parent == DOCS and src.suffix == ".md":
            for i, line in enumerate(src.read_text(encoding="utf-8").splitlines(), 1):
                for anchor in re.findall(r"\]\(#([^)\s]+)\)", line):
                    out.append((f"{src.relative_to(REPO)}:{i}", src.name, anchor))
    return out


def test_method_page_has_the_numbered_sections():
    a = anchors(DOCS / "method.md")
    for slug in ("1-overview", "2-backbone-and-prompts", "3-initial-cams", "4-refinement", "5-pseudo-labels",
                 "6-decoder", "7-losses", "8-training", "9-inference", "10-evaluation", "11-hyperparameters",
                 "12-paper-vs-code"):
        assert slug in a, slug


def test_every_docs_anchor_reference_resolves():
    refs = references()
    assert refs, "no references found: the scan is broken"
    cache = {p.name: anchors(p) for p in DOCS.glob("*.md")}
    broken = [f"{where}: {page}#{anchor}" for where, page, anchor in refs if anchor not in cache[page]]
    assert not broken, "links to missing headings:\n  " + "\n  ".join(broken)


def test_relative_links_of_docs_pages_exist():
    broken = []
    for md in DOCS.glob("*.md"):
        for i, line in enumerate(md.read_text(encoding="utf-8").splitlines(), 1):
            for target in re.findall(r"\]\(([^)\s#]+)(?:#[^)]*)?\)", line):
                if re.match(r"^[a-z]+://", target) or target.startswith("mailto:"):
                    continue
                if not (md.parent / target).exists():
                    broken.append(f"docs/{md.name}:{i}: {target}")
    assert not broken, "links to missing files:\n  " + "\n  ".join(broken)


@pytest.mark.parametrize("title, slug", [
    ("4. Refinement", "4-refinement"),
    ("4.1 Static refinement (CLIP-ES)", "41-static-refinement-clip-es"),
    ("11.7 Training (`train:`)", "117-training-train"),
])
def test_slug_rule(title, slug):
    assert github_slug(title) == slug


def test_a_missing_anchor_is_caught(tmp_path):
    md = tmp_path / "page.md"
    md.write_text("# Title\n\n## 2. Part\n\n```\n## not a heading\n```\n", encoding="utf-8")
    a = anchors(md)
    assert "2-part" in a and "title" in a
    assert "not-a-heading" not in a and "3-part" not in a


def test_every_config_key_is_documented():
    """Each field of the model, train and data configs appears as ``section.key`` in method.md."""
    import dataclasses

    from weclip_infer.config import WeCLIPConfig
    from weclip_infer.training.config import DataConfig, TrainConfig

    text = (DOCS / "method.md").read_text(encoding="utf-8")
    keys = []
    for f in dataclasses.fields(WeCLIPConfig):
        keys += [f"{f.name}.{g.name}" for g in dataclasses.fields(f.default_factory)]  # type: ignore[arg-type]
    keys += [f"train.{g.name}" for g in dataclasses.fields(TrainConfig)]
    keys += [f"data.{g.name}" for g in dataclasses.fields(DataConfig)]
    assert len(keys) > 50
    missing = [k for k in keys if f"`{k}`" not in text]
    assert not missing, f"config keys not documented in docs/method.md: {missing}"


def section_numbers(md: Path) -> Set[str]:
    """Numbers of the numbered headings of a page: ``## 4. Refinement`` → ``4``, ``### 4.2 RFM`` → ``4.2``."""
    out: Set[str] = set()
    for line in md.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^#{2,6}\s+(\d+(?:\.\d+)*)\.?\s", line)
        if m:
            out.add(m.group(1))
    return out


def test_every_method_section_number_cited_exists():
    """``docs/method.md §4.5`` (and ``§6.1, §12`` after it on the same line) names a numbered heading."""
    numbers = section_numbers(DOCS / "method.md")
    assert {"4", "4.5", "12"} <= numbers
    broken, seen = [], 0
    sources = [*REPO.joinpath("weclip_infer").rglob("*.py"), *REPO.joinpath("weclip_infer").rglob("*.yaml"),
               *DOCS.glob("*.md"), REPO / "README.md"]
    for src in sources:
        for i, line in enumerate(src.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if "method.md" not in line:
                continue
            tail = line.split("method.md", 1)[1]
            for num in re.findall(r"§\s*(\d+(?:\.\d+)*)", tail):
                seen += 1
                if num.rstrip(".") not in numbers:
                    broken.append(f"{src.relative_to(REPO)}:{i}: §{num}")
    assert seen, "no section citations found: the scan is broken"
    assert not broken, "citations of sections that docs/method.md does not have:\n  " + "\n  ".join(broken)
