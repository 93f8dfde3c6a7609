"""Chat completions through litellm, with hard time limits and errors a client can act on.

litellm takes seconds to import, so it is imported on first use, in a worker thread (the event
loop keeps serving: :mod:`atrium.kit.litellm`).
Retries are off (litellm's and the OpenAI client's): a slow provider must not turn into a hang.
Every call runs under ``asyncio.timeout``; a stream also has a limit per chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from atrium.kit.errors import AtriumError, BadGateway, GatewayTimeout
from atrium.kit.litellm import litellm_module


@dataclass(frozen=True)
class LLMConfig:
    """One call's model and limits."""

    model: str
    api_base: str | None
    api_key: str | None
    temperature: float
    max_tokens: int
    timeout: float


@dataclass
class Usage:
    """Tokens a call consumed, as the provider reported them."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Completion:
    """A finished answer."""

    text: str
    usage: Usage
    model: str


def _is_timeout(exc: BaseException) -> bool:
    """Whether a time-out is behind ``exc`` (litellm wraps a read time-out in a stream as a
    connection error, itself wrapped as a "mid-stream fallback" error)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, TimeoutError) or "Timeout" in type(current).__name__:
            return True
        nxt = getattr(current, "original_exception", None)
        current = (
            nxt if isinstance(nxt, BaseException) else (current.__cause__ or current.__context__)
        )
    return False


def provider_error(exc: BaseException, cfg: LLMConfig) -> AtriumError:
    """The client-facing error for a provider failure: 504 for time-outs, 502 otherwise."""
    if isinstance(exc, AtriumError):
        return exc
    name = type(exc).__name__
    if _is_timeout(exc):
        return GatewayTimeout(
            f"The language model ({cfg.model}) did not answer within {cfg.timeout:g} s; "
            "try again, or ask for a shorter answer (max_tokens)."
        )
    status = getattr(exc, "status_code", None)
    message = str(getattr(exc, "message", "") or exc).strip().splitlines()
    first = message[0][:300] if message else name
    if name == "APIConnectionError" and status in (None, 500):
        return BadGateway(f"Could not reach the language model ({cfg.model}): {first}")
    where = f" answered {status}" if status else " failed"
    return BadGateway(f"The language model provider{where} ({cfg.model}): {first}")


def _params(cfg: LLMConfig, messages: list[dict[str, str]], stream: bool) -> dict[str, Any]:
    params: dict[str, Any] = {
        "model": cfg.model,
        "messages": messages,
        "temperature": cfg.temperature,
        "max_tokens": cfg.max_tokens,
        "timeout": cfg.timeout,
        "num_retries": 0,
        "max_retries": 0,
        "stream": stream,
    }
    if cfg.api_base:
        params["api_base"] = cfg.api_base
    if cfg.api_key:
        params["api_key"] = cfg.api_key
    if stream:
        params["stream_options"] = {"include_usage": True}
    return params


def _usage(raw: Any) -> Usage | None:
    if raw is None:
        return None
    get = raw.get if isinstance(raw, dict) else lambda k, d=None: getattr(raw, k, d)
    return Usage(
        prompt_tokens=int(get("prompt_tokens", 0) or 0),
        completion_tokens=int(get("completion_tokens", 0) or 0),
    )


async def complete(cfg: LLMConfig, messages: list[dict[str, str]]) -> Completion:
    """One chat completion.

    Raises:
        GatewayTimeout: no answer within ``cfg.timeout``.
        BadGateway: the provider failed or answered an error.
    """
    litellm = await litellm_module()
    try:
        async with asyncio.timeout(cfg.timeout):
            response = await litellm.acompletion(**_params(cfg, messages, stream=False))
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        raise provider_error(exc, cfg) from exc
    try:
        text = response.choices[0].message.content or ""
    except (AttributeError, IndexError) as exc:
        raise BadGateway(f"The language model ({cfg.model}) sent no answer") from exc
    return Completion(
        text=text,
        usage=_usage(getattr(response, "usage", None)) or Usage(),
        model=str(getattr(response, "model", None) or cfg.model),
    )


@dataclass
class Stream:
    """An open streamed completion: iterate :meth:`deltas`, then read :attr:`usage`."""

    cfg: LLMConfig
    first: Any
    iterator: Any
    usage: Usage | None = None

    async def deltas(self) -> AsyncIterator[str]:
        """Text pieces as they arrive.

        Raises:
            GatewayTimeout: the next piece took longer than the time-out.
            BadGateway: the provider failed mid-stream.
        """
        try:
            chunk = self.first
            while chunk is not None:
                text = self._absorb(chunk)
                if text:
                    yield text
                try:
                    async with asyncio.timeout(self.cfg.timeout):
                        chunk = await anext(self.iterator)
                except StopAsyncIteration:
                    chunk = None
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise provider_error(exc, self.cfg) from exc
        finally:
            await self.close()

    def _absorb(self, chunk: Any) -> str:
        usage = _usage(getattr(chunk, "usage", None))
        if usage is not None and usage.total_tokens:
            self.usage = usage
        choices = getattr(chunk, "choices", None) or []
        if not choices:
            return ""
        delta = getattr(choices[0], "delta", None)
        return str(getattr(delta, "content", None) or "")

    async def close(self) -> None:
        """Release the provider connection (also when the client went away)."""
        closer = getattr(self.iterator, "aclose", None)
        if closer is not None:
            # Closing a broken stream may fail too; there is nothing more to do then.
            with contextlib.suppress(Exception):
                await closer()


async def open_stream(cfg: LLMConfig, messages: list[dict[str, str]]) -> Stream:
    """Start a streamed completion and wait for its first chunk.

    Waiting for the first chunk here means a provider that is down, refuses or stalls is
    reported as a plain 502/504 response before any event has been sent.

    Raises:
        GatewayTimeout, BadGateway: as :func:`complete`.
    """
    litellm = await litellm_module()
    try:
        async with asyncio.timeout(cfg.timeout):
            response = await litellm.acompletion(**_params(cfg, messages, stream=True))
            iterator = response.__aiter__()
            try:
                first = await anext(iterator)
            except StopAsyncIteration:
                first = None
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        raise provider_error(exc, cfg) from exc
    return Stream(cfg=cfg, first=first, iterator=iterator)
