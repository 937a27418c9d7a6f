"""Server settings: one pydantic-settings class, env prefix ``SPECTRAWATCH_``."""

from __future__ import annotations

import ipaddress
import math
import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

ENV_PREFIX = "SPECTRAWATCH_"


class SettingError(ValueError):
    """A setting the server cannot start with; ``str()`` is ``SPECTRAWATCH_<NAME>: <reason>``."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{ENV_PREFIX}{name.upper()}: {reason}")
        self.name = name
        self.reason = reason


def _http_url(value: str | None) -> str | None:
    parts = urlsplit(value or "")
    if value is not None and (parts.scheme not in ("http", "https") or not parts.hostname):
        raise ValueError(f"must be an http:// or https:// URL, got {value!r}")
    return value


_HOST_NAME = re.compile(
    r"(?=.{1,253}\.?$)[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
    r"(?:\.[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?)*\.?",
    re.IGNORECASE,
)


def _allowed_hosts(value: str) -> str:
    """Each comma-separated entry is an IP address, a CIDR network or a host name."""
    for raw in value.split(","):
        item = raw.strip()
        if not item:
            continue
        try:
            ipaddress.ip_network(item.strip("[]"), strict=False)
            continue
        except ValueError:
            pass
        if "://" in item:
            raise ValueError(f"{item!r}: give a host name, an IP address or a CIDR network")
        if "/" in item:
            raise ValueError(f"{item!r} is not a valid CIDR network")
        if not _HOST_NAME.fullmatch(item):
            raise ValueError(f"{item!r} is not a host name, an IP address or a CIDR network")
    return value


def _database_url(value: str | None) -> str | None:
    try:
        backend = make_url(value).get_backend_name() if value is not None else "sqlite"
    except ArgumentError:
        backend = "not a URL"
    if backend not in ("sqlite", "postgresql"):  # the value is not echoed: it may hold a password
        raise ValueError(f"must be a sqlite:/// or postgresql+psycopg:// URL ({backend})")
    return value


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/optional/prefix`` -> ``(bucket, "/optional/prefix")``."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise ValueError(f"not an s3://bucket[/prefix] URL: {url!r}")
    return parts.netloc, parts.path


def _s3_url(value: str | None) -> str | None:
    if value is not None:
        parse_s3_url(value)
    return value


def _device(value: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", value):
        raise ValueError(f"must be auto, cpu, cuda or cuda:N, got {value!r}")
    return value


def parse_schedule(text: str) -> tuple[float, ...]:
    """``"0,5,300"`` -> ``(0.0, 5.0, 300.0)``; at least one non-negative delay."""
    values = tuple(float(x) for x in text.split(",") if x.strip())
    if not values or not all(0 <= v < math.inf for v in values):  # NaN fails too
        raise ValueError(f"retry schedule must be non-negative seconds, got {text!r}")
    return values


def _retry_schedule(value: str) -> str:
    try:
        parse_schedule(value)
    except ValueError:
        raise ValueError(f"must be comma-separated non-negative seconds, got {value!r}") from None
    return value


class ServerSettings(BaseSettings):
    """Everything the API and worker read from the environment (prefix ``SPECTRAWATCH_``)."""

    # An empty variable means unset (compose passes unset ones as ""): BLOB_DIR= must not be
    # Path("") (the working directory).
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", env_ignore_empty=True)

    host: str = Field("127.0.0.1", min_length=1)
    port: int = Field(8765, ge=1, le=65535)
    data_dir: Path = Field(default_factory=lambda: Path.home() / ".spectrawatch")
    # default: sqlite:///<data_dir>/spectrawatch.db
    database_url: Annotated[str | None, AfterValidator(_database_url)] = None
    blob_dir: Path | None = None  # default: <data_dir>/blobs
    # s3://bucket/prefix: S3-compatible blob store instead of blob_dir
    blob_url: Annotated[str | None, AfterValidator(_s3_url)] = None
    # non-AWS S3 (MinIO, Ceph RGW...); keys: AWS_* env vars
    s3_endpoint_url: Annotated[str | None, AfterValidator(_http_url)] = None
    s3_region: str | None = None
    queue: Literal["embedded", "procrastinate"] = "embedded"
    device: Annotated[str, AfterValidator(_device)] = "auto"  # worker device
    run_worker: bool = True  # run the in-process worker thread (embedded queue)
    require_auth: bool = False
    max_body_bytes: int = Field(512 * 1024 * 1024, ge=1)
    # bytes zstd frame bodies may be decompressed to at once, all requests together (a frame
    # larger than this waits for the whole budget); past it a request answers 503 Retry-After
    max_inflating_bytes: int = Field(1024 * 1024 * 1024, ge=1)
    max_tensors: int = Field(4096, ge=1)
    max_dims: int = Field(4, ge=1)
    max_tensor_elements: int = Field(1 << 30, ge=1)
    max_info_bytes: int = Field(2 * 1024 * 1024, ge=1)  # a frame's serialized __metadata__.info
    max_scalars_per_batch: int = Field(100_000, ge=1)
    # rows of one POST /runs/{id}/metrics: a batch is one transaction (its frame row and every
    # row), so this bounds how long it holds SQLite's write lock (99,900 rows: 3.8-7.2 s); the
    # 20,000 rows the previous release's `spectrawatch import` sends pass (this one sends 5,000)
    max_metrics_per_batch: int = Field(20_000, ge=1)
    max_json_bytes: int = Field(32 * 1024 * 1024, ge=1)  # JSON request bodies (scalars, runs...)
    # ingest throughput: token/run cache of the frame route (a revoked token stops ingest after
    # at most this long; 0 disables), and the most frames one group-commit transaction holds
    auth_cache_seconds: float = Field(5.0, ge=0, le=300)
    ingest_batch_max: int = Field(64, ge=1, le=10_000)
    # Database timeouts (seconds; 0 = none). The API's: a request waits at most
    # db_pool_timeout for a pooled connection and each statement at most db_lock_timeout for a
    # lock (on SQLite: the busy timeout), so a busy database answers 503 database_busy
    # (Retry-After) well within the client's 10 s request timeout; db_statement_timeout ends a
    # runaway query (PostgreSQL only). `spectrawatch worker` uses the worker_* ones instead
    # (analysis writes may legitimately take longer).
    db_pool_timeout_seconds: float = Field(5.0, gt=0, le=300)
    db_statement_timeout_seconds: float = Field(10.0, ge=0, le=86_400)
    db_lock_timeout_seconds: float = Field(3.0, ge=0, le=86_400)
    worker_db_statement_timeout_seconds: float = Field(300.0, ge=0, le=86_400)
    worker_db_lock_timeout_seconds: float = Field(60.0, ge=0, le=86_400)
    # DATABASE_URL goes through PgBouncer in transaction pooling mode: the timeouts are set per
    # transaction (a pooler drops the startup packet's), no server-side prepared statements
    db_transaction_pooling: bool = False
    job_lease_seconds: float = Field(120.0, gt=0)
    job_max_attempts: int = Field(5, ge=1)
    worker_poll_seconds: float = Field(0.5, gt=0)  # 0 would spin
    # decoded sketch frames a worker keeps for the next frames' SED windows (0: none)
    frame_cache_mb: int = Field(256, ge=0)
    job_backoff_seconds: int = Field(2, ge=0)  # a retried job waits backoff**attempt s
    worker_heartbeat_seconds: float = Field(10.0, gt=0)  # procrastinate worker heartbeat period
    # heartbeat age after which a worker's job is re-queued
    worker_stalled_seconds: float = Field(30.0, gt=0)
    stall_check_seconds: int = Field(10, ge=1, le=59)  # period of the stalled-job check
    # how often a scale-out worker checks that no newer spectrawatch migrated the schema
    worker_schema_check_seconds: float = Field(30.0, gt=0, le=86_400)
    # used in links (alerts, CLI output)
    public_url: Annotated[str | None, AfterValidator(_http_url)] = None
    # alerts and webhooks (issue 8)
    run_webhooks: bool = True  # run the webhook sender thread (and the silent-run sweep)
    # comma-separated host names, IPs and CIDR networks exempt from the SSRF guard
    webhook_allowed_hosts: Annotated[str, AfterValidator(_allowed_hosts)] = ""
    webhook_timeout_seconds: float = Field(5.0, gt=0, le=60)
    # seconds before attempt i
    webhook_retry_schedule: Annotated[str, AfterValidator(_retry_schedule)] = (
        "0,5,300,1800,7200,18000,36000,36000"
    )
    webhook_jitter: float = Field(0.2, ge=0, lt=1)
    webhook_poll_seconds: float = Field(0.25, gt=0)
    webhook_event_ttl_hours: float = Field(72.0, gt=0)  # pending deliveries expire after this
    alert_sweep_seconds: float = Field(30.0, gt=0)  # how often silent runs are checked
    # retention: frame blobs of ended runs older than this many days are deleted hourly
    # (results stay); 0 keeps every blob
    prune_blobs_after_days: float = Field(0.0, ge=0, le=36_500)

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'spectrawatch.db'}"

    @property
    def resolved_blob_dir(self) -> Path:
        return self.blob_dir or self.data_dir / "blobs"

    @property
    def base_url(self) -> str:
        return self.public_url or f"http://{self.host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        return is_loopback_host(self.host)

    @property
    def sqlite_path(self) -> Path | None:
        """The SQLite database file, or None (PostgreSQL, in-memory)."""
        url = make_url(self.resolved_database_url)
        if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
            return None
        return Path(url.database)

    def check_startable(self) -> None:
        """Refuse configurations that would expose an unauthenticated server or lose files."""
        if not self.is_loopback and not self.require_auth:
            raise SettingError(
                "host",
                f"refusing to serve on non-loopback host {self.host!r} without auth: "
                "set SPECTRAWATCH_REQUIRE_AUTH=true (or --require-auth) and create tokens "
                "with `spectrawatch token create --project NAME`",
            )
        self.check_blob_dir()

    def check_blob_dir(self) -> None:
        """Refuse a local blob directory that is or contains the data directory, the database,
        the working or the home directory: the start-up clean-up deletes files in it."""
        if self.blob_url:
            return
        blob = self.resolved_blob_dir.expanduser().resolve()
        guarded = {
            "the data directory": self.data_dir,
            "the SQLite database": self.sqlite_path,
            "the working directory": Path.cwd(),
            "the home directory": Path.home(),
        }
        for what, path in guarded.items():
            if path is not None and _within(path.expanduser().resolve(), blob):
                reason = f"{blob} contains {what}; use a directory of its own"
                raise SettingError("blob_dir", reason)


def _within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def is_loopback_host(host: str) -> bool:
    """True for localhost names and loopback addresses (127.0.0.0/8, ::1)."""
    if host in {"localhost", "localhost.localdomain"}:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@lru_cache
def get_settings() -> ServerSettings:
    """The process's settings, read once; tests override by passing their own to create_app."""
    return ServerSettings()
