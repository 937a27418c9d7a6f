"""Webhook sender: leases due outbox rows, signs and POSTs them, logs every attempt, retries.

Retry schedule (Standard Webhooks): attempts at 0 s, 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h
after the event, each delay with +-``jitter`` relative noise; a ``Retry-After`` answer pushes
the next attempt at least that far. ``410 Gone`` disables the endpoint. A delivery past its
``expires_at`` (or, for rules bound to a live run such as the grokking warning, once the run has
ended), or an ``alert.opened`` of an episode acknowledged since, is marked failed instead of
being sent late. Redirects are not followed. ``timeout``
bounds the whole attempt (connect, send, answer), not each read: at the deadline a watchdog
shuts the socket down, so a receiver trickling bytes cannot hold the sender. Only the first
``log_chars`` characters of an answer are read (uncompressed: ``Accept-Encoding: identity``),
whatever its size. No database transaction is held open during the HTTP request.
"""

from __future__ import annotations

import contextlib
import logging
import random
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import httpx
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from spectrawatch._transport import parse_retry_after
from spectrawatch_server.alerts.engine import engine_for
from spectrawatch_server.alerts.rules import effective_rules
from spectrawatch_server.config import ServerSettings, parse_schedule
from spectrawatch_server.db.base import utcnow
from spectrawatch_server.db.models import Alert, Delivery, Run, Webhook
from spectrawatch_server.storage import alert_store
from spectrawatch_server.webhooks.outbox import ALERT_OPENED, slack_body
from spectrawatch_server.webhooks.signing import encode_body, signed_headers
from spectrawatch_server.webhooks.ssrf import Allowlist, Resolver, UnsafeTarget, check_url
from spectrawatch_server.webhooks.ssrf import system_resolver as _system_resolver

log = logging.getLogger(__name__)

STANDARD_SCHEDULE: tuple[float, ...] = (0, 5, 300, 1800, 7200, 18000, 36000, 36000)


@dataclass(frozen=True)
class DeliveryPolicy:
    """How deliveries are attempted. ``schedule[i]`` is the delay before attempt ``i + 1``."""

    schedule: tuple[float, ...] = STANDARD_SCHEDULE
    jitter: float = 0.2
    timeout: float = 5.0
    max_retry_after: float = 86_400.0
    log_chars: int = 500
    allow: Allowlist = field(default_factory=Allowlist)

    @property
    def max_attempts(self) -> int:
        return len(self.schedule)


def next_delay(
    policy: DeliveryPolicy, attempts_made: int, retry_after: float | None, rng: random.Random
) -> float | None:
    """Seconds until the next attempt after ``attempts_made`` failures, or ``None`` to give up."""
    if attempts_made >= policy.max_attempts:
        return None
    base = policy.schedule[attempts_made]
    delay = base * (1.0 + rng.uniform(-policy.jitter, policy.jitter)) if base > 0 else 0.0
    if retry_after is not None:
        delay = max(delay, min(retry_after, policy.max_retry_after))
    return delay


@dataclass(frozen=True)
class Outcome:
    """What one attempt did: the delivery's new ``status`` and the HTTP code (if any)."""

    delivery_id: int
    status: str
    status_code: int | None
    error: str | None
    latency_ms: float | None


@dataclass(frozen=True)
class _Message:
    webhook_id: int
    url: str
    secret: str
    format: str
    msg_id: str
    body: bytes
    attempts: int
    held_until: datetime | None = None  # the lease this sender set on the row (claimed ones)


@dataclass(frozen=True)
class Claim:
    """A sender's hold on a delivery it claimed: the ``next_at`` it set (``until``) and the
    lease it renews before each attempt, so that a batch of slow receivers never outlasts its
    claim while another sender re-claims the rows still to go."""

    until: datetime
    lease: timedelta


