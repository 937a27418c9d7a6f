"""Request and response bodies of the API (``XCreate`` in, ``XPublic`` out)."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from spectrawatch.wire import (
    CLIENT_COUNTERS,
    DOT_NAMES,
    LAYER_MAX,
    LAYER_PATTERN,
    MAX_STEP,
    NAME_MAX,
    NAME_PATTERN,
    TEXT_PATTERN,
    FrameKind,
)

Name = Field(min_length=1, max_length=NAME_MAX, pattern=NAME_PATTERN)


def dot_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a new project or run, if it is ``.`` or ``..``."""
    if name not in DOT_NAMES:
        return None
    return (
        f"{name!r} is not accepted as a new project or run name: the dashboards' links "
        f"would resolve /projects/{name} to another page"
    )


def _not_a_dot_name(name: str) -> str:
    problem = dot_name_problem(name)
    if problem is not None:
        raise ValueError(problem)
    return name


# the name of a project or run being created (a stored "." or ".." stays readable)
NewName = Annotated[str, Name, AfterValidator(_not_a_dot_name)]
# the name of a project or run that may exist: "." and ".." are checked against what is stored
StoredName = Annotated[str, Name]
# free text that ends up in SQL text columns: no control characters (PostgreSQL rejects NUL)
Tag = Annotated[str, Field(min_length=1, max_length=NAME_MAX, pattern=TEXT_PATTERN)]
Layer = Field(min_length=1, max_length=LAYER_MAX, pattern=LAYER_PATTERN)

JSON_DEPTH_MAX = 64
"""Levels of nesting a run's config or summary may have (a training config has ~10): deeper
ones were stored, then every read of the run failed (pydantic serialises 255 levels at most)."""


def _not_too_deep(value: dict[str, Any]) -> dict[str, Any]:
    """``value`` unchanged, or a ValueError when it nests more than :data:`JSON_DEPTH_MAX`
    levels of objects and arrays (walked without recursion)."""
    level: list[Any] = [value]
    for _ in range(JSON_DEPTH_MAX):
        level = [
            child
            for item in level
            for child in (item.values() if isinstance(item, dict) else item)
            if isinstance(child, (dict, list))
        ]
        if not level:
            return value
    raise ValueError(f"nested more than {JSON_DEPTH_MAX} levels deep")


NONFINITE_JSON = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}
"""How a run's config or summary stores a NaN/Inf number: the token Python's ``json`` writes
(and ``float()`` or JavaScript's ``Number()`` reads back), as a string: standard JSON holds no
such number, and PostgreSQL refused the run while SQLite stored invalid JSON."""


