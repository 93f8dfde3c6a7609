"""The metadata filter language of search, parsed once and compiled to SQL.

A filter is a JSON object; every entry is one condition and all conditions must hold::

    {
      "lang": "en",                          equals (an array field matches if it contains it)
      "year": {"$gte": 2020, "$lt": 2025},   range: $gt $gte $lt $lte on numbers or strings
      "tags": {"$in": ["legal", "finance"]}, in: any of up to 100 values
      "reviewed_by": {"$exists": true}       exists: the field is present (or absent with false)
    }

Field names are the document's top-level metadata keys, taken verbatim (metadata is a flat
object, and its keys may contain dots).

Values are never spliced into SQL: each condition compiles to a fixed fragment with parameters.
Parsing errors are :class:`FilterError` whose message names the offending part
(``filters.year.$gte: ...``); the request schema turns them into a 422.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from psycopg import sql
from psycopg.types.json import Jsonb

MAX_CONDITIONS = 32
MAX_IN_VALUES = 100
MAX_FIELD_LENGTH = 128
MAX_STRING_LENGTH = 1024

RANGE_OPERATORS = {"$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<="}
OPERATORS = ("$eq", "$in", *RANGE_OPERATORS, "$exists")

Scalar = str | int | float | bool | None


class FilterError(ValueError):
    """A filter that cannot be used; the message names the offending part."""


@dataclass(frozen=True)
class Condition:
    """One parsed condition on the metadata field at ``path``.

    Attributes:
        path: the field's path in the metadata object (one key: metadata is flat).
        op: ``$eq``, ``$in``, ``$gt``, ``$gte``, ``$lt``, ``$lte`` or ``$exists``.
        value: the operand (a list for ``$in``, a bool for ``$exists``).
    """

    path: tuple[str, ...]
    op: str
    value: Any


def _where(field: str, op: str | None = None) -> str:
    return f"filters.{field}" + (f".{op}" if op else "")


def _scalar(value: Any, where: str) -> Scalar:
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise FilterError(f"{where}: numbers must be finite")
        return value
    if isinstance(value, str):
        if len(value) > MAX_STRING_LENGTH:
            raise FilterError(f"{where}: strings are limited to {MAX_STRING_LENGTH} characters")
        return value
    if isinstance(value, list):
        raise FilterError(f'{where}: a list is not a value here; use {{"$in": [...]}}')
    raise FilterError(
        f"{where}: expected a string, number, boolean or null, got {type(value).__name__}"
    )


def _path(field: str) -> tuple[str, ...]:
    if not isinstance(field, str) or not field:
        raise FilterError("filters: field names must be non-empty strings")
    if len(field) > MAX_FIELD_LENGTH:
        raise FilterError(f"filters.{field[:20]}...: field names are limited to 128 characters")
    if field.startswith("$"):
        raise FilterError(
            f"filters.{field}: operators go inside a field's object, e.g. "
            '{"year": {"$gte": 2020}}; conditions on different fields are always combined with AND'
        )
    return (field,)


def parse_filters(raw: Any) -> list[Condition]:
    """Parse and validate a filter object.

    Args:
        raw: the ``filters`` value of a search request (a JSON object, or None).

    Returns:
        The conditions, in a canonical order (by field, then operator).

    Raises:
        FilterError: when any part is invalid; the message names that part.
    """
    if raw is None:
        return []
    if not isinstance(raw, dict):
        raise FilterError(
            'filters: expected an object such as {"lang": "en"}, got ' + type(raw).__name__
        )
    out: list[Condition] = []
    for field, spec in raw.items():
        path = _path(field)
        if isinstance(spec, dict):
            if not spec:
                raise FilterError(f"{_where(field)}: empty object; give an operator or a value")
            for op, operand in spec.items():
                out.append(_operator(field, path, op, operand))
            ops = set(spec)
            if "$eq" in ops and len(ops) > 1:
                raise FilterError(f"{_where(field)}: $eq cannot be combined with other operators")
        else:
            out.append(Condition(path, "$eq", _scalar(spec, _where(field))))
    if len(out) > MAX_CONDITIONS:
        raise FilterError(f"filters: at most {MAX_CONDITIONS} conditions, got {len(out)}")
    out.sort(key=lambda c: (c.path, c.op))
    return out


def _operator(field: str, path: tuple[str, ...], op: Any, operand: Any) -> Condition:
    where = _where(field, str(op))
    if op == "$eq":
        return Condition(path, op, _scalar(operand, where))
    if op == "$in":
        if not isinstance(operand, list) or not operand:
            raise FilterError(f"{where}: expected a non-empty list of values")
        if len(operand) > MAX_IN_VALUES:
            raise FilterError(f"{where}: at most {MAX_IN_VALUES} values")
        values = [_scalar(v, f"{where}[{i}]") for i, v in enumerate(operand)]
        return Condition(path, op, values)
    if op in RANGE_OPERATORS:
        if isinstance(operand, bool) or not isinstance(operand, int | float | str):
            raise FilterError(
                f"{where}: expected a number or a string (ISO dates compare as strings), "
                f"got {json.dumps(operand)}"
            )
        return Condition(path, op, _scalar(operand, where))
    if op == "$exists":
        if not isinstance(operand, bool):
            raise FilterError(f"{where}: expected true or false")
        return Condition(path, op, operand)
    raise FilterError(f"{where}: unknown operator; use one of {', '.join(OPERATORS)}")


def canonical(conditions: list[Condition]) -> list[list[Any]]:
    """A JSON-able canonical form of parsed conditions (for cache keys)."""
    return [[list(c.path), c.op, c.value] for c in conditions]


def _nest(path: tuple[str, ...], value: Any) -> Any:
    for part in reversed(path):
        value = {part: value}
    return value


def compile_filters(
    conditions: list[Condition], column: sql.Composable
) -> tuple[list[sql.Composable], list[Any]]:
    """SQL fragments (to be AND-ed) and their parameters for ``conditions`` on ``column``.

    Args:
        conditions: parsed conditions.
        column: the jsonb expression holding the metadata (e.g. ``c.metadata``).

    Returns:
        ``(fragments, params)``: fragments use ``%s`` placeholders, params in the same order.
    """
    fragments: list[sql.Composable] = []
    params: list[Any] = []
    for c in conditions:
        path = list(c.path)
        if c.op in ("$eq", "$in"):
            # Containment of {"k": v} (an equal scalar) or {"k": [v]} (a list holding v).
            values = c.value if c.op == "$in" else [c.value]
            fragments.append(sql.SQL("{} @> ANY(%s::jsonb[])").format(column))
            params.append([Jsonb(_nest(c.path, f)) for v in values for f in (v, [v])])
        elif c.op in RANGE_OPERATORS:
            # jsonb comparison orders numbers numerically and strings by collation; the type
            # check keeps "2021" (a string) from comparing with 2020 (a number) at all.
            kind = "string" if isinstance(c.value, str) else "number"
            fragments.append(
                sql.SQL(
                    "(jsonb_typeof({col} #> %s::text[]) = %s AND {col} #> %s::text[] {op} %s)"
                ).format(col=column, op=sql.SQL(RANGE_OPERATORS[c.op]))
            )
            params.extend([path, kind, path, Jsonb(c.value)])
        elif c.op == "$exists":
            test = "IS NOT NULL" if c.value else "IS NULL"
            fragments.append(sql.SQL("({} #> %s::text[]) " + test).format(column))
            params.append(path)
        else:  # pragma: no cover - parse_filters admits nothing else
            raise FilterError(f"unsupported operator {c.op}")
    return fragments, params
