"""Alert rules: pure decisions (hysteresis, persistence, growth), validation, and the engine
over a real SQLite database migrated by Alembic (episodes, resolution, outbox rows)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
from sqlalchemy import event
from sqlalchemy.orm import Session, sessionmaker

from spectrawatch.spectral import grokking
from spectrawatch_server.alerts import rules as R
from spectrawatch_server.alerts.engine import AlertEngine
from spectrawatch_server.analyses.registry import MODEL_LAYER
from spectrawatch_server.db.models import Alert, Delivery, Frame, Project, Run, Webhook
from spectrawatch_server.storage import alert_store, metric_reads, result_store, series
from spectrawatch_server.storage import repository as repo

ALPHA = R.RuleSpec("alpha", "threshold", metric="htsr.alpha", below=2.0, above=6.0, hysteresis=0.1)


def episodes(rule: R.RuleSpec, series: list[float]) -> list[tuple[int, R.Transition]]:
    """Replay a series point by point as the engine does; the transitions and where."""
    is_open = False
    out = []
    for i in range(len(series)):
        t = R.decide_series(rule, is_open, series[: i + 1][-rule.history_needed :])
        if t is not R.Transition.NONE:
            out.append((i, t))
            is_open = t is R.Transition.OPEN
    return out


def test_threshold_states_with_hysteresis_band() -> None:
    values = [1.5, 1.95, 2.05, 2.1, 4.0, 5.9, 5.95, 6.0, 6.01]
    assert R.point_states(ALPHA, values) == [
        "fire", "fire", "hold", "clear", "clear", "clear", "hold", "hold", "fire",
    ]  # fmt: skip


def test_flapping_metric_gives_one_episode() -> None:
    # alpha oscillates around 6 inside the hysteresis band: one alert, resolved once it clears
    series = [5.0, 6.2, 5.95, 6.3, 5.92, 6.1, 5.5, 5.0]
    assert episodes(ALPHA, series) == [(1, R.Transition.OPEN), (6, R.Transition.RESOLVE)]
    # without hysteresis the same series spams three episodes
    bare = R.RuleSpec("a", "threshold", metric="htsr.alpha", below=2.0, above=6.0)
    assert [t for _, t in episodes(bare, series)].count(R.Transition.OPEN) == 3


def test_persistence_fire_after_and_clear_after() -> None:
    rule = R.RuleSpec("s", "threshold", metric="htsr.alpha", above=1.0, fire_after=3, clear_after=2)
    series = [2.0, 2.0, 0.0, 2.0, 2.0, 2.0, 0.0, 2.0, 0.0, 0.0]
    assert episodes(rule, series) == [(5, R.Transition.OPEN), (9, R.Transition.RESOLVE)]


def test_growth_rule_ratio_over_window() -> None:
    rule = R.RuleSpec("g", "growth", metric="norm.spectral", factor=10.0, window=3, hysteresis=0.5)
    values = [1.0, 2.0, 3.0, 25.0, 30.0, 40.0, 45.0]
    # 25 / min(1, 2, 3) = 25 fires; 30 / min(2, 3, 25) = 15 fires; 40 / 3 = 13.3 fires;
    # 45 / min(25, 30, 40) = 1.8 < 10 * 0.5 clears
    assert R.point_states(rule, values) == [
        "hold",
        "clear",
        "clear",
        "fire",
        "fire",
        "fire",
        "clear",
    ]
    assert R.growth_ratio(rule, values[:4]) == pytest.approx(25.0)
    assert episodes(rule, values) == [(3, R.Transition.OPEN), (6, R.Transition.RESOLVE)]
    # a ratio between factor*(1-h) and factor holds the episode open
    assert R.point_states(rule, [1.0, 7.0]) == ["hold", "hold"]
    # with the open episode's baseline, a value that stays grown does not clear
    assert R.point_states(rule, values, baseline=1.0)[-1] == "fire"
    assert R.point_states(rule, [25.0, 30.0, 40.0, 1.5], baseline=1.0)[-1] == "clear"


def test_nonfinite_values_hold() -> None:
    # NaN/Inf are the nonfinite rule's business; threshold rules neither fire nor clear on them
    assert R.point_states(ALPHA, [float("nan"), float("inf"), 7.0]) == ["hold", "hold", "fire"]


def test_drops_and_silence() -> None:
    drops = R.RuleSpec("d", "client_drops", above=0.0)
    assert R.drops_state(drops, 0, 0) == "clear"
    assert R.drops_state(drops, 1, 0) == "fire"
    silent = R.RuleSpec("s", "silence", minutes=30.0)
    assert R.silence_state(silent, 31.0, running=True) == "fire"
    assert R.silence_state(silent, 29.0, running=True) == "clear"
    assert R.silence_state(silent, 600.0, running=False) == "clear"


def test_default_rules_cover_the_design() -> None:
    names = {r.name: r for r in R.default_rules()}
    assert set(names) == {
        "grokking_imminent", "alpha_out_of_range", "farms_alpha_out_of_range",
        "spectral_norm_blowup", "nonfinite", "gap_collapse", "activation_change",
        "client_drops", "run_silent", "correlation_traps",
    }  # fmt: skip
    assert [n for n, r in names.items() if not r.enabled] == ["correlation_traps"]  # opt-in
    # metric keys are the spectral modules' own constants
    from spectrawatch.spectral import grokking, htsr, norms, sed

    assert names["grokking_imminent"].metric == grokking.IMMINENT
    assert names["alpha_out_of_range"].metric == htsr.ALPHA
    assert names["farms_alpha_out_of_range"].metric == htsr.FARMS_PREFIX + "alpha"
    assert names["correlation_traps"].metric == htsr.NUM_TRAPS
    assert names["spectral_norm_blowup"].metric == norms.SPECTRAL_NORM
    assert names["gap_collapse"].metric == sed.PHASE
    assert names["gap_collapse"].covers(MODEL_LAYER)  # the whole model only, by default
    assert not names["gap_collapse"].covers("fc.bias")
    assert names["gap_collapse"].above == pytest.approx(sed.Phase.COLLAPSE - 0.5)
    # windowed SED keys are matched, other keys are not
    assert names["gap_collapse"].matches_metric(sed.windowed_key(sed.PHASE, 32))
    assert not names["gap_collapse"].matches_metric("sed.phase_x")
    assert not names["alpha_out_of_range"].covers("__model__")
    assert names["grokking_imminent"].covers("__model__")
    # near-random layers of a run trained from scratch (alpha > 6) are not news
    armed = {n for n, r in names.items() if r.above_after_in_range}
    assert armed == {"alpha_out_of_range", "farms_alpha_out_of_range"}


def test_above_after_in_range_is_a_flag_of_threshold_rules() -> None:
    base = {r.name: r for r in R.default_rules()}["alpha_out_of_range"]
    off = R.build_rule("alpha_out_of_range", {"above_after_in_range": False}, base=base)
    assert not off.above_after_in_range
    with pytest.raises(R.RuleError) as err:
        R.build_rule("alpha_out_of_range", {"above_after_in_range": "yes"}, base=base)
    assert err.value.field == "above_after_in_range"
    growth = {"kind": "growth", "metric": "norm.spectral", "factor": 3}
    growth["above_after_in_range"] = True
    assert not R.build_rule("custom_growth", growth).above_after_in_range


def test_known_metrics() -> None:
    known = ["htsr.alpha", "farms.alpha", "norm.spectral", "sed.phase.w32"]
    known += ["sed.interval.gap_ratio.w10", "grok.imminent", "eigentrack.change_score"]
    known += ["subspace.drift", "sed.phase", "grok.evidence.defect"]  # every stored key
    for name in known:
        assert R.is_known_metric(name), name
    for name in ("htsr.alphaa", "farms.nothing", "loss", "sed.phase.wx", "sed.interval"):
        assert not R.is_known_metric(name), name


@pytest.mark.parametrize(
    ("name", "params", "field"),
    [
        ("alpha_out_of_range", {"above": "high"}, "above"),
        ("alpha_out_of_range", {"above": float("nan")}, "above"),
        ("alpha_out_of_range", {"tresh": 3}, "tresh"),
        ("alpha_out_of_range", {"below": 7.0}, "below"),
        ("alpha_out_of_range", {"kind": "growth"}, "kind"),
        ("alpha_out_of_range", {"fire_after": 0}, "fire_after"),
        ("alpha_out_of_range", {"severity": "panic"}, "severity"),
        ("spectral_norm_blowup", {"factor": 0.5}, "factor"),
        ("custom_one", {"kind": "threshold", "metric": "htsr.alpha"}, "above"),
        ("custom_one", {"kind": "threshold", "metric": "no.such", "above": 1}, "metric"),
        ("custom_one", {"metric": "htsr.alpha", "above": 1}, "kind"),
        ("Bad-Name", {"kind": "nonfinite"}, "rule"),
        ("nonfinite", {"layers": "a" * 100_000}, "layers"),  # was stored, matched on every frame
    ],
)
def test_build_rule_rejects_bad_input(name: str, params: dict[str, object], field: str) -> None:
    base = {r.name: r for r in R.default_rules()}.get(name)
    with pytest.raises(R.RuleError) as info:
        R.build_rule(name, params, base=base)
    assert info.value.field == field


def test_effective_rules_merge_overrides_and_custom() -> None:
    stored = {
        "alpha_out_of_range": (True, {"below": 1.5}),
        "nonfinite": (False, {}),
        "big_norm": (True, {"kind": "threshold", "metric": "norm.frobenius", "above": 100.0}),
        "broken": (True, {"kind": "threshold", "metric": "gone.metric", "above": 1.0}),
    }
    rules = {r.name: r for r in R.effective_rules(stored)}
    assert rules["alpha_out_of_range"].below == 1.5
    assert rules["alpha_out_of_range"].above == 6.0  # untouched default
    assert rules["nonfinite"].enabled is False
    assert rules["big_norm"].above == 100.0
    assert "broken" not in rules  # an invalid stored custom rule is skipped, not fatal


# --- the engine over a real database -----------------------------------------------------


def add_frame(
    session: Session,
    run: Run,
    seq: int,
    metrics: dict[str, float],
    nonfinite: dict[str, int] | None = None,
    layer: str = "fc.weight",
) -> Frame:
    frame = Frame(
        run_id=run.id,
        kind="weights",
        step=100 * seq,
        seq=seq,
        idempotency_key=f"{run.id}:{seq}",
        blob_key=f"b{seq}",
        bytes=1,
        layers=["fc.weight"],
        nonfinite=nonfinite or {},
        status="done",
    )
    repo.insert_frame(session, frame)
    rows = [result_store.MetricRow(layer, name, frame.step, v) for name, v in metrics.items()]
    result_store.replace_results(session, run.id, frame.id, frame.step, "test", rows, [])
    return frame


def test_engine_episodes_and_outbox(sessions: sessionmaker[Session]) -> None:
    engine = AlertEngine("http://sw.example")
    with sessions.begin() as session:
        project, _ = repo.get_or_create_project(session, "p")
        run, _ = repo.get_or_create_run(session, project, "r", {}, [])
        session.add(Webhook(project_id=project.id, url="https://h.example/", secret="whsec_x"))
        session.add(
            Webhook(
                project_id=project.id,
                url="https://o.example/",
                secret="whsec_y",
                events=["alert.opened:nonfinite"],
            )
        )
        run_id = run.id
    series = [5.0, 6.3, 5.95, 6.4, 5.92, 5.5]  # flaps inside the band, then clears
    for seq, alpha in enumerate(series):
        with sessions.begin() as session:
            run = session.get_one(Run, run_id)
            frame = add_frame(session, run, seq, {"htsr.alpha": alpha})
            engine.evaluate(session, frame)
            engine.evaluate(session, frame)  # a redelivered job changes nothing
    with sessions() as session:
        alerts = alert_store.list_alerts(session, run_id=run_id)
        assert [(a.rule, a.layer, a.status, a.step, a.resolved_step) for a in alerts] == [
            ("alpha_out_of_range", "fc.weight", "resolved", 100, 500)
        ]
        assert alerts[0].values["value"] == 6.3
        deliveries = session.query(Delivery).order_by(Delivery.id).all()
        # only the unfiltered webhook wants alpha events: opened + resolved
        assert [d.event for d in deliveries] == ["alert.opened", "alert.resolved"]
        assert {d.webhook_id for d in deliveries} == {1}
        assert len({d.message_id for d in deliveries}) == 2
        data = deliveries[0].payload["data"]
        assert data["dashboard_url"] == f"http://sw.example/runs/{run_id}"
        assert (data["project"], data["rule"], data["step"]) == ("p", "alpha_out_of_range", 100)


def test_engine_nonfinite_and_disabled_rule(sessions: sessionmaker[Session]) -> None:
    engine = AlertEngine()
    with sessions.begin() as session:
        project, _ = repo.get_or_create_project(session, "q")
        run, _ = repo.get_or_create_run(session, project, "r", {}, [])
        alert_store.upsert_rule(session, project.id, "alpha_out_of_range", False, {})
        for seq, bad in enumerate([3, 1, 0]):
            frame = add_frame(
                session, run, seq, {"htsr.alpha": 1.0}, {"fc.weight": bad} if bad else {}
            )
            engine.evaluate(session, frame)
        alerts = session.query(Alert).all()
        assert [(a.rule, a.status, a.values["count"]) for a in alerts] == [
            ("nonfinite", "resolved", 3)
        ]
        assert session.query(Project).count() == 1


def test_database_allows_one_open_episode(sessions: sessionmaker[Session]) -> None:
    from sqlalchemy.exc import IntegrityError

    with sessions.begin() as session:
        project, _ = repo.get_or_create_project(session, "u")
        run, _ = repo.get_or_create_run(session, project, "r", {}, [])
        run_id = run.id
        session.add(Alert(run_id=run_id, rule="nonfinite", layer="a", step=1, status="resolved"))
        session.add(Alert(run_id=run_id, rule="nonfinite", layer="a", step=2, status="open"))
    with pytest.raises(IntegrityError), sessions.begin() as session:
        session.add(Alert(run_id=run_id, rule="nonfinite", layer="a", step=3, status="open"))


def test_system_metrics_alone_do_not_keep_a_hung_run_from_silence(
    sessions: sessionmaker[Session],
) -> None:
    """The client's system sampler logs every 10 s while the training loop hangs (an NCCL
    deadlock, a stuck data loader): its scalars moved last_seen_at, and run_silent never fired.
    A batch with any training scalar still counts as activity."""
    from datetime import timedelta

    from spectrawatch_server.db.base import utcnow
    from spectrawatch_server.storage import result_store

    long_ago = utcnow() - timedelta(minutes=31)
    with sessions.begin() as session:
        project, _ = repo.get_or_create_project(session, "hung")
        run, _ = repo.get_or_create_run(session, project, "r", {}, [])
        run.last_seen_at, run_id = long_ago, run.id
    with sessions.begin() as session:
        rows = [(5, "system/cpu_percent", 12.0), (5, "system/rss_mib", 900.0)]
        result_store.upsert_scalars(session, run_id, rows)
    with sessions.begin() as session:
        run = session.get_one(Run, run_id)
        assert (run.last_seen_at, run.last_step) == (long_ago, 5)
        assert AlertEngine().sweep_silent(session) == 1
    with sessions.begin() as session:
        result_store.upsert_scalars(session, run_id, [(6, "loss", 1.0), *rows])
        assert session.get_one(Run, run_id).last_seen_at > long_ago


def test_engine_silent_runs_and_client_drops(sessions: sessionmaker[Session]) -> None:
    from datetime import timedelta

    from spectrawatch_server.db.base import utcnow

    engine = AlertEngine()
    with sessions.begin() as session:
        project, _ = repo.get_or_create_project(session, "s")
        quiet, _ = repo.get_or_create_run(session, project, "quiet", {}, [])
        busy, _ = repo.get_or_create_run(session, project, "busy", {}, [])
        done, _ = repo.get_or_create_run(session, project, "done", {}, [])
        quiet.last_seen_at = utcnow() - timedelta(minutes=31)
        busy.last_seen_at = utcnow() - timedelta(minutes=5)
        done.last_seen_at = utcnow() - timedelta(minutes=90)
        done.status = "finished"
        mute, _ = repo.get_or_create_run(session, project, "mute", {}, [])
        mute.created_at = utcnow() - timedelta(minutes=40)  # hung before its first step
        young, _ = repo.get_or_create_run(session, project, "young", {}, [])
        ids = (quiet.id, busy.id, done.id, mute.id, young.id)
    with sessions.begin() as session:
        assert engine.sweep_silent(session) == 2
        assert engine.sweep_silent(session) == 0  # the open episode is not re-opened
    with sessions.begin() as session:
        (mute_alert,) = alert_store.list_alerts(session, rule="run_silent", run_id=ids[3])
        assert mute_alert.values["silent_minutes"] == pytest.approx(40.0, abs=0.2)
        session.delete(mute_alert)
    with sessions.begin() as session:
        (alert,) = alert_store.list_alerts(session, rule="run_silent")
        assert (alert.run_id, alert.status) == (ids[0], "open")
        assert alert.values["silent_minutes"] == pytest.approx(31.0, abs=0.2)
        run = session.get_one(Run, ids[0])
        run.client_stats = {"dropped_frames": 3, "spool_overflow": 0}
        frame = add_frame(session, run, 0, {})  # the run speaks again, and reports drops
        engine.evaluate(session, frame)
    with sessions.begin() as session:
        by_rule = {a.rule: a for a in alert_store.list_alerts(session, run_id=ids[0])}
        assert by_rule["run_silent"].status == "resolved"
        assert by_rule["client_drops"].status == "open"
        assert by_rule["client_drops"].values == {"dropped_frames": 3, "spool_overflow": 0}
        # counters reported with no frame after them (all were dropped) are judged at once
        busy_run = session.get_one(Run, ids[1])
        busy_run.client_stats = {"dropped_frames": 0, "spool_overflow": 2}
        engine.evaluate_client_stats(session, busy_run)
        (drops,) = alert_store.list_alerts(session, run_id=ids[1], rule="client_drops")
        assert (drops.status, drops.values["spool_overflow"]) == ("open", 2)


def test_watched_series_takes_the_longest_history_per_series() -> None:
    rules = [
        R.RuleSpec("a", "threshold", metric="m", above=1.0, fire_after=3),
        R.RuleSpec("b", "growth", metric="m", factor=2.0, window=5),
        R.RuleSpec("c", "threshold", metric="m", above=1.0, layers="x*", include_model=False),
        R.RuleSpec("off", "threshold", metric="other", above=1.0, enabled=False),
    ]
    series = [("x1", "m"), ("__model__", "m"), ("y", "m.w16"), ("y", "other")]
    watched = R.watched_series(rules, series)
    assert watched == {
        "a": {"x1": {"m"}, "__model__": {"m"}, "y": {"m.w16"}},
        "b": {"x1": {"m"}, "__model__": {"m"}, "y": {"m.w16"}},
        "c": {"x1": {"m"}},
    }
    assert R.history_wanted(rules, watched) == {
        ("m", "x1"): 6,
        ("m", "__model__"): 6,
        ("m.w16", "y"): 6,
    }


def tails_and_queries(
    sessions: sessionmaker[Session], run_id: int, wanted: dict[tuple[str, str], int]
) -> tuple[series.Series, series.Series, list[str]]:
    """``(reference tails, series.metric_tails, its SQL statements)``: each wanted series read
    alone by ``metric_tail``, then all at once, counting the statements of the latter."""
    from sqlalchemy import event

    with sessions() as session:
        want = {k: metric_reads.metric_tail(session, run_id, *k, n) for k, n in wanted.items()}
        queries: list[str] = []
        listen = session.connection().engine
        event.listen(listen, "before_cursor_execute", lambda *a: queries.append(a[2]))
        got = series.metric_tails(session, run_id, wanted)
    return want, got, queries


def test_metric_tails_equal_per_series_queries(sessions: sessionmaker[Session]) -> None:

    with sessions.begin() as session:
        project, _ = repo.get_or_create_project(session, "p")
        run, _ = repo.get_or_create_run(session, project, "r", {}, [])
        for seq in range(12):
            frame = add_frame(session, run, seq, {})
            rows = [
                result_store.MetricRow(layer, name, 100 * seq + k, float(seq * 10 + k))
                for name in ("a", "b")
                for layer in [f"l{i}" for i in range(10)]
                for k in range(3)  # three points per frame, as a multi-step sketch frame
                if not (layer == "l2" and seq % 2)  # l2 is in every other frame only
            ]
            rows.append(result_store.MetricRow("l0", "nan", 100 * seq, float("nan")))
            if seq >= 10:
                rows.append(
                    result_store.MetricRow("l0", "young", 100 * seq, 1.0)
                )  # 2 points in all
            result_store.replace_results(session, run.id, frame.id, frame.step, "t", rows, [])
        run_id = run.id
    wanted = {
        (name, layer): limit
        for name, layer, limit in [
            ("a", "l0", 1),
            ("a", "l1", 5),
            ("a", "l2", 5),  # missing from the latest frames: falls back to its own query
            ("b", "l2", 2),
            ("b", "l1", 40),  # more points than stored
            ("nan", "l0", 3),
            ("young", "l0", 11),
            ("absent", "l0", 1),
            *[("a", f"l{i}", 3) for i in range(3, 10)],
        ]
    }
    want, got, queries = tails_and_queries(sessions, run_id, wanted)
    assert {k: v for k, v in got.items() if v} == {k: v for k, v in want.items() if v}
    assert (
        got[("a", "l1")]
        == [
            (1000, 100.0),
            (1001, 101.0),
            (1002, 102.0),
            (1100, 110.0),
            (1101, 111.0),
            (1102, 112.0),
        ][-5:]
    )
    assert len(wanted) == 15
    assert len(queries) == 2 * 5 + 1  # 2 per name + 1 fallback for (a, l2), whatever the layers


def test_metric_tails_of_sparse_layers_and_a_dense_model_take_a_few_queries(
    sessions: sessionmaker[Session],
) -> None:
    """SED keeps the whole model's value at every row and a layer's every ``layer_stride``
    rows: probed on ``__model__`` (sorted first), every layer was short in the range read and
    got its own query once the run was past the tail (41 series: 42 queries, not 2)."""

    layers = [f"blocks.{i}.w" for i in range(8)]
    with sessions.begin() as session:
        project, _ = repo.get_or_create_project(session, "p")
        run, _ = repo.get_or_create_run(session, project, "r", {}, [])
        frame = add_frame(session, run, 0, {})
        rows = [result_store.MetricRow("__model__", "g", t, float(t)) for t in range(640)]
        rows += [result_store.MetricRow(la, "g", t, -t) for la in layers for t in range(0, 640, 16)]
        # a frozen layer's gap is never finite (stored NULL): probed first, it bounded nothing
        # and every point of the name was read, growing with the run
        rows += [result_store.MetricRow("a.frozen", "g", t, math.nan) for t in range(0, 640, 16)]
        result_store.replace_results(session, run.id, frame.id, 0, "sed", rows, [])
        run_id = run.id
    wanted = {("g", la): 16 for la in ["__model__", "a.frozen", *layers]}
    want, got, queries = tails_and_queries(sessions, run_id, wanted)
    assert got == want
    assert len(got[("g", "blocks.0.w")]) == 16
    assert got[("g", "a.frozen")] == []
    # two probes (the frozen layer's, then a layer's), the range, the frozen layer's own tail:
    # not one per layer (probed on the model), nor every point of the name
    assert len(queries) == 4


def test_flagged_steps_are_the_non_zero_points_from_a_step_on(
    sessions: sessionmaker[Session],
) -> None:
    with sessions.begin() as session:
        project, _ = repo.get_or_create_project(session, "p")
        run, _ = repo.get_or_create_run(session, project, "r", {}, [])
        for seq in range(10):
            frame = add_frame(session, run, seq, {})
            rows = [
                result_store.MetricRow(layer, "flag", 10 * seq + k, float((seq + k + i) % 3 == 0))
                for i, layer in enumerate(("a", "b"))
                for k in range(2)
            ]
            rows.append(result_store.MetricRow("a", "other", 10 * seq, 1.0))
            rows.append(
                result_store.MetricRow("b", "flag", 10 * seq + 5, float("nan"))
            )  # stored NULL
            result_store.replace_results(session, run.id, frame.id, frame.step, "t", rows, [])
        run_id = run.id
    with sessions() as session:
        got = series.flagged_steps(session, run_id, "flag", 31)
        for layer in ("a", "b"):
            points = metric_reads.metric_tail(session, run_id, "flag", layer, 1000)
            assert got[layer] == {s for s, v in points if s >= 31 and v}
        assert set(got) == {"a", "b"}
        assert series.flagged_steps(session, run_id, "flag", 10**6) == {}


@pytest.mark.parametrize("value", ["nan", "inf", "Infinity", "abc"])
def test_cli_refuses_non_finite_thresholds(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    """They reached the JSON encoder and ended in a traceback (the API refuses them too); a
    word said "invalid _finite_float value": the option and what it takes are named."""
    from spectrawatch.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["alerts", "set", "r", "--project", "p", "--above", value, "--url", "http://x:1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --above: must be a finite number, got '{value}'" in err
    assert "_finite_float" not in err


def test_engine_nonfinite_episodes_follow_steps_not_arrival(
    sessions: sessionmaker[Session],
) -> None:
    """One NaN incident seen by frames of several kinds arriving out of step order is one
    episode, opened at its first bad step; a relapse later is a second one."""
    engine = AlertEngine()

    def frame(seq: int, kind: str, steps: list[int], bad: tuple[int, int] | None) -> Frame:
        row = Frame(
            run_id=run_id,
            kind=kind,
            step=steps[0],
            seq=seq,
            idempotency_key=f"nan:{seq}",
            blob_key=f"n{seq}",
            bytes=1,
            info={"steps": steps} if len(steps) > 1 else {},
            layers=["fc.weight"],
            nonfinite={"fc.weight": 3} if bad else {},
            nonfinite_steps={"fc.weight": list(bad)} if bad else {},
            status="done",
        )
        repo.insert_frame(session, row)
        return row

    with sessions.begin() as session:
        project, _ = repo.get_or_create_project(session, "nan")
        run, _ = repo.get_or_create_run(session, project, "r", {}, [])
        run_id = run.id
        arrivals = [
            frame(0, "param_sketch", list(range(97, 113)), (100, 112)),  # opens at 100
            frame(1, "param_sketch", list(range(113, 129)), (113, 128)),  # same incident
            frame(2, "weights", [140], None),  # restored: resolves
            frame(3, "update_sketch", list(range(129, 145)), (129, 140)),  # late tail
            frame(4, "update_sketch", list(range(145, 161)), None),
            frame(5, "weights", [200], (200, 200)),  # relapse
            frame(6, "weights", [90], None),  # a late clean frame from before it
        ]
        for f in arrivals:
            engine.evaluate(session, f)
        alerts = alert_store.list_alerts(session, run_id=run_id, rule="nonfinite")
        got = sorted((a.step, a.status, a.resolved_step, a.values["last_step"]) for a in alerts)
        assert got == [(100, "resolved", 140, 128), (200, "open", None, 200)]
        first = min(alerts, key=lambda a: a.step)
        assert "(param_sketch frame, steps 100-112)" in first.message


def test_engine_nonfinite_incident_is_one_episode_naming_its_layers(
    sessions: sessionmaker[Session],
) -> None:
    """A NaN in every tensor of a 2-layer MLP (and the whole-model series) is one critical
    episode and one webhook delivery, not one per tensor; later bad frames add the layers
    they hit; a clean frame past the last bad step resolves it (one more delivery). An episode
    opened per layer before the grouping is still resolved by a clean frame of its layer."""
    engine = AlertEngine()
    params = ["0.weight", "0.bias", "2.weight", "2.bias"]

    def frame(seq: int, step: int, bad: list[str]) -> Frame:
        row = Frame(
            run_id=run_id,
            kind="weights",
            step=step,
            seq=seq,
            idempotency_key=f"mlp:{seq}",
            blob_key=f"m{seq}",
            bytes=1,
            layers=params,
            nonfinite=dict.fromkeys(bad, 2),
            status="done",
        )
        repo.insert_frame(session, row)
        return row

    with sessions.begin() as session:
        project, _ = repo.get_or_create_project(session, "mlp")
        run, _ = repo.get_or_create_run(session, project, "r", {}, [])
        run_id = run.id
        session.add(Webhook(project_id=project.id, url="https://h.example/", secret="whsec_x"))
        legacy = Alert(run_id=run_id, rule="nonfinite", layer="2.bias", step=5, status="open")
        session.add(legacy)
        session.flush()
        engine.evaluate(session, frame(0, 60, ["0.weight", "2.weight", MODEL_LAYER]))
        spread = frame(1, 80, [*params, MODEL_LAYER])
        engine.evaluate(session, spread)
        engine.evaluate(session, spread)  # redelivered
        alerts = alert_store.list_alerts(session, run_id=run_id, rule="nonfinite", status="open")
        assert [(a.layer, a.step, a.severity) for a in alerts] == [("", 60, "critical")]
        (alert,) = alerts
        assert alert.values["layers"] == ["0.weight", "2.weight", MODEL_LAYER, "0.bias", "2.bias"]
        assert (alert.values["layer_count"], alert.values["count"]) == (5, 6)
        assert alert.values["last_step"] == 80
        assert alert.message == (
            "nonfinite: 6 NaN/Inf values in 3 layers: 0.weight, 2.weight, __model__ "
            "(weights frame, step 60)"
        )
        early = frame(3, 50, ["0.weight"])  # analysed later, its bad rows earlier (a sketch)
        early.nonfinite_steps = {"0.weight": [52, 58]}
        engine.evaluate(session, early)
        assert (alert.step, alert.values["first_step"], alert.values["last_step"]) == (52, 52, 80)
        engine.evaluate(session, frame(2, 100, []))
        rows = alert_store.list_alerts(session, run_id=run_id, rule="nonfinite")
        assert sorted((a.layer, a.status, a.resolved_step) for a in rows) == [
            ("", "resolved", 100),
            ("2.bias", "resolved", 60),  # clean in the first frame
        ]
        deliveries = session.query(Delivery).order_by(Delivery.id).all()
        assert [(d.event, d.payload["data"]["layer"]) for d in deliveries] == [
            ("alert.resolved", "2.bias"),
            ("alert.opened", ""),
            ("alert.resolved", ""),
        ]


def test_nonfinite_layer_list_is_bounded_and_counted() -> None:
    """GPT-2 has ~150 tensors: the episode names the first few in its message and keeps at
    most ``NONFINITE_LAYERS_MAX`` names, counting them all."""
    rule = R.RuleSpec("nonfinite", "nonfinite", include_model=False)
    names = [f"h.{i}.w" for i in range(250)]
    bad = R.nonfinite_layers(rule, names, dict.fromkeys([*names, MODEL_LAYER], 1))
    assert bad == names  # the whole-model series is not covered by this rule
    values = R.nonfinite_layer_values({}, bad)
    assert (len(values["layers"]), values["layer_count"]) == (R.NONFINITE_LAYERS_MAX, 250)
    assert R.nonfinite_layer_values(values, ["other"]) == values | {"layer_count": 250}
    text = R.describe(rule, "", {"count": 250, "kind": "weights", **values})
    assert "in 250 layers: h.0.w, h.1.w, h.2.w and 247 more (weights frame)" in text


def test_engine_growth_episode_stays_open_while_grown(sessions: sessionmaker[Session]) -> None:
    """A weight blown up x100 and left there stayed "resolved" once the 10-frame window had slid
    into the grown values; it now resolves when the norm comes back."""
    engine = AlertEngine()
    norms = [1.0, 1.1, 0.9, 1.0] + [100.0] * 14 + [1.2]
    with sessions.begin() as session:
        project, _ = repo.get_or_create_project(session, "grow")
        run, _ = repo.get_or_create_run(session, project, "r", {}, [])
        history = []
        for seq, value in enumerate(norms):
            engine.evaluate(session, add_frame(session, run, seq, {"norm.spectral": value}))
            (alert,) = alert_store.list_alerts(session, run_id=run.id) or [None]
            history.append(None if alert is None else alert.status)
    assert history[:4] == [None] * 4
    assert history[4:-1] == ["open"] * 14
    assert history[-1] == "resolved"


def test_grokking_alert_quotes_the_detector_evidence(sessions: sessionmaker[Session]) -> None:
    """The detector stores, beside ``grok.imminent``, the step each piece of evidence appeared;
    the alert (and its webhook payload) carries them and its message names them in order."""
    engine = AlertEngine()
    frames = [
        {grokking.IMMINENT: 0.0, "grok.evidence.norm_turn": 2300.0},
        {
            grokking.IMMINENT: 1.0,
            "grok.evidence.norm_turn": 2300.0,
            "grok.evidence.defect": 3300.0,
            "grok.evidence.alpha_floor": 2200.0,
        },
    ]
    with sessions.begin() as session:
        project, _ = repo.get_or_create_project(session, "grok")
        run, _ = repo.get_or_create_run(session, project, "r", {}, [])
        session.add(Webhook(project_id=project.id, url="https://h.example/", secret="whsec_x"))
        for seq, metrics in enumerate(frames, start=33):
            engine.evaluate(session, add_frame(session, run, seq, metrics, layer="__model__"))
        (alert,) = alert_store.list_alerts(session, run_id=run.id)
        assert (alert.rule, alert.layer, alert.step) == ("grokking_imminent", "__model__", 3400)
        assert alert.values["evidence"] == {"alpha_floor": 2200, "defect": 3300, "norm_turn": 2300}
        assert alert.message == (
            "grokking_imminent: grok.imminent = 1 in __model__ (fires > 0.5); evidence: "
            "median HT-SR alpha <= 2 (reported, not counted by default) at step 2200, "
            "weight-norm turnaround at step 2300, "
            "commutator defect above its baseline at step 3300"
        )
        (delivery,) = session.query(Delivery).all()
        assert delivery.payload["data"]["values"]["evidence"]["defect"] == 3300


def test_threshold_messages_name_the_series_and_round() -> None:
    rules = {r.name: r for r in R.default_rules()}
    phase = {"metric": "sed.phase.w32", "value": 3.0}
    assert R.describe(rules["gap_collapse"], "__model__", phase) == (
        "gap_collapse: sed.phase.w32 = 3 in __model__ (fires > 2.5)"
    )
    alpha = {"metric": "farms.alpha", "value": 7.2463131206248415}
    assert R.describe(rules["farms_alpha_out_of_range"], "fc.weight", alpha) == (
        "farms_alpha_out_of_range: farms.alpha = 7.246 in fc.weight (fires < 2 or > 6)"
    )


def test_engine_ignores_steps_a_client_put_in_other_frames_info(
    sessions: sessionmaker[Session],
) -> None:
    """``info.steps`` is validated for sketch frames only: elsewhere it is client data."""
    with sessions.begin() as session:
        project, _ = repo.get_or_create_project(session, "info")
        run, _ = repo.get_or_create_run(session, project, "r", {}, [])
        frame = add_frame(session, run, 3, {}, {"fc.weight": 1})
        frame.info = {"steps": ["x", None]}
        AlertEngine().evaluate(session, frame)
        (alert,) = alert_store.list_alerts(session, run_id=run.id)
        assert (alert.rule, alert.step) == ("nonfinite", 300)


def test_a_custom_silence_rule_resolves_when_the_run_ends_or_speaks_again(
    sessions: sessionmaker[Session],
) -> None:
    # the sweep used to revisit only open episodes of the default `run_silent`: an episode of a
    # custom silence rule stayed open for ever once its run finished, or came back with
    # scalars only (no frame, so no per-frame evaluation)
    from datetime import timedelta

    from spectrawatch_server.db.base import utcnow

    engine = AlertEngine()
    with sessions.begin() as session:
        project, _ = repo.get_or_create_project(session, "s")
        params = {"kind": "silence", "minutes": 5.0}
        alert_store.upsert_rule(session, project.id, "quiet_5min", True, params)
        ended, _ = repo.get_or_create_run(session, project, "ended", {}, [])
        back, _ = repo.get_or_create_run(session, project, "back", {}, [])
        for run in (ended, back):
            run.last_seen_at = utcnow() - timedelta(minutes=10)
        ids = (ended.id, back.id)
    with sessions.begin() as session:
        assert engine.sweep_silent(session) == 2
        opened = alert_store.list_alerts(session, rule="quiet_5min", status="open")
        assert sorted(a.run_id for a in opened) == sorted(ids)
    with sessions.begin() as session:
        session.get_one(Run, ids[0]).status = "finished"
        session.get_one(Run, ids[1]).last_seen_at = utcnow()  # a scalar batch came in
    with sessions.begin() as session:
        assert engine.sweep_silent(session) == 2
        alerts = alert_store.list_alerts(session, rule="quiet_5min")
        assert sorted((a.run_id, a.status) for a in alerts) == [
            (ids[0], "resolved"),
            (ids[1], "resolved"),
        ]


def test_a_stored_rule_that_stops_validating_resolves_its_alerts_and_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A rule whose stored params an upgrade made invalid is off: its open alerts are resolved
    (``rule invalid: ...``) in every run of the project, by the next evaluation of one of them
    or by the periodic sweep; it is logged once, and the rules API lists it off with the
    problem (a custom one too)."""
    from fastapi.testclient import TestClient

    from spectrawatch_server.app import create_app
    from spectrawatch_server.config import ServerSettings

    settings = ServerSettings(data_dir=tmp_path, run_worker=False, run_webhooks=False)
    engine = AlertEngine()
    custom = {"kind": "threshold", "metric": "htsr.alpha", "above": 1.0}
    severity = "params.severity: must be one of info, warning, critical, got 'fatal'"
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        sessions = client.app.state.spectrawatch.sessions  # type: ignore[attr-defined]
        runs: dict[str, int] = {}  # project -> run (its other run ended before the upgrade)
        with sessions.begin() as session:
            for name in ("live", "ended"):
                project, _ = repo.get_or_create_project(session, name)
                alert_store.upsert_rule(session, project.id, "alpha_high", True, custom)
                for run_name in ("a", "b"):
                    run, _ = repo.get_or_create_run(session, project, run_name, {}, [])
                    frame = add_frame(session, run, 1, {"htsr.alpha": 3.0}, {"fc.weight": 2})
                    engine.evaluate(session, frame)
                runs[name] = run.id
                # the upgrade: a severity and a metric this version no longer knows
                alert_store.upsert_rule(
                    session, project.id, "nonfinite", True, {"severity": "fatal"}
                )
                gone = {**custom, "metric": "htsr.gone"}
                alert_store.upsert_rule(session, project.id, "alpha_high", True, gone)

        def open_rules() -> list[tuple[str, str]]:
            with sessions() as session:
                alerts = alert_store.list_alerts(session, status="open")
                return sorted((a.rule, f"{a.run_id}") for a in alerts)

        assert len(open_rules()) == 8
        rules = {r["name"]: r for r in client.get("/api/v1/projects/live/alert-rules").json()}
        assert (rules["nonfinite"]["enabled"], rules["nonfinite"]["problem"]) == (False, severity)
        assert rules["alpha_high"]["enabled"] is False
        assert rules["alpha_high"]["problem"] == "params.metric: unknown metric 'htsr.gone'"
        assert rules["alpha_high"]["params"]["metric"] == "htsr.gone"
        assert rules["alpha_out_of_range"]["problem"] is None

        with caplog.at_level("WARNING", logger="spectrawatch_server.alerts.engine"):
            # a frame of project live's run resolves the alerts of both its runs
            with sessions.begin() as session:
                run = session.get_one(Run, runs["live"])
                engine.evaluate(session, add_frame(session, run, 2, {"htsr.alpha": 3.0}))
            assert len(open_rules()) == 4  # project ended's
            with sessions.begin() as session:
                engine.evaluate(session, add_frame(session, run, 3, {"htsr.alpha": 3.0}))
                assert engine.sweep_invalid_rules(session) == 4  # project ended: no frame comes
            with sessions.begin() as session:
                assert engine.sweep_invalid_rules(session) == 0
        assert open_rules() == []
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert len(warnings) == 4, warnings  # once per rule and project
        assert "'alpha_high' no longer validates (params.metric: unknown metric" in warnings[0]
        with sessions() as session:
            alerts = alert_store.list_alerts(session)
            reasons = {(a.run_id, a.rule): a.values["resolved_reason"] for a in alerts}
        assert len(reasons) == 8
        assert reasons[(runs["ended"], "nonfinite")] == f"rule invalid: {severity}"
        assert reasons[(runs["live"], "alpha_high")].startswith("rule invalid: params.metric:")


