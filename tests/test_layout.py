"""The package's layering: the engine knows no file format, the solvers know no model."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "quantkit"
TESTS = Path(__file__).resolve().parent
# The test modules every test may import; a test module importing another couples their fixtures and skips.
SHARED_TEST_MODULES = {"helpers", "conftest"}
# The environment variables the package reads that are its own: user settings, none for tests (faults are
# injected through quantkit.engine.comm.Hooks and test Comms, not through the environment).
PACKAGE_VARIABLES = {"QUANTKIT_DEBUG", "QUANTKIT_TEXT_DATA", "QUANTKIT_IMAGE_DATA"}


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


@pytest.mark.parametrize("package, forbidden", [
    ("engine", ("quantkit.export",)),
    ("quant", ("quantkit.models", "quantkit.engine")),
])
def test_package_does_not_import(package: str, forbidden: tuple[str, ...]) -> None:
    offenders = [
        f"{path.relative_to(PACKAGE.parent)} imports {module}"
        for path in sorted((PACKAGE / package).rglob("*.py"))
        for module in sorted(imported_modules(path))
        if any(module == f or module.startswith(f + ".") for f in forbidden)
    ]
    assert not offenders, offenders


def test_layerwise_and_vision_do_not_import_each_other() -> None:
    engine = PACKAGE / "engine"
    assert "quantkit.engine.vision" not in imported_modules(engine / "layerwise.py")
    assert "quantkit.engine.layerwise" not in imported_modules(engine / "vision.py")


def test_no_method_name_compared_outside_the_registry() -> None:
    """Method behaviour comes from quantkit.quant.methods, not from comparing names."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "methods.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare) and any(isinstance(op, (ast.Eq, ast.NotEq, ast.In, ast.NotIn)) for op in node.ops):
                operands = [node.left, *node.comparators]
                names = [c.value for c in operands if isinstance(c, ast.Constant)]
                about_methods = any("method" in ast.unparse(c) for c in operands if not isinstance(c, ast.Constant))
                if about_methods and any(name in ("rtn", "gptq", "tlq") for name in names):
                    offenders.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert not offenders, offenders


def test_no_test_module_imports_another() -> None:
    """What tests share lives in tests/helpers.py (and conftest.py), not in another test module."""
    test_modules = {path.stem for path in TESTS.glob("*.py")} - SHARED_TEST_MODULES
    offenders = []
    for path in sorted(TESTS.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                offenders.append(f"{path.name}:{node.lineno} imports relatively")
        for module in sorted(imported_modules(path)):
            top = module.split(".")[0]
            if top == "tests" or top in test_modules:
                offenders.append(f"{path.name} imports {module}")
    assert not offenders, offenders


def test_package_reads_no_test_only_environment_variables() -> None:
    """Fault injection (failing or delaying a layer, splitting rows) is not switched on by the environment."""
    offenders = sorted(
        f"{path.relative_to(PACKAGE.parent)}: {name}"
        for path in PACKAGE.rglob("*.py")
        for name in set(re.findall(r"QUANTKIT_[A-Z0-9_]+", path.read_text()))
        if name not in PACKAGE_VARIABLES
    )
    assert not offenders, offenders


def test_no_format_name_compared_outside_the_formats() -> None:
    """Format behaviour comes from the Format objects in quantkit/export/formats, not from comparing names."""
    from quantkit.export.formats import FORMATS

    def names_in(node: ast.AST) -> list[str]:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return [node.value]
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return [n for elt in node.elts for n in names_in(elt)]
        return []

    offenders = []
    formats_dir = PACKAGE / "export" / "formats"
    for path in sorted(PACKAGE.rglob("*.py")):
        if formats_dir in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            compared: list[str] = []
            if isinstance(node, ast.Compare):
                compared = [n for operand in (node.left, *node.comparators) for n in names_in(operand)]
                compared = [n for n in compared if n in FORMATS]
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("startswith", "endswith"):
                prefixes = [n for arg in node.args for n in names_in(arg)]
                compared = [p for p in prefixes if len(p) >= 3 and any(f.startswith(p) or f.endswith(p) for f in FORMATS)]
            if compared:
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {compared}")
    assert not offenders, offenders
