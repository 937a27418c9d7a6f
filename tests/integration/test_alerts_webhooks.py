"""Alerts and signed webhooks end to end: a real server process, real frames, a real receiver.

The receiver is a ``http.server`` on a loopback port; the server is told to allow loopback
targets with ``SPECTRAWATCH_WEBHOOK_ALLOWED_HOSTS=127.0.0.1`` (its SSRF guard refuses them
otherwise, which is tested too) and to retry on a fast schedule.
"""

from __future__ import annotations

import http.server
import json
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import standardwebhooks
import torch
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from spectrawatch import Monitor
from spectrawatch.cli import main as cli_main
from spectrawatch.webhooks import WebhookVerificationError, verify
from spectrawatch.wire import FrameKind, encode_frame
from spectrawatch_server.storage import repository as repo
from tests.factories import make_run, post_frame
from tests.servers import ServerProcess, database_url, free_port, wait_until

pytestmark = pytest.mark.integration

RETRY_SCHEDULE = "0,0.4,0.4,0.4,0.4,0.4"  # six attempts over 2 s


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float


@dataclass
class Receiver:
    """Records every POST; answers with scripted codes per path (then 204)."""

    server: http.server.ThreadingHTTPServer
    received: list[Received] = field(default_factory=list)
    script: dict[str, list[tuple[int, dict[str, str]]]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def at(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.received if r.path == path]


def _handler(receiver_ref: list[Receiver]) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            receiver = receiver_ref[0]
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            with receiver.lock:
                receiver.received.append(
                    Received(self.path, dict(self.headers.items()), body, time.monotonic())
                )
                queue = receiver.script.get(self.path, [])
                code, headers = queue.pop(0) if queue else (204, {})
            self.send_response(code)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


def start_receiver(port: int = 0) -> Receiver:
    ref: list[Receiver] = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), _handler(ref))
    ref.append(Receiver(server))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return ref[0]


def stop_receiver(receiver: Receiver) -> None:
    receiver.server.shutdown()
    receiver.server.server_close()


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    rec = start_receiver()
    yield rec
    stop_receiver(rec)


@pytest.fixture(scope="module")
def alert_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(
        tmp_path_factory.mktemp("alerts"),
        env={
            "SPECTRAWATCH_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1",
            "SPECTRAWATCH_WEBHOOK_RETRY_SCHEDULE": RETRY_SCHEDULE,
            "SPECTRAWATCH_WEBHOOK_JITTER": "0",
            "SPECTRAWATCH_WEBHOOK_POLL_SECONDS": "0.1",
            "SPECTRAWATCH_WORKER_POLL_SECONDS": "0.1",
        },
    ).start()
    yield proc
    proc.stop()


@pytest.fixture
def api(alert_server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"{alert_server.url}/api/v1", timeout=30) as client:
        yield client


def setup_project(
    api: httpx.Client, receiver: Receiver, project: str, **hook: Any
) -> tuple[int, dict[str, Any]]:
    """A run in ``project`` (heavy-tail rules off unless wanted) and a webhook to the receiver."""
    run_id = make_run(api, project=project, name="run")
    response = api.post(
        "/webhooks", json={"project": project, "url": f"{receiver.base}/{project}", **hook}
    )
    assert response.status_code == 201, response.text
    return run_id, response.json()


def disable(api: httpx.Client, project: str, *rules: str) -> None:
    for rule in rules:
        r = api.patch(f"/projects/{project}/alert-rules/{rule}", json={"enabled": False})
        assert r.status_code == 200, r.text


def weights(step: int, seq: int, scale: float = 1.0, nan: bool = False) -> bytes:
    gen = torch.Generator().manual_seed(seq)
    w = torch.randn(24, 12, generator=gen) * scale
    if nan:
        w[3, 4] = float("nan")
        w[5, 6] = float("inf")
    return encode_frame(FrameKind.WEIGHTS, step, seq, {"fc.weight": w})


def events(receiver: Receiver, project: str, secret: str) -> list[dict[str, Any]]:
    """Verified events received for ``project`` (each one checked by our helper)."""
    return [verify(r.body, r.headers, secret) for r in receiver.at(f"/{project}")]


def test_nan_frame_opens_alert_delivered_signed_and_resolves(
    api: httpx.Client, receiver: Receiver
) -> None:
    project = "nan"
    run_id, hook = setup_project(api, receiver, project)
    disable(api, project, "alpha_out_of_range", "farms_alpha_out_of_range")
    secret = hook["secret"]
    assert secret.startswith("whsec_")
    assert "secret" not in api.get(f"/webhooks/{hook['id']}").json()  # shown once only

    t0 = time.monotonic()
    assert post_frame(api, run_id, weights(10, 0, nan=True), seq=0).status_code == 202
    wait_until(lambda: len(receiver.at(f"/{project}")) >= 1, timeout=30)
    latency = receiver.at(f"/{project}")[0].at - t0
    assert latency < 5.0  # target < 2 s (benchmarks/alerts_latency.py); loose on a shared box

    got = receiver.at(f"/{project}")[0]
    event = verify(got.body, got.headers, secret)
    # the reference implementation agrees
    assert standardwebhooks.Webhook(secret).verify(got.body, got.headers) == event
    with pytest.raises(WebhookVerificationError):
        verify(got.body, got.headers, "whsec_" + "A" * 44)
    assert event["type"] == "alert.opened"
    data = event["data"]
    assert (data["rule"], data["layer"], data["step"]) == ("nonfinite", "", 10)
    assert (data["values"]["count"], data["values"]["layers"]) == (2, ["fc.weight"])
    assert data["run"]["id"] == run_id
    assert data["dashboard_url"].endswith(f"/runs/{run_id}")

    alerts = api.get(f"/runs/{run_id}/alerts").json()
    assert [(a["rule"], a["status"]) for a in alerts] == [("nonfinite", "open")]

    # another NaN frame: same episode, no second alert
    assert post_frame(api, run_id, weights(20, 1, nan=True), seq=1).status_code == 202
    # a finite frame resolves it
    assert post_frame(api, run_id, weights(30, 2), seq=2).status_code == 202
    wait_until(lambda: len(receiver.at(f"/{project}")) >= 2, timeout=30)
    types = [e["type"] for e in events(receiver, project, secret)]
    assert types == ["alert.opened", "alert.resolved"]
    alerts = api.get(f"/runs/{run_id}/alerts").json()
    assert [(a["rule"], a["status"], a["resolved_step"]) for a in alerts] == [
        ("nonfinite", "resolved", 30)
    ]
    deliveries = api.get(f"/webhooks/{hook['id']}/deliveries").json()
    assert {d["status"] for d in deliveries} == {"delivered"}
    assert all(len(d["log"]) == 1 and d["log"][0]["status_code"] == 204 for d in deliveries)


def _nan_alert(api: httpx.Client, project: str, name: str) -> dict[str, Any]:
    """The alert a NaN frame opens in a new run ``name`` of ``project``."""
    run_id = make_run(api, project=project, name=name)
    assert post_frame(api, run_id, weights(10, 0, nan=True), seq=0).status_code == 202
    wait_until(lambda: bool(api.get(f"/runs/{run_id}/alerts").json()), timeout=30)
    alert: dict[str, Any] = api.get(f"/runs/{run_id}/alerts").json()[0]
    return alert


