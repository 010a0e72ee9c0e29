"""The package's floors hold: no import circle, no import from a lower floor up to a higher one, no module over
450 lines, no public function over 12 parameters. Imports inside functions count as much as those at the top."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "quantkit"

# The floors, lowest first; a module may import its own floor and the floors below it. A room is a top-level
# module or package of quantkit; every command (a room's cli.py, quantkit/cli.py, the API) sits on the top floor.
FLOORS = (
    {"errors", "bounds", "fsutil", "readers", "memory", "cli_options", "version"},  # what every room may use
    {"quant", "models"},  # solvers on tensors; adapters derived from models (neither imports the other)
    {"data"},  # calibration and evaluation data
    {"engine"},  # the layer-wise loop
    {"importance", "export", "planner"},  # TLQ's token weights; formats, writing, reading, loading; what a run will need
    {"eval", "train"},  # loss, tasks; the demo's trainer
    {"calibrate"},  # one calibration job: its specs, preflight and run
    {"qid", "demo"},  # what is built on calibrating and evaluating
    {"commands"},  # every command, the API and the package's lazy entry points
)
MAX_LINES = 450
MAX_PARAMETERS = 12


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def room(module: str) -> str:
    """A module's room; commands have their own."""
    parts = module.split(".")
    if len(parts) == 1 or parts[-1] == "cli" or parts[1] in ("cli", "api"):
        return "commands"
    return parts[1]


def floor(module: str) -> int:
    name = room(module)
    return next(level for level, rooms in enumerate(FLOORS) if name in rooms)


def defined_in(package: str, name: str) -> str:
    """The module a name imported from `package` comes from: a submodule, the submodule a package's __init__
    re-exports it from, or the package itself."""
    if f"{package}.{name}" in MODULES:
        return f"{package}.{name}"
    path = MODULES.get(package)
    if path is not None and path.name == "__init__.py":
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.module in MODULES and any(
                    (alias.asname or alias.name) == name for alias in node.names):
                return node.module
    return package


def imports(module: str) -> set[str]:
    """The quantkit modules `module` imports, at any depth, each name traced to the module that defines it."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in MODULES)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in MODULES:
            found.update(defined_in(node.module, alias.name) for alias in node.names)
    found.discard(module)
    return found


GRAPH = {module: imports(module) for module in MODULES}


def test_every_room_has_a_floor() -> None:
    rooms = {room(module) for module in MODULES}
    assert rooms <= set().union(*FLOORS), sorted(rooms - set().union(*FLOORS))


def test_no_import_from_a_lower_floor_to_a_higher_one() -> None:
    offenders = [f"{module} ({room(module)}) imports {target} ({room(target)})"
                 for module, targets in GRAPH.items() for target in sorted(targets) if floor(target) > floor(module)]
    assert not offenders, offenders


def test_no_import_circle() -> None:
    """Tarjan's strongly connected components of the module graph: every one is a single module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in GRAPH[module]:
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for module in sorted(GRAPH):
        if module not in index:
            visit(module)
    assert not circles, circles


def test_no_module_over_the_line_limit() -> None:
    long = {module: n for module, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_no_public_function_over_the_parameter_limit() -> None:
    """Options travel as objects (quantkit.calibrate.job's specs, a QuantSpec, a Method), not retyped lists;
    a command takes its options as **options."""
    offenders = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
                args = node.args
                names = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]
                count = len([n for n in names if n not in ("self", "cls")])
                if count > MAX_PARAMETERS:
                    offenders.append(f"{module}.{node.name}: {count}")
    assert not offenders, offenders
