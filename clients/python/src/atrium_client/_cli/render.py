"""The tables and JSON the ``atr`` commands print."""

from __future__ import annotations

import datetime as dt
import json
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from pydantic import BaseModel
from rich import box
from rich.filesize import decimal
from rich.table import Table
from rich.text import Text

from atrium_client import models
from atrium_client._cli.upload import Outcome

#: Characters of a search hit's text shown in the table (``--json`` has all of it).
EXCERPT = 160

_STATUS_STYLE = {
    "ready": "green",
    "failed": "red",
    "upload failed": "red",
    "deleted": "red",
    "queued": "yellow",
    "processing": "yellow",
    "deleting": "yellow",
}


def print_json(data: Any) -> None:
    """Write ``data`` (models, lists of models, plain JSON values) to stdout as indented JSON.

    Args:
        data: what to write.
    """

    def plain(value: Any) -> Any:
        if isinstance(value, BaseModel):
            return value.model_dump(mode="json")
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    sys.stdout.write(json.dumps(plain(data), indent=2, ensure_ascii=False) + "\n")
    sys.stdout.flush()


#: Column names that hold ids: never cut (a narrow terminal wraps the other columns first).
_ID_COLUMNS = {"Id", "Document"}
#: Column names that hold numbers: right-aligned.
_NUMBER_COLUMNS = {"#", "Score", "Documents", "Chunks", "Size", "Used", "Limit", "Percent"}


def _table(*columns: str, title: str | None = None) -> Table:
    table = Table(
        title=title,
        box=box.SIMPLE_HEAD,
        title_justify="left",
        pad_edge=False,
        collapse_padding=True,
    )
    for name in columns:
        if name in _ID_COLUMNS:
            table.add_column(name, no_wrap=True, min_width=36)
        elif name in _NUMBER_COLUMNS:
            table.add_column(name, justify="right", no_wrap=True)
        else:
            # Long names fold onto more lines rather than lose their end.
            table.add_column(name, overflow="fold")
    return table


def size(n: int) -> str:
    """A byte count for a table: ``97 B``, ``1.4 kB``, ``36.9 MB``.

    Args:
        n: bytes.

    Returns:
        The text.
    """
    return f"{n} B" if n < 1000 else decimal(n)


def status_text(status: str) -> Text:
    """A document status, coloured by what it means.

    Args:
        status: ``ready``, ``failed``...

    Returns:
        The styled text.
    """
    return Text(status, style=_STATUS_STYLE.get(status, ""))


def when(value: dt.datetime | None, fmt: str = "%Y-%m-%d %H:%M") -> str:
    """A timestamp in UTC (``YYYY-MM-DD HH:MM`` unless ``fmt`` says otherwise), or an em dash.

    Args:
        value: the timestamp.
        fmt: its ``strftime`` format.

    Returns:
        The text.
    """
    if value is None:
        return "—"
    return value.astimezone(dt.UTC).strftime(fmt)


def excerpt(text: str, limit: int = EXCERPT) -> str:
    """``text`` on one line, cut to ``limit`` characters with an ellipsis.

    Args:
        text: the text.
        limit: the longest result.

    Returns:
        The excerpt.
    """
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1].rstrip() + "…"


def search_table(query: str, response: models.SearchResponse) -> Table:
    """The hits of a search, best first.

    Args:
        query: the query (in the title).
        response: the search response.

    Returns:
        The table.
    """
    table = _table("#", "Score", "Title", "Excerpt", title=f"Results for {query!r}")
    for rank, hit in enumerate(response.results, 1):
        table.add_row(str(rank), f"{hit.score:.3f}", hit.title or "—", excerpt(hit.text))
    return table


def collections_table(collections: Iterable[models.Collection]) -> Table:
    """The tenant's collections (``--json`` adds status, description, metadata, dates).

    Args:
        collections: the collections.

    Returns:
        The table.
    """
    table = _table("Name", "Id", "Documents", "Chunks", "Size", "Created")
    for c in collections:
        table.add_row(
            c.name,
            str(c.id),
            str(c.document_count),
            str(c.chunk_count),
            size(c.total_bytes),
            when(c.created_at, "%Y-%m-%d"),
        )
    return table


def documents_table(documents: Iterable[models.Document], *, title: str | None = None) -> Table:
    """Documents with their processing status (``--json`` adds the type, tokens, stage, error,
    metadata and dates).

    Args:
        documents: the documents.
        title: the table's title (the collection's name when several are listed).

    Returns:
        The table.
    """
    table = _table("Title", "File", "Status", "Chunks", "Size", "Id", title=title)
    for d in documents:
        table.add_row(
            d.title,
            d.filename or "—",
            status_text(str(d.status)),
            str(d.chunk_count),
            size(d.size_bytes),
            str(d.id),
        )
    return table


def usage_table(usage: models.Usage) -> Table:
    """The tenant's usage against its plan's limits.

    Args:
        usage: the usage report.

    Returns:
        The table (its title names the plan and the billing period).
    """
    title = f"Plan {usage.plan}: {usage.period_start:%Y-%m-%d} to {usage.period_end:%Y-%m-%d} (UTC)"
    table = _table("Metric", "Used", "Limit", "Percent", "Resets", title=title)
    for m in usage.metrics:
        table.add_row(
            m.metric,
            f"{m.used:,}",
            f"{m.limit:,}" if m.limit is not None else "unlimited",
            f"{m.percent:.1f}%" if m.percent is not None else "—",
            when(m.resets_at) if m.resets_at else "—",
        )
    return table


def upload_table(outcomes: Sequence[Outcome]) -> Table:
    """The summary of an upload: each file, its status, chunks and document id.

    Args:
        outcomes: the upload's outcomes.

    Returns:
        The table.
    """
    table = _table("File", "Status", "Chunks", "Size", "Document", "Note", title="Upload summary")
    for o in outcomes:
        doc = o.document
        note = o.error or ("already in the collection" if o.duplicate else "")
        table.add_row(
            o.file.name,
            status_text(o.status),
            str(doc.chunk_count) if doc is not None else "—",
            size(o.file.size),
            str(doc.id) if doc is not None else "—",
            note,
        )
    return table
