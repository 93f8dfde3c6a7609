"""The quota engine's Redis Lua scripts, kept as ``.lua`` files beside this module (package
data: readable, diffable, and loaded once per process)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib.resources import files

from redis.asyncio import Redis
from redis.commands.core import AsyncScript


@functools.cache
def source(name: str) -> str:
    """The text of ``lua/<name>.lua``."""
    return files(__package__).joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")


@dataclass(frozen=True)
class Scripts:
    """The scripts registered on one Redis client (EVALSHA, loaded again if Redis lost them)."""

    reserve: AsyncScript
    settle: AsyncScript
    load: AsyncScript

    @classmethod
    def on(cls, redis: Redis) -> Scripts:
        """Register every script on ``redis``."""
        return cls(
            reserve=redis.register_script(source("reserve")),
            settle=redis.register_script(source("settle")),
            load=redis.register_script(source("load")),
        )
