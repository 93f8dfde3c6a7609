"""Superuser routes: find users and tenants, suspend and restore tenants."""
