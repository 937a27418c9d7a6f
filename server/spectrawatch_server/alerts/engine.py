"""Evaluate a project's alert rules for a run right after a frame's results are stored.

Runs inside the worker's results transaction (a :data:`spectrawatch_server.worker.ResultHook`):
the alert rows and their outbox deliveries commit atomically with the metrics that caused them,
and a redelivered job re-evaluates to the same state (an open episode is never opened twice).
Rules on logged scalars run the same way inside the transaction of ``POST /runs/{id}/scalars``
(:meth:`AlertEngine.evaluate_scalars`).
Episodes are keyed by (rule, run, layer); ``layer`` is ``""`` for run-level rules and for
``nonfinite``, whose one episode per incident names the layers it hit.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection
from datetime import timedelta
from typing import Any

from sqlalchemy.orm import Session

from spectrawatch.wire import row_steps
from spectrawatch_server.alerts import rules as R
from spectrawatch_server.config import ServerSettings
from spectrawatch_server.db.base import utcnow
from spectrawatch_server.db.models import Alert, Frame, Project, Run
from spectrawatch_server.storage import alert_store, series
from spectrawatch_server.webhooks import outbox

log = logging.getLogger(__name__)

DEFAULT_TTL = timedelta(hours=72)


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def read_evidence(
    session: Session, run_id: int, layer: str, metric: str, step: int
) -> dict[str, int | float] | None:
    """``{piece: value}`` of the evidence stored beside ``metric`` at ``step`` (the grokking
    detector's ``grok.evidence.*``: the step each piece appeared); None for a metric that has
    no evidence (:func:`~spectrawatch_server.alerts.rules.evidence_sources`)."""
    source = R.evidence_sources().get(metric)
    if source is None:
        return None
    prefix = source[0]
    return {
        k.removeprefix(prefix): int(v) if float(v).is_integer() else v
        for k, v in sorted(series.metrics_at(session, run_id, layer, prefix, step).items())
        if math.isfinite(v)
    }


class AlertEngine:
    """Rule evaluation bound to the links and delivery expiry of one server."""

    def __init__(self, base_url: str = "", ttl: timedelta = DEFAULT_TTL) -> None:
        self.base_url = base_url
        self.ttl = ttl
        self._reported: set[tuple[int, str, str]] = set()  # invalid rules logged (once each)

    # --- the worker hook -------------------------------------------------------------------

    def evaluate(self, session: Session, frame: Frame) -> None:
        """Open/resolve episodes of every enabled rule of the frame's project for its run."""
        run = session.get_one(Run, frame.run_id)
        project = session.get_one(Project, run.project_id)
        alert_store.lock_rules(session, project.id, edit=False)  # no rule edit until commit
        stored = alert_store.stored_rules(session, project.id)
        specs = R.effective_rules(stored)
        open_now = alert_store.open_alerts(session, run.id)
        if any(rule in stored for rule, _ in open_now):
            self.resolve_invalid(session, project, stored, {rule for rule, _ in open_now})
            open_now = alert_store.open_alerts(session, run.id)
        watched = R.watched_series(specs, alert_store.frame_series(session, frame.id))
        tails = series.metric_tails(session, run.id, R.history_wanted(specs, watched))
        for rule in specs:
            if not rule.enabled:
                continue
            if rule.kind in R.METRIC_KINDS:
                names_by_layer = watched.get(rule.name, {})
                self._metric_rule(session, rule, run, project, names_by_layer, tails, open_now)
            elif rule.kind == "nonfinite":
                self._nonfinite_rule(session, rule, run, project, frame, open_now)
            elif rule.kind == "client_drops":
                self._drops_rule(session, rule, run, project, frame.step, open_now)
            elif rule.kind == "silence":
                quiet: dict[str, Any] = {"silent_minutes": 0.0}
                self._apply(session, rule, run, project, "", frame.step, "clear", quiet, open_now)

    def evaluate_client_stats(self, session: Session, run: Run) -> None:
        """The ``client_drops`` rules after the client reported its counters (a run whose
        frames were all dropped sends no frame that would run them)."""
        project = session.get_one(Project, run.project_id)
        alert_store.lock_rules(session, project.id, edit=False)
        open_now = alert_store.open_alerts(session, run.id)
        for rule in R.effective_rules(alert_store.stored_rules(session, project.id)):
            if rule.enabled and rule.kind == "client_drops":
                self._drops_rule(session, rule, run, project, run.last_step or 0, open_now)

    def evaluate_scalars(self, session: Session, run: Run, names: Collection[str]) -> None:
        """The enabled scalar rules of the run's project that watch one of ``names`` (a batch
        of scalars just stored, in the caller's transaction), each decided on the points of its
        scalar with the highest steps: a late or re-sent old step changes the decision only if
        it is among them, so an episode does not flap on it.

        Without such a rule it costs one read of the project's stored rules (no lock); with
        one, a read of ``history_needed`` points per watched scalar, whatever the batch size."""
        if not _watched_scalars(alert_store.stored_rules(session, run.project_id), names):
            return
        project = session.get_one(Project, run.project_id)
        alert_store.lock_rules(session, project.id, edit=False)  # read again under the lock
        specs = [
            rule
            for rule in R.effective_rules(alert_store.stored_rules(session, project.id))
            if rule.enabled and rule.scalar is not None and rule.scalar in names
        ]
        if not specs:
            return
        open_now = alert_store.open_alerts(session, run.id)
        wanted: dict[str, int] = {}
        for rule in specs:
            assert rule.scalar is not None
            wanted[rule.scalar] = max(wanted.get(rule.scalar, 0), rule.history_needed)
        tails = {n: alert_store.scalar_tail(session, run.id, n, k) for n, k in wanted.items()}
        for rule in specs:
            assert rule.scalar is not None
            tail = R.evaluated_points(rule, tails[rule.scalar])[-rule.history_needed :]
            if tail:
                self._scalar_rule(session, rule, run, project, tail, open_now)

    def _scalar_rule(
        self,
        session: Session,
        rule: R.RuleSpec,
        run: Run,
        project: Project,
        tail: list[tuple[int, float]],
        open_now: dict[tuple[str, str], Alert],
    ) -> None:
        """Open or resolve the run's one episode (layer ``""``) of a scalar rule on ``tail``."""
        assert rule.scalar is not None
        episode = open_now.get((rule.name, ""))
        baseline = (episode.values or {}).get("baseline") if episode is not None else None
        values = [v for _, v in tail]
        growth_baseline = baseline if rule.kind == "growth" else None
        transition = R.decide_series(rule, episode is not None, values, growth_baseline)
        if transition is R.Transition.OPEN:
            if self._scalar_not_armed(session, rule, run, values[-1]):
                return  # above range, but the scalar never was in range
            opened = self._metric_values(rule, rule.scalar, tail, key="scalar")
            open_now[(rule.name, "")] = self._open(
                session, rule, run, project, "", tail[-1][0], opened
            )
        elif transition is R.Transition.RESOLVE and episode is not None:
            self._resolve(session, episode, run, project, tail[-1][0])
            del open_now[(rule.name, "")]

    @staticmethod
    def _scalar_not_armed(session: Session, rule: R.RuleSpec, run: Run, value: float) -> bool:
        """:meth:`_not_armed` for a rule on a logged scalar."""
        if not rule.above_after_in_range or rule.above is None or not value > rule.above:
            return False
        assert rule.scalar is not None
        return not alert_store.scalar_was_within(
            session, run.id, rule.scalar, rule.below, rule.above, rule.after_step
        )

    def _drops_rule(
        self,
        session: Session,
        rule: R.RuleSpec,
        run: Run,
        project: Project,
        step: int,
        open_now: dict[tuple[str, str], Alert],
    ) -> None:
        stats = run.client_stats or {}
        dropped = int(stats.get("dropped_frames", 0) or 0)
        overflow = int(stats.get("spool_overflow", 0) or 0)
        state = R.drops_state(rule, dropped, overflow)
        values: dict[str, Any] = {"dropped_frames": dropped, "spool_overflow": overflow}
        self._apply(session, rule, run, project, "", step, state, values, open_now)

    def _metric_rule(
        self,
        session: Session,
        rule: R.RuleSpec,
        run: Run,
        project: Project,
        names_by_layer: dict[str, set[str]],
        tails: series.Series,
        open_now: dict[tuple[str, str], Alert],
    ) -> None:
        for layer, names in sorted(names_by_layer.items()):
            episode = open_now.get((rule.name, layer))
            is_open = episode is not None
            baseline = (episode.values or {}).get("baseline") if episode is not None else None
            decisions: list[tuple[R.Transition, str, list[tuple[int, float]]]] = []
            for name in sorted(names):
                points = R.evaluated_points(rule, tails.get((name, layer), []))
                tail = points[-rule.history_needed :]
                if not tail:
                    continue
                values = [v for _, v in tail]
                transition = R.decide_series(
                    rule, is_open, values, baseline if rule.kind == "growth" else None
                )
                if transition is R.Transition.OPEN and self._not_armed(
                    session, rule, run, name, layer, values[-1]
                ):
                    continue  # above range, but the series never was in range: not news
                decisions.append((transition, name, tail))
            if not decisions:
                continue
            if not is_open:
                fired = [d for d in decisions if d[0] is R.Transition.OPEN]
                if fired:
                    _, name, tail = fired[0]
                    opened = self._metric_values(rule, name, tail)
                    evidence = read_evidence(session, run.id, layer, name, tail[-1][0])
                    if evidence is not None:  # what the metric's value rests on
                        opened["evidence"] = evidence
                    self._open(session, rule, run, project, layer, tail[-1][0], opened)
            elif all(d[0] is R.Transition.RESOLVE for d in decisions):
                step = max(d[2][-1][0] for d in decisions)
                self._resolve(session, open_now[(rule.name, layer)], run, project, step)

    @staticmethod
    def _not_armed(
        session: Session, rule: R.RuleSpec, run: Run, name: str, layer: str, value: float
    ) -> bool:
        """An ``above_after_in_range`` rule firing on its upper bound for a series that never
        was within range (e.g. alpha of a near-random layer since the first snapshot), from
        ``after_step`` on."""
        if not rule.above_after_in_range or rule.above is None or not value > rule.above:
            return False
        return not alert_store.was_within(
            session, run.id, name, layer, rule.below, rule.above, rule.after_step
        )

    @staticmethod
    def _metric_values(
        rule: R.RuleSpec, name: str, tail: list[tuple[int, float]], key: str = "metric"
    ) -> dict[str, Any]:
        """An opened episode's ``values``: the series (``{key: name}``), its latest value,
        and the rule's bounds or growth ratio and baseline."""
        values: dict[str, Any] = {key: name, "value": _finite(tail[-1][1])}
        if rule.kind == "growth":
            ratio = R.growth_ratio(rule, [v for _, v in tail])
            values["ratio"] = _finite(ratio)
            values["baseline"] = _finite(tail[-1][1] / ratio) if ratio else None
            values["window"] = rule.window
        else:
            values["below"] = rule.below
            values["above"] = rule.above
        return values

    def _nonfinite_rule(
        self,
        session: Session,
        rule: R.RuleSpec,
        run: Run,
        project: Project,
        frame: Frame,
        open_now: dict[tuple[str, str], Alert],
    ) -> None:
        """One episode per run (layer ``""``) for a NaN/Inf incident, naming the layers it hit
        (``values.layers``, ``layer_count``): one NaN spreads to every tensor within a step, and
        an episode per layer flooded one critical alert and webhook per tensor. Its message
        names the layers of the frame that opened it (where the incident began). Bad rows open it
        at their first step (unless they are the tail of an episode already resolved after
        them: frames of other kinds arrive out of step order); while open, bad rows add layers,
        extend ``last_step`` and move its step (``first_step``) back to an earlier bad row. A
        frame finite in every layer it carries resolves it if it reaches past that last bad step
        and carries one of the episode's layers."""
        self._legacy_nonfinite(session, rule, run, project, frame, open_now)
        counts = frame.nonfinite or {}
        bad = R.nonfinite_layers(rule, frame.layers or [], counts)
        frame_last = max([frame.step, *(row_steps(frame.kind, frame.info or {}) or [])])
        alert = open_now.get((rule.name, ""))
        if not bad:
            if alert is not None and self._clears(alert, frame, frame_last):
                last_bad = int((alert.values or {}).get("last_step", alert.step))
                self._resolve(session, alert, run, project, max(frame.step, last_bad + 1))
                del open_now[(rule.name, "")]
            return
        spans = frame.nonfinite_steps or {}
        first = min(int(spans.get(layer, (frame.step, frame_last))[0]) for layer in bad)
        last = max(int(spans.get(layer, (frame.step, frame_last))[1]) for layer in bad)
        if alert is not None:
            values = dict(alert.values or {})
            values["last_step"] = max(last, int(values.get("last_step", alert.step)))
            # a frame analysed later may hold earlier bad rows (an update frame still filling
            # when a theta frame opened the episode): the episode starts at the first of them
            values["first_step"] = min(first, int(values.get("first_step", alert.step)))
            alert.step = min(alert.step, first)
            values.update(R.nonfinite_layer_values(values, bad))
            alert.values = values  # the message stays the one delivered: where it began
            return
        resolved = alert_store.last_resolved_step(session, run.id, rule.name, "")
        if resolved is not None and last <= resolved:
            return
        values = {
            "count": sum(int(counts.get(layer, 0)) for layer in bad),
            "kind": frame.kind,
            "frame_id": frame.id,
            "first_step": first,
            "last_step": last,
            **R.nonfinite_layer_values({}, bad),
        }
        open_now[(rule.name, "")] = self._open(session, rule, run, project, "", first, values)

    @staticmethod
    def _clears(alert: Alert, frame: Frame, frame_last: int) -> bool:
        """A finite frame past the episode's last bad step that carries one of its layers
        (any layer when the episode's list was truncated)."""
        values = alert.values or {}
        if frame_last <= int(values.get("last_step", alert.step)):
            return False
        named = set(values.get("layers") or [])
        truncated = int(values.get("layer_count", len(named))) > len(named)
        return truncated or not named or bool(named & set(frame.layers or []))

    def _legacy_nonfinite(
        self,
        session: Session,
        rule: R.RuleSpec,
        run: Run,
        project: Project,
        frame: Frame,
        open_now: dict[tuple[str, str], Alert],
    ) -> None:
        """Episodes opened per layer before the per-run grouping: a finite frame carrying
        their layer past their last bad step resolves them (nothing opens new ones)."""
        counts = frame.nonfinite or {}
        frame_last = max([frame.step, *(row_steps(frame.kind, frame.info or {}) or [])])
        for (name, layer), alert in list(open_now.items()):
            if name != rule.name or not layer or layer not in (frame.layers or []):
                continue
            last_bad = int((alert.values or {}).get("last_step", alert.step))
            if not counts.get(layer) and frame_last > last_bad:
                self._resolve(session, alert, run, project, max(frame.step, last_bad + 1))
                del open_now[(name, layer)]

    def _apply(
        self,
        session: Session,
        rule: R.RuleSpec,
        run: Run,
        project: Project,
        layer: str,
        step: int,
        state: R.PointState,
        values: dict[str, Any],
        open_now: dict[tuple[str, str], Alert],
    ) -> None:
        """A single-point decision (persistence counts do not apply to per-frame states)."""
        single = R.RuleSpec(rule.name, rule.kind)
        alert = open_now.get((rule.name, layer))
        transition = R.decide(single, alert is not None, [state])
        if transition is R.Transition.OPEN:
            open_now[(rule.name, layer)] = self._open(
                session, rule, run, project, layer, step, values
            )
        elif transition is R.Transition.RESOLVE and alert is not None:
            self._resolve(session, alert, run, project, step)
            del open_now[(rule.name, layer)]

    # --- transitions -----------------------------------------------------------------------

    def _open(
        self,
        session: Session,
        rule: R.RuleSpec,
        run: Run,
        project: Project,
        layer: str,
        step: int,
        values: dict[str, Any],
    ) -> Alert:
        alert = alert_store.insert_alert(
            session,
            Alert(
                run_id=run.id,
                rule=rule.name,
                layer=layer,
                severity=rule.severity,
                status="open",
                step=step,
                message=R.describe(rule, layer, values),
                values=values,
            ),
        )
        log.info("alert %d opened: %s", alert.id, alert.message)
        outbox.enqueue_alert_event(
            session, outbox.ALERT_OPENED, alert, run, project, self.base_url, self.ttl
        )
        return alert

    def _resolve(
        self, session: Session, alert: Alert, run: Run, project: Project, step: int | None
    ) -> None:
        alert_store.resolve_alert(session, alert, step)
        outbox.enqueue_alert_event(
            session, outbox.ALERT_RESOLVED, alert, run, project, self.base_url, self.ttl
        )

    # --- rules switched off or changed ---------------------------------------------------

    def resolve_rule(self, session: Session, project: Project, rule: str, reason: str) -> int:
        """Resolve every open episode of ``rule`` in the project's runs, each with an
        ``alert.resolved`` event: the rule was disabled or deleted (no evaluation would ever
        resolve them) or changed (they came from a condition that is gone). ``reason`` is kept
        as ``values.resolved_reason``; the resolved step is the run's latest step. Returns the
        number of episodes resolved."""
        alerts = alert_store.open_alerts_of_project_rule(session, project.id, rule)
        for alert in alerts:
            run = session.get_one(Run, alert.run_id)
            alert.values = {**(alert.values or {}), "resolved_reason": reason}
            step = max(alert.step, run.last_step or alert.step)
            self._resolve(session, alert, run, project, step)
            log.info("alert %d resolved: %s", alert.id, reason)
        return len(alerts)

    def resolve_invalid(
        self,
        session: Session,
        project: Project,
        stored: dict[str, tuple[bool, dict[str, Any]]],
        among: set[str] | None = None,
    ) -> int:
        """Resolve the open episodes of the project's stored rules (of ``among``, else all)
        that no longer validate, e.g. a parameter an upgrade renamed: nothing evaluates them
        any more (:func:`~spectrawatch_server.alerts.rules.effective_rules` leaves them off).
        ``values.resolved_reason`` is ``rule invalid: params.<field>: <message>``; each such
        rule is logged once by this engine. Returns the number of episodes resolved."""
        resolved = 0
        for rule, problem in sorted(R.invalid_rules(stored).items()):
            if among is not None and rule not in among:
                continue
            if (project.id, rule, problem) not in self._reported:
                self._reported.add((project.id, rule, problem))
                log.warning(
                    "project %r: stored alert rule %r no longer validates (%s): it is off until "
                    "edited or reset (spectrawatch alerts set/reset)",
                    project.name,
                    rule,
                    problem,
                )
            resolved += self.resolve_rule(session, project, rule, f"rule invalid: {problem}")
        return resolved

    def sweep_invalid_rules(self, session: Session) -> int:
        """:meth:`resolve_invalid` for every project (periodic: a finished run whose rule an
        upgrade made invalid gets no frame that would do it). Returns episodes resolved."""
        resolved = 0
        for project_id, stored in alert_store.stored_rules_by_project(session).items():
            if not R.invalid_rules(stored):
                continue
            alert_store.lock_rules(session, project_id, edit=False)  # read again under it
            project = session.get_one(Project, project_id)
            resolved += self.resolve_invalid(
                session, project, alert_store.stored_rules(session, project_id)
            )
        return resolved

    # --- periodic: runs gone silent --------------------------------------------------------

    def sweep_silent(self, session: Session) -> int:
        """Open ``silence`` episodes for running runs that went quiet; resolve revived ones.

        Called periodically (not per frame: a silent run sends no frames). Returns the number
        of transitions.
        """
        now = utcnow()
        changes = 0
        candidates = {r.id: r for r in alert_store.silent_runs(session, now - timedelta(minutes=1))}
        # open episodes of every silence rule, custom ones too: the run may have ended or
        # spoken again (scalars only) since, and no frame would resolve them
        silence = {r.name for r in R.default_rules() if r.kind == "silence"}
        silence |= alert_store.stored_rule_names_of_kind(session, "silence")
        for alert in alert_store.open_alerts_of_rules(session, silence):
            run = session.get(Run, alert.run_id)
            if run is not None:
                candidates.setdefault(run.id, run)
        rules_by_project: dict[int, list[R.RuleSpec]] = {}
        for run in candidates.values():
            if run.project_id not in rules_by_project:
                alert_store.lock_rules(session, run.project_id, edit=False)
                stored = alert_store.stored_rules(session, run.project_id)
                rules_by_project[run.project_id] = [
                    r for r in R.effective_rules(stored) if r.enabled and r.kind == "silence"
                ]
            project = session.get_one(Project, run.project_id)
            open_now = alert_store.open_alerts(session, run.id)
            seen = run.last_seen_at or run.created_at
            minutes = (now - seen).total_seconds() / 60.0
            for rule in rules_by_project[run.project_id]:
                before = len(open_now), (rule.name, "") in open_now
                state = R.silence_state(rule, minutes, run.status == "running")
                values = {"silent_minutes": round(minutes, 1), "last_seen_at": seen.isoformat()}
                self._apply(
                    session, rule, run, project, "", run.last_step or 0, state, values, open_now
                )
                changes += int(before != (len(open_now), (rule.name, "") in open_now))
        return changes


def _watched_scalars(
    stored: dict[str, tuple[bool, dict[str, Any]]], names: Collection[str]
) -> bool:
    """Whether an enabled stored rule names one of ``names`` as its scalar (no default rule
    watches a scalar: without a custom one, a scalar batch takes no lock)."""
    scalars = {params.get("scalar") for enabled, params in stored.values() if enabled}
    return any(isinstance(n, str) and n in names for n in scalars)


def evaluate(session: Session, frame: Frame) -> None:
    """:class:`AlertEngine` with relative dashboard links (the app binds its own base URL)."""
    AlertEngine().evaluate(session, frame)


def engine_for(settings: ServerSettings) -> AlertEngine:
    """The engine with the server's public base URL and delivery expiry."""
    return AlertEngine(settings.base_url, timedelta(hours=settings.webhook_event_ttl_hours))
