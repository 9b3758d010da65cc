"""The layout docs/architecture.md describes, checked on the code: four floors, utils <- wan <- pipeline
<- experiments, where a module imports only from its own floor or the floors below; the modules that
run before torch is imported import no torch; the scripts stay thin."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FLOORS = ("utils", "wan", "pipeline", "experiments")
TORCH_FREE = ("utils.config", "utils.passes", "utils.preflight", "utils.wan21", "wan.cache_policies", "wan.families",
              "pipeline.plan", "pipeline.report", "utils.report_html", "utils.head_classes")
SCRIPTS = ("run_extraction_figure4.py", "plot_figure4.py", "aggregate_figure4.py", "report_figure4.py")


def project_imports(path):
    """The project packages (FLOORS) that the module at ``path`` imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found.update(name.split(".")[0] for name in names if name.split(".")[0] in FLOORS)
    return found


@pytest.mark.parametrize("floor", FLOORS)
def test_no_import_climbs_a_floor(floor):
    allowed = set(FLOORS[: FLOORS.index(floor) + 1])
    upward = {str(path.relative_to(REPO)): sorted(project_imports(path) - allowed)
              for path in sorted((REPO / floor).rglob("*.py"))}
    assert {path: up for path, up in upward.items() if up} == {}


def test_modules_checked_before_torch_import_no_torch():
    code = f"import sys, importlib; [importlib.import_module(m) for m in {TORCH_FREE!r}]; " \
           "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:3]"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_are_thin(script):
    assert len((REPO / "experiments" / script).read_text().splitlines()) <= 250
