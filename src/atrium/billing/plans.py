"""Plans: what each tenant may use, read from ``config/plans.toml``.

A plan is a set of :class:`Limit` values; ``None`` means unlimited. A superuser may override any
limit for one tenant; :func:`effective_limits` merges the plan with those overrides.
"""

from __future__ import annotations

import enum
import tomllib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from atrium.config import get_settings

#: The plans file shipped with the source tree (``config/plans.toml`` at the repository root).
BUNDLED_PLANS_FILE = Path(__file__).resolve().parents[3] / "config" / "plans.toml"

UNLIMITED = "unlimited"


class Limit(enum.StrEnum):
    """A limit a plan sets. Counted limits are levels; ``*_per_month`` reset each period."""

    members = "members"
    collections = "collections"
    documents = "documents"
    stored_bytes = "stored_bytes"
    chunks = "chunks"
    searches_per_month = "searches_per_month"
    answers_per_month = "answers_per_month"
    llm_tokens_per_month = "llm_tokens_per_month"
    embedding_tokens_per_month = "embedding_tokens_per_month"
    requests_per_minute_per_key = "requests_per_minute_per_key"
    requests_per_minute_per_user = "requests_per_minute_per_user"
    max_upload_bytes = "max_upload_bytes"


class PlanConfigError(ValueError):
    """The plans file is invalid; the message names the plan and the limit."""


@dataclass(frozen=True)
class Plan:
    """One plan of ``plans.toml``.

    Attributes:
        name: the id stored in ``tenants.plan`` (``free``, ``pro``...).
        title: the name shown to people.
        description: one sentence.
        price_usd_per_month: list price (0 for free or contract-priced plans).
        limits: every :class:`Limit`, ``None`` meaning unlimited.
    """

    name: str
    title: str
    description: str
    price_usd_per_month: float
    limits: dict[Limit, int | None] = field(default_factory=dict)


@dataclass(frozen=True)
class PlanCatalog:
    """All plans and the one new tenants get."""

    plans: dict[str, Plan]
    default_plan: str

    def get(self, name: str) -> Plan:
        """The plan called ``name``; an unknown name (a plan removed from the file) falls back
        to the default plan so a tenant is never left without limits."""
        return self.plans.get(name) or self.plans[self.default_plan]


def parse_limit_value(plan: str, key: str, value: Any) -> int | None:
    """A limit from TOML or JSON: a non-negative integer, or ``"unlimited"`` / ``None``.

    Raises:
        PlanConfigError: for anything else.
    """
    if value is None or value == UNLIMITED:
        if key == Limit.max_upload_bytes.value:
            raise PlanConfigError(
                f"plan '{plan}': max_upload_bytes must be a number of bytes (uploads are never "
                "unlimited: the API and the proxies size their request limits from it)"
            )
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise PlanConfigError(
            f"plan '{plan}': {key} must be a non-negative integer or \"unlimited\", got {value!r}"
        )
    return value


def _parse(data: dict[str, Any], source: str) -> PlanCatalog:
    raw_plans = data.get("plans")
    if not isinstance(raw_plans, dict) or not raw_plans:
        raise PlanConfigError(f"{source}: no [plans.<name>] tables")
    plans: dict[str, Plan] = {}
    for name, raw in raw_plans.items():
        if not isinstance(raw, dict):
            raise PlanConfigError(f"{source}: plans.{name} must be a table")
        unknown = set(raw) - {"title", "description", "price_usd_per_month"} - set(Limit)
        if unknown:
            raise PlanConfigError(f"plan '{name}': unknown keys {sorted(unknown)}")
        limits: dict[Limit, int | None] = {}
        for limit in Limit:
            if limit.value not in raw:
                raise PlanConfigError(f"plan '{name}': missing limit {limit.value}")
            limits[limit] = parse_limit_value(name, limit.value, raw[limit.value])
        plans[name] = Plan(
            name=name,
            title=str(raw.get("title", name.title())),
            description=str(raw.get("description", "")),
            price_usd_per_month=float(raw.get("price_usd_per_month", 0)),
            limits=limits,
        )
    default = str(data.get("default_plan", "free"))
    if default not in plans:
        raise PlanConfigError(f"{source}: default_plan '{default}' is not defined")
    return PlanCatalog(plans=plans, default_plan=default)


def load_plans(path: Path | None = None) -> PlanCatalog:
    """Read and validate a plans file (the bundled one when ``path`` is None).

    Raises:
        PlanConfigError: when the file is invalid.
    """
    path = path or BUNDLED_PLANS_FILE
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PlanConfigError(f"plans file not found: {path} (set ATRIUM_PLANS_FILE)") from None
    except tomllib.TOMLDecodeError as exc:
        raise PlanConfigError(f"{path}: {exc}") from None
    return _parse(data, str(path))


@lru_cache(maxsize=4)
def _cached(path: str) -> PlanCatalog:
    return load_plans(Path(path) if path else None)


def largest_upload(catalog: PlanCatalog) -> int:
    """The largest document any plan of ``catalog`` accepts, in bytes (plans never leave it
    unlimited, see :func:`parse_limit_value`)."""
    return max(plan.limits[Limit.max_upload_bytes] or 0 for plan in catalog.plans.values())


def get_catalog() -> PlanCatalog:
    """The process-wide plan catalog, from ``ATRIUM_PLANS_FILE`` or the bundled file."""
    configured = get_settings().plans_file
    return _cached(str(configured) if configured else "")


def effective_limits(plan: Plan, overrides: dict[str, int | None]) -> dict[Limit, int | None]:
    """The plan's limits with a tenant's overrides applied (an override may be ``None``:
    unlimited)."""
    limits = dict(plan.limits)
    for key, value in overrides.items():
        try:
            limits[Limit(key)] = value
        except ValueError:
            # An override for a limit that no longer exists is ignored, not fatal.
            continue
    return limits
