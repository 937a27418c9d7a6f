"""Request and response bodies of the API (``XCreate`` in, ``XPublic`` out)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from spectrawatch.wire import MAX_STEP

# project and run names: not blank, no "/" (URL segments) and no control characters
Name = Field(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f/]*[^\s\x00-\x1f/][^\x00-\x1f/]*$")
# free text that ends up in SQL text columns: no control characters (PostgreSQL rejects NUL)
Tag = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f]+$")]
# a layer name is also a dashboard URL segment: "." and ".." would be resolved away by browsers
Layer = Field(
    min_length=1,
    max_length=500,
    pattern=r"^([^\x00-\x1f.][^\x00-\x1f]*|\.[^\x00-\x1f.][^\x00-\x1f]*|\.\.[^\x00-\x1f]+)$",
)


class ProjectCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Name


class ProjectPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    name: str
    created_at: datetime


class RunCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    project: str = Name
    name: str = Name
    config: dict[str, Any] = Field(default_factory=dict)
    tags: list[Tag] = Field(default_factory=list, max_length=100)


RunStatus = Literal["running", "finished", "crashed"]


class RunUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    status: RunStatus | None = None
    summary: dict[str, Any] | None = None
    tags: list[Tag] | None = Field(default=None, max_length=100)


class RunDeleted(BaseModel):
    """What ``DELETE /runs/{id}`` removed."""

    id: int
    project: str
    name: str
    frames: int
    bytes: int
    blobs_not_deleted: int = 0


class RunPublic(BaseModel):
    id: int
    project: str
    name: str
    status: str
    config: dict[str, Any]
    tags: list[str]
    summary: dict[str, Any]
    client_stats: dict[str, Any]
    last_step: int | None
    created_at: datetime
    updated_at: datetime
    last_seen_at: datetime | None
    frames: dict[str, int] = Field(default_factory=dict, description="frames by analysis status")


class ClientStats(BaseModel):
    """Client-side health counters, reported by the client's sender."""

    model_config = ConfigDict(extra="allow")
    dropped_frames: int = Field(0, ge=0)
    spooled_frames: int = Field(0, ge=0)
    spool_bytes: int = Field(0, ge=0)
    spool_overflow: int = Field(0, ge=0)
    errors: int = Field(0, ge=0)


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
    created_at: datetime


# scalar names are query parameters, never path segments: "train/loss" is fine
ScalarName = Field(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f]+$")


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


class MetricBatch(BaseModel):
    """Analysis results computed elsewhere (``spectrawatch import``), stored as-is."""

    model_config = ConfigDict(extra="forbid")
    source: str = Field("import", pattern=r"^[a-z][a-z0-9_]{0,31}$")
    rows: list[MetricIn] = Field(min_length=1)


class Series(BaseModel):
    """One downsampled series; ``None`` values were NaN/Inf."""

    layer: str
    steps: list[int]
    values: list[float | None]
    points: int = Field(description="points before downsampling")


class MetricSeries(BaseModel):
    name: str
    series: list[Series]


class ScalarSeries(BaseModel):
    name: str
    steps: list[int]
    values: list[float | None]
    points: int


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
