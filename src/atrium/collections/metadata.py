"""User metadata on collections and documents: a small, flat JSON object.

Document metadata is copied onto every chunk, where search filters read it, so it is kept
small and flat: string keys, and values that are strings, numbers, booleans, null or lists of
those.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any

from pydantic import BeforeValidator, Field

MAX_KEYS = 32
MAX_KEY_LENGTH = 64
MAX_STRING_LENGTH = 1000
MAX_LIST_ITEMS = 64
MAX_BYTES = 8192

_SCALARS = (str, int, float, bool)


def _check_scalar(key: str, value: Any, where: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where}.{key} must be a finite number")
    if isinstance(value, str) and len(value) > MAX_STRING_LENGTH:
        raise ValueError(f"{where}.{key} is longer than {MAX_STRING_LENGTH} characters")


def validate_metadata(value: Any, where: str = "metadata") -> dict[str, Any]:
    """Check that ``value`` is a small flat JSON object and return it.

    Args:
        value: the parsed JSON value.
        where: the field name used in messages.

    Raises:
        ValueError: with a message saying what to change.
    """
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f'{where} must be a JSON object, e.g. {{"source": "wiki"}}')
    if len(value) > MAX_KEYS:
        raise ValueError(f"{where} has {len(value)} keys; at most {MAX_KEYS} are allowed")
    for key, item in value.items():
        if not isinstance(key, str) or not key or len(key) > MAX_KEY_LENGTH:
            raise ValueError(f"{where} keys must be strings of 1 to {MAX_KEY_LENGTH} characters")
        if item is None or isinstance(item, _SCALARS):
            _check_scalar(key, item, where)
        elif isinstance(item, list):
            if len(item) > MAX_LIST_ITEMS:
                raise ValueError(f"{where}.{key} has more than {MAX_LIST_ITEMS} items")
            for element in item:
                if not isinstance(element, _SCALARS):
                    raise ValueError(f"{where}.{key} may only list strings, numbers or booleans")
                _check_scalar(key, element, where)
        else:
            raise ValueError(
                f"{where}.{key} must be a string, number, boolean, null or a list of those "
                "(nested objects are not allowed)"
            )
    size = len(json.dumps(value, ensure_ascii=False).encode())
    if size > MAX_BYTES:
        raise ValueError(f"{where} is {size} bytes as JSON; at most {MAX_BYTES} are allowed")
    return value


def parse_metadata_json(raw: str | None, where: str = "metadata") -> dict[str, Any]:
    """Parse metadata sent as a JSON string (a multipart form field) and validate it.

    Raises:
        ValueError: when it is not JSON or not a small flat object.
    """
    if raw is None or not raw.strip():
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where} is not valid JSON ({exc.msg} at character {exc.pos})") from None
    return validate_metadata(value, where)


#: A pydantic field type for metadata in request bodies.
Metadata = Annotated[
    dict[str, Any],
    BeforeValidator(validate_metadata),
    Field(
        description=(
            f"A flat JSON object: at most {MAX_KEYS} keys; values are strings, numbers, "
            f"booleans, null or lists of those; at most {MAX_BYTES} bytes."
        ),
        examples=[{"source": "handbook", "year": 2024, "tags": ["hr", "policy"]}],
    ),
]