# --- rules on logged scalars -------------------------------------------------------------

VAL_LOSS = {"kind": "threshold", "scalar": "val_loss", "above": 2.0, "fire_after": 3}


def test_a_custom_rule_watches_a_logged_scalar() -> None:
    rule = R.build_rule("val_loss_high", VAL_LOSS)
    assert (rule.scalar, rule.metric, rule.fire_after) == ("val_loss", None, 3)
    assert rule.params()["scalar"] == "val_loss"
    growth = R.build_rule("loss_jump", {"kind": "growth", "scalar": "loss", "factor": 3.0})
    assert (growth.scalar, growth.window) == ("loss", 10)
    # an analysis metric is still checked by name; a scalar is any name the API takes
    with pytest.raises(R.RuleError, match="unknown metric 'loss'"):
        R.build_rule("loss_high", {"kind": "threshold", "metric": "loss", "above": 0.5})
    # switching a custom rule from a metric to a scalar: the metric is dropped explicitly
    switched = R.build_rule("r", {"kind": "threshold", "metric": None, "scalar": "acc", "below": 1})
    assert (switched.metric, switched.scalar) == (None, "acc")
    # rules on scalars are skipped by the frame path (no layer series matches them)
    assert R.watched_series([rule], [("", "val_loss"), ("fc.weight", "val_loss")]) == {}
    assert R.describe(rule, "", {"scalar": "val_loss", "value": 2.5}) == (
        "val_loss_high: val_loss = 2.5 (fires > 2 for 3 points)"
    )
    assert R.describe(rule, "", {"scalar": "val_loss", "value": None}) == (
        "val_loss_high: val_loss = NaN/Inf (fires > 2 for 3 points)"
    )


