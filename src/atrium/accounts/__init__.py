"""Accounts: registration, login sessions, verification, passwords, e-mail changes, exports."""
