"""The order routers are mounted in decides nothing but speed: the hot routes come first."""

from __future__ import annotations

import importlib
import re
import uuid
from typing import Any

from fastapi.routing import APIRoute

from atrium.app import V1_ROUTER_MODULES


def _concrete(path: str) -> str:
    # A value for every path parameter: ids are UUIDs, anything else a word.
    return re.sub(r"{[^}]+}", lambda m: str(uuid.uuid4()) if "id" in m[0] else "word", path)


def test_search_and_answer_come_first_and_no_other_route_matches_their_paths() -> None:
    assert V1_ROUTER_MODULES[:2] == ["atrium.retrieval.endpoints", "atrium.llm.endpoints"]
    # Every /v1 route (each router is mounted under /v1 with no prefix of its own).
    routes = [
        route
        for module in V1_ROUTER_MODULES
        for route in importlib.import_module(module).router.routes
        if isinstance(route, APIRoute)
    ]
    assert len(routes) > 50
    hot = [r for r in routes if r.path.endswith(("/search", "/answer"))]
    assert {r.path for r in hot} == {"/tenants/{tenant_id}/search", "/tenants/{tenant_id}/answer"}
    for route in hot:
        path = _concrete(route.path)
        assert route.path_regex.match(path)
        # Moving these routers to the front cannot have taken a request from another route.
        shadowed = [
            f"{sorted(other.methods)} {other.path}"
            for other in routes
            if other is not route and other.path_regex.match(path)
        ]
        assert not shadowed, f"{route.path} overlaps {shadowed}"


def _calls(dependant: Any) -> list[Any]:
    out = []
    for sub in dependant.dependencies:
        out.append(sub.call)
        out.extend(_calls(sub))
    return out


def test_a_route_that_leaves_its_rate_limit_to_the_hold_has_a_hold_that_counts_it() -> None:
    # require(..., rate_limit_in_hold=True) skips the per-minute count; only query_context
    # gives the route's quota hold the caller's bucket. A route with the first and not the
    # second would be unlimited.
    from atrium.auth.dependencies import require

    deferred = []
    for module in V1_ROUTER_MODULES:
        for route in importlib.import_module(module).router.routes:
            if not isinstance(route, APIRoute):
                continue
            calls = _calls(route.dependant)
            if any(isinstance(c, require) and c.rate_limit_in_hold for c in calls):
                deferred.append(route.path)
                assert any(
                    getattr(c, "__qualname__", "").startswith("query_context.") for c in calls
                ), f"{route.path} leaves its rate limit to a hold it does not have"
    assert sorted(deferred) == ["/tenants/{tenant_id}/answer", "/tenants/{tenant_id}/search"]
