"""The layout's arrows: orchestrator's packages import one way, click only in cli/, training/ nothing of ours.

    cli -> tune -> dispatch -> sweep -> run -> store -> leaves (errors, identity, diskfault) -> training
    report -> store -> leaves
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RANK = {"cli": 7, "tune": 6, "dispatch": 5, "sweep": 4, "run": 3, "store": 2, "errors": 1, "identity": 1,
        "diskfault": 1}
REPORT_MAY = {"report", "store", "errors", "identity", "diskfault"}


def part(module: str) -> str | None:
    """``orchestrator.dispatch.launch`` -> ``dispatch``; None for anything outside orchestrator."""
    names = module.split(".")
    return names[1] if names[0] == "orchestrator" and len(names) > 1 else None


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in a file, at any depth (functions' lazy imports too)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
            if node.module == "orchestrator":
                out += [(node.lineno, f"orchestrator.{a.name}") for a in node.names]
    return out


def violations(root: Path) -> list[str]:
    bad = []
    for path in sorted((root / "orchestrator").rglob("*.py")):
        rel = path.relative_to(root)
        mine = part(".".join(rel.with_suffix("").parts))
        for line, module in imports(path):
            where = f"{rel}:{line} imports {module}"
            if module.split(".")[0] == "click" and mine != "cli":
                bad.append(f"{where}: only cli/ imports click")
            theirs = part(module)
            if theirs is None or theirs == mine:
                continue
            if mine == "report" or theirs == "report":
                if mine == "report" and theirs not in REPORT_MAY:
                    bad.append(f"{where}: report reaches only store and the leaves")
                if theirs == "report" and mine != "cli":
                    bad.append(f"{where}: only cli/ uses report")
                continue
            if theirs not in RANK or mine not in RANK:
                bad.append(f"{where}: {theirs if theirs not in RANK else mine} is not a known part of the layout")
            elif RANK[theirs] > RANK[mine]:
                bad.append(f"{where}: {mine} is below {theirs}, the arrow points back up")
    for path in sorted((root / "training").rglob("*.py")):
        for line, module in imports(path):
            if module.split(".")[0] in ("orchestrator", "mlflow", "click", "yaml", "optuna"):
                bad.append(f"{path.relative_to(root)}:{line} imports {module}: training/ is plain PyTorch")
    return bad


def test_imports_point_one_way():
    assert violations(ROOT) == []


@pytest.mark.parametrize("file, source, complaint", [
    ("orchestrator/store/x.py", "from orchestrator.dispatch.launch import Launch\n", "arrow points back up"),
    ("orchestrator/run/x.py", "def f():\n    from orchestrator.sweep.file import load_sweep\n", "arrow points back up"),
    ("orchestrator/dispatch/x.py", "import click\n", "only cli/ imports click"),
    ("orchestrator/report/x.py", "from orchestrator.dispatch.scheduler import Task\n", "report reaches only store"),
    ("training/x.py", "import mlflow\n", "plain PyTorch"),
])
def test_the_check_sees_an_arrow_pointing_back(tmp_path, file, source, complaint):
    for package in ("orchestrator", "training"):
        (tmp_path / package).mkdir()
    (tmp_path / file).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / file).write_text(source)
    found = violations(tmp_path)
    assert len(found) == 1 and complaint in found[0], found
