"""The quota engine's Redis Lua scripts, kept as ``.lua`` files beside this module (package
data: readable, diffable, and loaded once per process)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib.resources import files

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from atrium.kit.ratelimit import HIT_SCRIPT


@functools.cache
def source(name: str) -> str:
    """The text of ``lua/<name>.lua``."""
    return files(__package__).joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")


@functools.cache
def admit_source() -> str:
    """``lua/admit.lua`` with its two bodies: the rate-limit check and ``reserve.lua``."""
    return (
        source("admit")
        .replace("--@rate_limit", HIT_SCRIPT)
        .replace("--@reserve", source("reserve"))
    )


@dataclass(frozen=True)
class Scripts:
    """The scripts registered on one Redis client (EVALSHA, loaded again if Redis lost them)."""

    reserve: AsyncScript
    #: A rate-limit check, then ``reserve`` when it admits the request.
    admit: AsyncScript
    settle: AsyncScript
    load: AsyncScript

    @classmethod
    def on(cls, redis: Redis) -> Scripts:
        """Register every script on ``redis``."""
        return cls(
            reserve=redis.register_script(source("reserve")),
            admit=redis.register_script(admit_source()),
            settle=redis.register_script(source("settle")),
            load=redis.register_script(source("load")),
        )