class _Watchdog:
    """Shuts an attempt's socket down at its deadline (httpx's timeouts are per read).

    Fed by httpcore's ``trace`` extension, which hands over each new connection's stream; a
    shutdown wakes the blocked read, which then fails. The raw ``socket.shutdown`` is used on
    TLS sockets too, so the SSL object is not touched from this thread.
    """

    def __init__(self, seconds: float) -> None:
        self.expired = False
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def trace(self, event: str, info: Mapping[str, object]) -> None:
        if event not in ("connection.connect_tcp.complete", "connection.start_tls.complete"):
            return
        stream = info.get("return_value")
        sock = getattr(stream, "get_extra_info", lambda _name: None)("socket")
        if not isinstance(sock, socket.socket):
            return
        with self._lock:
            self._sock = sock
            expired = self.expired
        if expired:
            _shutdown(sock)

    def cancel(self) -> None:
        self._timer.cancel()

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            sock = self._sock
        if sock is not None:
            _shutdown(sock)


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


def escape_controls(text: str) -> str:
    """``text`` with its unprintable characters escaped (newline as ``\\n``, ESC as ``\\x1b``):
    a receiver's answer and error texts go into the log and the delivery's error as one line,
    so a receiver cannot forge log lines or terminal sequences."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


class Deliverer:
    """Makes single delivery attempts and records them (usable from a route or the thread)."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        policy: DeliveryPolicy,
        *,
        resolve: Resolver = _system_resolver,
        transport: httpx.BaseTransport | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.sessions = sessions
        self.policy = policy
        self.resolve = resolve
        self.rng = rng or random.Random()
        self.client = httpx.Client(
            transport=transport,
            follow_redirects=False,
            timeout=policy.timeout,
            trust_env=False,
            limits=httpx.Limits(max_keepalive_connections=0),  # one connection per attempt
        )

    def close(self) -> None:
        self.client.close()

    def attempt(self, delivery_id: int, claim: Claim | None = None) -> Outcome | None:
        """One attempt of a pending delivery; ``None`` when it is no longer pending, or no
        longer held by ``claim`` (a delivery this sender claimed: another sender has it now)."""
        message, skipped = self._load(delivery_id, claim)
        if message is None:
            return skipped
        try:
            target = check_url(message.url, self.policy.allow, self.resolve)
            url = httpx.URL(target.url)
            pinned = url.copy_with(host=target.address)
        except (UnsafeTarget, httpx.InvalidURL) as exc:  # one stored before a check refused it
            return self._finish(delivery_id, message, None, None, f"refused: {exc}", None, True)
        body = message.body
        headers = signed_headers(message.msg_id, int(time.time()), body, message.secret)
        headers["host"] = url.netloc.decode("ascii")
        headers["accept-encoding"] = "identity"  # the answer is only logged: never inflate it
        extensions: dict[str, Any] = (
            {"sni_hostname": target.host} if target.scheme == "https" else {}
        )
        started = time.perf_counter()
        watchdog = _Watchdog(self.policy.timeout)
        try:
            code, text, retry_header = self._post(pinned, body, headers, extensions, watchdog)
        except httpx.HTTPError as exc:
            latency = (time.perf_counter() - started) * 1000
            failure = (
                f"timed out: no complete answer within {self.policy.timeout:g} s"
                if watchdog.expired
                else f"{type(exc).__name__}: {exc}"
            )
            return self._finish(delivery_id, message, None, latency, failure, None, False)
        finally:
            watchdog.cancel()
        latency = (time.perf_counter() - started) * 1000
        error = None if 200 <= code < 300 else f"HTTP {code}: {text}"
        retry_after = parse_retry_after(retry_header, utcnow())
        return self._finish(delivery_id, message, code, latency, error, retry_after, False)

    def _post(
        self,
        url: httpx.URL,
        body: bytes,
        headers: Mapping[str, str],
        extensions: dict[str, Any],
        watchdog: _Watchdog,
    ) -> tuple[int, str, str | None]:
        """POST and read at most ``log_chars`` of the answer: (status, text, Retry-After)."""
        limit = self.policy.log_chars * 4  # UTF-8: up to 4 bytes per character
        with self.client.stream(
            "POST",
            url,
            content=body,
            headers=headers,
            extensions={**extensions, "trace": watchdog.trace},
        ) as response:
            raw = bytearray()
            if response.is_stream_consumed:  # read already (in-memory transports)
                raw += response.content[:limit]
            elif not 200 <= response.status_code < 300:
                for chunk in response.iter_raw():  # raw: never inflate a compressed answer
                    raw += chunk
                    if len(raw) >= limit:
                        break
            text = escape_controls(raw.decode("utf-8", "replace"))[: self.policy.log_chars]
            return response.status_code, text, response.headers.get("retry-after")

    def _load(
        self, delivery_id: int, claim: Claim | None
    ) -> tuple[_Message | None, Outcome | None]:
        with self.sessions.begin() as session:
            held_until = None
            if claim is not None:
                held_until = utcnow() + claim.lease
                if not alert_store.renew_claim(session, delivery_id, claim.until, held_until):
                    return None, None
            delivery = session.get(Delivery, delivery_id)
            if delivery is None or delivery.status != "pending":
                return None, None
            webhook = session.get(Webhook, delivery.webhook_id)
            reason = self._expired(session, delivery, webhook)
            if reason is not None:
                delivery.status = "failed"
                delivery.last_error = reason
                return None, Outcome(delivery_id, "failed", None, reason, None)
            assert webhook is not None
            payload = (
                slack_body(delivery.payload) if webhook.format == "slack" else delivery.payload
            )
            return _Message(
                webhook.id,
                webhook.url,
                webhook.secret,
                webhook.format,
                delivery.message_id,
                encode_body(payload),
                delivery.attempts,
                held_until,
            ), None

    @staticmethod
    def _expired(session: Session, delivery: Delivery, webhook: Webhook | None) -> str | None:
        if webhook is None:
            return "webhook deleted"
        if not webhook.enabled:
            return f"endpoint disabled: {webhook.disabled_reason or 'by operator'}"
        if delivery.expires_at is not None and delivery.expires_at <= utcnow():
            return "expired before it could be delivered"
        if delivery.alert_id is not None:
            alert = session.get(Alert, delivery.alert_id)
            run = session.get(Run, alert.run_id) if alert is not None else None
            acknowledged = alert is not None and alert.acknowledged_at is not None
            if acknowledged and delivery.event == ALERT_OPENED:
                return "dropped: alert acknowledged before delivery"
            if alert is not None and run is not None and run.status != "running":
                # the project's rule: `expires_with_run` is an editable parameter
                stored = alert_store.stored_rules(session, run.project_id)
                if any(
                    r.name == alert.rule and r.expires_with_run for r in effective_rules(stored)
                ):
                    return f"expired: run ended ({run.status}) before delivery"
        return None

    def _finish(
        self,
        delivery_id: int,
        message: _Message,
        code: int | None,
        latency_ms: float | None,
        error: str | None,
        retry_after: float | None,
        final: bool,
    ) -> Outcome:
        error = None if error is None else escape_controls(error)
        with self.sessions.begin() as session:
            # the endpoint first, as its deletion locks it (a 410 disables it), then the
            # delivery: a webhook deleted now waits; one deleted during the request took its
            # deliveries with it (no attempt to record, and no row to retry)
            alert_store.lock_webhooks(session, webhook_id=message.webhook_id)
            delivery = session.get(Delivery, delivery_id, with_for_update=True)
            if delivery is None:
                log.info("webhook delivery %d: webhook deleted during the attempt", delivery_id)
                return Outcome(delivery_id, "failed", code, "webhook deleted", latency_ms)
            alert_store.record_attempt(session, delivery_id, code, latency_ms, error)
            if message.held_until is not None and delivery.next_at != message.held_until:
                # this attempt outlasted its lease and another sender claimed the delivery:
                # the attempt is logged, the delivery's state is the other sender's to set
                log.warning("webhook delivery %d: lease ran out during the attempt", delivery_id)
                return Outcome(delivery_id, delivery.status, code, error, latency_ms)
            delivery.attempts += 1
            delivery.last_status_code = code
            delivery.last_error = error
            now = utcnow()
            if code is not None and 200 <= code < 300:
                delivery.status = "delivered"
                delivery.delivered_at = now
            elif code == 410:
                delivery.status = "failed"
                alert_store.disable_webhook(
                    session, message.webhook_id, "receiver answered 410 Gone"
                )
            elif final:
                delivery.status = "failed"
            else:
                delay = next_delay(self.policy, delivery.attempts, retry_after, self.rng)
                due = None if delay is None else now + timedelta(seconds=delay)
                if due is None:
                    delivery.status = "failed"
                    delivery.last_error = f"gave up after {delivery.attempts} attempts: {error}"
                elif delivery.expires_at is not None and due > delivery.expires_at:
                    delivery.status = "failed"
                    delivery.last_error = f"expired before the next retry: {error}"
                else:
                    delivery.next_at = due
            status = delivery.status
            final_error = delivery.last_error
        if status != "delivered":
            log.info("webhook delivery %d: %s (%s)", delivery_id, status, final_error)
        return Outcome(delivery_id, status, code, final_error, latency_ms)


