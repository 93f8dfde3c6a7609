"""Redis clients. Two flavours: text (our own keys) and bytes (fastapi-cache2 needs raw bytes)."""

from __future__ import annotations

from redis.asyncio import Redis


def create_redis(url: str, *, decode_responses: bool = True) -> Redis:
    """An asyncio Redis client for ``redis://``, ``rediss://`` or ``unix://`` URLs."""
    return Redis.from_url(
        url,
        decode_responses=decode_responses,
        socket_connect_timeout=5,
        health_check_interval=30,
    )
