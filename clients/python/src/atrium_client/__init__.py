"""Typed Python client for the Atrium API."""
