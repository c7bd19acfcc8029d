"""Every code block in README.md and docs/*.md: the Python ones run as written (each in
a fresh namespace, in a scratch directory, on the CPU unless a GPU is there), and every
block names its language, so a shell command or a printed output is never mistaken for
Python (and never silently skipped)."""
import re
from pathlib import Path

import pytest

import kitsune

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
LANGUAGES = {"python", "bash", "text"}


def code_blocks() -> list:
    """(file name, line of the opening fence, language, code) for every fenced block."""
    blocks = []
    for path in DOCS:
        text = path.read_text()
        for match in FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            blocks.append((path.name, line, match.group(1).strip(), match.group(2)))
    return blocks


BLOCKS = code_blocks()
PYTHON = [b for b in BLOCKS if b[2] == "python"]


def test_the_docs_have_python_blocks():
    assert {name for name, *_ in PYTHON} >= {"README.md"}
    assert len(PYTHON) >= 3, PYTHON


@pytest.mark.parametrize("name, line, language, code", BLOCKS, ids=[f"{b[0]}:{b[1]}" for b in BLOCKS])
def test_every_block_names_its_language(name, line, language, code):
    assert language in LANGUAGES, f"{name}:{line}: fence it as one of {sorted(LANGUAGES)}, not {language!r}"


@pytest.mark.parametrize("name, line, code", [(n, li, c) for n, li, _, c in PYTHON],
                         ids=[f"{b[0]}:{b[1]}" for b in PYTHON])
def test_python_block_runs(name, line, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # blocks may write files (engine.report("report.html"))
    kitsune.reset_fusion_stats()
    exec(compile(code, f"{name}:{line}", "exec"), {"__name__": "__docs__"})