def test_a_deleted_alert_or_webhook_id_never_names_a_new_one(api: httpx.Client) -> None:
    """SQLite handed the newest row's id, once deleted, to the next row (no AUTOINCREMENT):
    a deleted run's alert gave its id to the next run's alert, and a ``PATCH /alerts/{id}``
    meant for the old one acknowledged the new one; a retried ``DELETE /webhooks/{id}``
    deleted the webhook created after it. Ids are now never reused: the stale id is 404."""
    project = "id-reuse"
    old = _nan_alert(api, project, "a")
    assert api.delete(f"/runs/{old['run_id']}").status_code == 200
    new = _nan_alert(api, project, "b")
    assert new["id"] != old["id"]
    stale = api.patch(f"/alerts/{old['id']}", json={"acknowledged": True})
    assert stale.status_code == 404, stale.text
    assert api.get(f"/runs/{new['run_id']}/alerts").json()[0]["acknowledged_at"] is None
    url = "https://93.184.216.34/hook"
    first = api.post("/webhooks", json={"project": project, "url": url + "1"}).json()["id"]
    assert api.delete(f"/webhooks/{first}").status_code == 204
    second = api.post("/webhooks", json={"project": project, "url": url + "2"}).json()["id"]
    assert second != first
    assert api.delete(f"/webhooks/{first}").status_code == 404  # a retried DELETE
    assert api.delete(f"/webhooks/{second}").status_code == 204


def _page_ids(api: httpx.Client, url: str, **params: Any) -> tuple[list[int], str | None]:
    """The ids of one page of a list and the URL its ``Link: rel="next"`` names (or None)."""
    resp = api.get(url, params=params or None)  # {} would drop a link's query
    assert resp.status_code == 200, resp.text
    link = resp.links.get("next", {}).get("url")
    return [item["id"] for item in resp.json()], link and str(resp.url.join(link))


def test_alerts_and_deliveries_pages_link_the_next_by_before_id(
    api: httpx.Client, receiver: Receiver
) -> None:
    """``/alerts``, a run's alerts and an endpoint's deliveries sent no ``Link`` (a client
    following links stopped at the first page, 100 alerts by default) and paged by ``offset``
    alone, newest first: an alert opened between two pages listed one twice. Each now links
    its next page by ``before_id``, which an alert opened meanwhile does not shift."""
    project = "alert-pages"
    run_id = make_run(api, project=project, name="twice")
    disable(api, project, "alpha_out_of_range", "farms_alpha_out_of_range")  # NaN alerts only
    hook = api.post("/webhooks", json={"project": project, "url": f"{receiver.base}/{project}"})
    assert hook.status_code == 201, hook.text
    for seq, nan in enumerate((True, False, True)):  # two episodes of one run
        assert post_frame(api, run_id, weights(10 * seq, seq, nan=nan), seq=seq).status_code == 202
    wait_until(lambda: len(api.get(f"/runs/{run_id}/alerts").json()) == 2, timeout=30)
    third = _nan_alert(api, project, "other")["id"]
    older = [a["id"] for a in api.get(f"/runs/{run_id}/alerts").json()]
    page, link = _page_ids(api, "/alerts", project=project, limit=2)
    assert page == [third, older[0]]
    assert link is not None
    assert f"before_id={older[0]}" in link
    assert "offset" not in link
    _nan_alert(api, project, "newer")  # opened between the two pages
    page, link = _page_ids(api, link)
    assert (page, link) == ([older[1]], None)  # none repeated, none skipped
    page, link = _page_ids(api, f"/runs/{run_id}/alerts", limit=1)
    assert page == older[:1]
    assert link is not None
    assert _page_ids(api, link) == (older[1:], None)
    assert api.get("/alerts", params={"before_id": 0}).status_code == 422
    deliveries = f"/webhooks/{hook.json()['id']}/deliveries"
    wait_until(lambda: len(api.get(deliveries).json()) == 5, timeout=30)  # 4 opened, 1 resolved
    every = [d["id"] for d in api.get(deliveries).json()]
    page, link = _page_ids(api, deliveries, limit=3)
    assert page == every[:3]
    assert link is not None
    assert _page_ids(api, link) == (every[3:], None)


