"""Imports go at the top of the module; one inside a function says why, in a comment on its
line or the line above (docs/decisions/0014-import-rules.md, rule 5).

A run of imports right under one such comment shares it. A tool's pragma alone (``# noqa``,
``# type: ignore``, ``# nosec``) is no reason. Imports under ``if TYPE_CHECKING:`` at module
level are not in a function and are not checked.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "atrium"

_PRAGMA = re.compile(
    r"noqa(:\s*[A-Z]+\d+(\s*,\s*[A-Z]+\d+)*)?|type:\s*ignore(\[[^\]]*\])?|nosec(\s+B\d+)*"
)


def _comments(source: str) -> tuple[set[int], set[int]]:
    """Lines with a comment that says something (more than a pragma), and of those the lines
    that hold nothing but the comment."""
    said: set[int] = set()
    alone: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type != tokenize.COMMENT:
            continue
        if _PRAGMA.sub("", tok.string.lstrip("#")).strip(" #"):
            said.add(tok.start[0])
            if not tok.line[: tok.start[1]].strip():
                alone.add(tok.start[0])
    return said, alone


def unexplained_imports(source: str) -> list[int]:
    """The lines of the imports written inside a function with no comment saying why."""
    said, alone = _comments(source)
    found: list[int] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        explained_above: ast.stmt | None = None
        for child in ast.iter_child_nodes(node):
            if in_function and isinstance(child, ast.Import | ast.ImportFrom):
                explained = (
                    child.lineno in said
                    or child.lineno - 1 in alone
                    or (
                        explained_above is not None
                        and explained_above.end_lineno == child.lineno - 1
                    )
                )
                if not explained:
                    found.append(child.lineno)
                explained_above = child if explained else None
                continue
            explained_above = None
            visit(child, in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef))

    visit(ast.parse(source), False)
    return found


def test_the_check_finds_an_import_without_a_reason() -> None:
    source = """
import os

if TYPE_CHECKING:
    import json


def bare():
    import re


def pragma_only():
    import onnx  # noqa: F401


def reasoned():
    # lazy: only a build needs it
    import onnx
    from onnxruntime import quantization


def inline():
    import litellm  # lazy: several seconds to import


def not_a_block():
    # lazy: the first one only
    import a

    import b


class Thing:
    def method(self):
        try:
            import c
        except ImportError:
            pass

        def inner():
            import d  # lazy: optional
"""
    lines = source.splitlines()
    assert [lines[n - 1].strip() for n in unexplained_imports(source)] == [
        "import re",
        "import onnx  # noqa: F401",
        "import b",
        "import c",
    ]


def test_every_import_inside_a_function_says_why() -> None:
    missing = [
        f"{path.relative_to(SRC.parents[1])}:{line}"
        for path in sorted(SRC.rglob("*.py"))
        for line in unexplained_imports(path.read_text(encoding="utf-8"))
    ]
    assert not missing, (
        "imports inside functions without a comment saying why (move them to the top of the "
        "module, or say why they are lazy on the line or just above): " + ", ".join(missing)
    )
