"""Dependencies point one way: no two of kiq's modules import each other (at run time or for type checking)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def modules() -> dict[str, Path]:
    found = {}
    for package in ("kiq", "worker", "producer"):
        for path in (ROOT / package).rglob("*.py"):
            found[".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")] = path
    return found


def imported(node: ast.AST, known: dict[str, Path]) -> set[str]:
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name in known}
    if isinstance(node, ast.ImportFrom) and node.module:
        submodules = {f"{node.module}.{alias.name}" for alias in node.names} & known.keys()
        # `from kiq import redisurl` imports the submodule; `from kiq import Job` imports the package.
        plain = len(submodules) < len(node.names) and node.module in known
        return submodules | ({node.module} if plain else set())
    return set()


def test_no_two_modules_import_each_other():
    known = modules()
    edges = {name: set() for name in known}
    for name, path in known.items():
        for node in ast.walk(ast.parse(path.read_text())):
            edges[name] |= imported(node, known) - {name}
    pairs = sorted({tuple(sorted((a, b))) for a in edges for b in edges[a] if a in edges[b]})
    assert pairs == []


def test_no_test_module_imports_another():
    """Shared helpers live in tests/helpers.py and fixtures in a conftest.py: importing a test module runs its
    fixtures and tests twice under pytest and ties the two files' fates."""
    found = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [f"{node.module or ''}.{alias.name}" for alias in node.names] + [node.module or ""]
            found += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.rsplit(".", 1)[-1].startswith("test_")]
    assert found == []
