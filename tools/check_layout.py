"""Layout checks that ruff and import-linter do not make (run by `make lint`):

1. no import cycle among first-party modules (revpers, revpers_client, benchmarks);
2. first-party imports sit at module top: an import inside a function is for a heavy optional
   third-party dependency only (tensorrt, modelopt, polygraphy, ray, pyarrow, ...), never for a
   first-party module, where it would hide a dependency or a cycle; the one exception is a
   first-party module that itself imports such a dependency at its top (e.g. revpers.batch.run,
   which needs Ray): deferring it is deferring that dependency.

Exit status 1 with one line per problem.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("revpers", "revpers_client", "benchmarks")
HEAVY_OPTIONAL = {"tensorrt", "modelopt", "polygraphy", "ray", "pyarrow"}
SOURCES = ("revpers", "client", "benchmarks")


def cycles(graph) -> list[list[str]]:
    """Groups of modules that import each other (strongly connected components of more than one
    module, Tarjan's algorithm; a few hundred modules, so recursion is fine)."""
    index, low, stack, out = {}, {}, [], []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for child in sorted(graph.find_modules_directly_imported_by(node)):
            if child not in index:
                visit(child)
                low[node] = min(low[node], low[child])
            elif child in stack:
                low[node] = min(low[node], index[child])
        if low[node] == index[node]:
            component = stack[stack.index(node) :]
            del stack[stack.index(node) :]
            if len(component) > 1:
                out.append(sorted(component))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return out


def optional_component(module: str) -> bool:
    """A first-party module that imports a heavy optional dependency at its top."""
    parts = module.split(".")
    base = ROOT / ("client" if parts[0] == "revpers_client" else parts[0]) / Path(*parts[1:])
    path = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
    if not path.is_file():
        return False
    for node in ast.parse(path.read_text()).body:
        names = (
            [a.name for a in node.names]
            if isinstance(node, ast.Import)
            else [node.module or ""]
            if isinstance(node, ast.ImportFrom)
            else []
        )
        if any(n.split(".")[0] in HEAVY_OPTIONAL for n in names):
            return True
    return False


def nested_first_party_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    problems = []
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] in PACKAGES):
                if node.level == 0 and optional_component(node.module):
                    continue
                problems.append(f"{path.relative_to(ROOT)}:{node.lineno}: first-party import inside {fn.name}()")
            elif isinstance(node, ast.Import) and any(a.name.split(".")[0] in PACKAGES for a in node.names):
                problems.append(f"{path.relative_to(ROOT)}:{node.lineno}: first-party import inside {fn.name}()")
    return problems


def main() -> int:
    sys.path.insert(0, str(ROOT))
    problems = []
    graph = grimp.build_graph(*PACKAGES, include_external_packages=False)
    problems += [f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]
    for src in SOURCES:
        for path in sorted((ROOT / src).rglob("*.py")):
            problems += nested_first_party_imports(path)
    for p in problems:
        print(p)
    print(f"check_layout: {len(graph.modules)} modules, {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
