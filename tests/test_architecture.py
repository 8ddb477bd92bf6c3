"""Import-graph rules from design.md, checked on the package's own source with `ast`.

Function-level imports count as edges (they still tie modules together); imports under
`if TYPE_CHECKING:` are excluded because they never run and exist only for annotations.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "openglm"
MAX_LINES = 600
# Oversized modules and the reason they are allowed for now.
LONG_MODULES: dict[str, str] = {}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _edges(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Modules `name` imports; `from openglm import kernels` is an edge to openglm.kernels."""
    targets: set[str] = set()
    for node in _imports(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets.update(a.name for a in node.names if a.name.startswith("openglm"))
        elif node.module and node.module.startswith("openglm") and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                targets.add(sub if sub in modules else node.module)
    return {t for t in targets if t in modules and t != name and not name.startswith(t + ".")}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := dfs(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := dfs(node)):
            return cycle
    return None


def test_find_cycle_reference() -> None:
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles() -> None:
    modules = _modules()
    graph = {name: _edges(name, path, modules) for name, path in modules.items()}
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_data_and_tokenizer_are_in_no_cycle() -> None:
    """The data pipeline and the tokenizer trainer import nothing that imports them back."""
    modules = _modules()
    graph = {name: _edges(name, path, modules) for name, path in modules.items()}
    for start in [n for n in graph if n == "openglm.tokenizer" or n.startswith("openglm.data")]:
        seen, todo = set(), list(graph[start])
        while todo:
            node = todo.pop()
            assert node != start, f"{start} imports a module that imports it back"
            if node not in seen:
                seen.add(node)
                todo += graph[node]


def test_no_private_imports_across_modules() -> None:
    bad = []
    for name, path in _modules().items():
        for node in _imports(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("openglm"):
                if node.module != name:
                    bad += [f"{name}: from {node.module} import {a.name}" for a in node.names if a.name.startswith("_")]
            elif isinstance(node, ast.Import):
                bad += [f"{name}: import {a.name}" for a in node.names if any(p.startswith("_") for p in a.name.split("."))]
    assert not bad, "\n".join(bad)


# Package layers, lowest first, as design.md draws them: a module may import its own layer and the
# layers below it, never one above. A name is a package or module; a module takes the layer of the
# longest name that is a prefix of it. Where the code and design.md differ, and the code is right:
# - io.atomic (the torch-free atomic writes) sits with config, under the data pipeline, the tokenizer
#   and train's metrics that write through it; the rest of io/ sits above model and tokenizer,
#   because loading, quantized loading and conversion build a GLM and write a tokenizer.
# - the executors (native, decoding) sit under parallel/ rather than beside it, and generation/
#   beside train/ (neither imports the other).
# - eval.lm (NLL, perplexity, bits per byte over a model) sits with train/: the trainer's held-out
#   loss is that metric, and eval/'s scorer uses the same one.
# - the root package (`openglm.load`, generation re-exported) is an entry point like cli and serve.
LAYERS: list[set[str]] = [
    {"openglm.config", "openglm.console", "openglm.counter_random", "openglm.kernels", "openglm.io.atomic"},
    {"openglm.positions", "openglm.quant", "openglm.data", "openglm.tokenizer"},
    {"openglm.model"},
    {"openglm.io"},
    {"openglm.native", "openglm.decoding"},
    {"openglm.parallel"},
    {"openglm.generation", "openglm.train", "openglm.eval.lm"},
    {"openglm.eval"},
    {"openglm", "openglm.__main__", "openglm.cli", "openglm.serve"},
]


def _layer(module: str) -> int:
    """The layer of `module`: that of the longest LAYERS name equal to it or a package above it
    (the root package's name stands for itself only, so every new module must be placed)."""
    placed = {name: index for index, names in enumerate(LAYERS) for name in names}
    owners = [name for name in placed if module == name or (name != "openglm" and module.startswith(name + "."))]
    assert owners, f"{module} is in no layer: add it (or its package) to LAYERS"
    return placed[max(owners, key=len)]


def test_layer_of_a_module() -> None:
    assert _layer("openglm.io.atomic") == 0 and _layer("openglm.io.convert.sat") == 3
    assert _layer("openglm.eval.lm") == 6 and _layer("openglm.eval.runner") == 7
    assert _layer("openglm") == 8 and _layer("openglm.train.trainer") == 6 > _layer("openglm.parallel.plan")
    with pytest.raises(AssertionError, match="in no layer"):
        _layer("openglm.unplaced")


def test_no_package_imports_a_higher_layer() -> None:
    modules = _modules()
    upward = [
        f"{name} (layer {_layer(name)}) imports {target} (layer {_layer(target)})"
        for name, path in sorted(modules.items())
        for target in sorted(_edges(name, path, modules))
        if _layer(target) > _layer(name)
    ]
    assert not upward, "\n".join(upward)


def test_module_size() -> None:
    long = {n: len(p.read_text().splitlines()) for n, p in _modules().items()}
    over = {n: c for n, c in long.items() if c > MAX_LINES and n not in LONG_MODULES}
    assert not over, f"modules over {MAX_LINES} lines: {over}"
