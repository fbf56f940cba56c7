"""README.md and docs/*.md point only at files that exist: every markdown link to a local file, and every
repository path written in backticks (`docs/...`, `benchmarks/...`, `sanf_pipeline/...`, `tests/...`, `.ci/...`,
relative to the repository root as the docs say), resolves in the checkout. Git-ignored scratch space
(`benchmarks/.work/`) and patterns (`*`, `<name>`) are not paths."""

from __future__ import annotations

import re

import pytest
from conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PREFIXES = ("docs/", "benchmarks/", "sanf_pipeline/", "tests/", ".ci/")
IGNORED = ("benchmarks/.work",)
LINK = re.compile(r"\]\(([^)\s]+)\)")
CODE = re.compile(r"`([^`\n]+)`")


def named_paths(text: str) -> set[str]:
    found = {m.group(1) for m in LINK.finditer(text) if not re.match(r"[a-z]+:|#", m.group(1))}
    for m in CODE.finditer(text):
        token = m.group(1).strip()
        if token.startswith(PREFIXES) and " " not in token:
            found.add(token)
    out = set()
    for p in found:
        p = p.split("#")[0].split("::")[0].rstrip(":,.;)")
        if p and not any(c in p for c in "*<>{}") and not p.startswith(IGNORED):
            out.add(p)
    return out


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_named_files_exist(doc):
    missing = []
    for p in sorted(named_paths(doc.read_text(encoding="utf-8"))):
        # markdown links resolve from the document's folder, backticked paths from the repository root
        if not ((doc.parent / p).exists() or (REPO / p).exists()):
            missing.append(p)
    assert not missing, f"{doc.relative_to(REPO)} names files that do not exist: {missing}"


def test_readme_keeps_what_ci_and_users_rely_on():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = "\n".join(re.findall(r"^```(?:bash)?\n(.*?)^```", readme, flags=re.S | re.M))
    lines = [line.split("#")[0].strip() for line in blocks.splitlines()]
    assert "python -m pytest -q -p no:cacheprovider" in lines  # .ci/run runs the README's test command
    assert "pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu" in lines
    quick = readme[readme.index("## Quick start"):readme.index("## Your own images")]
    assert quick.index("download.pytorch.org/whl/cpu") < quick.index("That is all")
    assert re.search(r"\d+ tests in [\d.]+ min on 2 idle cores", quick)
    assert "### The combined score" in readme  # `sanf fit --help` points at it
    assert not re.search(r"\bissue \d+", readme, flags=re.I)  # no project history in user text
