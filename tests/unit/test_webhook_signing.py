"""Standard Webhooks signing/verification, the retry schedule, and the SSRF guard.

Signatures are checked against an HMAC computed here from the spec's definition
(``base64(HMAC-SHA256(base64decode(secret without 'whsec_'), f"{id}.{ts}.{body}"))``) and
against the reference ``standardwebhooks`` package, in both directions.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import random
import re
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import standardwebhooks

from spectrawatch.webhooks import WebhookVerificationError, sign, signature_headers, verify
from spectrawatch_server.webhooks.deliver import (
    STANDARD_SCHEDULE,
    DeliveryPolicy,
    next_delay,
    parse_retry_after,
    parse_schedule,
)
from spectrawatch_server.webhooks.signing import check_secret, encode_body, generate_secret
from spectrawatch_server.webhooks.ssrf import Allowlist, UnsafeTarget, check_url, classify

# The Standard Webhooks spec's published example secret (standard-webhooks/spec).
SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
BODY = b'{"type":"alert.opened","data":{"rule":"nonfinite","step":10}}'


def reference_signature(secret: str, msg_id: str, ts: int, body: bytes) -> str:
    key = base64.b64decode(secret.removeprefix("whsec_"))
    digest = hmac.new(key, f"{msg_id}.{ts}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def test_sign_matches_independent_hmac() -> None:
    ts = 1_700_000_000
    assert sign("msg_1", ts, BODY, SPEC_SECRET) == reference_signature(
        SPEC_SECRET, "msg_1", ts, BODY
    )
    secret = generate_secret()
    assert sign("msg_2", ts, BODY, secret) == reference_signature(secret, "msg_2", ts, BODY)


def test_reference_library_verifies_our_headers() -> None:
    secret = generate_secret()
    headers = signature_headers("msg_abc", int(time.time()), BODY, secret)
    assert standardwebhooks.Webhook(secret).verify(BODY, headers) == verify(BODY, headers, secret)


def test_we_verify_reference_signed_messages() -> None:
    ref = standardwebhooks.Webhook(SPEC_SECRET)
    now = datetime.now(timezone.utc)
    signature = ref.sign("msg_ref", now, BODY.decode())
    headers = {
        "Webhook-Id": "msg_ref",  # header names are case-insensitive
        "Webhook-Timestamp": str(int(now.timestamp())),
        "Webhook-Signature": signature,
    }
    assert verify(BODY, headers, SPEC_SECRET)["data"]["rule"] == "nonfinite"


def both_reject(body: bytes, headers: dict[str, str], secret: str) -> None:
    with pytest.raises(WebhookVerificationError):
        verify(body, headers, secret)
    with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
        standardwebhooks.Webhook(secret).verify(body, headers)


def test_rejects_what_the_reference_rejects() -> None:
    secret = generate_secret()
    now = int(time.time())
    good = signature_headers("msg_x", now, BODY, secret)
    both_reject(BODY + b" ", good, secret)  # tampered body
    both_reject(BODY, good, generate_secret())  # other secret
    both_reject(BODY, {**good, "webhook-id": "msg_y"}, secret)  # id not what was signed
    both_reject(BODY, signature_headers("msg_x", now - 600, BODY, secret), secret)  # stale
    both_reject(BODY, signature_headers("msg_x", now + 600, BODY, secret), secret)  # future
    both_reject(BODY, {k: v for k, v in good.items() if k != "webhook-signature"}, secret)
    v2 = {**good, "webhook-signature": good["webhook-signature"].replace("v1,", "v2,")}
    both_reject(BODY, v2, secret)  # only v1 is understood


def test_tolerance_boundary() -> None:
    secret = generate_secret()
    headers = signature_headers("m", 1000, BODY, secret)
    assert verify(BODY, headers, secret, now=1300)  # exactly 300 s old is accepted
    with pytest.raises(WebhookVerificationError, match="too old"):
        verify(BODY, headers, secret, now=1301)
    with pytest.raises(WebhookVerificationError, match="too new"):
        verify(BODY, headers, secret, now=699)


def test_rotated_secret_lists() -> None:
    old, new = generate_secret(), generate_secret()
    now = int(time.time())
    # sender signs with both during a rotation: a receiver on either secret accepts
    both = signature_headers("msg_r", now, BODY, [old, new])
    assert len(both["webhook-signature"].split(" ")) == 2
    for secret in (old, new):
        assert verify(BODY, both, secret)
        assert standardwebhooks.Webhook(secret).verify(BODY, both)
    # receiver holding a list accepts a message signed with either one
    assert verify(BODY, signature_headers("msg_r", now, BODY, old), [new, old])
    with pytest.raises(WebhookVerificationError):
        verify(BODY, signature_headers("msg_r", now, BODY, generate_secret()), [new, old])


def test_secrets() -> None:
    secret = generate_secret()
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret.removeprefix("whsec_"))) == 32
    assert check_secret(secret) == secret
    for bad in ("hunter2", "whsec_!!!", "whsec_" + base64.b64encode(b"short").decode()):
        with pytest.raises(ValueError, match="secret"):
            check_secret(bad)


def test_body_encoding_is_canonical() -> None:
    assert encode_body({"b": 1, "a": [1.5, "é"]}) == '{"a":[1.5,"é"],"b":1}'.encode()


# --- retry schedule ------------------------------------------------------------------------


def test_standard_schedule_and_jitter() -> None:
    assert STANDARD_SCHEDULE == (0, 5, 300, 1800, 7200, 18000, 36000, 36000)
    policy = DeliveryPolicy(jitter=0.2)
    rng = random.Random(0)
    for attempts in range(1, len(STANDARD_SCHEDULE)):
        base = STANDARD_SCHEDULE[attempts]
        delays = [next_delay(policy, attempts, None, rng) for _ in range(200)]
        assert all(d is not None and 0.8 * base <= d <= 1.2 * base for d in delays)
        assert len(set(delays)) > 100  # jittered, not constant
    assert next_delay(policy, len(STANDARD_SCHEDULE), None, rng) is None  # give up


def test_retry_after_is_a_floor() -> None:
    policy = DeliveryPolicy(schedule=(0, 5, 300), jitter=0.0)
    rng = random.Random(0)
    assert next_delay(policy, 1, 60.0, rng) == 60.0
    assert next_delay(policy, 1, 1.0, rng) == 5.0
    assert next_delay(policy, 1, 10**9, rng) == policy.max_retry_after
    now = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)
    assert parse_retry_after("120", now) == 120.0
    http_date = "Thu, 01 Jan 2026 12:02:00 GMT"
    assert parse_retry_after(http_date, now) == pytest.approx(120.0)
    assert (
        parse_retry_after((now - timedelta(hours=1)).strftime("%a, %d %b %Y %H:%M:%S GMT"), now)
        == 0
    )
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after(None, now) is None


def test_parse_schedule() -> None:
    assert parse_schedule("0, 5,300") == (0.0, 5.0, 300.0)
    for bad in ("", "1,-1", "0,nan", "inf"):
        with pytest.raises(ValueError, match="schedule"):
            parse_schedule(bad)


# --- SSRF guard ----------------------------------------------------------------------------


def resolver(*addresses: str):  # type: ignore[no-untyped-def]
    return lambda host, port: list(addresses)


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("127.10.0.1", "loopback"),
        ("::1", "loopback"),
        ("169.254.169.254", "link_local"),
        ("fe80::1", "link_local"),
        ("10.0.0.1", "private"),
        ("172.16.5.4", "private"),
        ("192.168.1.1", "private"),
        ("fd00::1", "private"),
        ("fec0::1", "site_local"),
        ("224.0.0.251", "multicast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("240.0.0.1", "reserved"),
        ("100.64.0.1", "non_global"),
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:169.254.169.254", "link_local"),
        ("2002:7f00:1::", "loopback"),  # 6to4 of 127.0.0.1
        ("2002:a9fe:a9fe::1", "link_local"),  # 6to4 of 169.254.169.254
    ],
)
def test_forbidden_classes(address: str, kind: str) -> None:
    import ipaddress

    assert classify(ipaddress.ip_address(address)) == kind
    with pytest.raises(UnsafeTarget) as info:
        check_url("https://hooks.example.com/x", Allowlist(), resolver(address))
    assert info.value.reason == f"forbidden_{kind}"
    assert "SPECTRAWATCH_WEBHOOK_ALLOWED_HOSTS" in str(info.value)


def test_public_targets_pass_and_pin_the_address() -> None:
    target = check_url(
        "https://hooks.example.com:8443/p?q=1", Allowlist(), resolver("93.184.215.14")
    )
    assert (target.host, target.port, target.address) == (
        "hooks.example.com",
        8443,
        "93.184.215.14",
    )
    assert check_url("http://8.8.8.8/x", Allowlist(), resolver()).address == "8.8.8.8"


def test_any_internal_address_in_the_answer_refuses() -> None:
    with pytest.raises(UnsafeTarget, match=r"10\.0\.0\.5"):
        check_url("https://evil.example/x", Allowlist(), resolver("93.184.215.14", "10.0.0.5"))


def test_allowlist_by_host_ip_and_cidr() -> None:
    allow = Allowlist.parse("127.0.0.1, hooks.internal ,10.20.0.0/16")
    assert check_url("http://127.0.0.1:9000/x", allow).address == "127.0.0.1"
    assert (
        check_url("http://hooks.internal/x", allow, resolver("192.168.3.3")).host
        == "hooks.internal"
    )
    assert check_url("http://svc/x", allow, resolver("10.20.3.4")).address == "10.20.3.4"
    with pytest.raises(UnsafeTarget):
        check_url("http://127.0.0.2/x", allow)
    with pytest.raises(UnsafeTarget):
        check_url("http://svc/x", allow, resolver("10.21.0.1"))


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://example.com/x", "bad_scheme"),
        ("file:///etc/passwd", "bad_scheme"),
        ("http:///nohost", "bad_url"),
        ("http://user:pw@example.com/", "bad_url"),
        ("http://example.com:99999/", "bad_url"),
    ],
)
def test_malformed_urls(url: str, reason: str) -> None:
    with pytest.raises(UnsafeTarget) as info:
        check_url(url, Allowlist(), resolver("93.184.215.14"))
    assert info.value.reason == reason


def test_unresolvable_host() -> None:
    def fail(host: str, port: int) -> list[str]:
        raise OSError("no such host")

    with pytest.raises(UnsafeTarget) as info:
        check_url("https://nowhere.invalid/x", Allowlist(), fail)
    assert info.value.reason == "unresolvable"


# --- the sender against a mock transport and a real SQLite outbox ---------------------------


def make_outbox(tmp_path: Path, rule: str = "nonfinite") -> tuple[Any, int, int, str]:
    """A migrated database with one run, one webhook and one pending alert delivery."""
    from spectrawatch_server.db import migrate
    from spectrawatch_server.db.models import Alert, Project, Webhook
    from spectrawatch_server.db.session import make_engine, make_session_factory
    from spectrawatch_server.storage import repository as repo
    from spectrawatch_server.webhooks import outbox

    engine = make_engine(f"sqlite:///{tmp_path / 'o.db'}")
    migrate.upgrade(engine)
    sessions = make_session_factory(engine)
    secret = generate_secret()
    with sessions.begin() as session:
        project, _ = repo.get_or_create_project(session, "p")
        run, _ = repo.get_or_create_run(session, project, "r", {}, [])
        hook = Webhook(project_id=project.id, url="https://hooks.example/in", secret=secret)
        session.add(hook)
        alert = Alert(run_id=run.id, rule=rule, layer="l", step=5, message="m", values={})
        session.add(alert)
        session.flush()
        (delivery,) = outbox.enqueue_alert_event(
            session, outbox.ALERT_OPENED, alert, run, session.get_one(Project, project.id),
            "http://sw", timedelta(hours=1),
        )  # fmt: skip
        run_id, delivery_id = run.id, delivery.id
    return sessions, run_id, delivery_id, secret


def sender(sessions: Any, handler: Any, schedule: tuple[float, ...] = (0, 5, 300)) -> Any:
    import httpx

    from spectrawatch_server.webhooks.deliver import Deliverer

    policy = DeliveryPolicy(schedule=schedule, jitter=0.0)
    return Deliverer(
        sessions,
        policy,
        resolve=lambda host, port: ["93.184.215.14"],
        transport=httpx.MockTransport(handler),
        rng=random.Random(0),
    )


def test_sender_signs_pins_and_does_not_follow_redirects(tmp_path: Path) -> None:
    import httpx

    from spectrawatch_server.db.models import Delivery

    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(302, headers={"location": "http://169.254.169.254/"}, text="x" * 900)

    sessions, _, delivery_id, secret = make_outbox(tmp_path)
    deliverer = sender(sessions, handler)
    outcome = deliverer.attempt(delivery_id)
    deliverer.close()
    assert outcome is not None
    assert (outcome.status, outcome.status_code) == ("pending", 302)  # a failure, retried later
    (request,) = seen  # the redirect was not followed
    assert request.url.host == "93.184.215.14"  # connected to the checked address
    assert request.headers["host"] == "hooks.example"
    assert request.extensions["sni_hostname"] == "hooks.example"
    event = verify(request.content, request.headers, secret)  # signed over the body as sent
    assert event["data"]["rule"] == "nonfinite"
    # ISO 8601 UTC with a Z, as every other timestamp of the API (it was +00:00)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z", event["timestamp"])
    with sessions() as session:
        row = session.get_one(Delivery, delivery_id)
        assert row.attempts == 1
        assert row.last_error is not None
        assert len(row.last_error) <= len("HTTP 302: ") + 500  # response body truncated
        wait = (row.next_at - row.created_at).total_seconds()
        assert 4.0 < wait < 6.5  # schedule[1] = 5 s


def test_sender_expires_run_bound_events_after_the_run_ended(tmp_path: Path) -> None:
    import httpx

    from spectrawatch_server.db.models import Delivery, Run

    def handler(request: httpx.Request) -> httpx.Response:
        raise AssertionError("an expired event must not be sent")

    sessions, run_id, delivery_id, _ = make_outbox(tmp_path, rule="grokking_imminent")
    with sessions.begin() as session:
        session.get_one(Run, run_id).status = "finished"
    deliverer = sender(sessions, handler)
    outcome = deliverer.attempt(delivery_id)
    deliverer.close()
    assert outcome is not None
    assert outcome.status == "failed"
    with sessions() as session:
        row = session.get_one(Delivery, delivery_id)
        assert row.last_error is not None
        assert "run ended" in row.last_error
        assert row.attempts == 0


def test_sender_expires_at_deadline_and_gives_up(tmp_path: Path) -> None:
    import httpx

    from spectrawatch_server.db.base import utcnow
    from spectrawatch_server.db.models import Delivery

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(500)

    sessions, _, delivery_id, _ = make_outbox(tmp_path)
    deliverer = sender(sessions, handler, schedule=(0, 0))
    assert deliverer.attempt(delivery_id).status == "pending"  # type: ignore[union-attr]
    final = deliverer.attempt(delivery_id)
    assert final is not None
    assert final.status == "failed"
    assert final.error is not None
    assert "gave up after 2 attempts" in final.error
    # a pending row past its expires_at is failed without being sent
    with sessions.begin() as session:
        row = session.get_one(Delivery, delivery_id)
        row.status = "pending"
        row.expires_at = utcnow() - timedelta(seconds=1)
    expired = deliverer.attempt(delivery_id)
    deliverer.close()
    assert expired is not None
    assert expired.status == "failed"
    assert expired.error == "expired before it could be delivered"


def test_event_timestamps_are_written_as_the_api_writes_times() -> None:
    """``payload.timestamp`` said ``+00:00`` where the API's other timestamps say ``Z``
    (pydantic's JSON form); an event's time in another zone is converted to UTC."""
    from pydantic import TypeAdapter

    from spectrawatch_server.webhooks.outbox import iso_utc

    for at in (
        datetime(2026, 11, 29, 20, 17, 21, 969599, tzinfo=timezone.utc),
        datetime(2026, 11, 29, 20, 17, 21, tzinfo=timezone.utc),
    ):
        assert iso_utc(at) == TypeAdapter(datetime).dump_json(at).decode().strip('"')
    assert iso_utc(datetime(2026, 11, 29, 21, tzinfo=timezone(timedelta(hours=1)))) == (
        "2026-11-29T20:00:00Z"
    )


def test_slack_text_escapes_user_names() -> None:
    """A project or run named ``<!channel>`` must not notify a Slack channel or add a link."""
    from spectrawatch_server.webhooks.outbox import slack_body

    payload = {
        "type": "alert.fired",
        "data": {
            "project": "<!channel> <mailto:x@evil.example|click>",
            "run": {"name": "r&d <b>"},
            "severity": "critical",
            "step": 7,
            "message": "layer <https://evil.example|here> alpha 1.2",
            "dashboard_url": "http://sw.example/runs/1",
        },
    }
    text = slack_body(payload)["text"]
    assert "<!channel>" not in text
    assert "<mailto:" not in text
    assert "<https://evil" not in text
    assert "&lt;!channel&gt;" in text
    assert "r&amp;d &lt;b&gt;" in text
    assert text.endswith("<http://sw.example/runs/1|dashboard>")  # the one real link


def test_a_webhook_deleted_during_an_attempt_ends_it_and_the_batch_goes_on(
    tmp_path: Path,
) -> None:
    # recording the attempt of a delivery whose webhook (and with it the delivery) was deleted
    # while the request was in flight raised a foreign-key IntegrityError out of the sender's
    # batch: the other deliveries it had claimed waited out their lease (60 s)
    import httpx

    from spectrawatch_server.db.models import Alert, Delivery, DeliveryAttempt, Webhook
    from spectrawatch_server.webhooks.deliver import DeliveryThread

    sessions, _, doomed_id, _ = make_outbox(tmp_path)
    with sessions.begin() as session:
        doomed = session.get_one(Delivery, doomed_id)
        alive = Webhook(project_id=1, url="https://hooks.example/alive", secret=generate_secret())
        session.add(alive)
        session.flush()
        alert = session.get_one(Alert, doomed.alert_id)
        session.add(
            Delivery(
                webhook_id=alive.id, alert_id=alert.id, message_id="msg_alive", event=doomed.event,
                payload=doomed.payload, status="pending", attempts=0, next_at=doomed.next_at,
            )
        )  # fmt: skip
        doomed_hook = doomed.webhook_id

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/in":  # the operator deletes this endpoint meanwhile
            with sessions.begin() as session:
                session.delete(session.get_one(Webhook, doomed_hook))
            return httpx.Response(500)
        return httpx.Response(204)

    thread = DeliveryThread(sender(sessions, handler))
    assert thread.run_once() == 2
    thread.deliverer.close()
    with sessions() as session:
        rows = session.query(Delivery).all()
        assert [(d.message_id, d.status, d.attempts) for d in rows] == [
            ("msg_alive", "delivered", 1)
        ]
        assert session.query(DeliveryAttempt).count() == 1


def test_a_sender_whose_claim_ran_out_leaves_the_rest_of_its_batch_to_the_next(
    tmp_path: Path,
) -> None:
    """A batch of slow receivers outlasted its claim (60 s lease, 16 x 5 s timeouts): another
    process's sender claimed the rows still to go, and both POSTed them. Each attempt now
    renews the claim first and a sender that lost it skips the row."""
    import time

    import httpx

    from spectrawatch_server.db.models import Delivery
    from spectrawatch_server.webhooks.deliver import Deliverer, DeliveryThread

    sessions, _, first_id, _ = make_outbox(tmp_path)
    with sessions.begin() as session:
        first = session.get_one(Delivery, first_id)
        for i in range(2):
            session.add(
                Delivery(
                    webhook_id=first.webhook_id, alert_id=first.alert_id, message_id=f"msg_{i}",
                    event=first.event, payload=first.payload, status="pending", attempts=0,
                    next_at=first.next_at,
                )
            )  # fmt: skip
    posts: list[tuple[str, str]] = []
    other: list[DeliveryThread] = []

    def handler(who: str) -> Any:
        def answer(request: httpx.Request) -> httpx.Response:
            posts.append((who, request.headers["webhook-id"]))
            return httpx.Response(204 if who == "a" else 503)  # B's fail: pending, due later

        return answer

    def thread(name: str) -> DeliveryThread:
        policy = DeliveryPolicy(schedule=(0, 5, 300), jitter=0.0, timeout=0.25)  # lease 0.75 s
        deliverer = Deliverer(
            sessions, policy, resolve=lambda host, port: ["93.184.215.14"],
            transport=httpx.MockTransport(handler(name)), rng=random.Random(0),
        )  # fmt: skip
        return DeliveryThread(deliverer, lease_seconds=0.0)

    a = thread("a")
    other.append(thread("b"))
    attempt = a.deliverer.attempt

    def slow_batch(*args: Any) -> Any:  # A's first attempt takes the whole lease
        done = attempt(*args)
        if len(posts) == 1:
            time.sleep(0.9)
            assert other[0].run_once() == 2  # B claims the two rows A has not reached
        return done

    a.deliverer.attempt = slow_batch  # type: ignore[method-assign]
    assert a.run_once() == 3
    a.deliverer.close()
    other[0].deliverer.close()
    ids = [message for _, message in posts]
    assert len(ids) == 3 == len(set(ids))  # each message once: A skipped what B had claimed
    with sessions() as session:
        rows = {d.message_id: (d.status, d.attempts) for d in session.query(Delivery)}
    assert sorted(rows.values()) == [("delivered", 1), ("pending", 1), ("pending", 1)]


@pytest.mark.parametrize(
    ("rule", "params", "expires"),
    [
        ("run_bound", {"kind": "nonfinite", "expires_with_run": True}, True),
        ("grokking_imminent", {"expires_with_run": False}, False),
    ],
)
def test_sender_honours_the_projects_expires_with_run(
    tmp_path: Path, rule: str, params: dict[str, Any], expires: bool
) -> None:
    # the API accepts and shows `expires_with_run` for any rule, but the sender read it from
    # the default rules only: a custom rule's events were sent after the run ended, and a
    # project that turned it off for grokking_imminent still had them dropped
    import httpx

    from spectrawatch_server.db.models import Run
    from spectrawatch_server.storage import alert_store

    sent: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(204)

    sessions, run_id, delivery_id, _ = make_outbox(tmp_path, rule=rule)
    with sessions.begin() as session:
        run = session.get_one(Run, run_id)
        run.status = "finished"
        alert_store.upsert_rule(session, run.project_id, rule, True, params)
    deliverer = sender(sessions, handler)
    outcome = deliverer.attempt(delivery_id)
    deliverer.close()
    assert outcome is not None
    if expires:
        assert (outcome.status, len(sent)) == ("failed", 0)
        assert outcome.error is not None
        assert "run ended" in outcome.error
    else:
        assert (outcome.status, len(sent)) == ("delivered", 1)


def test_sender_loop_logs_a_database_outage_once_and_backs_off(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database away for a while: one warning (it logged a 50-line traceback every second,
    34 in a 20-s PostgreSQL outage of a 2-process API), waits growing to 30 s, one line when it
    is back."""
    import httpx
    from sqlalchemy.exc import OperationalError

    from spectrawatch_server.webhooks.deliver import DeliveryThread

    sessions, _, _, _ = make_outbox(tmp_path)
    thread = DeliveryThread(sender(sessions, lambda _: httpx.Response(204)), poll_seconds=0.0)
    outage = OperationalError("SELECT 1", {}, Exception("connection refused\nmore text"))
    rounds = iter([outage] * 8 + [None])
    waits: list[float] = []

    def run_once() -> int:
        failure = next(rounds)
        if failure is not None:
            raise failure
        thread._stop.set()  # back: one good round, then stop
        return 0

    monkeypatch.setattr(thread, "run_once", run_once)
    monkeypatch.setattr(thread._stop, "wait", lambda seconds: waits.append(seconds))
    with caplog.at_level("INFO", logger="spectrawatch_server.webhooks.deliver"):
        thread._loop()
    thread.deliverer.close()
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "database unavailable" in messages[0]
    assert "connection refused" in messages[0]
    assert "more text" not in messages[0]
    assert not any(r.exc_info for r in caplog.records)
    assert "back after 8 failed rounds" in messages[1]


ELL = "\u217c"  # SMALL ROMAN NUMERAL FIFTY: "l" to Python's idna codec, refused by httpx


def test_a_host_httpx_cannot_send_is_refused_and_names_resolve_as_sent() -> None:
    """Python's IDNA 2003 codec maps ``localhost`` spelt with U+217C onto ``localhost``, so the
    check resolved and passed it; httpx (IDNA 2008) refuses it, and the test send answered 500."""
    asked: list[str] = []

    def record(host: str, port: int) -> list[str]:
        asked.append(host)
        return ["93.184.215.14"]

    for url in (f"http://{ELL}ocalhost:19718/hook", f"https://hooks.s{ELL}ack.com/x"):
        with pytest.raises(UnsafeTarget) as info:
            check_url(url, Allowlist.parse("127.0.0.1"), record)
        assert info.value.reason == "bad_url"
        assert "cannot be sent" in info.value.message
    assert asked == []
    # a name IDNA 2003 and 2008 spell differently is resolved as httpx will send it
    assert check_url("https://straße.de/x", Allowlist(), record).host == "xn--strae-oqa.de"
    assert asked == ["xn--strae-oqa.de"]


def test_a_stored_url_httpx_refuses_fails_its_delivery_only(tmp_path: Path) -> None:
    """A URL stored before the check refused it raised httpx.InvalidURL out of ``attempt``: the
    test send answered 500, the delivery stayed pending, the sender's batch was abandoned."""
    import httpx

    from spectrawatch_server.db.models import Delivery, Webhook
    from spectrawatch_server.webhooks.deliver import DeliveryThread

    sessions, _, poisoned_id, _ = make_outbox(tmp_path)
    with sessions.begin() as session:
        poisoned = session.get_one(Delivery, poisoned_id)
        session.get_one(Webhook, poisoned.webhook_id).url = f"http://{ELL}ocalhost:19718/hook"
        healthy = Webhook(project_id=1, url="https://hooks.example/ok", secret=generate_secret())
        session.add(healthy)
        session.flush()
        session.add(
            Delivery(
                webhook_id=healthy.id, alert_id=poisoned.alert_id, message_id="msg_ok",
                event=poisoned.event, payload=poisoned.payload, status="pending", attempts=0,
                next_at=poisoned.next_at,
            )
        )  # fmt: skip

    thread = DeliveryThread(sender(sessions, lambda request: httpx.Response(204)))
    assert thread.run_once() == 2
    thread.deliverer.close()
    with sessions() as session:
        rows = {d.message_id: d for d in session.query(Delivery).all()}
        assert rows["msg_ok"].status == "delivered"
        bad = rows[poisoned.message_id]
        assert (bad.status, bad.attempts) == ("failed", 1)
        assert bad.last_error is not None
        assert bad.last_error.startswith("refused: webhook URL cannot be sent")


def test_a_receivers_answer_cannot_forge_log_lines(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The first 500 characters of a non-2xx answer went into the log line and the stored
    error with their newlines: a receiver could append forged log lines."""
    import httpx

    from spectrawatch_server.db.models import Delivery

    forged = "oops\n2024-01-01 WARNING token 1 (admin) revoked\r\x1b[2K\u2028done"
    sessions, _, delivery_id, _ = make_outbox(tmp_path)
    deliverer = sender(sessions, lambda request: httpx.Response(500, text=forged))
    with caplog.at_level("INFO", logger="spectrawatch_server.webhooks.deliver"):
        outcome = deliverer.attempt(delivery_id)
    deliverer.close()
    assert outcome is not None
    expected = "HTTP 500: oops\\n2024-01-01 WARNING token 1 (admin) revoked\\r\\x1b[2K\\u2028done"
    assert outcome.error == expected
    (line,) = [m for r in caplog.records if f"delivery {delivery_id}" in (m := r.getMessage())]
    assert expected in line
    assert line.isprintable()
    with sessions() as session:
        assert session.get_one(Delivery, delivery_id).last_error == expected