def test_acknowledged_alert_sends_nothing_more_and_leaves_the_runs_count(
    api: httpx.Client,
    receiver: Receiver,
    alert_server: ServerProcess,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``spectrawatch alerts ack``: the episode's ``alert.opened`` still retrying is dropped
    (one attempt reached the receiver), further bad frames of the same episode send nothing,
    the runs list counts no open alert, and its resolution is still sent; ``--undo`` and
    ``--run`` (every open alert of a run) work on the real server."""
    project = "ack"
    run_id, hook = setup_project(api, receiver, project)
    disable(api, project, "alpha_out_of_range", "farms_alpha_out_of_range")
    receiver.script[f"/{project}"] = [(503, {"Retry-After": "4"})]  # the retry waits 4 s

    def cell() -> str:
        page = api.get(f"{alert_server.url}/", params={"project": project, "fragment": "true"})
        return page.text

    assert post_frame(api, run_id, weights(10, 0, nan=True), seq=0).status_code == 202
    wait_until(lambda: len(receiver.at(f"/{project}")) == 1, timeout=30)
    (alert,) = api.get(f"/runs/{run_id}/alerts").json()
    assert f'href="/runs/{run_id}/alerts">1</a>' in cell()
    base = ["--url", alert_server.url]
    assert cli_main(["alerts", "ack", str(alert["id"]), *base]) == 0
    assert f"acknowledged   {alert['message']}" in capsys.readouterr().out
    assert f'href="/runs/{run_id}/alerts">' not in cell()  # 0 open alerts needing attention

    def opened() -> dict[str, Any]:
        rows = api.get(f"/webhooks/{hook['id']}/deliveries").json()
        return next(d for d in rows if d["event"] == "alert.opened")

    wait_until(lambda: opened()["status"] == "failed", timeout=30)
    assert opened()["last_error"] == "dropped: alert acknowledged before delivery"
    assert post_frame(api, run_id, weights(20, 1, nan=True), seq=1).status_code == 202
    assert post_frame(api, run_id, weights(30, 2), seq=2).status_code == 202
    wait_until(lambda: len(receiver.at(f"/{project}")) == 2, timeout=30)
    time.sleep(1.0)  # nothing else arrives
    types = [e["type"] for e in events(receiver, project, hook["secret"])]
    assert types == ["alert.opened", "alert.resolved"]
    (done,) = api.get(f"/runs/{run_id}/alerts").json()
    assert (done["status"], done["acknowledged_by"]) == ("resolved", "anonymous")

    assert post_frame(api, run_id, weights(40, 3, nan=True), seq=3).status_code == 202
    wait_until(lambda: len(receiver.at(f"/{project}")) == 3, timeout=30)  # a new episode
    assert cli_main(["alerts", "ack", "--run", str(run_id), "--json", *base]) == 0
    (acked,) = json.loads(capsys.readouterr().out)
    assert acked["status"] == "open"
    assert acked["acknowledged_at"] is not None
    assert cli_main(["alerts", "ack", "--run", str(run_id), "--undo", *base]) == 0
    shown = ["alerts", "list", "--run", str(run_id), "--unacknowledged", "--status", "open"]
    capsys.readouterr()
    assert cli_main([*shown, *base]) == 0
    assert f"{acked['id']:>6}  open" in capsys.readouterr().out
    # `alerts list` follows the pages (it printed the server's first page only: 100 alerts)
    monkeypatch.setattr("spectrawatch._cli_http.PAGE_MAX", 1)
    both = ["alerts", "list", "--run", str(run_id), "--json", *base]
    assert cli_main([*both, "--all"]) == 0
    assert [a["id"] for a in json.loads(capsys.readouterr().out)] == [acked["id"], done["id"]]
    assert cli_main([*both, "--limit", "1"]) == 0
    assert [a["id"] for a in json.loads(capsys.readouterr().out)] == [acked["id"]]
    monkeypatch.undo()
    assert cli_main(["alerts", "ack", *base]) == 1  # nothing named
    assert "error: name the alerts" in capsys.readouterr().err


def test_spectral_norm_blowup_fires_once_per_episode(api: httpx.Client, receiver: Receiver) -> None:
    project = "blowup"
    run_id, hook = setup_project(api, receiver, project, events=["alert.opened"])
    disable(api, project, "alpha_out_of_range", "farms_alpha_out_of_range")
    scales = [1.0, 1.1, 0.9, 1.0, 100.0, 120.0]
    for seq, scale in enumerate(scales):
        assert post_frame(api, run_id, weights(100 * seq, seq, scale), seq=seq).status_code == 202
    wait_until(lambda: len(receiver.at(f"/{project}")) >= 1, timeout=30)
    time.sleep(1.0)  # the sixth frame must not produce a second episode
    received = events(receiver, project, hook["secret"])
    assert [e["data"]["rule"] for e in received] == ["spectral_norm_blowup"]
    values = received[0]["data"]["values"]
    assert received[0]["data"]["step"] == 400
    assert values["metric"] == "norm.spectral"
    assert values["ratio"] == pytest.approx(values["value"] / values["baseline"])
    assert values["ratio"] > 50


def test_alpha_collapse_alert(api: httpx.Client, receiver: Receiver) -> None:
    """Pareto(1)-tailed entries give an ESD power law with alpha ~1.4 < 2 (over-fit)."""
    project = "alpha"
    run_id, hook = setup_project(api, receiver, project, events=["alert.opened:alpha_out_of_range"])
    gen = torch.Generator().manual_seed(0)
    heavy = torch.rand(96, 48, generator=gen) ** -1.0 * torch.randn(96, 48, generator=gen).sign()
    body = encode_frame(FrameKind.WEIGHTS, 500, 0, {"attn.weight": heavy})
    assert post_frame(api, run_id, body, seq=0).status_code == 202
    wait_until(lambda: len(receiver.at(f"/{project}")) >= 1, timeout=60)
    (event,) = events(receiver, project, hook["secret"])
    data = event["data"]
    assert (data["rule"], data["layer"]) == ("alpha_out_of_range", "attn.weight")
    assert data["values"]["value"] < 2.0
    alpha = api.get(f"/runs/{run_id}/metrics", params={"name": "htsr.alpha"}).json()["series"]
    assert alpha[0]["values"][-1] == pytest.approx(data["values"]["value"])


def test_alpha_above_range_fires_only_after_the_layer_was_in_range(api: httpx.Client) -> None:
    """A layer near-random from the first snapshot (alpha > 6, as at initialisation) raises no
    alert; once it was within [2, 6], drifting above 6 does (``above_after_in_range``)."""
    project = "alpha-armed"
    run_id = make_run(api, project=project, name="run")
    disable(api, project, "farms_alpha_out_of_range")
    gen = torch.Generator().manual_seed(0)
    gauss = torch.randn(256, 128, generator=gen)  # alpha 10.9 (MP-like bulk)
    heavy = (
        torch.rand(256, 128, generator=gen) ** -0.5 * torch.randn(256, 128, generator=gen).sign()
    )
    expected = [(100, gauss, []), (200, heavy, []), (300, gauss, [300])]
    for seq, (step, w, alerted) in enumerate(expected):
        body = encode_frame(FrameKind.WEIGHTS, step, seq, {"l.weight": w})
        assert post_frame(api, run_id, body, seq=seq).status_code == 202
        wait_until(
            lambda n=seq + 1: (
                [f["status"] for f in api.get(f"/runs/{run_id}/frames").json()] == ["done"] * n
            ),
            timeout=60,
        )
        alerts = api.get(f"/runs/{run_id}/alerts").json()
        assert [a["step"] for a in alerts if a["rule"] == "alpha_out_of_range"] == alerted
    alpha = api.get(f"/runs/{run_id}/metrics", params={"name": "htsr.alpha"}).json()["series"]
    values = alpha[0]["values"]
    assert values[0] > 6
    assert 2 < values[1] < 6
    assert values[2] > 6


def test_correlation_traps_rule_is_opt_in(api: httpx.Client, receiver: Receiver) -> None:
    """Off by default: a weight with an outsized entry raises nothing; once enabled, the next
    such frame opens an alert naming the layer and its trap count, delivered signed."""
    project = "traps"
    run_id, hook = setup_project(api, receiver, project, events=["alert.opened:correlation_traps"])
    rules = {r["name"]: r for r in api.get(f"/projects/{project}/alert-rules").json()}
    assert rules["correlation_traps"]["enabled"] is False
    # a default switched and switched back is the default again: nothing stored, not customized
    for flip in (True, False):
        r = api.patch(f"/projects/{project}/alert-rules/correlation_traps", json={"enabled": flip})
        assert r.status_code == 200, r.text
        assert (r.json()["enabled"], r.json()["customized"]) == (flip, flip)
    rules = {r["name"]: r for r in api.get(f"/projects/{project}/alert-rules").json()}
    assert (rules["correlation_traps"]["enabled"], rules["correlation_traps"]["customized"]) == (
        False,
        False,
    )
    # its parameters alone, never edited before: still off (a params-only PATCH enabled it)
    edited = api.patch(
        f"/projects/{project}/alert-rules/correlation_traps", json={"params": {"fire_after": 1}}
    )
    assert edited.status_code == 200, edited.text
    assert (edited.json()["enabled"], edited.json()["customized"]) == (False, True)
    assert api.delete(f"/projects/{project}/alert-rules/correlation_traps").status_code == 204
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(256, 128, generator=gen)
    w[3, 5] = 40.0

    def send(seq: int, weight: torch.Tensor) -> None:
        body = encode_frame(FrameKind.WEIGHTS, 100 * (seq + 1), seq, {"fc.weight": weight})
        assert post_frame(api, run_id, body, seq=seq).status_code == 202
        wait_until(
            lambda: (
                [f["status"] for f in api.get(f"/runs/{run_id}/frames").json()]
                == ["done"] * (seq + 1)
            ),
            timeout=60,
        )

    send(0, w)
    traps = api.get(f"/runs/{run_id}/metrics", params={"name": "htsr.num_traps"}).json()
    assert traps["series"][0]["values"] == [1.0]
    assert not [
        a for a in api.get(f"/runs/{run_id}/alerts").json() if a["rule"] == "correlation_traps"
    ]
    r = api.patch(f"/projects/{project}/alert-rules/correlation_traps", json={"enabled": True})
    assert r.status_code == 200, r.text
    send(1, w * 1.01)
    wait_until(lambda: len(receiver.at(f"/{project}")) >= 1, timeout=60)
    (event,) = events(receiver, project, hook["secret"])
    data = event["data"]
    assert (data["rule"], data["layer"], data["step"]) == ("correlation_traps", "fc.weight", 200)
    assert data["values"]["value"] == 1.0


def test_retries_on_500_then_one_logical_delivery(api: httpx.Client, receiver: Receiver) -> None:
    project = "retry"
    receiver.script[f"/{project}"] = [(500, {}), (503, {"Retry-After": "1"}), (200, {})]
    run_id, hook = setup_project(api, receiver, project)
    disable(api, project, "alpha_out_of_range", "farms_alpha_out_of_range")
    assert post_frame(api, run_id, weights(1, 0, nan=True), seq=0).status_code == 202
    wait_until(lambda: len(receiver.at(f"/{project}")) >= 3, timeout=30)
    got = receiver.at(f"/{project}")
    assert len({r.headers["webhook-id"] for r in got}) == 1  # same message id on every retry
    assert got[2].at - got[1].at >= 0.9  # Retry-After: 1 honoured (schedule says 0.3 s)
    for r in got:
        verify(r.body, r.headers, hook["secret"])
    wait_until(
        lambda: api.get(f"/webhooks/{hook['id']}/deliveries").json()[0]["status"] == "delivered"
    )
    (delivery,) = api.get(f"/webhooks/{hook['id']}/deliveries").json()
    assert [a["status_code"] for a in delivery["log"]] == [500, 503, 200]
    assert delivery["attempts"] == 3
    assert all(a["latency_ms"] is not None for a in delivery["log"])

    # manual redelivery: same webhook-id again
    r = api.post(f"/deliveries/{delivery['id']}/redeliver")
    assert r.status_code == 200, r.text
    wait_until(lambda: len(receiver.at(f"/{project}")) >= 4, timeout=30)
    assert receiver.at(f"/{project}")[3].headers["webhook-id"] == got[0].headers["webhook-id"]


def test_gives_up_after_schedule(api: httpx.Client, receiver: Receiver) -> None:
    project = "giveup"
    receiver.script[f"/{project}"] = [(500, {})] * 10
    run_id, hook = setup_project(api, receiver, project)
    disable(api, project, "alpha_out_of_range", "farms_alpha_out_of_range")
    assert post_frame(api, run_id, weights(1, 0, nan=True), seq=0).status_code == 202

    def failed() -> bool:
        rows = api.get(f"/webhooks/{hook['id']}/deliveries").json()
        return bool(rows) and rows[0]["status"] == "failed"

    wait_until(failed, timeout=30)
    (delivery,) = api.get(f"/webhooks/{hook['id']}/deliveries").json()
    assert delivery["attempts"] == len(RETRY_SCHEDULE.split(","))
    assert f"gave up after {delivery['attempts']} attempts" in delivery["last_error"]


def test_410_disables_the_endpoint(api: httpx.Client, receiver: Receiver) -> None:
    project = "gone"
    receiver.script[f"/{project}"] = [(410, {})]
    run_id, hook = setup_project(api, receiver, project)
    disable(api, project, "alpha_out_of_range", "farms_alpha_out_of_range")
    assert post_frame(api, run_id, weights(1, 0, nan=True), seq=0).status_code == 202
    wait_until(lambda: not api.get(f"/webhooks/{hook['id']}").json()["enabled"], timeout=30)
    state = api.get(f"/webhooks/{hook['id']}").json()
    assert "410" in state["disabled_reason"]
    (delivery,) = api.get(f"/webhooks/{hook['id']}/deliveries").json()
    assert delivery["status"] == "failed"
    assert delivery["attempts"] == 1
    # later alerts are not sent to a disabled endpoint
    assert post_frame(api, run_id, weights(2, 1), seq=1).status_code == 202
    wait_until(lambda: api.get(f"/runs/{run_id}/alerts").json()[0]["status"] == "resolved")
    time.sleep(0.5)
    assert len(receiver.at(f"/{project}")) == 1
    assert len(api.get(f"/webhooks/{hook['id']}/deliveries").json()) == 1


def test_disabling_or_deleting_a_rule_resolves_its_open_alerts(
    api: httpx.Client, receiver: Receiver
) -> None:
    """Nothing evaluates a disabled or deleted rule, so its open alerts are resolved then (an
    ``alert.resolved`` event each); resetting a default rule leaves it on and its alerts open."""
    project = "ruleoff"
    run_id, hook = setup_project(api, receiver, project)
    disable(api, project, "alpha_out_of_range", "farms_alpha_out_of_range")
    custom = {"params": {"kind": "nonfinite", "severity": "info"}}
    r = api.patch(f"/projects/{project}/alert-rules/nan_watch", json=custom)
    assert r.status_code == 200, r.text
    assert post_frame(api, run_id, weights(10, 0, nan=True), seq=0).status_code == 202
    wait_until(lambda: len(receiver.at(f"/{project}")) >= 2, timeout=30)

    def alerts() -> dict[str, dict[str, Any]]:
        return {a["rule"]: a for a in api.get(f"/runs/{run_id}/alerts").json()}

    assert {k: a["status"] for k, a in alerts().items()} == {
        "nonfinite": "open",
        "nan_watch": "open",
    }
    # a default rule reset to its defaults is still on: its alert stays open
    assert api.delete(f"/projects/{project}/alert-rules/nonfinite").status_code == 204
    assert alerts()["nonfinite"]["status"] == "open"

    disable(api, project, "nonfinite")
    nonfinite = alerts()["nonfinite"]
    assert (nonfinite["status"], nonfinite["resolved_step"]) == ("resolved", 10)
    assert nonfinite["resolved_at"] is not None
    assert nonfinite["values"]["resolved_reason"] == "rule disabled"
    assert alerts()["nan_watch"]["status"] == "open"

    assert api.delete(f"/projects/{project}/alert-rules/nan_watch").status_code == 204
    nan_watch = alerts()["nan_watch"]
    assert (nan_watch["status"], nan_watch["values"]["resolved_reason"]) == (
        "resolved",
        "rule deleted",
    )
    assert api.get("/alerts", params={"project": project, "status": "open"}).json() == []

    wait_until(lambda: len(receiver.at(f"/{project}")) >= 4, timeout=30)
    got = [(e["type"], e["data"]["rule"]) for e in events(receiver, project, hook["secret"])]
    assert sorted(got[:2]) == [("alert.opened", "nan_watch"), ("alert.opened", "nonfinite")]
    assert sorted(got[2:]) == [("alert.resolved", "nan_watch"), ("alert.resolved", "nonfinite")]
    reasons = {
        e["data"]["rule"]: (e["data"]["status"], e["data"]["values"]["resolved_reason"])
        for e in events(receiver, project, hook["secret"])[2:]
    }
    assert reasons == {
        "nonfinite": ("resolved", "rule disabled"),
        "nan_watch": ("resolved", "rule deleted"),
    }


def test_changing_a_rule_resolves_its_alerts_and_the_new_rule_opens_its_own(
    api: httpx.Client, receiver: Receiver
) -> None:
    """A rule's open alerts came from its old condition: a parameter change (or resetting a
    customized default) resolves them as ``rule changed``; the next evaluation under the new
    rule opens a new episode where it holds. Re-enabling without a change resolves nothing."""
    project = "rulechange"
    run_id, _ = setup_project(api, receiver, project)
    disable(api, project, "alpha_out_of_range", "farms_alpha_out_of_range")
    assert post_frame(api, run_id, weights(10, 0, nan=True), seq=0).status_code == 202

    def nonfinite() -> list[dict[str, Any]]:
        got = [a for a in api.get(f"/runs/{run_id}/alerts").json() if a["rule"] == "nonfinite"]
        return sorted(got, key=lambda a: a["id"])

    wait_until(lambda: len(nonfinite()) == 1, timeout=30)
    first = nonfinite()[0]["id"]
    r = api.patch(f"/projects/{project}/alert-rules/nonfinite", json={"enabled": True})
    assert r.status_code == 200, r.text
    assert [a["status"] for a in nonfinite()] == ["open"]  # nothing changed: still open
    r = api.patch(
        f"/projects/{project}/alert-rules/nonfinite", json={"params": {"severity": "warning"}}
    )
    assert r.status_code == 200, r.text
    (old,) = nonfinite()
    assert (old["status"], old["values"]["resolved_reason"]) == ("resolved", "rule changed")
    assert post_frame(api, run_id, weights(20, 1, nan=True), seq=1).status_code == 202
    wait_until(lambda: len(nonfinite()) == 2, timeout=30)
    new = nonfinite()[1]
    assert (new["status"], new["severity"], new["step"]) == ("open", "warning", 20)
    assert new["id"] != first
    # resetting the customized default: its condition changed back, so resolved again
    assert api.delete(f"/projects/{project}/alert-rules/nonfinite").status_code == 204
    assert [(a["status"], a["values"].get("resolved_reason")) for a in nonfinite()] == [
        ("resolved", "rule changed"),
        ("resolved", "rule changed"),
    ]


def test_test_send_and_slack_format(api: httpx.Client, receiver: Receiver) -> None:
    project = "ping"
    make_run(api, project=project, name="r")
    r = api.post(
        "/webhooks",
        json={"project": project, "url": f"{receiver.base}/{project}", "format": "slack"},
    )
    hook = r.json()
    result = api.post(f"/webhooks/{hook['id']}/test").json()
    assert result["status"] == "delivered", result
    assert result["log"][0]["status_code"] == 204
    (got,) = receiver.at(f"/{project}")
    body = verify(got.body, got.headers, hook["secret"])
    assert "test delivery" in body["text"]


def test_server_log_does_not_name_webhook_urls(receiver: Receiver, tmp_path: Path) -> None:
    """At the default log level (info), no line names a webhook's URL: for Slack's and
    Discord's incoming webhooks the URL is the receiver's credential (httpx logged it, the
    secret path included, for every attempt)."""
    proc = ServerProcess(
        tmp_path,
        env={"SPECTRAWATCH_LOG_LEVEL": "info", "SPECTRAWATCH_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1"},
    ).start()
    secret_path = "/services/T0LOGS/B0LOGS/Xq7secretPathPart"
    try:
        with httpx.Client(base_url=f"{proc.url}/api/v1", timeout=30) as api:
            make_run(api, project="logs", name="r")
            hook = api.post(
                "/webhooks", json={"project": "logs", "url": receiver.base + secret_path}
            )
            result = api.post(f"/webhooks/{hook.json()['id']}/test").json()
            assert result["status"] == "delivered", result
    finally:
        proc.stop()
    assert len(receiver.at(secret_path)) == 1
    log = proc.log_path.read_text()
    assert '"POST /api/v1/webhooks HTTP/1.1" 201' in log  # info lines are written
    assert "Xq7secretPathPart" not in log


def test_client_stats_alone_open_the_drops_alert(api: httpx.Client) -> None:
    """A client whose every frame was dropped only reports its counters: that must alert."""
    run_id = make_run(api, project="drops", name="r")
    stats = {"dropped_frames": 5, "spool_overflow": 2}
    assert api.post(f"/runs/{run_id}/client-stats", json=stats).status_code == 200
    (alert,) = api.get(f"/runs/{run_id}/alerts").json()
    assert (alert["rule"], alert["status"]) == ("client_drops", "open")


class _HostileReceiver:
    """A raw socket server that answers every request in a hostile way and counts bytes sent:
    ``trickle`` sends a status line, then one header byte per 0.3 s; ``huge`` answers 500
    with a 200 MB body."""

    def __init__(self, mode: str) -> None:
        import socket

        self.mode = mode
        self.sent = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: Any) -> None:
        with conn:
            conn.settimeout(60)
            try:
                conn.recv(65536)
                if self.mode == "trickle":
                    conn.sendall(b"HTTP/1.1 200 OK\r\n")
                    for _ in range(200):
                        time.sleep(0.3)
                        conn.sendall(b"x")
                        self.sent += 1
                else:
                    size = 200 * 2**20
                    conn.sendall(f"HTTP/1.1 500 Oops\r\ncontent-length: {size}\r\n\r\n".encode())
                    chunk = b"E" * 2**16
                    while self.sent < size:
                        conn.sendall(chunk)
                        self.sent += len(chunk)
            except OSError:  # the server gave up on us: what we want
                pass

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("mode", ["trickle", "huge"])
def test_hostile_receiver_cannot_hold_or_flood_the_sender(api: httpx.Client, mode: str) -> None:
    """httpx's timeout is per read: a receiver trickling bytes held an attempt for minutes, and
    the whole answer was read into memory before being cut to 500 characters for the log."""
    hostile = _HostileReceiver(mode)
    try:
        project = f"hostile-{mode}"
        make_run(api, project=project, name="r")
        hook = api.post(
            "/webhooks", json={"project": project, "url": f"http://127.0.0.1:{hostile.port}/h"}
        ).json()
        started = time.monotonic()
        result = api.post(f"/webhooks/{hook['id']}/test").json()
        took = time.monotonic() - started
    finally:
        hostile.close()
    assert result["status"] == "failed", result
    assert took < 5.0 + 3.0  # SPECTRAWATCH_WEBHOOK_TIMEOUT_SECONDS (5) bounds the whole attempt
    error = result["log"][0]["error"]
    if mode == "trickle":
        assert "timed out: no complete answer within 5 s" in error
    else:
        assert error.startswith("HTTP 500: EEEE")
        assert len(error) <= len("HTTP 500: ") + 500
        time.sleep(0.5)
        assert hostile.sent < 32 * 2**20  # it stopped reading: not 200 MB into memory


def test_test_sends_in_flight_are_bounded(api: httpx.Client) -> None:
    """Test deliveries to a slow receiver run in the API's request threads: past four at once
    the API answers 429 instead of letting them take every thread."""
    from concurrent.futures import ThreadPoolExecutor

    hostile = _HostileReceiver("trickle")
    try:
        make_run(api, project="slow-tests", name="r")
        hook = api.post(
            "/webhooks", json={"project": "slow-tests", "url": f"http://127.0.0.1:{hostile.port}"}
        ).json()
        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(lambda _: api.post(f"/webhooks/{hook['id']}/test"), range(8)))
        assert api.get("/alerts").status_code == 200
    finally:
        hostile.close()
    statuses = sorted(r.status_code for r in codes)
    assert statuses.count(200) >= 1
    assert statuses.count(200) <= 4
    assert statuses.count(429) == 8 - statuses.count(200)
    busy = next(r for r in codes if r.status_code == 429)
    assert busy.json()["error"]["code"] == "too_many_test_sends"
    assert busy.headers["retry-after"] == "5"


def test_a_webhook_deleted_during_its_test_send_is_404(api: httpx.Client) -> None:
    """The test send's delivery goes with its webhook: its outcome was a 409 "retry it" (the
    attempt could not be recorded), and is now a 404 naming the deleted webhook."""
    from concurrent.futures import ThreadPoolExecutor

    hostile = _HostileReceiver("trickle")  # holds the attempt for its 5 s timeout
    try:
        make_run(api, project="deleted-mid-test", name="r")
        hook = api.post(
            "/webhooks",
            json={"project": "deleted-mid-test", "url": f"http://127.0.0.1:{hostile.port}"},
        ).json()
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(api.post, f"/webhooks/{hook['id']}/test")
            wait_until(lambda: hostile.sent > 0, timeout=10)
            assert api.delete(f"/webhooks/{hook['id']}").status_code == 204
            answer = pending.result()
    finally:
        hostile.close()
    assert answer.status_code == 404, answer.text
    assert answer.json()["error"]["code"] == "webhook_not_found"
    assert api.get("/health").status_code == 200


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://127.0.0.2:9/x", "loopback"),
        ("http://[::1]:9/x", "loopback"),
        ("http://169.254.169.254/latest/meta-data", "link-local"),
        ("http://10.1.2.3/x", "private"),
        ("http://192.168.0.10/x", "private"),
        ("http://224.0.0.1/x", "multicast"),
        ("http://0.0.0.0/x", "unspecified"),
        ("ftp://example.com/x", "http(s)"),
    ],
)
def test_ssrf_targets_refused(api: httpx.Client, url: str, reason: str) -> None:
    make_run(api, project="ssrf", name="r")
    r = api.post("/webhooks", json={"project": "ssrf", "url": url})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "unsafe_webhook_url"
    assert error["message"].startswith("url:")
    assert reason in error["message"]


@pytest.mark.parametrize(
    ("body", "code", "needle"),
    [
        ({"params": {"above": "high"}}, "invalid_rule", "params.above"),
        ({"params": {"metric": "htsr.alphaa"}}, "invalid_rule", "unknown metric"),
        ({"params": {"tresh": 1}}, "invalid_rule", "params.tresh"),
        ({"params": {"below": 7.0}}, "invalid_rule", "params.below"),
        ({"params": {"kind": "growth"}}, "invalid_rule", "params.kind"),
    ],
)
def test_bad_rule_input_is_422(
    api: httpx.Client, body: dict[str, Any], code: str, needle: str
) -> None:
    make_run(api, project="badrules", name="r")
    r = api.patch("/projects/badrules/alert-rules/alpha_out_of_range", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == code
    assert needle in r.json()["error"]["message"]


def test_editing_an_unknown_rule_is_404(api: httpx.Client) -> None:
    make_run(api, project="norule", name="r")
    r = api.patch("/projects/norule/alert-rules/nosuch", json={"enabled": False})
    assert (r.status_code, r.json()["error"]["code"]) == (404, "rule_not_found")
    assert "has no rule 'nosuch'; a new custom rule needs params.kind" in r.text


def test_bad_webhook_input_is_4xx(api: httpx.Client, receiver: Receiver) -> None:
    make_run(api, project="badhooks", name="r")
    url = f"{receiver.base}/badhooks"
    r = api.post(
        "/webhooks", json={"project": "badhooks", "url": url, "events": ["alert.exploded"]}
    )
    assert (r.status_code, r.json()["error"]["code"]) == (422, "invalid_event")
    r = api.post("/webhooks", json={"project": "badhooks", "url": url, "secret": "hunter2"})
    assert (r.status_code, r.json()["error"]["code"]) == (422, "invalid_secret")
    r = api.post("/webhooks", json={"project": "badhooks", "url": "not a url"})
    assert (r.status_code, r.json()["error"]["code"]) == (422, "unsafe_webhook_url")
    r = api.post("/webhooks", json={"project": "nope", "url": url})
    assert r.status_code == 404


def test_a_second_webhook_for_the_same_url_is_409_naming_the_first(
    api: httpx.Client, receiver: Receiver
) -> None:
    """A provisioning script run twice registered the URL twice: two webhooks, every event
    delivered twice. The second POST (or a PATCH onto a URL another endpoint has) is now 409
    ``webhook_exists`` naming the first, which keeps the only delivery; another project may
    register the same URL."""
    project, url = "duphooks", f"{receiver.base}/duphooks"
    run_id = make_run(api, project=project, name="r")
    disable(api, project, "alpha_out_of_range", "farms_alpha_out_of_range")
    first = api.post("/webhooks", json={"project": project, "url": url})
    assert first.status_code == 201, first.text
    hook = first.json()["id"]
    again = api.post("/webhooks", json={"project": project, "url": url, "format": "slack"})
    assert (again.status_code, again.json()["error"]["code"]) == (409, "webhook_exists")
    assert f"webhook {hook} for this URL" in again.json()["error"]["message"]
    assert again.headers["location"] == f"/api/v1/webhooks/{hook}"
    # other spellings of the same endpoint: scheme and host case, a fragment, an empty query
    scheme, rest = url.split("://", 1)
    for spelling in (f"{scheme.upper()}://{rest}", f"{url}#x", f"{url}?"):
        dup = api.post("/webhooks", json={"project": project, "url": spelling})
        assert (dup.status_code, dup.json()["error"]["code"]) == (409, "webhook_exists"), spelling
    listed = api.get("/webhooks", params={"project": project}).json()
    assert [(w["id"], w["format"]) for w in listed] == [(hook, "standard")]
    make_run(api, project="duphooks-b", name="r")
    other = api.post("/webhooks", json={"project": "duphooks-b", "url": url})
    assert other.status_code == 201, other.text
    second = api.post("/webhooks", json={"project": project, "url": url + "/2"}).json()["id"]
    moved = api.patch(f"/webhooks/{second}", json={"url": url})
    assert (moved.status_code, moved.json()["error"]["code"]) == (409, "webhook_exists")
    assert api.patch(f"/webhooks/{second}", json={"url": url + "/2"}).status_code == 200
    assert api.delete(f"/webhooks/{second}").status_code == 204
    assert api.delete(f"/webhooks/{other.json()['id']}").status_code == 204
    assert post_frame(api, run_id, weights(10, 0, nan=True), seq=0).status_code == 202
    wait_until(lambda: len(receiver.at(f"/{project}")) >= 1, timeout=30)
    time.sleep(0.5)
    assert len(receiver.at(f"/{project}")) == 1  # one webhook: the event once


def test_custom_rule_and_cli(
    api: httpx.Client, alert_server: ServerProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    project = "cli"
    make_run(api, project=project, name="r")
    base = ["--url", alert_server.url]
    assert (
        cli_main(["alerts", "set", "alpha_out_of_range", "--project", project, "--disable", *base])
        == 0
    )
    code = cli_main(
        [
            "alerts",
            "set",
            "wide_norm",
            "--project",
            project,
            "--kind",
            "threshold",
            "--metric",
            "norm.frobenius",
            "--above",
            "50",
            "--no-include-model",
            "--above-after-in-range",
            *base,
        ]
    )
    assert code == 0
    assert cli_main(["alerts", "rules", "--project", project, "--json", *base]) == 0
    out = capsys.readouterr().out
    rules = json.loads(out[out.index("[") :])
    by_name = {r["name"]: r for r in rules}
    assert by_name["alpha_out_of_range"]["enabled"] is False
    assert by_name["wide_norm"]["params"]["above"] == 50.0
    assert by_name["wide_norm"]["params"]["include_model"] is False
    assert by_name["wide_norm"]["params"]["above_after_in_range"] is True
    assert by_name["farms_alpha_out_of_range"]["params"]["above_after_in_range"] is True
    assert by_name["nonfinite"]["enabled"] is True
    # a bad threshold through the CLI is reported, exit code 1
    assert (
        cli_main(["alerts", "set", "wide_norm", "--project", project, "--metric", "nope.x", *base])
        == 1
    )
    assert "unknown metric" in capsys.readouterr().err
    assert cli_main(["alerts", "reset", "wide_norm", "--project", project, *base]) == 0
    names = {r["name"] for r in api.get(f"/projects/{project}/alert-rules").json()}
    assert "wide_norm" not in names
    assert cli_main(["alerts", "list", "--project", project, *base]) == 0
    assert "(none)" in capsys.readouterr().out


def test_cli_edits_the_rules_of_projects_named_with_url_characters(
    api: httpx.Client, alert_server: ServerProcess
) -> None:
    """Project names may hold '?', '#', '%' or be '.'/'..' (stored before those two were
    refused): the CLI puts them in the path as one escaped segment (it sent them raw: a 404, or
    '%2e%2e' editing the rules of '..')."""
    base = ["--url", alert_server.url]

    def enabled(name: str) -> bool:
        path = name.replace(".", "%2E") if name in (".", "..") else quote(name, safe="")
        rules = api.get(f"/projects/{path}/alert-rules")
        assert rules.status_code == 200, (name, rules.text)
        return {r["name"]: r["enabled"] for r in rules.json()}["alpha_out_of_range"]

    names = ["a?b", "c#d", "50%", "%2e%2e", ".", ".."]
    for name in names[:-2]:
        make_run(api, project=name, name="r")
    engine = create_engine(database_url(alert_server.data_dir))
    try:
        with Session(engine) as session, session.begin():
            for name in names[-2:]:
                repo.get_or_create_project(session, name)
    finally:
        engine.dispose()
    for name in names:
        argv = ["alerts", "set", "alpha_out_of_range", "--project", name, "--disable", *base]
        assert cli_main(argv) == 0, name
        assert enabled(name) is False, name
        if name == "%2e%2e":
            assert enabled("..") is True  # not the rules of another project
    for name in names:
        assert cli_main(["alerts", "reset", "alpha_out_of_range", "--project", name, *base]) == 0
        assert enabled(name) is True, name


def test_real_training_run_nan_alert_survives_receiver_outage(
    api: httpx.Client, alert_server: ServerProcess, tmp_path: Path
) -> None:
    """A real training loop under the client monitor; a NaN is injected into a weight while the
    receiver is down; deliveries retry with backoff and succeed once it is back, one logical
    delivery (one ``webhook-id``) per alert."""
    project = "training"
    assert api.post("/projects", json={"name": project}).status_code in (200, 201)
    disable(api, project, "alpha_out_of_range", "farms_alpha_out_of_range")
    port = free_port()  # nothing listens here yet: the receiver is down
    hook = api.post(
        "/webhooks",
        json={
            "project": project,
            "url": f"http://127.0.0.1:{port}/hook",
            "events": ["alert.opened"],
        },
    ).json()

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(64, 8), torch.randn(64, 1)
    monitor = Monitor(
        url=alert_server.url, project=project, run="mlp", weights_every=5, activations_every=0,
        theta_every=0, frame_steps=4, spool_dir=str(tmp_path / "spool"),
    )  # fmt: skip
    monitor.attach(model, opt)
    for step in range(1, 21):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        if step == 12:
            with torch.no_grad():
                model[0].weight[0, 0] = float("nan")
        monitor.log({"loss": loss.item()}, step=step)
    assert monitor.finish(timeout=60)

    def deliveries() -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = api.get(f"/webhooks/{hook['id']}/deliveries").json()
        return rows

    wait_until(lambda: any(d["attempts"] >= 2 for d in deliveries()), timeout=60)
    failed_attempt = next(d for d in deliveries() if d["attempts"] >= 2)["log"][0]
    assert failed_attempt["status_code"] is None
    assert "Connect" in failed_attempt["error"]  # connection refused, logged

    rec = start_receiver(port)  # the receiver comes back
    try:
        wait_until(lambda: all(d["status"] == "delivered" for d in deliveries()), timeout=60)
        rows = deliveries()
        got = rec.at("/hook")
        received = [verify(r.body, r.headers, hook["secret"]) for r in got]
        assert len(got) == len(rows)  # exactly one logical delivery per alert
        assert {r.headers["webhook-id"] for r in got} == {d["message_id"] for d in rows}
        nan = [e["data"] for e in received if e["data"]["rule"] == "nonfinite"]
        assert len(nan) == 1, nan  # one incident, one alert: not one per tensor
        assert nan[0]["layer"] == ""
        assert "0.weight" in nan[0]["values"]["layers"], nan
        run_id = received[0]["data"]["run"]["id"]
        alerts = api.get(f"/runs/{run_id}/alerts", params={"status": "open"}).json()
        assert {a["id"] for a in alerts} >= {e["data"]["alert_id"] for e in received}
        assert min(e["data"]["step"] for e in received) >= 12
    finally:
        stop_receiver(rec)


def test_rule_on_a_logged_loss_fires_and_resolves_from_a_real_run(
    api: httpx.Client,
    alert_server: ServerProcess,
    receiver: Receiver,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``spectrawatch alerts set loss_high --scalar loss``: a real training loop under the
    client monitor logs a loss that blows up past the threshold (learning rate 5) and comes
    back (weights re-initialised): one episode, opened and resolved on the loss's own steps,
    each delivered once, signed, to the project's webhook."""
    project = "scalar-rules"
    assert api.post("/projects", json={"name": project}).status_code in (200, 201)
    hook = api.post(
        "/webhooks",
        json={
            "project": project,
            "url": f"{receiver.base}/{project}",
            "events": ["alert.opened:loss_high", "alert.resolved:loss_high"],
        },
    ).json()
    base = ["--url", alert_server.url, "--project", project]
    # a logged scalar is not an analysis metric: --metric still refuses it
    argv = ["alerts", "set", "loss_high", "--kind", "threshold", "--above", "100"]
    assert cli_main([*argv, "--metric", "loss", *base]) == 1
    assert "unknown metric 'loss'" in capsys.readouterr().err
    assert cli_main([*argv, "--scalar", "loss", "--fire-after", "2", *base]) == 0
    assert '"scalar": "loss"' in capsys.readouterr().out

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(64, 8), torch.randn(64, 1)
    monitor = Monitor(
        url=alert_server.url, project=project, run="blowup", weights_every=0,
        activations_every=0, theta_every=0, spool_dir=str(tmp_path / "spool"),
    )  # fmt: skip
    monitor.attach(model, opt)
    losses: dict[int, float] = {}
    phases = {"calm": range(1, 11), "blow-up": range(11, 19), "reset": range(19, 29)}
    for phase, steps in phases.items():
        for group in opt.param_groups:
            group["lr"] = 5.0 if phase == "blow-up" else 0.05
        if phase == "reset":
            for layer in (model[0], model[2]):
                layer.reset_parameters()
        for step in steps:
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            losses[step] = loss.item()
            monitor.log({"loss": loss.item()}, step=step)
        assert monitor.wait_idle(timeout=30)  # each phase reaches the server before the next
    assert monitor.finish(timeout=60)
    # past 100 at 3 steps, then inf and NaN (sent, stored as null: they fire the rule too)
    high = [s for s, v in losses.items() if math.isfinite(v) and v > 100]
    assert len(high) >= 2, losses
    assert set(high) <= set(phases["blow-up"]), losses
    assert all(losses[s] < 100 for s in phases["reset"]), losses

    wait_until(lambda: len(events(receiver, project, hook["secret"])) == 2, timeout=30)
    time.sleep(0.5)  # nothing more comes
    received = events(receiver, project, hook["secret"])
    assert [e["type"] for e in received] == ["alert.opened", "alert.resolved"]
    opened, resolved = (e["data"] for e in received)
    assert (opened["rule"], opened["layer"], opened["values"]["scalar"]) == (
        "loss_high",
        "",
        "loss",
    )
    assert opened["step"] in phases["blow-up"]
    assert opened["step"] >= high[1]  # fire_after 2
    assert resolved["alert_id"] == opened["alert_id"]
    (alert,) = [
        a for a in api.get(f"/runs/{opened['run']['id']}/alerts").json() if a["rule"] == "loss_high"
    ]
    assert alert["status"] == "resolved"
    assert alert["resolved_step"] in phases["reset"]
    assert alert["message"].startswith("loss_high: loss = ")
    assert len(receiver.at(f"/{project}")) == 2  # one delivery each, no retry


