"""Plans, quotas, usage metering and rate-limit policy."""
