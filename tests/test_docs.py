"""The docs cite only what exists: every relative path and every §-reference to a file in docs/ and
README.md resolves inside this repository, and the README opens with its two commands."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
REPO_DIRS = ("docs/", "src/", "tests/", "benchmarks/", ".ci/", "examples/")

LINK = re.compile(r"\]\(([^)\s]+)\)")  # [text](target)
CODE = re.compile(r"`([^`\s]+)`")  # `path`
SECTION = re.compile(r"`([^`\s]+\.md)`\s*(?:,\s*)?§\s*([0-9][0-9.]*|[A-Za-z][\w -]*)")  # `file.md` §3.1


def _resolve(doc: Path, target: str) -> Path | None:
    """The file a reference names, if it exists (relative to the doc, the repo root or docs/)."""
    target = target.split("#")[0].rstrip("/.,:;")
    for base in (doc.parent, ROOT, ROOT / "docs"):
        p = (base / target).resolve()
        if p.exists() and ROOT in p.parents:
            return p
    return None


def _references(text: str) -> list[str]:
    refs = [t for t in LINK.findall(text) if not re.match(r"[a-z]+://|mailto:|#", t)]
    for t in CODE.findall(text):
        t = t.split(":")[0]  # `src/x.py:12` -> the file
        if t.startswith(REPO_DIRS) or t in ("README.md", "pyproject.toml") or re.fullmatch(r"[\w.-]+\.md", t):
            if not any(c in t for c in "<>*{}$") and not t.startswith(("~", "/")):
                refs.append(t)
    return refs


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_paths_resolve(doc):
    text = doc.read_text(encoding="utf-8")
    missing = sorted({r for r in _references(text) if _resolve(doc, r) is None})
    assert not missing, f"{doc.relative_to(ROOT)} cites paths that are not in the repository: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_section_references_resolve(doc):
    text = doc.read_text(encoding="utf-8")
    bad = []
    for name, section in SECTION.findall(text):
        target = _resolve(doc, name)
        if target is None:
            bad.append(f"`{name}` §{section} (no such file)")
            continue
        headings = [
            h.strip("# ").strip()
            for h in target.read_text(encoding="utf-8").splitlines()
            if h.startswith("#")
        ]
        key = section.rstrip(".").strip()
        if not any(h.startswith(key) or key.lower() in h.lower() for h in headings):
            bad.append(f"`{name}` §{section} (no such heading)")
    assert not bad, f"{doc.relative_to(ROOT)}: {bad}"


def test_readme_opens_with_the_two_commands():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("```")[1]
    commands = [ln for ln in block.splitlines()[1:] if ln.strip() and not ln.lstrip().startswith("#")]
    assert len(commands) == 2, commands
    assert "pip install" in commands[0] and "pytest" in commands[1]


def test_docs_are_for_users_not_a_development_log():
    pattern = re.compile(
        r"this session|another engineer|outside my files|issue \d+|reference/[\w.-]+\.md", re.I
    )
    hits = [
        f"{doc.relative_to(ROOT)}:{i}: {m.group(0)}"
        for doc in DOCS
        for i, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1)
        for m in [pattern.search(line)]
        if m
    ]
    assert not hits, hits
