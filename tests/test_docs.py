"""What the code and the docs cite exists in the repository: every `docs/*.md` and
`benchmarks/*.py` named, and every markdown link to a doc and its section.

Ten files once cited a design document that was never in the repository; a newcomer could
not follow them. This keeps a citation from pointing nowhere again."""

from __future__ import annotations

import re
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
_TREES = (
    "redis_plumbing",
    "service_registry",
    "balancer",
    "session_store",
    "demo_app",
    "benchmarks",
    "tests",
    "scripts",
    "deploy",
)
_TOP = ("README.md", "pyproject.toml", "compose.yaml", "Dockerfile")
_SUFFIXES = {".py", ".md", ".toml", ".yaml", ".yml", ".js", ".html", ".css", ".sh", ""}

_CITED = re.compile(r"\b((?:docs/[\w.-]+\.md)|(?:benchmarks/\w+\.py))\b")
_LINK = re.compile(r"\]\(([\w./-]+\.md)(?:#([\w-]+))?\)")
_HEADING = re.compile(r"^#{1,6} (.+?)\s*$", re.MULTILINE)
_FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def _sources() -> list[Path]:
    files = [_ROOT / name for name in _TOP if (_ROOT / name).is_file()]
    files += sorted((_ROOT / "docs").glob("*.md"))
    for tree in _TREES:
        for path in sorted((_ROOT / tree).rglob("*")):
            if path.is_file() and path.suffix in _SUFFIXES and "__pycache__" not in path.parts:
                files.append(path)
    return files


def _anchors(doc: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces as hyphens."""
    text = _FENCE.sub("", doc.read_text(encoding="utf-8"))
    return {
        re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        for heading in _HEADING.findall(text)
    }


def test_every_cited_doc_and_benchmark_exists() -> None:
    missing = []
    for path in _sources():
        text = path.read_text(encoding="utf-8", errors="replace")
        for cited in _CITED.findall(text):
            if not (_ROOT / cited).is_file():
                missing.append(f"{path.relative_to(_ROOT)} cites {cited}")
        if "DESIGN.md" in text and path != Path(__file__).resolve():
            missing.append(f"{path.relative_to(_ROOT)} cites DESIGN.md (docs/architecture.md)")
    assert missing == []


def test_every_markdown_link_to_a_doc_reaches_its_section() -> None:
    broken = []
    for path in _sources():
        if path.suffix != ".md":
            continue
        for target, anchor in _LINK.findall(path.read_text(encoding="utf-8")):
            doc = (path.parent / target).resolve()
            if not doc.is_file():
                broken.append(f"{path.relative_to(_ROOT)}: {target} does not exist")
            elif anchor and anchor not in _anchors(doc):
                broken.append(f"{path.relative_to(_ROOT)}: {target} has no #{anchor}")
    assert broken == []


def test_the_architecture_doc_is_linked_from_the_readme() -> None:
    assert "(docs/architecture.md)" in (_ROOT / "README.md").read_text(encoding="utf-8")
