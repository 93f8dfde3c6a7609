"""``atr``: the Atrium API from the terminal.

Upload files and directories (with progress bars for the bytes sent and for processing), search,
ask questions with a streamed answer, and list collections, documents and usage::

    export ATRIUM_URL=https://atrium.example.com ATRIUM_API_KEY=atr_... ATRIUM_TENANT=...
    atr upload ./handbook --collection handbook
    atr search "refund policy"
    atr ask "How long do refunds take?"

Every setting is a global flag too (``atr --url ... search ...``). Errors are one line on
stderr with a non-zero exit code (see :mod:`atrium_client._cli.config`); ``--json`` prints
machine-readable output on stdout.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from atrium_client import Atrium, DeltaEvent, DoneEvent, ErrorEvent, RetrievalEvent, models
from atrium_client._cli import render
from atrium_client._cli.config import (
    ENV_API_KEY,
    ENV_TENANT,
    ENV_URL,
    EXIT_USAGE,
    CliError,
    Config,
    ensure_collection,
    one_line,
    reported,
    resolve_collection,
)
from atrium_client._cli.upload import collect, upload_all, wait_for_processing
from atrium_client._version import __version__

app = typer.Typer(
    name="atr",
    help="The Atrium API from the terminal: upload documents, search, ask, see usage.",
    no_args_is_help=True,
    add_completion=False,
    # Never print local variables (the API key) in a traceback.
    pretty_exceptions_show_locals=False,
    # Help paragraphs reflow to the terminal's width.
    rich_markup_mode="markdown",
)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON on stdout instead of a table.")]
CollectionsOption = Annotated[
    list[str] | None,
    typer.Option(
        "--collection",
        "-c",
        help="Only this collection (name or id); repeat for several. Default: all.",
    ),
]
ModeOption = Annotated[
    models.SearchMode,
    typer.Option("--mode", "-m", help="hybrid (semantic and BM25 keywords), vector or lexical."),
]
RerankFlag = Annotated[
    bool,
    typer.Option(
        "--rerank", help="Rerank the candidates with the server's rerank model (if it has one)."
    ),
]


def _stderr() -> Console:
    return Console(stderr=True, highlight=False)


def _stdout() -> Console:
    return Console(highlight=False)


def _config(ctx: typer.Context) -> Config:
    config = ctx.find_object(Config)
    assert config is not None
    return config


def _collection_ids(client: Atrium, refs: list[str] | None) -> list[str] | None:
    if not refs:
        return None
    return [str(resolve_collection(client, ref).id) for ref in refs]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"atr (atrium-client) {__version__}")
        raise typer.Exit()


@app.callback()
def configure(
    ctx: typer.Context,
    url: Annotated[
        str | None,
        typer.Option("--url", envvar=ENV_URL, help="The server's base URL.", show_envvar=True),
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key", envvar=ENV_API_KEY, help="An API key (atr_...).", show_envvar=True
        ),
    ] = None,
    tenant: Annotated[
        str | None,
        typer.Option(
            "--tenant", envvar=ENV_TENANT, help="The tenant (workspace) id.", show_envvar=True
        ),
    ] = None,
    timeout: Annotated[
        float, typer.Option("--timeout", min=1, help="Seconds to wait for each request.")
    ] = 60.0,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """The Atrium API from the terminal: upload documents, search, ask, see usage.

    \f
    Args:
        ctx: the command's context; the configuration goes into ``ctx.obj``.
        url: the server's base URL.
        api_key: the API key.
        tenant: the tenant id.
        timeout: seconds to wait for each request.
        version: print the version and exit.
    """
    ctx.obj = Config(url=url, api_key=api_key, tenant=tenant, timeout=timeout)


@app.command()
def upload(
    ctx: typer.Context,
    paths: Annotated[
        list[Path],
        typer.Argument(
            exists=True,
            readable=True,
            help="Files and directories (directories are read recursively; hidden files, "
            "symbolic links and special files in them are skipped).",
            metavar="PATH",
            show_default=False,
        ),
    ],
    collection: Annotated[
        str,
        typer.Option(
            "--collection",
            "-c",
            help="The collection's name or id; a name that does not exist yet is created.",
            show_default=False,
        ),
    ],
    parallel: Annotated[
        int, typer.Option("--parallel", "-p", min=1, max=32, help="Uploads at a time.")
    ] = 4,
    wait: Annotated[
        bool,
        typer.Option("--wait/--no-wait", help="Wait until every document is ready or failed."),
    ] = True,
    wait_timeout: Annotated[
        float, typer.Option("--wait-timeout", min=1, help="Seconds to wait for processing.")
    ] = 600.0,
    json_out: JsonFlag = False,
) -> None:
    """Upload files and directories to a collection, then wait until they are processed.

    Shows a progress bar of the bytes sent, then one of the processing, and ends with a table
    of every file's status. Exits with 1 if any file failed.

    \f
    Args:
        ctx: the command's context.
        paths: files and directories.
        collection: the collection's name or id.
        parallel: uploads at a time.
        wait: wait for processing.
        wait_timeout: seconds to wait for processing.
        json_out: print JSON instead of the table.

    Raises:
        CliError: nothing to upload, an error of the server, or a file that failed.
    """
    config = _config(ctx)
    config.check()
    try:
        files = collect(paths)
    except (OSError, ValueError) as exc:
        raise CliError(str(exc), EXIT_USAGE) from exc
    if not files:
        raise CliError(
            "Nothing to upload: no regular files (hidden files and symbolic links are skipped)",
            EXIT_USAGE,
        )
    err = _stderr()
    finished = True
    with config.client() as client, reported(config.url):
        coll, created = ensure_collection(client, collection)
        if created:
            err.print(f"Created collection {coll.name!r} ({coll.id}).", markup=False)
        else:
            err.print(f"Collection {coll.name!r} ({coll.id}).", markup=False)
        outcomes = upload_all(client, coll.id, files, parallel=parallel, console=err)
        if wait:
            finished = wait_for_processing(
                client, coll.id, outcomes, timeout=wait_timeout, console=err
            )
    if json_out:
        render.print_json([o.as_json() for o in outcomes])
    else:
        _stdout().print(render.upload_table(outcomes))
    failed = [o for o in outcomes if o.status in ("failed", "upload failed", "deleted")]
    if failed:
        raise CliError(f"{len(failed)} of {len(outcomes)} files failed")
    if not finished:
        running = sum(1 for o in outcomes if not o.finished)
        raise CliError(
            f"{running} documents were still processing after {wait_timeout:g} s "
            f"(`atr documents -c {coll.id}` shows them)"
        )


@app.command()
def search(
    ctx: typer.Context,
    query: Annotated[str, typer.Argument(help="What to look for.", show_default=False)],
    collection: CollectionsOption = None,
    top_k: Annotated[
        int, typer.Option("--top-k", "-k", min=1, max=100, help="How many results.")
    ] = 10,
    mode: ModeOption = models.SearchMode.hybrid,
    rerank: RerankFlag = False,
    min_score: Annotated[
        float | None, typer.Option("--min-score", help="Drop results scoring below this.")
    ] = None,
    json_out: JsonFlag = False,
) -> None:
    """Search the tenant's documents; prints the best passages with their scores.

    \f
    Args:
        ctx: the command's context.
        query: what to look for.
        collection: only these collections.
        top_k: how many results.
        mode: vector, lexical or hybrid.
        rerank: rerank the candidates.
        min_score: the lowest score shown.
        json_out: print the API's JSON.
    """
    config = _config(ctx)
    with config.client() as client, reported(config.url):
        ids = _collection_ids(client, collection)
        response = client.search(
            query, mode=mode, top_k=top_k, collection_ids=ids, min_score=min_score, rerank=rerank
        )
    if json_out:
        render.print_json(response)
    elif not response.results:
        _stderr().print("No results.")
    else:
        _stdout().print(render.search_table(query, response))


@app.command()
def ask(
    ctx: typer.Context,
    question: Annotated[str, typer.Argument(help="The question.", show_default=False)],
    collection: CollectionsOption = None,
    top_k: Annotated[
        int, typer.Option("--top-k", "-k", min=1, max=100, help="Passages given to the model.")
    ] = 5,
    mode: ModeOption = models.SearchMode.hybrid,
    rerank: RerankFlag = False,
    json_out: Annotated[
        bool, typer.Option("--json", help="Wait for the whole answer and print it as JSON.")
    ] = False,
) -> None:
    """Ask a question: the answer streams to the terminal, its cited sources follow.

    \f
    Args:
        ctx: the command's context.
        question: the question.
        collection: only these collections.
        top_k: passages given to the model.
        mode: vector, lexical or hybrid retrieval.
        rerank: rerank the candidate passages.
        json_out: print the whole answer as JSON instead of streaming it.

    Raises:
        CliError: the answer broke off, or the server refused the question.
    """
    config = _config(ctx)
    out = sys.stdout
    with config.client() as client, reported(config.url):
        ids = _collection_ids(client, collection)
        if json_out:
            render.print_json(
                client.answer(question, mode=mode, top_k=top_k, collection_ids=ids, rerank=rerank)
            )
            return
        done: DoneEvent | None = None
        titles: dict[int, str] = {}
        wrote = False
        stream = client.answer_stream(
            question, mode=mode, top_k=top_k, collection_ids=ids, rerank=rerank
        )
        for event in stream:
            if isinstance(event, RetrievalEvent):
                titles = {s.number: s.title or "untitled" for s in event.sources}
            elif isinstance(event, DeltaEvent):
                out.write(event.text)
                out.flush()
                wrote = wrote or bool(event.text)
            elif isinstance(event, DoneEvent):
                done = event
            elif isinstance(event, ErrorEvent):
                if wrote:
                    out.write("\n")
                detail = event.detail if isinstance(event.detail, str) else event.error
                raise CliError(one_line(f"The answer broke off: {event.error}: {detail}"))
    if done is None:
        raise CliError("The answer stream ended without an answer")
    if not wrote:
        out.write(done.answer)
    out.write("\n")
    if done.citations:
        out.write("\nSources:\n")
        for c in done.citations:
            title = c.title or titles.get(c.number, "untitled")
            out.write(f"[{c.number}] {title} (document {c.document_id})\n")
    out.flush()


@app.command()
def collections(ctx: typer.Context, json_out: JsonFlag = False) -> None:
    """List the tenant's collections with their document and chunk counts.

    \f
    Args:
        ctx: the command's context.
        json_out: print the API's JSON.
    """
    config = _config(ctx)
    with config.client() as client, reported(config.url):
        items = list(client.collections.list())
    if json_out:
        render.print_json(items)
    elif not items:
        _stderr().print("No collections yet: `atr upload FILES --collection NAME` makes one.")
    else:
        _stdout().print(render.collections_table(items))


@app.command()
def documents(
    ctx: typer.Context,
    collection: Annotated[
        str | None,
        typer.Option(
            "--collection", "-c", help="The collection's name or id. Default: every collection."
        ),
    ] = None,
    status: Annotated[
        models.DocumentStatus | None,
        typer.Option("--status", "-s", help="Only documents in this state."),
    ] = None,
    json_out: JsonFlag = False,
) -> None:
    """List documents with their processing status, newest first.

    \f
    Args:
        ctx: the command's context.
        collection: the collection; None lists every collection's documents.
        status: only documents in this state.
        json_out: print the API's JSON.
    """
    config = _config(ctx)
    listed: list[tuple[models.Collection, list[models.Document]]] = []
    with config.client() as client, reported(config.url):
        if collection is not None:
            chosen = [resolve_collection(client, collection)]
        else:
            chosen = list(client.collections.list())
        for coll in chosen:
            listed.append((coll, list(client.documents.list(coll.id, status=status))))
    if json_out:
        render.print_json([d for _, docs in listed for d in docs])
        return
    out = _stdout()
    shown = 0
    for coll, docs in listed:
        if not docs:
            continue
        # One table per collection, titled with its name when every collection is listed.
        title = None if collection is not None else f"{coll.name} ({coll.id})"
        out.print(render.documents_table(docs, title=title))
        shown += len(docs)
    if not shown:
        _stderr().print("No documents.")


@app.command()
def usage(ctx: typer.Context, json_out: JsonFlag = False) -> None:
    """Show this billing period's usage against the plan's limits.

    \f
    Args:
        ctx: the command's context.
        json_out: print the API's JSON.
    """
    config = _config(ctx)
    with config.client() as client, reported(config.url):
        report = client.usage()
    if json_out:
        render.print_json(report)
    else:
        _stdout().print(render.usage_table(report))


def main() -> None:
    """Run ``atr`` (the console script): errors become one line on stderr and an exit code."""
    try:
        app(prog_name="atr")
    except CliError as exc:
        _stderr().print(f"Error: {one_line(exc.message)}", markup=False, soft_wrap=True)
        sys.exit(exc.code)


if __name__ == "__main__":
    main()
