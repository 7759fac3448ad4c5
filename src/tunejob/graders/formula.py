"""A multi grader's `calculate_output`: arithmetic over its sub-graders' scores, read with Python's
`ast` and evaluated by walking the tree over a whitelist of node types. Never `eval`: the formula
comes from whoever sends a grader (an API caller of `tunejob serve` included).

OpenAI's graders guide lists what a formula may use: the keys of `graders` as variables, the
operators + - * / ^ (power), and the functions min, max, abs, floor, ceil, exp, sqrt, log.
`^` is power there, as in math: it is read as Python's `**`, which also binds as math does
(`2 * x ^ 2` is 2·x², `-x ^ 2` is -(x²)); Python's own `^` would bind looser than `+`. `**` itself
is accepted too. Numbers are evaluated as floats, so `10 ^ 10 ^ 10` overflows at once instead of
building a billion-digit integer.
"""

from __future__ import annotations

import ast
import math

FUNCTIONS = {"min": min, "max": max, "abs": abs, "floor": math.floor, "ceil": math.ceil, "exp": math.exp,
             "sqrt": math.sqrt, "log": math.log}
_BINARY = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
           ast.Div: lambda a, b: a / b, ast.Pow: math.pow}  # math.pow: (-8) ^ 0.5 is an error, not a complex number
_UNARY = {ast.UAdd: lambda a: +a, ast.USub: lambda a: -a}
MAX_LENGTH = 2000  # characters; a formula over a handful of graders is tens of characters
ALLOWED = "use numbers, the graders' keys, + - * / ^ ( ) and min, max, abs, floor, ceil, exp, sqrt, log"


class FormulaError(ValueError):
    """A formula that cannot be used (check time) or cannot be computed for a sample (run time)."""


def parse(text: str, names: set[str]) -> ast.Expression:
    """The formula's tree, every node checked; FormulaError naming the first thing not allowed."""
    if len(text) > MAX_LENGTH:
        raise FormulaError(f"{len(text)} characters; keep it under {MAX_LENGTH}")
    try:
        tree = ast.parse(text.replace("^", "**").strip(), mode="eval")
    except SyntaxError as exc:
        raise FormulaError(f"cannot parse {text!r} ({exc.msg} at character {exc.offset}); {ALLOWED}") from None
    except (RecursionError, MemoryError):
        raise FormulaError("nested too deeply; write it flatter") from None
    _check(tree.body, names)
    return tree


def _check(node: ast.AST, names: set[str]) -> None:
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        _check(node.left, names)
        _check(node.right, names)
    elif isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        _check(node.operand, names)
    elif isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            raise FormulaError(f"{node.value!r} is not a number; {ALLOWED}")
    elif isinstance(node, ast.Name):
        if node.id not in names:
            known = ", ".join(sorted(names)) or "none"
            hint = f"{node.id}(...) is a function: call it" if node.id in FUNCTIONS else f"graders has no key {node.id!r}"
            raise FormulaError(f"{hint}; the graders' keys are: {known}")
    elif isinstance(node, ast.Call):
        _check_call(node, names)
    else:
        raise FormulaError(f"{_describe(node)} is not allowed; {ALLOWED}")


def _check_call(node: ast.Call, names: set[str]) -> None:
    if not isinstance(node.func, ast.Name):
        raise FormulaError(f"calling {_describe(node.func)} is not allowed; {ALLOWED}")
    if node.func.id not in FUNCTIONS:
        raise FormulaError(f"{node.func.id}() is not one of the functions min, max, abs, floor, ceil, exp, sqrt, log")
    fn = node.func.id
    if node.keywords or any(isinstance(a, ast.Starred) for a in node.args):
        raise FormulaError(f"{fn}() takes plain arguments, no keywords or *args")
    if fn in ("min", "max") and len(node.args) < 2:
        raise FormulaError(f"{fn}() needs two or more arguments")
    if fn not in ("min", "max") and len(node.args) != 1:
        raise FormulaError(f"{fn}() takes one argument, got {len(node.args)}")
    for arg in node.args:
        _check(arg, names)


def _describe(node: ast.AST) -> str:
    kinds = {ast.Attribute: "attribute access (a.b)", ast.Subscript: "indexing (a[b])", ast.Lambda: "lambda",
             ast.Compare: "a comparison", ast.BoolOp: "and/or", ast.IfExp: "if/else", ast.BinOp: "that operator",
             ast.UnaryOp: "that operator"}
    return kinds.get(type(node), type(node).__name__)


def evaluate(tree: ast.Expression, values: dict[str, float]) -> float:
    """The formula's value for one sample's sub-scores; FormulaError when arithmetic fails
    (division by zero, log of 0, overflow) or the result is not a finite number."""
    try:
        result = float(_value(tree.body, values))
    except ZeroDivisionError:
        raise FormulaError("division by zero") from None
    except (OverflowError, ValueError) as exc:
        raise FormulaError(f"math error ({exc})") from None
    if not math.isfinite(result):
        raise FormulaError(f"the result is {result}, not a finite number")
    return result


def _value(node: ast.AST, values: dict[str, float]) -> float:
    if isinstance(node, ast.BinOp):
        return _BINARY[type(node.op)](_value(node.left, values), _value(node.right, values))
    if isinstance(node, ast.UnaryOp):
        return _UNARY[type(node.op)](_value(node.operand, values))
    if isinstance(node, ast.Constant):
        return float(node.value)
    if isinstance(node, ast.Name):
        return float(values[node.id])
    args = [_value(a, values) for a in node.args]  # an ast.Call, checked by parse
    return float(FUNCTIONS[node.func.id](*args))