def _nonfinite_as_strings(value: Any) -> Any:
    """``value`` with every NaN/Inf float replaced by its :data:`NONFINITE_JSON` string (the
    depth is already bounded by :func:`_not_too_deep`)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else NONFINITE_JSON[repr(value)]
    if isinstance(value, dict):
        return {k: _nonfinite_as_strings(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nonfinite_as_strings(v) for v in value]
    return value


# free-form JSON a run carries (config, summary): a diverged run's summary may hold a NaN loss,
# a config ``max_steps = inf``; both are kept, as strings
JsonObject = Annotated[
    dict[str, Any], AfterValidator(_not_too_deep), AfterValidator(_nonfinite_as_strings)
]


class ProjectCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: NewName


class ProjectPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    name: str
    created_at: datetime


class TokenPublic(BaseModel):
    """A token as ``spectrawatch token list`` shows it (the secret is never stored)."""

    model_config = ConfigDict(from_attributes=True)
    id: int
    name: str
    prefix: str
    created_at: datetime


class WhoAmI(BaseModel):
    """``GET /token``: what the calling token may do. ``project`` None: every project (a
    server-wide token, or anonymous local use, ``anonymous`` true and ``token`` None)."""

    project: str | None
    role: Literal["read", "write", "admin"]
    token: TokenPublic | None
    anonymous: bool = False


class RunCreate(BaseModel):
    """Get-or-create: a new project or run gets a :data:`NewName`; an existing one named ``.``
    or ``..`` (stored before those were refused) takes runs / resumes (checked by the route)."""

    model_config = ConfigDict(extra="forbid")
    project: StoredName
    name: StoredName
    config: JsonObject = Field(default_factory=dict)
    tags: list[Tag] = Field(default_factory=list, max_length=100)
    resume: bool = Field(True, description="false: answer 409 if the run exists (create only)")


RunStatus = Literal["running", "finished", "crashed"]


class RunUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    status: RunStatus | None = None
    summary: JsonObject | None = None
    tags: list[Tag] | None = Field(default=None, max_length=100)


class RunDeleted(BaseModel):
    """What ``DELETE /runs/{id}`` removed."""

    id: int
    project: str
    name: str
    frames: int
    bytes: int
    blobs_not_deleted: int = 0


class ProjectDeleted(BaseModel):
    """What ``DELETE /projects/{name}`` removed."""

    name: str
    runs: int
    frames: int
    bytes: int
    tokens_revoked: int
    alert_rules: int
    webhooks: int
    deliveries_dropped: int
    blobs_not_deleted: int = 0


def _ended_statuses() -> list[RunStatus]:
    return ["finished", "crashed"]


class BulkDeleteRequest(BaseModel):
    """Retention: delete the runs of ``statuses`` inactive for more than ``older_than_days``
    (``updated_at`` and ``last_seen_at`` both older), in ``project`` (all the caller may see
    when not given), at most ``limit`` of them, oldest first. Running runs only when
    ``statuses`` names ``running``."""

    model_config = ConfigDict(extra="forbid")
    older_than_days: float = Field(ge=0, le=36_500)
    project: str | None = Field(None, min_length=1, max_length=NAME_MAX, pattern=NAME_PATTERN)
    statuses: list[RunStatus] = Field(default_factory=_ended_statuses, min_length=1, max_length=3)
    limit: int = Field(100, ge=1, le=1000)
    dry_run: bool = False


class BulkDeletedRun(BaseModel):
    id: int
    project: str
    name: str
    status: str
    updated_at: datetime


class BulkDeleteResult(BaseModel):
    """``runs``: those deleted (or, with ``dry_run``, to be deleted) by this call; ``matched``:
    how many match in all (more than ``len(runs)``: call again)."""

    runs: list[BulkDeletedRun]
    matched: int
    frames: int
    bytes: int
    blobs_not_deleted: int
    dry_run: bool


class RunPublic(BaseModel):
    id: int
    uid: str = Field(
        description="random identity of the run: clients send it with their writes as "
        "`X-Spectrawatch-Run-Uid`, so a reused id (a replaced database) cannot take them"
    )
    project: str
    name: str
    status: RunStatus
    config: dict[str, Any]
    tags: list[str]
    summary: dict[str, Any]
    client_stats: dict[str, Any]
    last_step: int | None
    created_at: datetime
    updated_at: datetime
    last_seen_at: datetime | None
    frames: dict[str, int] = Field(default_factory=dict, description="frames by analysis status")


class RunCreated(RunPublic):
    """``POST /runs``'s reply: the run, and what it was before this request resumed it."""

    resumed_status: str | None = Field(
        None,
        description="the status the run had before this request resumed it (it is `running` "
        "now); null for a run this request created",
    )
    dashboard_url: str = Field(
        description="the run's dashboard page: a path (`/runs/{id}`, relative to the server "
        "URL the client used), or an absolute URL under the server's public URL when it has one"
    )


COUNTER_MAX = 2**63 - 1  # a counter as the database's BIGINT holds it
STATS_MAX_KEYS = 200
STAT_KEY_MAX = 64
STAT_TEXT_MAX = 1000  # the client sends at most 500 characters of its last error
STAT_DICT_MAX = {"dropped_by_kind": 32, "nonfinite_scalars": 100}
STAT_VALUE_MAX = 64  # characters of a non-finite scalar's value ("nan", "-inf")
# counters and settings the bundled client sends as integers (shown as numbers, compared)
INT_STATS = frozenset(CLIENT_COUNTERS) | {
    "rejected_scalars",
    "spooled_scalars",
    "update_every",
    "row_groups",
    "layout_changes",
    "steps_not_increasing",
    "sketch_steps_skipped",
    "weights_widened",
    "sketch_graph_off",
    "sketch_stream_off",
    "spool_unreadable",
    "run_lost",
    "spooled_pending",
}
CounterInt = Annotated[int, Field(ge=0, le=COUNTER_MAX)]


