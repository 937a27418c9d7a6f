"""Frame ingest: take the body under a size cap, validate it, make its blob durable, then
hand the frame row to the app's group committer, which inserts it with its analysis job (and
those of concurrent requests) in one transaction and answers once that has committed.

A repeated ``Idempotency-Key`` answers 200 with the first frame's id and stores nothing new.
The API never runs analysis. Per frame the event loop hands off to a thread twice at most:
once to validate and store the blob, once (shared by the batch) to commit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, BinaryIO, Literal

from fastapi import APIRouter, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from spectrawatch.wire import (
    FrameError,
    FrameHeader,
    count_nonfinite,
    decompress_frame,
    load_tensors,
    nonfinite_steps,
    parse_header,
    row_steps,
)
from spectrawatch_server.api.auth_cache import AuthCache
from spectrawatch_server.api.deps import (
    RunDep,
    RunUidDep,
    SessionDep,
    StateDep,
    checks_role_inside,
)
from spectrawatch_server.api.errors import ApiError
from spectrawatch_server.api.inflate_budget import InflateBudget
from spectrawatch_server.api.links import next_link
from spectrawatch_server.api.openapi import error
from spectrawatch_server.api.state import AppState
from spectrawatch_server.db.models import Frame
from spectrawatch_server.schemas import SOURCE_PATTERN, FramePublic
from spectrawatch_server.storage import repository as repo
from spectrawatch_server.storage.blobs import BlobStoreFull, frame_blob_key
from spectrawatch_server.storage.group_commit import CommitUnknown, FrameCommitter, RunGone

if TYPE_CHECKING:
    import torch

router = APIRouter(tags=["frames"])

MAX_KEY_LENGTH = 160
SPOOL_BYTES = 1024 * 1024  # bodies up to this size stay in memory until validated
# layer names of one page of GET /runs/{id}/frames (a frame holds up to 4,096 names of 512)
PAGE_LAYER_CHARS = 4 * 1024 * 1024
INFLATE_WAIT_S = 2.0  # a zstd body waits this long for decompression budget, then 503


@dataclass
class IngestContext:
    """Per-app ingest helpers, made on the first frame (they live as long as the app)."""

    auth: AuthCache
    committer: FrameCommitter
    budget: InflateBudget  # bytes zstd bodies may be decompressed to at once


def ingest_context(request: Request, state: AppState) -> IngestContext:
    """The app's :class:`IngestContext` (one per app, hence per event loop)."""
    ctx: IngestContext | None = getattr(request.app.state, "ingest", None)
    if ctx is None:
        ctx = IngestContext(
            AuthCache(state.settings.auth_cache_seconds),
            FrameCommitter(state.sessions, state.queue, state.settings.ingest_batch_max),
            InflateBudget(state.settings.max_inflating_bytes, INFLATE_WAIT_S),
        )
        request.app.state.ingest = ctx
    return ctx


FRAME_BODY = {
    "required": True,
    "description": "one frame as `spectrawatch.wire.encode_frame` writes it: safetensors "
    "tensors with the frame's metadata in the header, compressed with zstd when sent with "
    "`Content-Encoding: zstd`",
    "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
}


