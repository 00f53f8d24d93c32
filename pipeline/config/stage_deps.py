"""A DVC stage's code: the files of every project module its command imports (transitively, at module
level or inside functions), which dvc.yaml lists as the stage's deps so that `dvc repro` reruns it whenever
code it runs changes, and never for code it does not run. tests/test_dvc_deps.py holds dvc.yaml to it."""

import ast
from pathlib import Path

PACKAGES = ("pipeline", "stages")
REPO = Path(__file__).resolve().parents[2]


def module_path(name: str, repo: Path = REPO) -> Path | None:
    base = repo.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imports_of(path: Path, repo: Path = REPO) -> set[str]:
    """Project modules a file imports (`import a.b`, `from a.b import c`, where c may be a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        found |= {n for n in names if n.split(".")[0] in PACKAGES and module_path(n, repo)}
    return found


def docstring_only(path: Path) -> bool:
    body = ast.parse(path.read_text()).body
    return all(isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) for node in body)


def code_deps(module: str, repo: Path = REPO) -> list[str]:
    """The files (relative to the project) of every project module reachable from `module`; package
    __init__ files that hold only their docstring run no code, and are left out."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += imports_of(module_path(name, repo), repo)
    files = {module_path(n, repo) for n in seen}
    return sorted(str(f.relative_to(repo)) for f in files if f.name != "__init__.py" or not docstring_only(f))


def stage_module(command: str) -> str:
    """`python -m stages.score --model m ...` -> stages.score."""
    return command.split("python -m ", 1)[1].split()[0]
