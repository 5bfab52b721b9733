"""The suite checks itself: every test function asserts something.

A test passes this check when its body holds an ``assert``, uses ``pytest.raises`` / ``pytest.warns``
or ``numpy.testing.assert_*``,
or calls a helper of the suite that does (helpers are followed to a fixed point, across files:
``assert_clean_error`` in test_cli.py counts for the tests that import it)."""

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _functions() -> dict[str, list[ast.FunctionDef]]:
    out: dict[str, list[ast.FunctionDef]] = {}
    for f in sorted(TESTS.rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                node.file = f  # type: ignore[attr-defined]
                out.setdefault(node.name, []).append(node)
    return out


def _direct(fn: ast.AST) -> bool:
    for node in ast.walk(fn):
        if isinstance(node, ast.Assert):
            return True
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Attribute) and f.attr in ("raises", "warns", "fail") and getattr(f.value, "id", "") == "pytest":
                return True
            if isinstance(f, ast.Attribute) and f.attr.startswith("assert_"):  # np.testing.assert_allclose, ...
                return True
    return False


def _called(fn: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(fn):
        if isinstance(node, ast.Call):
            f = node.func
            names.add(f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else "")
    return names


def test_every_test_function_asserts():
    functions = _functions()
    asserting = {name for name, defs in functions.items() if all(_direct(d) for d in defs)}
    changed = True
    while changed:  # helpers that call asserting helpers assert too
        changed = False
        for name, defs in functions.items():
            if name not in asserting and all(_direct(d) or _called(d) & asserting for d in defs):
                asserting.add(name)
                changed = True
    tests = [d for name, defs in functions.items() if name.startswith("test_") for d in defs]
    assert len(tests) > 150  # the walk found the suite
    silent = [f"{d.file.name}::{d.name}" for d in tests if not (_direct(d) or _called(d) & asserting)]
    assert silent == [], f"test functions that assert nothing: {silent}"


def test_the_check_catches_a_silent_test():
    tree = ast.parse("def test_x():\n    compile_model()\n\ndef test_y():\n    assert 1\n")
    x, y = tree.body
    assert not _direct(x) and _direct(y) and _called(x) == {"compile_model"}
