"""The code keeps the shape a newcomer can read: short modules, short functions, rooms named for what they hold.

Measured on the source alone (the `ast` module), over every module of src/dhow except the generated gRPC
stubs, which are not ours to shape.

- A module's length is its number of lines.
- A function's length is the lines from its `def` (decorators not counted) to the end of its body, blank
  lines and comments included, less the lines of its docstring. Every `def` and `async def` counts, methods
  and nested functions too (a nested function's lines count in its parent as well).
- p90 is the nearest-rank 90th percentile of those lengths: 90% of functions are at most that long.
"""

from __future__ import annotations

import ast
import math
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "dhow"
GENERATED = PACKAGE / "protocols" / "grpc" / "generated"
MAX_MODULE_LINES = 500
MAX_FUNCTION_P90 = 25
GRAB_BAGS = {"util", "utils", "helper", "helpers", "misc", "common", "tool", "tools"}


# Issue 11 ("One way in") brings these back in shape; remove a marker when its check passes (strict: a check
# that passes while marked fails the run, so the marker cannot outlive the fix).
@dataclass(frozen=True)
class Function:
    where: str  # path:line
    name: str
    lines: int


def _modules() -> list[Path]:
    return sorted(path for path in PACKAGE.rglob("*.py") if GENERATED not in path.parents)


def _name(path: Path) -> str:
    return str(path.relative_to(PACKAGE.parents[1]))


def _docstring_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        return (first.end_lineno or first.lineno) - first.lineno + 1
    return 0


def _is_grab_bag(relative: Path) -> bool:
    """Whether a module or a package on its path is named like a grab bag (`utils.py`, `_helpers/x.py`)."""
    return any(part.lstrip("_").removesuffix(".py") in GRAB_BAGS for part in relative.parts)


def _functions() -> list[Function]:
    found = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1 - _docstring_lines(node)
                found.append(Function(f"{_name(path)}:{node.lineno}", node.name, lines))
    return found


def _p90(values: list[int]) -> int:
    ordered = sorted(values)
    return ordered[math.ceil(0.9 * len(ordered)) - 1]


def test_no_module_over_500_lines() -> None:
    lengths = {_name(path): len(path.read_text().splitlines()) for path in _modules()}
    offenders = sorted(((n, name) for name, n in lengths.items() if n > MAX_MODULE_LINES), reverse=True)
    if offenders:
        listing = "\n".join(f"  {n:5d}  {name}" for n, name in offenders)
        pytest.fail(f"modules over {MAX_MODULE_LINES} lines (split them by concept):\n{listing}", pytrace=False)


def test_function_length_p90() -> None:
    functions = _functions()
    assert len(functions) > 100, f"found only {len(functions)} functions under {PACKAGE}: is the path right?"
    p90 = _p90([f.lines for f in functions])
    offenders = sorted((f for f in functions if f.lines > MAX_FUNCTION_P90), key=lambda f: -f.lines)
    if p90 > MAX_FUNCTION_P90:
        listing = "\n".join(f"  {f.lines:4d}  {f.where}  {f.name}" for f in offenders)
        pytest.fail(
            f"function-length p90 is {p90} lines over {len(functions)} functions (at most {MAX_FUNCTION_P90}); "
            f"the {len(offenders)} functions over {MAX_FUNCTION_P90} lines, longest first:\n{listing}",
            pytrace=False,
        )


def test_no_grab_bag_module_names() -> None:
    offenders = [_name(path) for path in _modules() if _is_grab_bag(path.relative_to(PACKAGE))]
    assert not offenders, f"name these for what they hold ({', '.join(sorted(GRAB_BAGS))} say nothing): {offenders}"


def test_measures_count_what_they_say() -> None:
    """The rules themselves: def line to end, docstring left out; nearest-rank p90; grab bags at any depth."""
    source = 'def f(x):\n    """Two\n    lines."""\n\n    # why\n    return x\n'
    node = ast.parse(source).body[0]
    assert isinstance(node, ast.FunctionDef)
    assert node.end_lineno is not None
    assert node.end_lineno - node.lineno + 1 - _docstring_lines(node) == 4
    assert _p90(list(range(1, 11))) == 9
    assert _p90([5] * 9 + [100]) == 5
    assert _is_grab_bag(Path("serving/utils.py"))
    assert _is_grab_bag(Path("_helpers/codec.py"))
    assert not _is_grab_bag(Path("serving/dataplane.py"))