@pytest.mark.parametrize(
    ("name", "params", "field"),
    [
        ("alpha_out_of_range", {"scalar": "loss"}, "scalar"),  # a default keeps its metric
        ("custom_one", {**VAL_LOSS, "metric": "htsr.alpha"}, "scalar"),
        ("custom_one", {"kind": "silence", "scalar": "loss", "minutes": 1.0}, "scalar"),
        ("custom_one", {**VAL_LOSS, "scalar": ""}, "scalar"),
        ("custom_one", {**VAL_LOSS, "scalar": "a\nb"}, "scalar"),
        ("custom_one", {**VAL_LOSS, "scalar": "x" * 201}, "scalar"),
        ("custom_one", {**VAL_LOSS, "scalar": 3}, "scalar"),
        ("custom_one", {**VAL_LOSS, "layers": "fc.*"}, "layers"),
        ("custom_one", {"kind": "threshold", "scalar": "loss"}, "above"),
    ],
)
def test_bad_scalar_rules_name_the_field(name: str, params: dict[str, object], field: str) -> None:
    base = {r.name: r for r in R.default_rules()}.get(name)
    with pytest.raises(R.RuleError) as info:
        R.build_rule(name, params, base=base)
    assert info.value.field == field


def test_a_nonfinite_scalar_fires_its_rules() -> None:
    # a NaN loss is the divergence a loss rule watches for (a metric's NaN still holds)
    rule = R.build_rule("loss_high", {"kind": "threshold", "scalar": "loss", "above": 10.0})
    assert R.point_states(rule, [1.0, float("nan"), float("inf"), 1.0]) == [
        "clear", "fire", "fire", "clear",
    ]  # fmt: skip
    growth = R.build_rule("g", {"kind": "growth", "scalar": "loss", "factor": 3.0})
    assert R.point_states(growth, [1.0, 1.0, float("nan")]) == ["hold", "clear", "fire"]