def test_an_after_step_rule_is_silent_through_the_warm_up(
    api: httpx.Client,
    alert_server: ServerProcess,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``alerts set val_acc_low --scalar val_acc --below 0.6 --fire-after 2 --after-step 10``:
    a run under the client monitor logs a low accuracy from step 0; the rule stays silent
    through steps 0-9 and opens at step 11, its second low point from step 10 on."""
    project = "warm-up"
    assert api.post("/projects", json={"name": project}).status_code in (200, 201)
    base = ["--url", alert_server.url, "--project", project]
    argv = ["alerts", "set", "val_acc_low", "--kind", "threshold", "--scalar", "val_acc"]
    assert (
        cli_main([*argv, "--below", "0.6", "--fire-after", "2", "--after-step", "10", *base]) == 0
    )
    assert cli_main([*argv, "--after-step", "-1", *base]) == 1
    assert "params.after_step: must be an integer in 0.." in capsys.readouterr().err
    assert cli_main(["alerts", "rules", *base]) == 0
    assert '"after_step": 10' in capsys.readouterr().out
    rules = api.get(f"/dashboards/projects/{project}/alert-rules").json()["rules"]
    (row,) = [r for r in rules if r["name"] == "val_acc_low"]
    assert row["condition"] == "scalar val_acc < 0.6 for 2 points from step 10"

    monitor = Monitor(
        url=alert_server.url, project=project, run="warm-up", spool_dir=str(tmp_path / "spool")
    )

    def val_acc_alerts() -> list[dict[str, Any]]:
        assert monitor.wait_idle(timeout=30)
        alerts = api.get(f"/runs/{monitor.run_id}/alerts").json()
        return [a for a in alerts if a["rule"] == "val_acc_low"]

    for step in range(10):
        monitor.log({"val_acc": 0.05 * step}, step=step)
    assert val_acc_alerts() == []  # ten low points, all in the warm-up
    monitor.log({"val_acc": 0.5}, step=10)
    assert val_acc_alerts() == []  # one low point from step 10 on
    monitor.log({"val_acc": 0.55}, step=11)
    (alert,) = val_acc_alerts()
    assert (alert["status"], alert["step"]) == ("open", 11)
    assert alert["message"] == (
        "val_acc_low: val_acc = 0.55 (fires < 0.6 for 2 points from step 10)"
    )
    assert monitor.finish(timeout=60)


def test_a_nan_loss_logged_by_the_monitor_fires_a_loss_rule(
    api: httpx.Client, alert_server: ServerProcess, tmp_path: Path
) -> None:
    """``monitor.log({"loss": nan})`` reaches the server (stored as null): a rule on the loss
    opens at the first NaN step. The client skipped NaN/Inf, so a loss rule never saw the
    divergence it watches for. A rule with ``after_step`` 12 skips the NaNs of steps 10-11
    and opens at 12; the client stats still name the first NaN step for the dashboards."""
    project = "nan-loss"
    rules = f"/projects/{project}/alert-rules"
    assert api.post("/projects", json={"name": project}).status_code in (200, 201)
    loss_high = {"kind": "threshold", "scalar": "loss", "above": 10.0}
    assert api.patch(f"{rules}/loss_high", json={"params": loss_high}).status_code == 200
    late = {**loss_high, "after_step": 12}
    assert api.patch(f"{rules}/loss_high_late", json={"params": late}).status_code == 200
    monitor = Monitor(
        url=alert_server.url, project=project, run="diverged", spool_dir=str(tmp_path / "spool")
    )

    def loss_alerts() -> dict[str, dict[str, Any]]:
        assert monitor.wait_idle(timeout=30)
        alerts = api.get(f"/runs/{monitor.run_id}/alerts").json()
        return {a["rule"]: a for a in alerts}

    for step in range(10):
        monitor.log({"loss": 1.0 / (step + 1)}, step=step)
    assert loss_alerts() == {}
    monitor.log({"loss": torch.tensor(float("nan"))}, step=10)
    # one batch each: a batch of steps 10 and 11 opens the episode at its latest step, 11
    alert = loss_alerts()["loss_high"]
    assert (alert["status"], alert["step"], alert["values"]["value"]) == ("open", 10, None)
    monitor.log({"loss": torch.tensor(float("nan"))}, step=11)
    assert alert["message"] == "loss_high: loss = NaN/Inf (fires > 10)"
    assert "loss_high_late" not in loss_alerts()  # NaN at steps 10-11: before its step
    monitor.log({"loss": float("nan")}, step=12)
    late_alert = loss_alerts()["loss_high_late"]
    assert (late_alert["status"], late_alert["step"]) == ("open", 12)
    assert monitor.finish(timeout=60)
    (series,) = api.get(f"/runs/{monitor.run_id}/scalars", params={"name": "loss"}).json()
    assert series["steps"] == list(range(13))
    assert series["values"][10:] == [None, None, None]
    stats = api.get(f"/runs/{monitor.run_id}").json()["client_stats"]
    assert stats["nonfinite_scalars"] == {"loss": {"step": 10, "value": "nan"}}
    assert stats["errors"] == 0
