"""All account-database models, imported in one place to avoid import cycles."""

from atrium.models.accounts import AuthSession, DataExport, ExportStatus, Invitation
from atrium.models.apikeys import ApiKey
from atrium.models.audit import AuditEvent
from atrium.models.base import Base, IDMixin, TimestampMixin, utcnow
from atrium.models.billing import BillingAccount, UsageAlert, UsageCounter, UsageDaily  # noqa: F401
from atrium.models.ingestion import Collection, CollectionStatus, Document, DocumentStatus
from atrium.models.outbox import OutboxJob
from atrium.models.tenancy import Membership, Role, Tenant, TenantStatus, User

__all__ = [
    "ApiKey",
    "AuditEvent",
    "AuthSession",
    "Base",
    "Collection",
    "CollectionStatus",
    "DataExport",
    "Document",
    "DocumentStatus",
    "ExportStatus",
    "IDMixin",
    "Invitation",
    "Membership",
    "OutboxJob",
    "Role",
    "Tenant",
    "TenantStatus",
    "TimestampMixin",
    "User",
    "utcnow",
]
