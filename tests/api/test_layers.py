"""The arrows point one way (STYLE.md): api/ imports nothing of worker/."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _imported_modules(path: Path) -> set[str]:
    """Every module an `import` or `from … import` names anywhere in the file (also in functions)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_api_imports_nothing_of_worker():
    offenders = sorted(
        f"{path.relative_to(REPO)}: {module}"
        for path in (REPO / "api").rglob("*.py")
        for module in _imported_modules(path)
        if module == "worker" or module.startswith("worker.")
    )
    assert offenders == []