class DeliveryThread:
    """Background sender: polls the outbox and runs periodic ``ticks`` (e.g. the silence sweep)."""

    def __init__(
        self,
        deliverer: Deliverer,
        *,
        poll_seconds: float = 0.25,
        lease_seconds: float = 60.0,
        batch: int = 16,
        ticks: Sequence[tuple[float, Callable[[], None]]] = (),
    ) -> None:
        self.deliverer = deliverer
        self.poll_seconds = poll_seconds
        self.lease = timedelta(seconds=max(lease_seconds, deliverer.policy.timeout * 3))
        self.batch = batch
        self.ticks = list(ticks)
        self._next_tick = [0.0 for _ in self.ticks]
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._loop, name="spectrawatch-webhooks", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.deliverer.close()

    def notify(self) -> None:
        self._wake.set()

    def run_once(self) -> int:
        """Attempt every due delivery once; returns how many were attempted."""
        now = utcnow()
        with self.deliverer.sessions.begin() as session:
            ids = alert_store.claim_due_deliveries(session, now, self.lease, self.batch)
        claim = Claim(now + self.lease, self.lease)
        for delivery_id in ids:
            if self._stop.is_set():
                break
            try:
                self.deliverer.attempt(delivery_id, claim)
            except OperationalError:
                raise  # the database is away: the loop backs off
            except Exception:  # a bug in one delivery must not hold the rest of the batch
                log.exception("webhook delivery %d: attempt failed", delivery_id)
        return len(ids)

    def _run_ticks(self) -> None:
        now = time.monotonic()
        for i, (every, fn) in enumerate(self.ticks):
            if now >= self._next_tick[i]:
                self._next_tick[i] = now + every
                fn()

    def _loop(self) -> None:
        failures = 0
        while not self._stop.is_set():
            busy = 0
            try:
                self._run_ticks()
                busy = self.run_once()
                if failures:
                    log.info("webhook sender: database back after %d failed rounds", failures)
                failures = 0
            except OperationalError as exc:  # the database is away: one line, then back off
                failures += 1
                if failures == 1:
                    log.warning("webhook sender: database unavailable, retrying: %s", _brief(exc))
                self._stop.wait(min(30.0, 2.0 ** min(failures - 1, 5)))
            except Exception:  # the sender must survive anything else too; this one is a bug
                failures += 1
                log.exception("webhook sender loop failed; retrying")
                self._stop.wait(min(30.0, 2.0 ** min(failures - 1, 5)))
            if busy < self.batch:
                self._wake.wait(self.poll_seconds)
                self._wake.clear()


