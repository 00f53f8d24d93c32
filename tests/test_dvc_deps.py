"""dvc.yaml's code deps cannot drift: each stage lists exactly the modules of pipeline/ and stages/ its
command imports (transitively, at module level or inside functions), so `dvc repro` reruns a stage
whenever code it runs changes, and never for code it does not run."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

from conftest import REPO

PACKAGES = ("pipeline", "stages")


def module_path(name: str) -> Path | None:
    base = REPO.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imports_of(path: Path) -> set[str]:
    """Project modules a file imports (`import a.b`, `from a.b import c`, where c may be a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        found |= {n for n in names if n.split(".")[0] in PACKAGES and module_path(n)}
    return found


def closure(module: str) -> set[Path]:
    """Files of every project module reachable from `module`, package __init__ files excluded (empty)."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo += imports_of(module_path(name))
    files = {module_path(n).relative_to(REPO) for n in seen}
    return {f for f in files if f.name != "__init__.py" or f.stat().st_size > 0 and f.parent.name != "pipeline"}


def stage_code_deps(stage: dict) -> set[Path]:
    return {Path(d) for d in stage["deps"] if d.endswith(".py")}


def test_every_stage_lists_exactly_the_code_it_runs():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    problems = []
    for name, stage in stages.items():
        module = stage["cmd"].split("python -m ", 1)[1].split()[0]
        needed = {p for p in closure(module) if p.parts[0] in PACKAGES}
        listed = stage_code_deps(stage)
        problems += [f"{name}: imports {p} but dvc.yaml does not list it" for p in sorted(needed - listed)]
        problems += [f"{name}: lists {p} but never imports it" for p in sorted(listed - needed)]
    assert not problems, "\n".join(problems)


def test_the_check_catches_a_removed_line(tmp_path):
    """Drop one dep from a copy of dvc.yaml: the same comparison must name it."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    stage = stages["score"]
    removed = next(d for d in stage["deps"] if d.endswith("selection.py"))
    stage["deps"].remove(removed)
    module = stage["cmd"].split("python -m ", 1)[1].split()[0]
    missing = {p for p in closure(module) if p.parts[0] in PACKAGES} - stage_code_deps(stage)
    assert missing == {Path(removed)}
