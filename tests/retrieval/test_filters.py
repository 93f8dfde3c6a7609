"""The metadata filter language: parsing, canonical form, and the SQL it compiles to."""

from __future__ import annotations

from typing import Any

import pytest
from psycopg import sql

from atrium.retrieval.filters import (
    MAX_IN_VALUES,
    Condition,
    FilterError,
    canonical,
    compile_filters,
    parse_filters,
)


def test_parse_accepts_every_operator_in_canonical_order() -> None:
    conditions = parse_filters(
        {
            "year": {"$lt": 2025, "$gte": 2020},
            "lang": "en",
            "tags": {"$in": ["a", 1, True]},
            "draft": {"$exists": False},
            "score": {"$gt": 0.5, "$lte": 1},
            "note": None,
            "a.b": {"$eq": "dots are part of the key"},
        }
    )
    assert [(c.path, c.op) for c in conditions] == [
        (("a.b",), "$eq"),
        (("draft",), "$exists"),
        (("lang",), "$eq"),
        (("note",), "$eq"),
        (("score",), "$gt"),
        (("score",), "$lte"),
        (("tags",), "$in"),
        (("year",), "$gte"),
        (("year",), "$lt"),
    ]
    # The same filter written in another key order has the same canonical form (cache keys).
    again = parse_filters({"year": {"$gte": 2020, "$lt": 2025}, "lang": {"$eq": "en"}})
    assert canonical(again) == canonical(
        [c for c in conditions if c.path in (("year",), ("lang",))]
    )
    assert parse_filters(None) == [] and parse_filters({}) == []


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ([{"lang": "en"}], "filters: expected an object"),
        ("lang=en", "filters: expected an object"),
        ({"": 1}, "non-empty"),
        ({"x" * 200: 1}, "limited to 128"),
        ({"$and": []}, "filters.$and: operators go inside"),
        ({"lang": ["en", "de"]}, 'filters.lang: a list is not a value here; use {"$in"'),
        ({"lang": {"x": 1}}, "filters.lang.x: unknown operator"),
        ({"lang": {"$regex": "e.*"}}, "filters.lang.$regex: unknown operator"),
        ({"lang": {}}, "filters.lang: empty object"),
        ({"year": {"$gt": None}}, "filters.year.$gt: expected a number or a string"),
        ({"year": {"$gt": [1]}}, "filters.year.$gt: expected a number or a string"),
        ({"year": {"$lt": False}}, "filters.year.$lt"),
        ({"year": float("inf")}, "filters.year: numbers must be finite"),
        ({"tags": {"$in": []}}, "filters.tags.$in: expected a non-empty list"),
        ({"tags": {"$in": [{"a": 1}]}}, "filters.tags.$in[0]: expected a string"),
        ({"tags": {"$in": list(range(MAX_IN_VALUES + 1))}}, f"at most {MAX_IN_VALUES}"),
        ({"x": {"$exists": 1}}, "filters.x.$exists: expected true or false"),
        ({"x": {"$eq": 1, "$gt": 0}}, "$eq cannot be combined"),
        ({"x": "y" * 2000}, "limited to 1024 characters"),
        ({f"k{i}": i for i in range(40)}, "at most 32 conditions"),
    ],
)
def test_parse_rejects_with_a_message_naming_the_part(raw: Any, message: str) -> None:
    with pytest.raises(FilterError) as info:
        parse_filters(raw)
    assert message in str(info.value)


def _render(conditions: list[Condition]) -> tuple[str, list[Any]]:
    fragments, params = compile_filters(conditions, sql.SQL("m"))
    return " AND ".join(f.as_string(None) for f in fragments), params


def test_compiled_sql_holds_no_values() -> None:
    evil = "x'); DROP TABLE chunks; --"
    text, params = _render(
        parse_filters(
            {evil: evil, "tags": {"$in": [evil]}, "y": {"$gte": evil}, "z": {"$exists": True}}
        )
    )
    assert "DROP" not in text
    assert text.count("%s") == len(params)
    assert "m @> ANY(%s::jsonb[])" in text
    assert "jsonb_typeof(m #> %s::text[]) = %s" in text
    assert "(m #> %s::text[]) IS NOT NULL" in text
    # Equality matches a scalar or a list holding the value: two containment forms.
    forms = [
        [p.obj for p in param]
        for param in params
        if isinstance(param, list) and hasattr(param[0], "obj")
    ]
    assert [{evil: evil}, {evil: [evil]}] in forms
    assert [{"tags": evil}, {"tags": [evil]}] in forms
