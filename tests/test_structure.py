"""The house's shape, read from the source: no import circle among the project's modules (imports inside
functions count), no arrow from a lower room of services/ to a higher one, `facenet` never importing
`services`, and no function over 100 lines."""

from __future__ import annotations

import ast
import os
import pathlib



REPO = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("facenet", "services")
# services/ floors, top first: a room imports only rooms below it (and the services root, the bottom floor).
FLOORS = ["services.cli", "services.bench", "services.stack", "services.queue", "services"]


def _modules() -> dict[str, pathlib.Path]:
    found = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _imports(path: pathlib.Path, module: str, modules: dict) -> set[str]:
    """The project modules `module` imports anywhere in its file (module level or inside a function): for
    `from a.b import c`, a.b.c when that is a module, else a.b."""
    out = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                package = module.split(".") if is_package else module.split(".")[:-1]
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:  # `import a.b.c` of a function: its module
                name = name.rpartition(".")[0]
            if name and name != module:
                out.add(name)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(p, m, modules) for m, p in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_cycle():
    """The finder itself, on a made-up graph with one circle of three and a tail: it must see the circle."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_imports_inside_functions(tmp_path):
    """An import inside a function is an arrow: the graph reader finds it (and resolves relative imports)."""
    (tmp_path / "pkg").mkdir()
    for name, text in {"__init__.py": "", "a.py": "def f():\n    from pkg import b\n",
                       "b.py": "from . import a\n"}.items():
        (tmp_path / "pkg" / name).write_text(text)
    modules = {"pkg": tmp_path / "pkg/__init__.py", "pkg.a": tmp_path / "pkg/a.py", "pkg.b": tmp_path / "pkg/b.py"}
    graph = {m: _imports(p, m, modules) for m, p in modules.items()}
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.a"}
    assert _cycles(graph) == [["pkg.a", "pkg.b"]]


def test_no_import_cycle():
    cycles = _cycles(_graph())
    assert not cycles, "import circles (imports inside functions count): " + "; ".join(" <-> ".join(c) for c in cycles)


def _floor(module: str) -> int | None:
    for i, room in enumerate(FLOORS):
        if module == room or module.startswith(room + ".") or (room == "services" and module.startswith("services.")):
            return i
    return None


def test_arrows_point_down():
    """facenet never imports services; in services/, the CLI sits on the benchmarks, which sit on the stack,
    which sits on the queue, which sits on the services root (config, process helpers)."""
    wrong = []
    for module, imported in _graph().items():
        for target in imported:
            if module.startswith("facenet") and target.startswith("services"):
                wrong.append(f"{module} -> {target}")
            elif module.startswith("services") and target.startswith("services"):
                here, there = _floor(module), _floor(target)
                if there < here and module.split(".")[:2] != target.split(".")[:2]:
                    wrong.append(f"{module} -> {target}")
    assert not wrong, "arrows up: " + ", ".join(sorted(wrong))


def test_no_function_over_100_lines():
    long = []
    for module, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 100:
                    long.append(f"{os.path.relpath(path, REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "functions over 100 lines: " + ", ".join(long)
