"""Frame ingest: stream the body to a temp blob under a size cap, validate, then commit
blob-first and insert the frame row and its analysis job in one transaction.

A repeated ``Idempotency-Key`` answers 200 with the first frame's id and stores nothing new.
The API never runs analysis.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, BinaryIO

from fastapi import APIRouter, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from sqlalchemy.exc import IntegrityError

from spectrawatch.wire import (
    FrameError,
    FrameHeader,
    count_nonfinite,
    decompress,
    load_tensors,
    parse_header,
)
from spectrawatch_server.api.deps import RunDep, SessionDep, StateDep, authenticate, find_run
from spectrawatch_server.api.errors import ApiError
from spectrawatch_server.api.state import AppState
from spectrawatch_server.db.models import Frame
from spectrawatch_server.schemas import FramePublic
from spectrawatch_server.storage import repository as repo
from spectrawatch_server.storage.blobs import BlobStoreFull

router = APIRouter(tags=["frames"])

MAX_KEY_LENGTH = 160


@router.post(
    "/runs/{run_id}/frames",
    status_code=202,
    response_model=FramePublic,
    responses={200: {"description": "repeat of an idempotency key: the stored frame"}},
)
async def ingest_frame(
    run_id: int,
    request: Request,
    state: StateDep,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
    content_encoding: Annotated[str | None, Header(alias="Content-Encoding")] = None,
) -> JSONResponse:
    """Store one safetensors frame (optionally zstd) and queue its analysis."""
    # A short session of its own: no DB connection is held while the body streams in.
    await run_in_threadpool(_authorize, state, run_id, request.headers.get("authorization"))
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

    upload = await run_in_threadpool(state.blobs.new_upload)
    try:
        size = await _stream_to(request, upload, limit)
        header, nonfinite = await run_in_threadpool(_validate, state, upload, size, encoding)
    except BaseException:
        await run_in_threadpool(state.blobs.abort_upload, upload)
        raise
    # Keys are namespaced by run, so one run's client cannot collide with another's frames.
    key = f"{run_id}/{idempotency_key or f'{run_id}:{header.seq}'}"
    return await run_in_threadpool(
        _commit, state, run_id, key, upload, size, encoding, header, nonfinite
    )


def _authorize(state: AppState, run_id: int, authorization: str | None) -> None:
    with state.sessions() as session:
        principal = authenticate(session, state.settings.require_auth, authorization)
        find_run(session, principal, run_id)


async def _stream_to(request: Request, upload: BinaryIO, limit: int) -> int:
    """Copy the request body into ``upload``; 413 as soon as it passes ``limit`` bytes."""
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "too_large", f"body exceeds the limit of {limit} bytes")
        try:
            await run_in_threadpool(upload.write, chunk)
        except OSError as exc:
            raise BlobStoreFull(exc.errno, "blob store is full") from exc
    if size == 0:
        raise ApiError(400, "empty_body", "frame body is empty")
    return size


def _validate(
    state: AppState, upload: BinaryIO, size: int, encoding: str
) -> tuple[FrameHeader, dict[str, int]]:
    """Header checks, then a full tensor read (also catches corrupt data) and NaN/Inf count."""
    upload.seek(0)
    data = upload.read()
    if encoding == "zstd":
        data = decompress(data, state.settings.max_body_bytes)
    header = parse_header(data, len(data), state.limits)
    tensors = load_tensors(data)
    if set(tensors) != set(header.names):
        raise FrameError("bad_tensor_data", "tensor names differ from the header", status=400)
    return header, count_nonfinite(tensors)


def _commit(
    state: AppState,
    run_id: int,
    key: str,
    upload: BinaryIO,
    size: int,
    encoding: str,
    header: FrameHeader,
    nonfinite: dict[str, int],
) -> JSONResponse:
    with state.sessions() as session:
        existing = repo.frame_by_key(session, key)
        if existing is not None:
            state.blobs.abort_upload(upload)
            return _frame_response(existing, 200)
    suffix = ".safetensors.zst" if encoding == "zstd" else ".safetensors"
    blob_key = f"runs/{run_id}/{header.kind.value}/{header.seq:012d}-{uuid.uuid4().hex[:8]}{suffix}"
    state.blobs.commit_upload(upload, blob_key)  # blob first: a crash leaves an orphan, not a hole
    frame = Frame(
        run_id=run_id,
        kind=header.kind.value,
        step=header.step,
        seq=header.seq,
        idempotency_key=key,
        blob_key=blob_key,
        encoding=encoding,
        bytes=size,
        info=header.info,
        layers=header.names,
        nonfinite=nonfinite,
        status="pending",
    )
    try:
        with state.sessions.begin() as session:
            repo.insert_frame(session, frame)
            state.queue.enqueue(session, frame.id)
    except IntegrityError:  # the same key won a race in another request
        state.blobs.delete(blob_key)
        with state.sessions() as session:
            existing = repo.frame_by_key(session, key)
        if existing is None:
            raise
        return _frame_response(existing, 200)
    except BaseException:
        state.blobs.delete(blob_key)
        raise
    state.queue.notify()
    return _frame_response(frame, 202)


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
    kind: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> list[FramePublic]:
    return [
        FramePublic.model_validate(f)
        for f in repo.list_frames(session, run.id, kind, limit, offset)
    ]
