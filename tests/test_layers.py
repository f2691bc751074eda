"""The package's layers (README, "Layout"): every import of a rayattr module, at module level or
inside a function, points to the same layer or one below it, and no two units (a subpackage, or a
module at the top level) import each other, directly or round a circle; nor do two modules.

Read from the source with `ast`: nothing is imported, so this needs neither torch nor Ray.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "rayattr"

# bottom to top; config and errors are the public face every layer may import, and they
# import nothing but each other; `rayattr` itself is the package's __init__ (its version)
LAYERS = [
    {"rayattr", "config", "errors"},
    {"capture", "math", "runtime"},         # the math and capture; logging, test seams, joining Ray
    {"store", "data"},                      # the run's storage; the training data
    {"model", "optim"},                     # the model and its loss; the optimizer
    {"record"},                             # a rank's steps into the run
    {"train", "embed", "reduce", "integrations"},  # DeepSpeed ranks; segment actors; the reducer
    {"validate", "query", "report", "exact"},  # what a finished run answers
    {"pipeline", "plan"},                   # the stages in order, the job; estimates
    {"cli"},                                # the `rayattr` command
]
LAYER = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(path: Path, modules: set[str]) -> list[tuple[str, bool]]:
    """(module imported, only under `if TYPE_CHECKING:`) for every rayattr import in the file."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: list[tuple[str, bool]] = []

    def visit(node: ast.AST, typing_only: bool) -> None:
        if isinstance(node, ast.If) and _type_checking(node):
            for child in node.body:
                visit(child, True)
            for child in node.orelse:
                visit(child, typing_only)
            return
        if isinstance(node, ast.Import):
            out.extend((a.name, typing_only) for a in node.names if a.name.split(".")[0] == "rayattr")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "rayattr":
                # `from pkg import submodule` imports the submodule
                subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules]
                out.extend((m, typing_only) for m in subs or [target])
        for child in ast.iter_child_nodes(node):
            visit(child, typing_only)

    visit(ast.parse(path.read_text()), False)
    return out


def graph() -> dict[str, list[tuple[str, bool]]]:
    files = sorted(ROOT.rglob("*.py"))
    modules = {module_name(f) for f in files}
    return {module_name(f): imports(f, modules) for f in files}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            strong(v)
    return found


def test_every_unit_has_a_layer():
    units = {unit(m) for m in graph()}
    assert units <= set(LAYER), f"units without a layer (add them to LAYERS and the README): {sorted(units - set(LAYER))}"


def test_the_top_level_holds_only_the_public_face():
    top = sorted(p.name for p in ROOT.glob("*.py"))
    assert top == ["__init__.py", "cli.py", "config.py", "errors.py"], top


def test_imports_point_down():
    upward = [f"{m} -> {t} (layer {LAYER[unit(m)]} -> {LAYER[unit(t)]})"
              for m, targets in graph().items() for t, _ in targets
              if unit(t) != unit(m) and LAYER[unit(t)] > LAYER[unit(m)]]
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(sorted(set(upward)))


def test_no_import_cycles_between_units():
    edges: dict[str, set[str]] = {}
    for m, targets in graph().items():
        edges.setdefault(unit(m), set()).update(unit(t) for t, _ in targets if unit(t) != unit(m))
    assert not cycles(edges)


def test_no_import_cycles_between_modules():
    # a name imported only for a type annotation (`if TYPE_CHECKING:`) is never executed
    edges = {m: {t for t, typing_only in targets if not typing_only and t != m} for m, targets in graph().items()}
    found = cycles(edges)
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_check_finds_an_upward_import_and_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert LAYER["record"] < LAYER["train"] and LAYER["optim"] < LAYER["record"] and LAYER["config"] == 0


def test_reading_a_finished_run_imports_neither_torch_nor_ray():
    # what `rayattr values`, `show`, `runs` and `report` import; `query` computes (torch), on demand
    import subprocess
    import sys

    code = ("import sys, rayattr, rayattr.cli, rayattr.query.finished, rayattr.report.summary, "
            "rayattr.report.standing, rayattr.report.html, rayattr.store; "
            "print(sorted(m for m in ('torch', 'ray', 'deepspeed') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=ROOT.parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


# entry points print (results on stdout, errors and notes on stderr); library code logs under
# the `rayattr` logger, which an entry point shows (runtime/logs.show_warnings)
ENTRY_POINTS = {"rayattr.cli", "rayattr.pipeline.job", "rayattr.plan.estimate"}


def test_only_entry_points_print():
    printing = set()
    for path in ROOT.rglob("*.py"):
        tree = ast.parse(path.read_text())
        if any(isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "print"
               for n in ast.walk(tree)):
            printing.add(module_name(path))
    assert printing and printing <= ENTRY_POINTS, sorted(printing - ENTRY_POINTS)
