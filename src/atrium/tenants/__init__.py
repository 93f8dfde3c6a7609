"""Tenants: creation, members and roles, invitations, ownership, audit log and purge."""