@router.post(
    "/runs/{run_id}/frames",
    status_code=202,
    response_model=FramePublic,
    responses={
        200: {"model": FramePublic, "description": "a repeated idempotency key: the stored frame"},
        400: error("the body is not a frame: `empty_body`, `truncated`, `bad_encoding`, ..."),
        409: error("`idempotency_conflict`: the key was used for another frame"),
        413: error("`too_large`: the body, or its decompressed frame, exceeds the limit"),
        415: error("`unsupported_encoding`: a Content-Encoding other than zstd"),
        422: error("the frame's metadata or tensors are invalid (the code names the problem)"),
        503: error("`ingest_busy` (decompression budget), `database_busy`: retry later"),
        507: error("`storage_full`: the blob store is full; the frame was not stored"),
    },
    openapi_extra={"requestBody": FRAME_BODY},
)
@checks_role_inside("write")  # in its auth cache: no database query per frame
async def ingest_frame(
    run_id: int,
    request: Request,
    state: StateDep,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
    content_encoding: Annotated[str | None, Header(alias="Content-Encoding")] = None,
    uid: RunUidDep = None,
) -> JSONResponse:
    """Store one safetensors frame (optionally zstd) and queue its analysis (a ``write``
    token)."""
    ctx = ingest_context(request, state)
    authorization = request.headers.get("authorization")
    require_auth = state.settings.require_auth
    if not ctx.auth.check(require_auth, authorization, run_id, uid):
        # A short session of its own: no DB connection is held while the body streams in.
        await run_in_threadpool(
            ctx.auth.authorize, state.sessions, require_auth, authorization, run_id, uid
        )
    encoding = (content_encoding or "identity").strip().lower()
    if encoding not in ("identity", "zstd"):
        raise ApiError(
            415, "unsupported_encoding", f"Content-Encoding {encoding!r}; use zstd or none"
        )
    if idempotency_key is not None and not 0 < len(idempotency_key) <= MAX_KEY_LENGTH:
        raise ApiError(
            400, "bad_idempotency_key", f"Idempotency-Key must be 1-{MAX_KEY_LENGTH} chars"
        )
    limit = state.settings.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "too_large", f"body of {declared} bytes exceeds the limit of {limit}")

    # Cleanup below is on Exception only: a cancelled request (shutdown) may still have its
    # blob or row completed by the thread or batch it started; restart reconciles orphans.
    body = _Body(state)
    try:
        await _receive(request, body, limit)
        frame = await run_in_threadpool(
            _store, state, ctx.budget, run_id, body, encoding, idempotency_key
        )
    except Exception:
        await run_in_threadpool(body.discard)
        raise
    try:
        committed = await ctx.committer.commit(frame)
    except CommitUnknown as exc:  # a row may name the blob: it stays (or goes as an orphan)
        raise exc.error from exc
    except Exception as exc:  # its transaction rolled back: no row names the blob
        await run_in_threadpool(state.blobs.delete, frame.blob_key)
        if isinstance(exc, RunGone):  # deleted while this frame streamed in
            ctx.auth.forget_run(run_id)
            raise ApiError(404, "run_deleted", str(exc)) from exc
        raise
    if not committed.created:  # the key was stored before: drop this copy's blob
        await run_in_threadpool(state.blobs.delete, frame.blob_key)
        _check_replay(committed.frame, frame)
        return _frame_response(committed.frame, 200)
    return _frame_response(committed.frame, 202)


def _check_replay(stored: Frame, new: Frame) -> None:
    """409 when a reused idempotency key names a different frame: a replay repeats the kind,
    step, seq and layers of what was stored (the tensor bytes are not compared)."""
    differ = [f for f in ("kind", "step", "seq") if getattr(stored, f) != getattr(new, f)]
    if sorted(stored.layers) != sorted(new.layers):
        differ.append("layers")
    if differ:
        raise ApiError(
            409,
            "idempotency_conflict",
            f"the idempotency key of this frame was used for frame {stored.id}, whose "
            f"{', '.join(differ)} differ; a replay must repeat the same frame",
        )


class _Body:
    """A request body: chunks in memory, spilled to a blob upload past ``SPOOL_BYTES``."""

    def __init__(self, state: AppState) -> None:
        self.state = state
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.size = 0
        self.upload: BinaryIO | None = None

    def add(self, chunk: bytes) -> None:
        self.chunks.append(chunk)
        self.buffered += len(chunk)
        self.size += len(chunk)

    def spill(self) -> None:
        """Write the buffered chunks to the upload file (opened on first use)."""
        if self.upload is None:
            self.upload = self.state.blobs.new_upload()
        try:
            self.upload.write(b"".join(self.chunks))
        except OSError as exc:
            raise BlobStoreFull(exc.errno, "blob store is full") from exc
        self.chunks.clear()
        self.buffered = 0

    def data(self) -> bytes:
        """The whole body (read back from the upload file if it was spilled)."""
        if self.upload is None:
            return b"".join(self.chunks)
        self.spill()
        self.upload.seek(0)
        return self.upload.read()

    def discard(self) -> None:
        if self.upload is not None:
            self.state.blobs.abort_upload(self.upload)
            self.upload = None
        self.chunks.clear()


