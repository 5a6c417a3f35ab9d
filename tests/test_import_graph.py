"""dockyard's import graph, built from the source: no module imports itself back, directly or through others.

Every ``import`` of a dockyard module counts, at module level and inside functions alike (a cycle hidden
in a function is still a cycle: it only fails later, and in an order that depends on the call). What
``if TYPE_CHECKING:`` guards is left out (it never runs). A name taken from a package that serves its
names lazily (a ``_LAZY = {name: module}`` table in its ``__init__``, as ``dockyard`` and
``dockyard.onboard`` have) counts as an import of the module that defines it.

A module-level ``COMMANDS = {"name": "dockyard.module:function"}`` table (the CLI loads a command's module
when that command runs) counts as imports of the modules it names.

Function-local imports of dockyard's own modules are allowed only to keep an optional dependency
optional, and each says which in a comment on its line or above its run of imports: the comment names
the dependency and the word "optional" (``# Triton is an optional dependency``). Keeping torch or a slow
import off a light path is no reason: that is a layout to fix (metadata in torch-free modules).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "dockyard"

def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict[str, tuple[Path, ast.Module]]:
    return {_module_name(p): (p, ast.parse(p.read_text(), str(p))) for p in sorted(PACKAGE.rglob("*.py"))}


def _lazy_table(tree: ast.Module) -> dict[str, str]:
    """A package's ``_LAZY = {"Name": "dockyard.module"}`` literal, if it has one."""
    for node in tree.body:
        if (isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_LAZY" for t in node.targets)
                and isinstance(node.value, ast.Dict)):
            return {k.value: v.value for k, v in zip(node.value.keys, node.value.values, strict=True)
                    if isinstance(k, ast.Constant) and isinstance(v, ast.Constant)}
    return {}


def _command_table(tree: ast.Module) -> set[str]:
    """The modules a ``COMMANDS = {"name": "dockyard.module:function"}`` literal names, if there is one."""
    for node in tree.body:
        if (isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "COMMANDS" for t in node.targets)
                and isinstance(node.value, ast.Dict)):
            return {v.value.partition(":")[0] for v in node.value.values
                    if isinstance(v, ast.Constant) and isinstance(v.value, str) and ":" in v.value}
    return set()


def _type_checking_only(tree: ast.Module) -> set[int]:
    """ids of the import nodes under ``if TYPE_CHECKING:`` (never executed)."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            skipped.update(id(inner) for stmt in node.body for inner in ast.walk(stmt))
    return skipped


def _imports(name: str, path: Path, tree: ast.Module, modules: set[str],
             lazy: dict[str, dict[str, str]]) -> list[tuple[str, int, bool]]:
    """(imported dockyard module, line, inside a function) for each import in ``tree``."""
    skipped = _type_checking_only(tree)
    local = {id(inner) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
             for inner in ast.walk(fn)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: list[tuple[str, int, bool]] = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                if f"{base}.{alias.name}" in modules:
                    targets.append(f"{base}.{alias.name}")
                elif alias.name in lazy.get(base, {}):
                    targets.append(lazy[base][alias.name])
                else:
                    targets.append(base)
        for target in targets:
            while target and target not in modules:  # `import dockyard.x.y` of a name inside a module
                target = target.rpartition(".")[0]
            if target.split(".")[0] == "dockyard" and target != name:
                out.append((target, node.lineno, id(node) in local))
    return out


def _graph() -> tuple[dict[str, set[str]], list[str]]:
    """The import graph, and the function-local imports of dockyard modules that carry no comment."""
    sources = _sources()
    modules = set(sources)
    lazy = {name: _lazy_table(tree) for name, (path, tree) in sources.items() if path.name == "__init__.py"}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    uncommented = []
    for name, (path, tree) in sources.items():
        lines = path.read_text().splitlines()
        graph[name].update(_command_table(tree) & modules)
        for target, line, in_function in _imports(name, path, tree, modules, lazy):
            graph[name].add(target)
            if in_function and not _says_optional(lines, line):
                uncommented.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}")
    return graph, sorted(set(uncommented))


def _says_optional(lines: list[str], line: int) -> bool:
    """A comment naming an optional dependency on the import's line, or above the run of import lines it
    belongs to (the nearest comment counts)."""
    i = line - 1
    while True:
        if "#" in lines[i]:
            return "optional" in lines[i].partition("#")[2].lower()
        if i == 0 or not lines[i - 1].strip().startswith(("from ", "import ", "#")):
            return False
        i -= 1


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _path_within(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """One cycle through the component's first module, for the failure message."""
    members, start = set(component), component[0]
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for succ in sorted(graph[node] & members):
                if succ == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if succ not in parents:
                    parents[succ] = node
                    nxt.append(succ)
        frontier = nxt
    return component


def test_no_import_cycle():
    graph, _ = _graph()
    cycles = [" → ".join(_path_within(graph, c)) for c in _cycles(graph)]
    assert not cycles, "import cycles in dockyard/:\n" + "\n".join(cycles)


def test_function_local_imports_say_why():
    _, uncommented = _graph()
    assert not uncommented, ("function-local imports of dockyard modules without a comment naming the optional "
                             "dependency they keep optional (hoist them, or say why):\n" + "\n".join(uncommented))


# What resolving a model and reading its metadata imports (``dockyard inspect``, the CLI's choices): no torch.
METADATA_MODULES = ("dockyard.model_source", "dockyard.onboard.context", "dockyard.tokenizer",
                    "dockyard.weights.gguf_metadata", "dockyard.weights.quant_config",
                    "dockyard.weights.safetensors_dir")


def test_metadata_modules_import_no_torch():
    """The layout keeps torch off the metadata path with top-level imports only (no import hidden in a function)."""
    probe = f"import sys; import {', '.join(METADATA_MODULES)}; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False", "a metadata module imports torch"


def test_the_graph_sees_cycles_and_local_imports(tmp_path):
    """The checks above can fail: a two-module cycle made of one top-level and one function-local import."""
    graph = {"dockyard.a": {"dockyard.b"}, "dockyard.b": {"dockyard.a"}, "dockyard.c": {"dockyard.a"}}
    assert _cycles(graph) == [["dockyard.a", "dockyard.b"]]
    assert _path_within(graph, ["dockyard.a", "dockyard.b"]) == ["dockyard.a", "dockyard.b", "dockyard.a"]
    path = PACKAGE / "engine" / "llm.py"
    tree = ast.parse("from dockyard.spec import ModelSpec\n"
                     "def f():\n    from dockyard.engine import llm_engine\n    from dockyard import LLM\n")
    modules = {"dockyard.spec", "dockyard.engine", "dockyard.engine.llm", "dockyard.engine.llm_engine", "dockyard"}
    found = _imports("dockyard.engine.llm", path, tree, modules, {"dockyard": {"LLM": "dockyard.engine.llm"}})
    assert found == [("dockyard.spec", 1, False), ("dockyard.engine.llm_engine", 3, True)]
    lines = ["def f():", "    # Triton is an optional dependency", "    from dockyard.ops import triton_a",
             "    from dockyard.ops import triton_b", "", "    from dockyard.ops import triton_c",
             "    from dockyard.weights import gguf  # imports torch: the CLI stays light"]
    assert [_says_optional(lines, n) for n in (3, 4, 6, 7)] == [True, True, False, False]
    table = ast.parse('COMMANDS = {"run": "dockyard.engine.llm:main", "other": "dockyard.spec:f"}\n')
    assert _command_table(table) == {"dockyard.engine.llm", "dockyard.spec"}