def post_scalars(
    sessions: sessionmaker[Session],
    engine: AlertEngine,
    run_id: int,
    points: list[tuple[int, float]],
    name: str = "val_loss",
) -> None:
    """What ``POST /runs/{id}/scalars`` does: store the batch, then the scalar rules."""
    with sessions.begin() as session:
        run = session.get_one(Run, run_id)
        result_store.upsert_scalars(session, run_id, [(s, name, v) for s, v in points])
        engine.evaluate_scalars(session, run, {name})


def test_engine_scalar_rule_episodes_by_step_not_arrival(
    sessions: sessionmaker[Session],
) -> None:
    """``val_loss`` above 2.0 for 3 points opens one episode (one webhook delivery), a re-sent
    or late old batch neither reopens nor resolves it, and it resolves on the latest steps."""
    engine = AlertEngine()
    with sessions.begin() as session:
        project, _ = repo.get_or_create_project(session, "scalars")
        run, _ = repo.get_or_create_run(session, project, "r", {}, [])
        other, _ = repo.get_or_create_run(session, project, "other", {}, [])
        session.add(Webhook(project_id=project.id, url="https://h.example/", secret="whsec_x"))
        alert_store.upsert_rule(session, project.id, "val_loss_high", True, VAL_LOSS)
        run_id, other_id = run.id, other.id

    def alerts() -> list[tuple[str, str, str, int, int | None]]:
        with sessions() as session:
            rows = alert_store.list_alerts(session, run_id=run_id)
            return [(a.rule, a.layer, a.status, a.step, a.resolved_step) for a in rows]

    post_scalars(sessions, engine, run_id, [(1, 1.0), (2, 2.5), (3, 2.6)])
    assert alerts() == []  # 2 points above: fire_after is 3
    post_scalars(sessions, engine, run_id, [(4, 2.7)], name="loss")  # another scalar
    assert alerts() == []
    post_scalars(sessions, engine, run_id, [(4, 2.7)])
    assert alerts() == [("val_loss_high", "", "open", 4, None)]
    post_scalars(sessions, engine, run_id, [(1, 1.0), (2, 2.5), (3, 2.6), (4, 2.7)])  # re-sent
    assert alerts() == [("val_loss_high", "", "open", 4, None)]
    post_scalars(sessions, engine, run_id, [(5, 1.5)])
    assert alerts() == [("val_loss_high", "", "resolved", 4, 5)]
    # a late old step above the threshold: not among the latest 3, nothing reopens
    post_scalars(sessions, engine, run_id, [(0, 9.0)])
    post_scalars(sessions, engine, run_id, [(6, 3.0), (7, 3.0), (8, float("nan"))])
    assert alerts()[0] == ("val_loss_high", "", "open", 8, None)
    # a late step among the latest ones counts (the series by step): 7, 8, 9 all still fire
    post_scalars(sessions, engine, run_id, [(9, 2.1)])
    post_scalars(sessions, engine, run_id, [(7, 2.2)])
    assert alerts()[0][2] == "open"
    post_scalars(sessions, engine, run_id, [(10, 1.0)])
    post_scalars(sessions, engine, run_id, [(2, 1.0)])  # late and clear: no change either
    post_scalars(sessions, engine, other_id, [(1, 5.0), (2, 5.0)])  # another run: its own
    with sessions() as session:
        rows = alert_store.list_alerts(session, run_id=run_id)
        assert [(a.status, a.step, a.resolved_step) for a in rows] == [
            ("resolved", 8, 10),
            ("resolved", 4, 5),
        ]
        assert rows[0].values["value"] is None  # the NaN of step 8
        assert rows[1].values == {"scalar": "val_loss", "value": 2.7, "below": None, "above": 2.0}
        assert rows[1].message == "val_loss_high: val_loss = 2.7 (fires > 2 for 3 points)"
        deliveries = session.query(Delivery).order_by(Delivery.id).all()
        assert [d.event for d in deliveries] == ["alert.opened", "alert.resolved"] * 2
        assert deliveries[0].payload["data"]["values"]["scalar"] == "val_loss"
        assert alert_store.list_alerts(session, run_id=other_id) == []


