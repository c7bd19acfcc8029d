"""The pipeline (capture → ir → planner → codegen → tuning → runtime, and the compiler
that runs it) never imports the API and report layers on top of it."""
import ast
from pathlib import Path

import pytest

import kitsune

SRC = Path(kitsune.__file__).parent
PIPELINE = ["capture", "ir", "planner", "codegen", "tuning", "runtime", "compiler.py", "record.py"]
# Modules allowed to reach up (none now that the patterns live in planner/).
DOORS: set = set()


def _imports(path: Path) -> set:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


@pytest.mark.parametrize("part", PIPELINE)
def test_pipeline_imports_no_api_or_report(part):
    root = SRC / part
    for path in ([root] if root.is_file() else sorted(root.rglob("*.py"))):
        if str(path.relative_to(SRC)) in DOORS:
            continue
        upward = {m for m in _imports(path) if m.startswith(("kitsune.fusion", "kitsune.report"))}
        assert not upward, f"{path.relative_to(SRC)} imports {sorted(upward)}"



# The order imports follow inside the pipeline: a stage imports only stages before it
# (and the shared leaves: config, cache, _compat). tuning/ comes before codegen/: the
# code generators read their launch choices from it, and its measurements know a fused
# call by what it has, not by importing runtime/.
ORDER = ["capture", "ir", "planner", "tuning", "codegen", "runtime"]


@pytest.mark.parametrize("stage", ORDER)
def test_pipeline_imports_go_down_only(stage):
    later = tuple(f"kitsune.{s}" for s in ORDER[ORDER.index(stage) + 1:])
    for path in sorted((SRC / stage).rglob("*.py")):
        upward = {m for m in _imports(path) if later and m.startswith(later)}
        assert not upward, f"{path.relative_to(SRC)} imports later stages {sorted(upward)}"
