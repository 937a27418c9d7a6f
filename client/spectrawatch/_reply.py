"""Replies read with a bound on their size, so that no server can fill this process's memory.

``httpx`` reads a whole reply into memory and inflates a compressed one without limit: a
broken or hostile server answering with an endless body, or with 1 MB of gzip that inflates
to 1 GiB, grows the caller (a training process) by as much. :func:`read_reply` reads at most
``limit`` bytes of a reply, counted before and after decoding, and closes the connection past
that. It decodes gzip and deflate itself, in steps that never produce more than the bytes left
(``zlib``'s ``max_length``), and offers only those encodings (:data:`ACCEPT_ENCODING`); any
other content coding is refused rather than inflated unbounded.
"""

from __future__ import annotations

import threading
import zlib

import httpx

ACCEPT_ENCODING = "gzip, deflate"  # the codings :func:`read_reply` decodes within its bound
_WBITS = {"gzip": zlib.MAX_WBITS | 16, "x-gzip": zlib.MAX_WBITS | 16, "deflate": zlib.MAX_WBITS}
_MIB = 1 << 20
# The bound of the CLI and the notebook Api (the training process's are its own, smaller): a
# run's every point (series, export) takes ~27 bytes of JSON, so about 40 million points, four
# times the rows an import reads by default; a page of runs echoing configs and summaries of up
# to the server's 32 MiB JSON limit each.
REPLY_MAX = 1024 * _MIB


class ReplyError(httpx.RequestError):
    """A reply not read to its end: larger than its bound, in a coding this client does not
    decode, or no longer awaited by its caller."""


def read_reply(
    client: httpx.Client,
    request: httpx.Request,
    limit: int,
    stop: threading.Event | None = None,
) -> httpx.Response:
    """``client.send(request)`` with at most ``limit`` bytes of the reply read (before and after
    decoding); past that, or once ``stop`` is set, the connection is closed and
    :class:`ReplyError` raised. The response returned holds the decoded body."""
    response = client.send(request, stream=True)
    try:
        if response.is_stream_consumed:  # a transport that hands over a whole body (mocks)
            body = response.content
            if len(body) > limit:
                raise _too_large(request, limit)
            return response
        body = _read_body(response, limit, stop)
    finally:
        response.close()
    headers = [(k, v) for k, v in response.headers.multi_items() if k != "content-encoding"]
    return httpx.Response(
        response.status_code,
        headers=headers,
        content=body,
        request=request,
        extensions=response.extensions,
    )


def _read_body(response: httpx.Response, limit: int, stop: threading.Event | None) -> bytes:
    request = response.request
    coding = response.headers.get("content-encoding", "identity").strip().lower()
    if coding not in ("", "identity") and coding not in _WBITS:
        raise ReplyError(
            f"reply in content coding {coding[:50]!r}, not decoded here", request=request
        )
    inflate = zlib.decompressobj(_WBITS[coding]) if coding in _WBITS else None
    body = bytearray()
    received = 0
    for raw in response.iter_raw():
        if stop is not None and stop.is_set():
            raise ReplyError("reply no longer awaited", request=request)
        received += len(raw)
        if received > limit:
            raise _too_large(request, limit)
        try:
            body += raw if inflate is None else inflate.decompress(raw, limit - len(body) + 1)
        except zlib.error as exc:
            raise httpx.DecodingError(f"{coding} reply: {exc}", request=request) from exc
        if len(body) > limit:
            raise _too_large(request, limit)
    if inflate is not None:
        body += inflate.flush(limit - len(body) + 1)
        if len(body) > limit:
            raise _too_large(request, limit)
    return bytes(body)


def _too_large(request: httpx.Request, limit: int) -> ReplyError:
    size = f"{limit / _MIB:.1f} MiB" if limit >= _MIB else f"{limit} bytes"
    return ReplyError(f"reply larger than {size}: not read further", request=request)