def test_engine_scalar_rules_off_or_absent_cost_one_read(sessions: sessionmaker[Session]) -> None:
    """Without an enabled rule on a scalar of the batch the engine reads the project's rules
    once and stops; a disabled rule opens nothing; an above_after_in_range rule waits for the
    scalar to have been within range."""
    engine = AlertEngine()
    with sessions.begin() as session:
        project, _ = repo.get_or_create_project(session, "quiet")
        run, _ = repo.get_or_create_run(session, project, "r", {}, [])
        alert_store.upsert_rule(session, project.id, "off", False, {**VAL_LOSS, "fire_after": 1})
        armed = {"kind": "threshold", "scalar": "acc", "below": 0.2, "above": 0.9}
        alert_store.upsert_rule(
            session, project.id, "acc_band", True, {**armed, "above_after_in_range": True}
        )
        run_id = run.id
    statements: list[str] = []

    def record(*args: object) -> None:
        statements.append(str(args[2]))

    with sessions.begin() as session:
        run = session.get_one(Run, run_id)
        result_store.upsert_scalars(session, run_id, [(s, "val_loss", 5.0) for s in range(5000)])
        connection = session.connection()
        event.listen(connection, "before_cursor_execute", record)
        engine.evaluate_scalars(session, run, {"val_loss", "loss"})
        event.remove(connection, "before_cursor_execute", record)
    assert len(statements) == 1, statements  # the rules, no lock: nothing to evaluate
    post_scalars(sessions, engine, run_id, [(1, 0.95), (2, 0.97)], name="acc")
    with sessions() as session:
        assert alert_store.list_alerts(session, run_id=run_id) == []  # never in range yet
    post_scalars(sessions, engine, run_id, [(3, 0.5), (4, 0.95)], name="acc")
    with sessions() as session:
        (alert,) = alert_store.list_alerts(session, run_id=run_id)
        assert (alert.rule, alert.step, alert.values["value"]) == ("acc_band", 4, 0.95)


