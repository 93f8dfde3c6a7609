"""litellm, imported once on first use in a worker thread (it takes seconds to import).

Shared by every caller of a hosted model (answers, reranking, hosted embeddings), so the
module-wide settings below are made in one place. ``LITELLM_LOCAL_MODEL_COST_MAP`` stops it
fetching a price list at import.
"""

from __future__ import annotations

import asyncio
import os
import threading
from types import ModuleType

_lock = threading.Lock()
_module: ModuleType | None = None


def _import() -> ModuleType:
    global _module
    with _lock:
        if _module is None:
            os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
            # lazy: several seconds to import; only processes that call a hosted model pay
            import litellm

            # The OpenAI client loads its resource classes on the first request (over a
            # second); load them now so that first request is not charged for it.
            import openai.resources  # noqa: F401

            # Cost accounting loads a tiktoken encoding (about a second) on the first answer.
            from litellm.litellm_core_utils import default_encoding  # noqa: F401

            litellm.telemetry = False
            litellm.suppress_debug_info = True
            _module = litellm
    return _module


async def litellm_module() -> ModuleType:
    """The litellm module, imported on first use without blocking the event loop."""
    if _module is not None:
        return _module
    return await asyncio.to_thread(_import)
