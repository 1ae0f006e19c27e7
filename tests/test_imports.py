"""No module of mbdml imports one that imports it back, not even inside a function.

Every ``import`` and ``from ... import`` statement of the package's source is read (at
the top of a module, inside functions and under ``if TYPE_CHECKING``), resolved to the
module it loads, and the graph of these imports must have no cycle. Importing a module
also runs its parent packages' ``__init__``: those count too, except for a module inside
the package (the package is loading it already).
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def modules_of(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> source file, for every module of ``package`` under ``root``."""
    found = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module ``name`` loads: itself, or the deepest enclosing module that exists."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``module`` imports anywhere in its source."""
    is_package = path.name == "__init__.py"
    here = module if is_package else module.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                targets.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")
                base = base[: len(base) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            for alias in node.names:
                submodule = f"{origin}.{alias.name}"
                targets.add(submodule if submodule in modules else origin)
    edges = set()
    for target in targets:
        resolved = _resolve(target, modules)
        if resolved is None or resolved == module:
            continue
        edges.add(resolved)
        parts = resolved.split(".")
        for i in range(1, len(parts)):  # the parent packages run first, unless we are inside them
            parent = ".".join(parts[:i])
            if parent in modules and not module.startswith(parent + ".") and parent != module:
                edges.add(parent)
    return edges


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    modules = modules_of(root, package)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of modules (the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def test_no_module_imports_one_that_imports_it_back():
    graph = import_graph(SRC, "mbdml")
    assert len(graph) > 40 and graph["mbdml.train"]  # the whole package was read
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_function_level_imports_are_in_the_graph():
    graph = import_graph(SRC, "mbdml")
    # cmd_train imports the training module inside the function, to start fast
    assert "mbdml.train" in graph["mbdml.cli"]
    # the engine's hub imports: a relative import of a package and of a module inside one
    assert {"mbdml.data", "mbdml.data.batches", "mbdml.methods", "mbdml.run_folder"} <= graph["mbdml.engine"]


def test_a_cycle_through_a_function_is_found(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .low import LOW\n")
    (pkg / "sub" / "low.py").write_text("LOW = 1\n")
    (pkg / "top.py").write_text(textwrap.dedent("""\
        from .sub.low import LOW

        def late():
            from . import middle
            return middle
    """))
    (pkg / "middle.py").write_text("import pkg.top\n")
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.top"] == {"pkg.middle", "pkg.sub.low", "pkg.sub"}
    assert graph["pkg.sub"] == {"pkg.sub.low"}
    assert find_cycle(graph) == ["pkg.middle", "pkg.top", "pkg.middle"]
    (pkg / "middle.py").write_text("from .sub import LOW\n")
    assert find_cycle(import_graph(tmp_path, "pkg")) is None