# --- after_step: a warm-up gate -------------------------------------------------------------

VAL_ACC_LOW = {"kind": "threshold", "scalar": "val_acc", "below": 0.6, "fire_after": 2}


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("custom_one", {**VAL_ACC_LOW, "after_step": -1}),
        ("custom_one", {**VAL_ACC_LOW, "after_step": 1.5}),
        ("custom_one", {**VAL_ACC_LOW, "after_step": "500"}),
        ("custom_one", {**VAL_ACC_LOW, "after_step": True}),
        ("custom_one", {**VAL_ACC_LOW, "after_step": 2**62 + 1}),
        ("nonfinite", {"after_step": 100}),  # frames, not a series of points
        ("run_silent", {"after_step": 100}),
        ("custom_one", {"kind": "client_drops", "above": 0, "after_step": 1}),
    ],
)
def test_after_step_is_a_step_of_threshold_and_growth_rules(
    name: str, params: dict[str, object]
) -> None:
    base = {r.name: r for r in R.default_rules()}.get(name)
    with pytest.raises(R.RuleError) as info:
        R.build_rule(name, params, base=base)
    assert info.value.field == "after_step"


def test_after_step_leaves_out_the_points_before_it() -> None:
    """``val_acc < 0.6 for 2 points from step 500``: the low accuracies of the warm-up neither
    fire nor count toward ``fire_after``; a growth rule takes no baseline before it."""
    rule = R.build_rule("val_acc_low", {**VAL_ACC_LOW, "after_step": 500})
    assert (rule.after_step, rule.params()["after_step"]) == (500, 500)
    assert R.build_rule("val_acc_low", VAL_ACC_LOW).after_step == 0  # absent: every step
    nonfinite = {r.name: r for r in R.default_rules()}["nonfinite"]
    assert R.build_rule("nonfinite", {"after_step": 0}, base=nonfinite).after_step == 0
    warmup = [(100, 0.1), (200, 0.2), (400, 0.3), (500, 0.4), (600, 0.5)]
    assert R.evaluated_points(rule, warmup) == [(500, 0.4), (600, 0.5)]
    values = [v for _, v in R.evaluated_points(rule, warmup[:4])]
    assert R.decide_series(rule, False, values) is R.Transition.NONE  # one point from 500 on
    values = [v for _, v in R.evaluated_points(rule, warmup)]
    assert R.decide_series(rule, False, values) is R.Transition.OPEN
    growth = R.build_rule("g", {"kind": "growth", "scalar": "loss", "factor": 3.0})
    late = dataclasses.replace(growth, after_step=300)
    points = [(100, 1.0), (200, 1.0), (300, 4.0), (400, 4.5)]
    assert R.point_states(growth, [v for _, v in points])[2:] == ["fire", "fire"]
    # from step 300 on the series is 4.0, 4.5: no baseline under the grown value
    assert R.point_states(late, [v for _, v in R.evaluated_points(late, points)]) == [
        "hold", "clear",
    ]  # fmt: skip
    assert R.describe(rule, "", {"scalar": "val_acc", "value": 0.5}) == (
        "val_acc_low: val_acc = 0.5 (fires < 0.6 for 2 points from step 500)"
    )