class NonfiniteScalar(BaseModel):
    """The first step a logged scalar was NaN/Inf, and that value as text."""

    model_config = ConfigDict(extra="forbid")
    step: int = Field(ge=0, le=MAX_STEP)
    value: str = Field(max_length=STAT_VALUE_MAX)


class ClientStats(BaseModel):
    """Client-side health counters, reported by the client's sender: the counters below,
    ``dropped_by_kind`` (``{kind: count}``), ``nonfinite_scalars`` (``{name: {step, value}}``),
    and any other key (at most :data:`STATS_MAX_KEYS`) with a number, a boolean or a text of
    at most :data:`STAT_TEXT_MAX` characters (``last_error``, ``monitoring_off``); the
    bundled client's counters (:data:`INT_STATS`) are non-negative integers."""

    model_config = ConfigDict(extra="allow")
    dropped_frames: CounterInt = 0
    spooled_frames: CounterInt = 0
    spool_bytes: CounterInt = 0
    spool_overflow: CounterInt = 0
    errors: CounterInt = 0

    @model_validator(mode="after")
    def _check_extra(self) -> ClientStats:
        extra = self.model_extra or {}
        if len(extra) > STATS_MAX_KEYS:
            raise ValueError(f"at most {STATS_MAX_KEYS} client stats, got {len(extra)}")
        for key, value in extra.items():
            if len(key) > STAT_KEY_MAX or not key.isprintable():
                raise ValueError(
                    f"client stat name {key[:STAT_KEY_MAX]!r} is too long or unprintable"
                )
            problem = _stat_problem(key, value)
            if problem is not None:
                raise ValueError(f"client stat {key!r} {problem}")
            if key == "nonfinite_scalars":
                extra[key] = {
                    name: NonfiniteScalar.model_validate(seen).model_dump()
                    for name, seen in value.items()
                }
        return self


def _stat_problem(key: str, value: Any) -> str | None:
    """Why ``value`` cannot be the client stat ``key``, or None."""
    if key in STAT_DICT_MAX:
        most = STAT_DICT_MAX[key]
        if not isinstance(value, dict) or len(value) > most:
            return f"must be an object of at most {most} entries"
        for name, item in value.items():
            if len(name) > NAME_MAX:
                return f"has a name of more than {NAME_MAX} characters"
            if key == "dropped_by_kind" and not _is_counter(item):
                return f"entry {name[:64]!r} must be an integer in [0, 2**63 - 1]"
            if key == "nonfinite_scalars" and not isinstance(item, dict):
                return f"entry {name[:64]!r} must be an object with step and value"
        return None
    if key in INT_STATS:
        return None if _is_counter(value) else "must be an integer in [0, 2**63 - 1]"
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return None if -COUNTER_MAX <= value <= COUNTER_MAX else "is out of the 64-bit range"
    if isinstance(value, float):
        return None if math.isfinite(value) else "must be finite"
    if isinstance(value, str):
        return None if len(value) <= STAT_TEXT_MAX else f"is longer than {STAT_TEXT_MAX} characters"
    return "must be a number, a boolean or a text"


def _is_counter(value: Any) -> bool:
    return type(value) is int and 0 <= value <= COUNTER_MAX


class FramePublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    run_id: int
    kind: str
    step: int
    seq: int
    bytes: int
    encoding: str
    layers: list[str]
    nonfinite: dict[str, int]
    status: str
    error: str | None = Field(None, description="why its analysis failed (status failed)")
    created_at: datetime
    has_blob: bool  # false: an imported metric batch, or a frame whose blob was pruned


class PruneRequest(BaseModel):
    """Which frame blobs to release: those stored more than ``older_than_days`` ago, of ended
    runs, in ``project`` / run ``run_id`` (all the caller may see when neither is given)."""

    older_than_days: float = Field(ge=0, le=36_500)
    project: str | None = Field(None, min_length=1, max_length=NAME_MAX, pattern=NAME_PATTERN)
    run_id: int | None = Field(None, ge=1, le=2**63 - 1)
    dry_run: bool = False