async def _receive(request: Request, body: _Body, limit: int) -> None:
    """Read the request body into ``body``; 413 as soon as it passes ``limit`` bytes."""
    async for chunk in request.stream():
        body.add(chunk)
        if body.size > limit:
            raise ApiError(413, "too_large", f"body exceeds the limit of {limit} bytes")
        if body.buffered > SPOOL_BYTES:
            await run_in_threadpool(body.spill)
    if body.size == 0:
        raise ApiError(400, "empty_body", "frame body is empty")


def _store(
    state: AppState,
    budget: InflateBudget,
    run_id: int,
    body: _Body,
    encoding: str,
    idempotency_key: str | None,
) -> Frame:
    """Validate the body, commit its blob (durable before any row names it), build the row.

    A zstd body's decompressed bytes are held against ``budget`` until its tensors are freed.
    """
    data = body.data()
    with budget.reservation() as reservation:
        header, tensors = _validate(state, data, encoding, reservation.take)
        nonfinite = count_nonfinite(tensors)
        steps = row_steps(header.kind.value, header.info)
        bad_steps = nonfinite_steps(tensors, nonfinite, steps, header.step)
        del tensors
    body.spill()  # in-memory bodies are written only once they proved valid
    assert body.upload is not None
    blob_key = frame_blob_key(run_id, header.kind.value, header.seq, encoding)
    upload, body.upload = body.upload, None
    state.blobs.commit_upload(upload, blob_key)  # blob first: a crash leaves an orphan, not a hole
    return Frame(
        run_id=run_id,
        kind=header.kind.value,
        step=header.step,
        seq=header.seq,
        # Keys are namespaced by run, so one run's client cannot collide with another's frames.
        idempotency_key=f"{run_id}/{idempotency_key or f'{run_id}:{header.seq}'}",
        blob_key=blob_key,
        encoding=encoding,
        bytes=body.size,
        info=header.info,
        layers=header.names,
        nonfinite=nonfinite,
        nonfinite_steps=bad_steps,
        status="pending",
    )


def _validate(
    state: AppState, data: bytes, encoding: str, admit: Callable[[int], None]
) -> tuple[FrameHeader, dict[str, torch.Tensor]]:
    """Header checks, then a full tensor read (also catches corrupt data). A zstd body is
    inflated only once its header is valid and ``admit`` took the size it declares."""
    if encoding == "zstd":
        header, data = decompress_frame(data, state.settings.max_body_bytes, state.limits, admit)
    else:
        header = parse_header(data, len(data), state.limits)
    tensors = load_tensors(data)
    if set(tensors) != set(header.names):
        raise FrameError("bad_tensor_data", "tensor names differ from the header", status=400)
    return header, tensors


def _frame_response(frame: Frame, status: int) -> JSONResponse:
    body: dict[str, Any] = FramePublic.model_validate(frame).model_dump(mode="json")
    if frame.nonfinite:
        body["warnings"] = [
            f"{n} NaN/Inf values in '{layer}'" for layer, n in frame.nonfinite.items()
        ]
    return JSONResponse(body, status_code=status)


@router.get("/runs/{run_id}/frames", response_model=list[FramePublic])
def list_frames(
    run: RunDep,
    session: SessionDep,
    state: StateDep,
    request: Request,
    response: Response,
    # a FrameKind, or an import's source (its metrics are stored as a frame of that kind)
    kind: Annotated[str | None, Query(pattern=SOURCE_PATTERN)] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    offset: Annotated[int, Query(ge=0)] = 0,
    status: Literal["pending", "running", "done", "failed"] | None = None,
) -> list[FramePublic]:
    """The run's frames by seq: at most ``limit``, and at most ``PAGE_LAYER_CHARS`` characters
    of layer names (one frame at least). While more match (the page is full, or ends early for
    its layer names) the response has a ``Link: <url>; rel="next"`` header and
    ``X-Next-Offset`` (the ``offset`` of the next page)."""
    frames, more = repo.frames_page(
        session, run.id, kind, limit + 1, offset, status, max_layer_chars=PAGE_LAYER_CHARS
    )
    if len(frames) > limit:  # one more than asked for: the next page has frames
        frames, more = frames[:limit], True
    if more:
        following = offset + len(frames)
        response.headers["Link"] = next_link(
            request, state.settings.public_url, offset=following, limit=limit
        )
        response.headers["X-Next-Offset"] = str(following)
    return [FramePublic.model_validate(f) for f in frames]
