"""Typed Python client for the Atrium API.

    from atrium_client import Atrium

    with Atrium(base_url="http://127.0.0.1:8000", api_key="atr_...", tenant_id="...") as client:
        hits = client.search("refund policy", mode="hybrid", top_k=5).results

:class:`AsyncAtrium` has the same methods for asyncio. Response models are generated from the
API's OpenAPI document (:mod:`atrium_client.models`); errors are :class:`AtriumError`
subclasses (:mod:`atrium_client.errors`).
"""

from atrium_client import models
from atrium_client._async import (
    AsyncApiKeys,
    AsyncAtrium,
    AsyncCollections,
    AsyncDocuments,
    AsyncTenants,
)
from atrium_client._base import ProgressCallback, RetryPolicy
from atrium_client._sync import ApiKeys, Atrium, Collections, Documents, Tenants
from atrium_client._version import __version__
from atrium_client.errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AtriumError,
    AuthenticationError,
    Conflict,
    NotFound,
    PayloadTooLarge,
    PaymentRequired,
    PermissionDenied,
    RateLimited,
    ServerError,
    ServiceUnavailable,
    UnsupportedMediaType,
    ValidationError,
    WaitTimeout,
)
from atrium_client.events import AnswerEvent, DeltaEvent, DoneEvent, ErrorEvent, RetrievalEvent

__all__ = [
    "APIConnectionError",
    "APIStatusError",
    "APITimeoutError",
    "AnswerEvent",
    "ApiKeys",
    "AsyncApiKeys",
    "AsyncAtrium",
    "AsyncCollections",
    "AsyncDocuments",
    "AsyncTenants",
    "Atrium",
    "AtriumError",
    "AuthenticationError",
    "Collections",
    "Conflict",
    "DeltaEvent",
    "Documents",
    "DoneEvent",
    "ErrorEvent",
    "NotFound",
    "PayloadTooLarge",
    "PaymentRequired",
    "PermissionDenied",
    "ProgressCallback",
    "RateLimited",
    "RetrievalEvent",
    "RetryPolicy",
    "ServerError",
    "ServiceUnavailable",
    "Tenants",
    "UnsupportedMediaType",
    "ValidationError",
    "WaitTimeout",
    "__version__",
    "models",
]
