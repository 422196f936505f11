"""The import graph of lmkit has no cycle, and every module imports on its own.

The graph is read from the source with `ast`, so a cycle fails here even where the import
order of the test session happens to hide it. Every import counts, also those inside
functions (a lazy import that dodges a cycle is still a cycle), except those under
`if TYPE_CHECKING:` (type hints, never executed). Importing `a.b.c` runs the `__init__` of
`a.b` first, so that package is an edge too (unless the importer lives inside it).
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import lmkit

ROOT = Path(lmkit.__file__).parent


def module_names(root: Path, package: str) -> dict[str, Path]:
    """Dotted name -> file of every module under the package folder `root`."""
    names = {}
    for file in sorted(root.rglob("*.py")):
        parts = [package, *file.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = file
    return names


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imported(node: ast.AST, importer: str, is_package: bool) -> list[str]:
    """Dotted names an import statement may load: `from m import x` names `m.x` (a submodule,
    if there is one) and `m`."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:  # relative: from the importer's package, up `level - 1` more
        here = importer.split(".") if is_package else importer.split(".")[:-1]
        here = here[:len(here) - (node.level - 1)]
        base = ".".join(here + ([base] if base else []))
    return [base] + [f"{base}.{a.name}" for a in node.names]


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """module -> the modules of `package` that importing it runs."""
    files = module_names(root, package)
    graph: dict[str, set[str]] = {}
    for name, file in files.items():
        is_package = file.name == "__init__.py"
        own_packages = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        if is_package:
            own_packages.add(name)
        edges: set[str] = set()
        stack: list[ast.AST] = [ast.parse(file.read_text(), str(file))]
        while stack:
            node = stack.pop()
            for child in ast.iter_child_nodes(node):
                if _is_type_checking(child):
                    stack.extend(child.orelse)
                    continue
                if isinstance(child, ast.Import | ast.ImportFrom):
                    for target in _imported(child, name, is_package):
                        parts = target.split(".")
                        for i in range(1, len(parts) + 1):  # parent packages run first
                            step = ".".join(parts[:i])
                            if step in files and step not in own_packages:
                                edges.add(step)
                stack.append(child)
        edges.discard(name)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path `a -> b -> ... -> a`, or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_lmkit_has_no_import_cycle():
    graph = import_graph(ROOT, "lmkit")
    assert len(graph) > 30 and "lmkit.loading" in graph["lmkit.cli"]  # the graph was read
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# The layers of docs/ARCHITECTURE.md, bottom first: a module imports only lower layers and its
# own unit (a module, or a package and its submodules).
LAYERS = [
    ["lmkit.errors", "lmkit.names", "lmkit.logs"],
    ["lmkit.textfiles"],
    ["lmkit.config", "lmkit.checkpoint", "lmkit.device", "lmkit.hub", "lmkit.lineage",
     "lmkit.generation_config", "lmkit.sources", "lmkit.compiling"],
    ["lmkit.model", "lmkit.tokenizer", "lmkit.sharded"],
    ["lmkit.flops", "lmkit.generate", "lmkit.convert", "lmkit.data"],
    ["lmkit.loading", "lmkit.objectives"],
    ["lmkit.train"],
    ["lmkit.tasks"],
    ["lmkit.finetune"],
    ["lmkit.report", "lmkit.evaluation"],
    ["lmkit.serve"],
    ["lmkit.cli", "lmkit"],
]


def _unit(module: str) -> tuple[int, str]:
    for level, units in enumerate(LAYERS):
        for unit in units:
            if module == unit or (unit != "lmkit" and module.startswith(unit + ".")):
                return level, unit
    raise AssertionError(f"{module} is in no layer: add it to LAYERS and docs/ARCHITECTURE.md")


def test_imports_go_down_the_layers():
    wrong = []
    for module, targets in import_graph(ROOT, "lmkit").items():
        level, unit = _unit(module)
        for target in targets:
            target_level, target_unit = _unit(target)
            if target_unit != unit and target_level >= level:
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports that go up or sideways in the layers: " + ", ".join(wrong)


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(text))


def test_cycle_finder_sees_lazy_and_package_cycles(tmp_path):
    pkg = tmp_path / "pkg"
    _write(pkg, {
        "__init__.py": "from pkg.low import f\n",
        "low.py": """
            from typing import TYPE_CHECKING
            if TYPE_CHECKING:
                from pkg.high import H  # a type hint only: no edge
            def f():
                return 1
            """,
        "high.py": "from pkg.low import f\nclass H: ...\n",
        "sub/__init__.py": "from pkg.sub.a import A\n",
        "sub/a.py": "from . import b\nclass A: ...\n",
        "sub/b.py": "",
    })
    graph = import_graph(pkg, "pkg")
    assert graph["pkg.low"] == set()
    assert graph["pkg.high"] == {"pkg.low"}
    assert graph["pkg.sub.a"] == {"pkg.sub.b"}  # its own package is already running
    assert find_cycle(graph) is None

    _write(pkg, {"low.py": "def f():\n    from pkg.high import H  # lazy, still a cycle\n"})
    assert find_cycle(import_graph(pkg, "pkg")) == ["pkg.low", "pkg.high", "pkg.low"]

    # pkg.other imports pkg.sub.b, which runs pkg/sub/__init__ -> a -> ... -> pkg.other
    _write(pkg, {"low.py": "", "other.py": "import pkg.sub.b\n",
                 "sub/a.py": "from pkg.other import x\n"})
    assert find_cycle(import_graph(pkg, "pkg")) == ["pkg.other", "pkg.sub", "pkg.sub.a",
                                                    "pkg.other"]


# Imports every module named on the command line in a child forked from a process that holds
# only the heavy third-party libraries, so each lmkit module starts with no lmkit module loaded
# (as in a fresh interpreter) without paying torch's import time ~50 times.
_ISOLATED_IMPORTS = """
import importlib, os, sys, traceback
import numpy, safetensors, tokenizers, torch
assert not any(m == "lmkit" or m.startswith("lmkit.") for m in sys.modules)
failed = []
for name in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(name)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    if os.waitpid(pid, 0)[1] != 0:
        failed.append(name)
print("FAILED:", " ".join(failed))
"""


def test_every_module_imports_alone():
    modules = sorted(module_names(ROOT, "lmkit"))
    done = subprocess.run([sys.executable, "-c", _ISOLATED_IMPORTS, *modules],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    failed = done.stdout.split("FAILED:")[-1].split()
    assert not failed, f"these modules fail when imported alone: {failed}\n{done.stderr}"