def policy_for(settings: ServerSettings) -> DeliveryPolicy:
    """The delivery policy configured by ``SPECTRAWATCH_WEBHOOK_*`` settings."""
    return DeliveryPolicy(
        schedule=parse_schedule(settings.webhook_retry_schedule),
        jitter=settings.webhook_jitter,
        timeout=settings.webhook_timeout_seconds,
        allow=Allowlist.parse(settings.webhook_allowed_hosts),
    )


def build_sender(
    settings: ServerSettings,
    sessions: sessionmaker[Session],
    ticks: Sequence[tuple[float, Callable[[], None]]] = (),
) -> DeliveryThread:
    """The sender thread (not started), with the alert sweep (silent runs, rules that no longer
    validate) and ``ticks`` as periodic tasks."""
    engine = engine_for(settings)

    def sweep() -> None:
        with sessions.begin() as session:
            engine.sweep_silent(session)
        with sessions.begin() as session:
            engine.sweep_invalid_rules(session)

    return DeliveryThread(
        Deliverer(sessions, policy_for(settings)),
        poll_seconds=settings.webhook_poll_seconds,
        ticks=[(settings.alert_sweep_seconds, sweep), *ticks],
    )


def _brief(exc: BaseException) -> str:
    """The first line of an exception's text (SQLAlchemy appends the statement and a link)."""
    return (str(exc).splitlines() or [type(exc).__name__])[0][:300]