class PruneResult(BaseModel):
    frames: int
    bytes: int
    blobs_not_deleted: int
    dry_run: bool


class ReanalyzeRequest(BaseModel):
    """Which frames of a run to analyse again: from the first one at ``from_step`` or later
    (in seq order) to the last; every frame when absent."""

    model_config = ConfigDict(extra="forbid")
    from_step: int | None = Field(None, ge=0, le=MAX_STEP)


class ReanalyzeResult(BaseModel):
    """Frames queued for analysis again, and those left as they are: ``skipped_pruned`` (their
    blobs were pruned) and ``skipped_imported`` (imported metric batches, never analysed)."""

    run_id: int
    from_step: int | None
    queued: int
    skipped_pruned: int
    skipped_imported: int


# scalar names are query parameters, never path segments: "train/loss" is fine
ScalarName = Field(min_length=1, max_length=NAME_MAX, pattern=TEXT_PATTERN)


class ScalarIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    step: int = Field(ge=0, le=MAX_STEP)
    name: str = ScalarName
    value: float


class MetricIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    step: int = Field(ge=0, le=MAX_STEP)
    layer: str = Layer
    name: str = Name
    value: float | None


SOURCE_PATTERN = r"^[a-z][a-z0-9_]{0,31}$"
"""An import's ``source``: the kind of the frame its metrics are stored under."""


class MetricBatch(BaseModel):
    """Analysis results computed elsewhere (``spectrawatch import``), stored as-is."""

    model_config = ConfigDict(extra="forbid")
    source: str = Field("import", pattern=SOURCE_PATTERN)
    rows: list[MetricIn] = Field(min_length=1)

    @field_validator("source")
    @classmethod
    def _not_a_frame_kind(cls, source: str) -> str:
        """A frame kind here would give the run a blob-less frame the worker reads as its own."""
        if source in {k.value for k in FrameKind}:
            raise ValueError(f"{source!r} is a frame kind; use another source (e.g. 'import')")
        return source


class Series(BaseModel):
    """One downsampled series; ``None`` values were NaN/Inf."""

    layer: str
    steps: list[int]
    values: list[float | None]
    points: int = Field(description="points before downsampling")
    downsampled: bool = Field(
        False, description="whether points were left out (fewer steps than ``points``)"
    )


class MetricSeries(BaseModel):
    name: str
    series: list[Series]


class ScalarSeries(BaseModel):
    name: str
    steps: list[int]
    values: list[float | None]
    points: int


class LagPoint(BaseModel):
    """Pearson r of a gap series with a scalar ``lag`` grid points later (``steps`` later)."""

    lag: int
    steps: int
    r: float | None = Field(description="null where an overlap is constant")
    pairs: int = Field(description="point pairs the correlation is over (shared points - |lag|)")


class LagSeries(BaseModel):
    """The lag analysis of one gap-ratio series against the scalar."""

    metric: str
    layer: str
    points: int = Field(description="steps both series share (the lag grid)")
    step_unit: int | None = Field(description="median step spacing of the shared grid")
    lags: list[LagPoint]
    best: LagPoint | None = Field(
        description="the strongest |r| among lags over at least 10 pairs; lag > 0: the gap leads"
    )


class LagAnalysis(BaseModel):
    scalar: str
    max_lag: int
    series: list[LagSeries]


class MetricInfo(BaseModel):
    name: str
    layer: str
    points: int
    first_step: int
    last_step: int


class SpectrumPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    frame_id: int
    analysis: str
    layer: str
    step: int
    payload: dict[str, Any]


class Problem(BaseModel):
    """One invalid part of a request: ``field`` is where (``body.name``, ``query.limit``)."""

    field: str
    message: str


class ErrorDetail(BaseModel):
    """What went wrong: a stable ``code`` (``run_not_found``) and a message naming the field;
    a 422 ``invalid_request`` lists each invalid part in ``problems``."""

    code: str = Field(description="stable, machine-readable: `run_not_found`, `too_large`, ...")
    message: str
    problems: list[Problem] | None = Field(None, description="422 `invalid_request` only")


class ErrorBody(BaseModel):
    """Every 4xx/5xx answer of the API: ``{"error": {"code", "message"[, "problems"]}}``."""

    error: ErrorDetail