def test_engine_after_step_is_silent_before_its_step(sessions: sessionmaker[Session]) -> None:
    """A scalar rule and a metric rule with ``after_step``: out of range through the warm-up,
    no alert; out of range after it, one; ``above_after_in_range`` is armed only by a value in
    range from ``after_step`` on."""
    engine = AlertEngine()
    with sessions.begin() as session:
        project, _ = repo.get_or_create_project(session, "warmup")
        run, _ = repo.get_or_create_run(session, project, "r", {}, [])
        alert_store.upsert_rule(
            session, project.id, "val_acc_low", True, {**VAL_ACC_LOW, "after_step": 500}
        )
        alert_store.upsert_rule(
            session, project.id, "alpha_out_of_range", True, {"after_step": 300}
        )
        run_id = run.id

    def alerts() -> list[tuple[str, str, int]]:
        with sessions() as session:
            rows = alert_store.list_alerts(session, run_id=run_id)
            return [(a.rule, a.status, a.step) for a in reversed(rows)]

    post_scalars(sessions, engine, run_id, [(s, 0.1) for s in range(0, 500, 100)], name="val_acc")
    assert alerts() == []  # five points < 0.6, all before step 500
    post_scalars(sessions, engine, run_id, [(500, 0.2)], name="val_acc")
    assert alerts() == []  # one point from step 500 on; fire_after is 2
    post_scalars(sessions, engine, run_id, [(600, 0.3)], name="val_acc")
    assert alerts() == [("val_acc_low", "open", 600)]

    # alpha: in range at step 100 (before after_step), then above 6: not armed from step 300
    def analyse(seq: int, alpha: float) -> None:  # a frame at step 100 * seq
        with sessions.begin() as session:
            frame = add_frame(session, session.get_one(Run, run_id), seq, {"htsr.alpha": alpha})
            engine.evaluate(session, frame)

    for seq, alpha in [(1, 1.0), (2, 4.0), (3, 7.0), (4, 7.5)]:
        analyse(seq, alpha)
    assert alerts() == [("val_acc_low", "open", 600)]  # 1.0 < 2 at step 100: before 300
    analyse(5, 4.0)
    analyse(6, 7.0)
    assert alerts() == [("val_acc_low", "open", 600), ("alpha_out_of_range", "open", 600)]
