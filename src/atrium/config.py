"""Settings: one object, read from ``ATRIUM_*`` environment variables and ``.env``.

Every setting is documented in ``.env.example`` and ``docs/configuration.md``; a test fails when a
setting is missing from either.
"""

from __future__ import annotations

import enum
import ipaddress
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

#: The secret used when none is configured. Accepted in development and test only.
DEFAULT_SECRET_KEY = "atrium-development-secret-change-me"  # noqa: S105 - a known placeholder
MIN_SECRET_KEY_LENGTH = 32


class Environment(enum.StrEnum):
    """Where Atrium runs; production turns on the strict checks."""

    development = "development"
    test = "test"
    production = "production"


class ConfigurationError(Exception):
    """Settings that cannot work; the message names the setting to change."""


class Settings(BaseSettings):
    """All of Atrium's settings. Empty URLs mean "use the embedded default"."""

    model_config = SettingsConfigDict(
        env_prefix="ATRIUM_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
    )

    environment: Environment = Field(
        Environment.development, description="development, test or production."
    )
    secret_key: SecretStr = Field(
        SecretStr(DEFAULT_SECRET_KEY),
        description="Signs tokens and keys API-key HMACs: a random value of at least 32 "
        "characters. The placeholder default works only in development on a loopback host.",
    )
    previous_secret_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated older secret keys still accepted when verifying (key ring); "
        "each is held to the rules of secret_key.",
    )
    host: str = Field("127.0.0.1", description="Address the API listens on.")
    port: int = Field(8000, ge=1, le=65535, description="Port the API listens on.")
    public_url: str = Field(
        "", description="Base URL used in links sent by mail; defaults to http://HOST:PORT."
    )
    data_dir: Path = Field(
        Path("var"),
        description="Where embedded services, blobs, exports and the mail outbox keep data.",
    )

    database_url: str = Field(
        "",
        description="Account database (mysql+aiomysql://...). Empty: SQLite file in data_dir.",
    )
    database_pool_size: int = Field(10, ge=1, description="Account database pool size.")
    vector_database_url: str = Field(
        "",
        description="PostgreSQL with pgvector (postgresql+psycopg://...). Empty: embedded server.",
    )
    vector_pool_size: int = Field(10, ge=1, description="Vector database pool size.")
    vector_pool_timeout_seconds: float = Field(
        1.0,
        gt=0,
        description="How long a search (or a worker) waits for a vector database connection "
        "before it answers 503 with Retry-After: the wait while the database is down, or while "
        "every connection of the pool is busy (raise the pool size or this if searches get "
        "503 under load while the database is up).",
    )
    redis_url: str = Field(
        "", description="Redis (redis://host:port/db or unix://path). Empty: embedded Redis."
    )
    celery_broker_url: str = Field("", description="Celery broker. Empty: the Redis of redis_url.")
    celery_always_eager: bool = Field(
        False, description="Run Celery tasks in-process (only for debugging; never in production)."
    )
    celery_visibility_timeout: int = Field(
        7200,
        ge=1,
        description="Seconds before Redis hands an unacknowledged task (its worker died) to "
        "another worker; keep it above the longest task.",
    )
    celery_relay_interval_seconds: int = Field(
        15,
        ge=1,
        description="How often beat publishes the jobs that were committed but not sent "
        "(the broker was unreachable): they wait in the account database's job outbox; the "
        "relay takes a job once it is 30 s old.",
    )

    smtp_host: str = Field(
        "", description="SMTP server. Empty: mail is written to data_dir/outbox."
    )
    smtp_port: int = Field(587, description="SMTP port.")
    smtp_username: str = Field("", description="SMTP user name.")
    smtp_password: SecretStr = Field(SecretStr(""), description="SMTP password.")
    smtp_starttls: bool = Field(False, description="Use STARTTLS.")
    smtp_ssl: bool = Field(False, description="Use implicit TLS.")
    mail_from: str = Field("Atrium <no-reply@example.com>", description="Sender of mail.")
    mail_outbox: bool = Field(
        False,
        description="Allow writing mail to data_dir/outbox in production (no SMTP host): "
        "production refuses to start without an SMTP host unless this is true.",
    )
    mail_retry_initial_seconds: int = Field(
        30, ge=1, description="Wait before the first retry of a mail the SMTP server did not take."
    )
    mail_retry_max_delay_seconds: int = Field(
        600, ge=1, description="Longest wait between two retries of a mail (the wait doubles)."
    )
    mail_retry_window_seconds: int = Field(
        7200,
        ge=0,
        description="How long a mail is retried while the SMTP server is unreachable before it "
        "is given up (logged as mail_failed).",
    )

    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated origins allowed by CORS."
    )
    log_level: str = Field("INFO", description="Log level.")
    log_json: bool = Field(True, description="JSON log lines (false: human-readable console).")
    metrics_token: SecretStr = Field(
        SecretStr(""), description="When set, GET /metrics requires Authorization: Bearer <token>."
    )
    celery_max_memory_per_child_mb: int = Field(
        2048,
        ge=0,
        description="A worker pool process whose peak memory passed this (MB) is replaced by a "
        "fresh one once its task ends (a large document leaves the process large; Celery's "
        "worker_max_memory_per_child; prefork pool only; 0: never).",
    )
    worker_metrics_port: int = Field(
        0, ge=0, le=65535, description="Port where `atrium worker` serves its metrics (0: off)."
    )
    readyz_cache_seconds: float = Field(
        5.0,
        ge=0,
        description="How long GET /readyz reuses its last answer (0: check on every call).",
    )
    readyz_worker_check_seconds: float = Field(
        30.0,
        ge=0,
        description="How long /readyz reuses its last Celery worker ping (one broadcast per "
        "period per API process; 0: ping on every check).",
    )

    access_token_ttl_seconds: int = Field(900, ge=60, description="Access token lifetime.")
    refresh_token_ttl_seconds: int = Field(
        30 * 24 * 3600, ge=300, description="Refresh token lifetime."
    )

    embedding_provider: Literal["local", "litellm"] = Field(
        "local", description="local (bundled ONNX model) or litellm (hosted)."
    )
    embedding_model: str = Field(
        "all-MiniLM-L6-v2", description="Embedding model name (litellm model id for litellm)."
    )
    embedding_dimension: int = Field(384, ge=8, le=4000, description="Embedding dimension.")
    embedding_max_tokens: int = Field(256, ge=16, description="Model input limit in tokens.")
    embedding_api_base: str = Field("", description="API base for the litellm embedder.")
    embedding_api_key: SecretStr = Field(SecretStr(""), description="API key for the embedder.")
    embedding_threads: int = Field(
        0,
        ge=0,
        description="ONNX threads per process (0: the cores this process may use divided by "
        "the worker's pool processes, at least 1; all of them in an API process).",
    )
    chunk_tokens: int = Field(256, ge=16, description="Target chunk size in model tokens.")
    chunk_overlap_tokens: int = Field(32, ge=0, description="Overlap between chunks in tokens.")
    ingestion_stuck_after_seconds: int = Field(
        900,
        ge=30,
        description="A document queued or processing this long without progress is requeued.",
    )
    ingestion_max_attempts: int = Field(
        5, ge=1, description="Processing runs a document may start before it is marked failed."
    )
    ingestion_sweep_interval_seconds: int = Field(
        300, ge=5, description="How often beat looks for stuck documents and deletions."
    )
    ingestion_batch_documents: int = Field(
        8,
        ge=1,
        description="Documents one worker task may process together when a backlog waits: its "
        "own and up to this many minus one queued ones, embedded in shared model batches "
        "(1: one document per task).",
    )
    ingestion_batch_wait_ms: int = Field(
        500,
        ge=0,
        description="A queued document is taken into another task's batch only once it has "
        "waited this long (a backlog); a short queue keeps one document per task, in parallel.",
    )
    ingestion_batch_max_kb: int = Field(
        64,
        ge=1,
        description="Documents larger than this (KiB as uploaded, or in text once read, 1,024 "
        "characters a KiB) are never batched: they run alone, with their stages shown as they go.",
    )
    ingestion_batch_budget_seconds: int = Field(
        300,
        ge=0,
        description="A task stops taking up its batch's documents once it has spent this long: "
        "the ones not read yet go back to the queue with a job each (the worker's time limit, "
        "1,700 s, covers the whole batch).",
    )
    ingestion_extract_timeout_seconds: int = Field(
        300,
        ge=5,
        description="Longest a worker spends reading one document's text (a sandboxed child "
        "process, killed after this); the document then fails with the reason.",
    )
    ingestion_extract_memory_mb: int = Field(
        1024,
        ge=128,
        description="Memory (MB) the sandbox that reads one document may allocate; a document "
        "needing more fails with the reason.",
    )
    ingestion_max_pdf_pages: int = Field(
        2000, ge=1, description="A PDF with more pages fails (split it)."
    )
    ingestion_max_inflated_mb: int = Field(
        256, ge=1, description="The most (MB) a DOCX's compressed parts may inflate to, together."
    )

    llm_model: str = Field(
        "", description="litellm model for answers (e.g. openai/gpt-4o-mini). Empty: extractive."
    )
    llm_api_base: str = Field("", description="API base of the LLM provider.")
    llm_api_key: SecretStr = Field(SecretStr(""), description="API key of the LLM provider.")
    llm_temperature: float = Field(0.1, ge=0, le=2, description="Default temperature.")
    llm_max_tokens: int = Field(512, ge=1, description="Default answer length limit.")
    llm_timeout_seconds: float = Field(60.0, gt=0, description="LLM request time-out.")
    llm_max_tokens_limit: int = Field(
        4096, ge=1, description="Largest max_tokens an answer request may ask for."
    )
    llm_allowed_models: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated litellm models an answer request may pick besides llm_model.",
    )
    search_cache_ttl_seconds: int = Field(
        300, ge=0, description="How long search results stay cached (0: no cache)."
    )

    rerank_model: str = Field(
        "",
        description="litellm rerank model (e.g. cohere/rerank-english-v3.0, "
        "jina_ai/jina-reranker-v2-base-multilingual, voyage/rerank-2). Empty: a search asking "
        "for reranking is refused (400).",
    )
    rerank_api_base: str = Field(
        "",
        description="API base of the rerank provider. Empty: the provider's own. For cohere/ "
        "models a base ending in /v1/rerank selects Cohere's v1 API; otherwise /v2/rerank "
        "is appended.",
    )
    rerank_api_key: SecretStr = Field(SecretStr(""), description="API key of the rerank provider.")
    rerank_timeout_seconds: float = Field(10.0, gt=0, description="Rerank request time-out.")
    rerank_max_candidates: int = Field(
        100,
        ge=1,
        le=1000,
        description="Most search candidates one request may send to the reranker (rerank_top_n).",
    )

    blob_url: str = Field(
        "", description="Blob store (s3://bucket/prefix). Empty: local directory data_dir/blobs."
    )
    max_request_body_bytes: int = Field(
        1024 * 1024,
        ge=1024,
        description="Largest request body of every route but uploads (JSON, forms), counted "
        "as streamed; larger bodies get 413.",
    )
    max_tenants_per_user: int = Field(
        5,
        ge=1,
        description="Tenants one user may own (not counting those being deleted); "
        "POST /v1/tenants, and a transfer of ownership to the user, answer 409 beyond it.",
    )
    plans_file: Path | None = Field(
        None, description="Plans file (TOML). Empty: config/plans.toml of the source tree."
    )

    @model_validator(mode="before")
    @classmethod
    def _split_lists(cls, data: object) -> object:
        if isinstance(data, dict):
            for key in ("cors_origins", "previous_secret_keys", "llm_allowed_models"):
                value = data.get(key)
                if isinstance(value, str):
                    data[key] = [v.strip() for v in value.split(",") if v.strip()]
        return data

    @model_validator(mode="after")
    def _check_production(self) -> Settings:
        self._check_secrets()
        if self.environment is Environment.production:
            if not self.smtp_host and not self.mail_outbox:
                raise ValueError(
                    "ATRIUM_SMTP_HOST must be set in production (mail carries sign-in links); "
                    "set ATRIUM_MAIL_OUTBOX=true only if something else delivers the files "
                    "written to data_dir/outbox"
                )
            if self.celery_always_eager:
                raise ValueError("ATRIUM_CELERY_ALWAYS_EAGER must be false in production")
        if self.chunk_overlap_tokens >= self.chunk_tokens:
            raise ValueError("ATRIUM_CHUNK_OVERLAP_TOKENS must be smaller than ATRIUM_CHUNK_TOKENS")
        if self.database_url and not self.database_url.startswith(
            ("mysql+aiomysql://", "sqlite+aiosqlite://")
        ):
            raise ValueError(
                "ATRIUM_DATABASE_URL must start with mysql+aiomysql:// or sqlite+aiosqlite://"
            )
        if self.vector_database_url and not self.vector_database_url.startswith(
            ("postgresql+psycopg://", "postgresql://", "postgres://")
        ):
            raise ValueError("ATRIUM_VECTOR_DATABASE_URL must start with postgresql+psycopg://")
        return self

    def _check_secrets(self) -> None:
        # The placeholder is public (it is in this file): with it anyone can sign access tokens
        # and e-mail-change links. It is tolerated only where nobody else can reach the server:
        # development on a loopback address. Older keys still verify tokens, so they are held
        # to the same rule.
        if self.environment is Environment.development and self.binds_loopback:
            return
        keys = [("ATRIUM_SECRET_KEY", self.secret_key)] + [
            (f"ATRIUM_PREVIOUS_SECRET_KEYS (entry {i})", k)
            for i, k in enumerate(self.previous_secret_keys, 1)
        ]
        for name, key in keys:
            value = key.get_secret_value()
            if value == DEFAULT_SECRET_KEY or len(value) < MIN_SECRET_KEY_LENGTH:
                raise ValueError(
                    f"{name} must be a random value of at least {MIN_SECRET_KEY_LENGTH} "
                    "characters, not the placeholder, unless ATRIUM_ENVIRONMENT=development "
                    "and ATRIUM_HOST is a loopback address "
                    '(python -c "import secrets; print(secrets.token_urlsafe(48))")'
                )

    # Derived values -------------------------------------------------------------------------

    @property
    def binds_loopback(self) -> bool:
        """Whether the API listens only on this machine (127.0.0.0/8, ::1 or localhost)."""
        host = self.host.strip().strip("[]")
        if host.lower() == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    @property
    def is_production(self) -> bool:
        """Whether strict production rules apply."""
        return self.environment is Environment.production

    @property
    def resolved_public_url(self) -> str:
        """Base URL for links in mail."""
        return (self.public_url or f"http://{self.host}:{self.port}").rstrip("/")

    @property
    def resolved_database_url(self) -> str:
        """The account database URL, the SQLite file when none is configured."""
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'atrium.db').resolve()}"

    @property
    def vector_conninfo(self) -> str:
        """The vector database URL in the form psycopg accepts."""
        return self.vector_database_url.replace("postgresql+psycopg://", "postgresql://", 1)

    @property
    def resolved_broker_url(self) -> str:
        """Celery's broker URL; Celery spells Redis unix sockets ``redis+socket://``."""
        url = self.celery_broker_url or self.redis_url
        if url.startswith("unix://"):
            return "redis+socket://" + url[len("unix://") :]
        return url

    @property
    def secret_keys(self) -> list[str]:
        """The current secret first, then older ones still accepted for verification."""
        return [self.secret_key.get_secret_value()] + [
            k.get_secret_value() for k in self.previous_secret_keys
        ]

    @property
    def outbox_dir(self) -> Path:
        """Where mail goes when no SMTP server is configured."""
        return self.data_dir / "outbox"


def load_settings(**overrides: object) -> Settings:
    """Build settings, turning validation errors into a message that names the setting.

    Raises:
        ConfigurationError: when a setting is invalid.
    """
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"])
            name = f"ATRIUM_{loc.upper()}" if loc else "settings"
            msg = str(err["msg"]).removeprefix("Value error, ")
            lines.append(f"{name}: {msg}" if loc else msg)
        raise ConfigurationError("Invalid configuration:\n  " + "\n  ".join(lines)) from None


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings (cached)."""
    return load_settings()
