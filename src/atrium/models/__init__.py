"""All account-database models, imported in one place to avoid import cycles."""

from atrium.models.accounts import AuthSession, DataExport, ExportStatus, Invitation
from atrium.models.apikeys import ApiKey
from atrium.models.audit import AuditEvent
from atrium.models.base import Base, IDMixin, TimestampMixin, utcnow
from atrium.models.billing import BillingAccount, UsageAlert, UsageCounter, UsageDaily  # noqa: F401
from atrium.models.tenancy import Membership, Role, Tenant, TenantStatus, User

__all__ = [
    "ApiKey",
    "AuditEvent",
    "AuthSession",
    "Base",
    "DataExport",
    "ExportStatus",
    "IDMixin",
    "Invitation",
    "Membership",
    "Role",
    "Tenant",
    "TenantStatus",
    "TimestampMixin",
    "User",
    "utcnow",
]
