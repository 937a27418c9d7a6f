"""Server settings: one pydantic-settings class, env prefix ``SPECTRAWATCH_``."""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url

ENV_PREFIX = "SPECTRAWATCH_"


class SettingError(ValueError):
    """A setting the server cannot start with; ``str()`` is ``SPECTRAWATCH_<NAME>: <reason>``."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{ENV_PREFIX}{name.upper()}: {reason}")
        self.name = name
        self.reason = reason


class ServerSettings(BaseSettings):
    """Everything the API and worker read from the environment (prefix ``SPECTRAWATCH_``)."""

    # An empty variable means unset (compose passes unset ones as ""): BLOB_DIR= must not be
    # Path("") (the working directory).
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", env_ignore_empty=True)

    host: str = "127.0.0.1"
    port: int = 8765
    data_dir: Path = Field(default_factory=lambda: Path.home() / ".spectrawatch")
    database_url: str | None = None  # default: sqlite:///<data_dir>/spectrawatch.db
    blob_dir: Path | None = None  # default: <data_dir>/blobs
    blob_url: str | None = None  # s3://bucket/prefix: S3-compatible blob store instead of blob_dir
    s3_endpoint_url: str | None = None  # non-AWS S3 (MinIO, Ceph RGW...); keys: AWS_* env vars
    s3_region: str | None = None
    queue: Literal["embedded", "procrastinate"] = "embedded"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    run_worker: bool = True  # run the in-process worker thread (embedded queue)
    require_auth: bool = False
    max_body_bytes: int = 512 * 1024 * 1024
    max_tensors: int = 4096
    max_dims: int = 4
    max_tensor_elements: int = 1 << 30
    max_scalars_per_batch: int = 100_000
    max_json_bytes: int = 32 * 1024 * 1024  # JSON request bodies (scalars, runs, rules...)
    # ingest throughput: token/run cache of the frame route (a revoked token stops ingest after
    # at most this long; 0 disables), and the most frames one group-commit transaction holds
    auth_cache_seconds: float = Field(5.0, ge=0, le=300)
    ingest_batch_max: int = Field(64, ge=1, le=10_000)
    job_lease_seconds: float = 120.0
    job_max_attempts: int = 5
    worker_poll_seconds: float = 0.5
    job_backoff_seconds: int = 2  # procrastinate retries wait backoff**attempt seconds
    worker_heartbeat_seconds: float = 10.0  # procrastinate worker heartbeat period
    worker_stalled_seconds: float = 30.0  # heartbeat age after which a worker's job is re-queued
    stall_check_seconds: int = 10  # period of the stalled-job check (1..59)
    public_url: str | None = None  # used in links (alerts, CLI output)
    # alerts and webhooks (issue 8)
    run_webhooks: bool = True  # run the webhook sender thread (and the silent-run sweep)
    webhook_allowed_hosts: str = ""  # comma-separated hosts/IPs/CIDRs exempt from the SSRF guard
    webhook_timeout_seconds: float = Field(5.0, gt=0, le=60)
    webhook_retry_schedule: str = "0,5,300,1800,7200,18000,36000,36000"  # s before attempt i
    webhook_jitter: float = Field(0.2, ge=0, lt=1)
    webhook_poll_seconds: float = Field(0.25, gt=0)
    webhook_event_ttl_hours: float = Field(72.0, gt=0)  # pending deliveries expire after this
    alert_sweep_seconds: float = Field(30.0, gt=0)  # how often silent runs are checked

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
