"""Alerts (per run, per project) and each project's alert rules (defaults on, editable)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool
from sqlalchemy.orm import Session

from spectrawatch_server.alerts import rules as R
from spectrawatch_server.alerts.engine import engine_for
from spectrawatch_server.api.deps import (
    Principal,
    PrincipalDep,
    RunDep,
    SessionDep,
    StateDep,
    find_alert,
    require_role,
)
from spectrawatch_server.api.errors import ApiError
from spectrawatch_server.api.links import keyset_page
from spectrawatch_server.db.models import Project, Token
from spectrawatch_server.storage import alert_store
from spectrawatch_server.storage import repository as repo
from spectrawatch_server.storage.metric_reads import INT64_MAX

router = APIRouter(tags=["alerts"])

AlertStatus = Literal["open", "resolved"]


class AlertPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    run_id: int
    rule: str
    layer: str
    severity: R.Severity
    status: AlertStatus
    step: int
    resolved_step: int | None
    message: str
    values: dict[str, Any]
    created_at: datetime
    resolved_at: datetime | None
    acknowledged_at: datetime | None = Field(
        None, description="when someone acknowledged the episode (None: not acknowledged)"
    )
    acknowledged_by: str | None = Field(
        None, description="who: the token's name (or `token <id>`), `anonymous` without auth"
    )


class AlertUpdate(BaseModel):
    """``{"acknowledged": true}`` acknowledges an episode, ``false`` takes that back."""

    model_config = ConfigDict(extra="forbid")
    acknowledged: StrictBool  # "yes" or 1 is refused, not read as true


class RulePublic(BaseModel):
    name: str
    kind: str
    enabled: bool
    builtin: bool = Field(description="one of the default rules (DELETE resets it)")
    customized: bool = Field(description="the project stores overrides for this rule")
    description: str
    params: dict[str, Any]
    problem: str | None = Field(
        None,
        description="why the stored params no longer validate (e.g. after an upgrade): the rule "
        "is off and its alerts were resolved until it is edited (PATCH) or reset (DELETE)",
    )


class RuleUpdate(BaseModel):
    """Partial update: ``params`` are merged into the stored overrides."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool | None = None
    params: dict[str, Any] = Field(default_factory=dict)


def find_project(session: Session, principal: Principal, name: str) -> Project:
    project = repo.get_project(session, name)
    if project is None or not principal.can_access(project.id):
        raise ApiError(404, "project_not_found", f"project {name!r} does not exist")
    return project


def _rule_public(
    spec: R.RuleSpec, stored: dict[str, tuple[bool, dict[str, Any]]], problem: str | None = None
) -> RulePublic:
    builtin = spec.name in {r.name for r in R.default_rules()}
    return RulePublic(
        name=spec.name,
        kind=spec.kind,
        enabled=spec.enabled,
        builtin=builtin,
        customized=spec.name in stored,
        description=spec.description,
        params=spec.params(),
        problem=problem,
    )


def _invalid_custom_rule(name: str, params: dict[str, Any], problem: str) -> RulePublic:
    """A stored custom rule that no longer validates: off, its stored params as they are."""
    return RulePublic(
        name=name,
        kind=str(params.get("kind", "")),
        enabled=False,
        builtin=False,
        customized=True,
        description="custom rule whose stored parameters no longer validate",
        params=params,
        problem=problem,
    )


BeforeId = Annotated[int | None, Query(ge=1, le=INT64_MAX)]


@router.get("/runs/{run_id}/alerts", response_model=list[AlertPublic])
def list_run_alerts(
    run: RunDep,
    session: SessionDep,
    state: StateDep,
    request: Request,
    response: Response,
    status: AlertStatus | None = None,
    acknowledged: bool | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    offset: Annotated[int, Query(ge=0)] = 0,
    before_id: BeforeId = None,
) -> list[AlertPublic]:
    """Alert episodes of a run, newest first, with their status (open or resolved); with
    ``acknowledged``, only the acknowledged (true) or unacknowledged (false) ones. Paged as
    ``GET /alerts``."""
    rows = alert_store.list_alerts(
        session,
        run_id=run.id,
        status=status,
        acknowledged=acknowledged,
        limit=limit + 1,
        offset=offset,
        before_id=before_id,
    )
    page = keyset_page(request, response, state.settings.public_url, rows, limit)
    return [AlertPublic.model_validate(a) for a in page]


@router.get("/alerts", response_model=list[AlertPublic])
def list_alerts(
    principal: PrincipalDep,
    session: SessionDep,
    state: StateDep,
    request: Request,
    response: Response,
    project: str | None = None,
    status: AlertStatus | None = None,
    rule: str | None = None,
    acknowledged: bool | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
    before_id: BeforeId = None,
) -> list[AlertPublic]:
    """Alerts across runs of a project (or of every project the caller can see), newest
    first: those with an id below ``before_id`` when given, ``offset`` of them skipped, at most
    ``limit``. When more match, ``Link: <url>; rel="next"`` names the next page by
    ``before_id`` (the page's last id), which an alert opened or deleted between two pages does
    not shift, as ``offset`` does; the link keeps the filters (relative to the request's URL,
    or under ``SPECTRAWATCH_PUBLIC_URL``)."""
    project_id = principal.project_id
    if project is not None:
        project_id = find_project(session, principal, project).id
    rows = alert_store.list_alerts(
        session,
        project_id=project_id,
        status=status,
        rule=rule,
        acknowledged=acknowledged,
        limit=limit + 1,
        offset=offset,
        before_id=before_id,
    )
    page = keyset_page(request, response, state.settings.public_url, rows, limit)
    return [AlertPublic.model_validate(a) for a in page]


def _acknowledger(session: Session, principal: Principal) -> str:
    """Who acknowledges: the token's name, ``token <id>`` for an unnamed one, or anonymous."""
    token = None if principal.token_id is None else session.get(Token, principal.token_id)
    if token is None:
        return "anonymous"
    return token.name or f"token {token.id}"


@router.get("/alerts/{alert_id}", response_model=AlertPublic)
def read_alert(alert_id: int, principal: PrincipalDep, session: SessionDep) -> AlertPublic:
    """One alert episode (a webhook event names it by ``data.id``); 404 ``alert_not_found``
    for an id that no alert of a project the caller may see has."""
    return AlertPublic.model_validate(find_alert(session, principal, alert_id))


@router.patch(
    "/alerts/{alert_id}", response_model=AlertPublic, dependencies=[require_role("write")]
)
def update_alert(
    alert_id: int, body: AlertUpdate, principal: PrincipalDep, session: SessionDep
) -> AlertPublic:
    """Acknowledge an alert episode (``{"acknowledged": true}``), or take it back (``false``).

    An acknowledged open episode no longer counts as needing attention (the runs list counts
    only unacknowledged open alerts) and its ``alert.opened`` deliveries still pending
    (retries) are dropped; nothing is sent for the acknowledgement itself. It stays open until
    its signal clears (an ``alert.resolved`` event then, as for any episode); a new episode of
    the same rule later is unacknowledged. Acknowledging twice keeps the first time and name.
    """
    alert = find_alert(session, principal, alert_id)
    if body.acknowledged != (alert.acknowledged_at is not None):
        by = _acknowledger(session, principal) if body.acknowledged else None
        alert_store.acknowledge_alert(session, alert, by)
    session.commit()
    return AlertPublic.model_validate(alert)


@router.get("/projects/{project}/alert-rules", response_model=list[RulePublic])
def list_rules(project: str, principal: PrincipalDep, session: SessionDep) -> list[RulePublic]:
    """Every rule of the project: the defaults (with overrides) and custom rules. A stored rule
    that no longer validates (a parameter an upgrade renamed or tightened) is listed off, with
    its ``problem``; the engine resolves its open alerts (``rule invalid: ...``) at its next
    sweep or evaluation."""
    return _project_rules(session, find_project(session, principal, project))


@router.get("/projects/{project}/alert-rules/{rule}", response_model=RulePublic)
def read_rule(project: str, rule: str, principal: PrincipalDep, session: SessionDep) -> RulePublic:
    """One rule of the project, as the list shows it; 404 ``rule_not_found`` for a name that
    is neither a default rule nor one of the project's custom rules."""
    for found in _project_rules(session, find_project(session, principal, project)):
        if found.name == rule:
            return found
    raise ApiError(404, "rule_not_found", f"project {project!r} has no rule {rule!r}")


def _project_rules(session: Session, project: Project) -> list[RulePublic]:
    """Every rule of ``project``: the effective ones, then stored ones that no longer validate."""
    stored = alert_store.stored_rules(session, project.id)
    problems = R.invalid_rules(stored)
    specs = R.effective_rules(stored)
    out = [_rule_public(spec, stored, problems.get(spec.name)) for spec in specs]
    listed = {spec.name for spec in specs}
    out += [
        _invalid_custom_rule(name, stored[name][1], problem)
        for name, problem in sorted(problems.items())
        if name not in listed
    ]
    return out


@router.patch(
    "/projects/{project}/alert-rules/{rule}",
    response_model=RulePublic,
    dependencies=[require_role("admin")],
)
def update_rule(
    project: str,
    rule: str,
    body: RuleUpdate,
    principal: PrincipalDep,
    session: SessionDep,
    state: StateDep,
) -> RulePublic:
    """Edit a default rule or create/edit a custom one (custom rules need ``kind`` and a
    ``metric``, or a ``scalar`` the run logs for a threshold or growth rule).

    Bad parameters (unknown key, non-numeric threshold, unknown metric...) answer 422 naming
    the parameter. Disabling a rule resolves its open alerts (``values.resolved_reason``
    ``rule disabled``, an ``alert.resolved`` event each): nothing evaluates it any more.
    Changing its parameters resolves them too (``rule changed``; as Prometheus restarts a
    changed rule's alerts): they were raised by a condition that no longer exists (a narrower
    ``layers`` glob, another metric or threshold), and the engine opens new ones where the new
    rule holds at its next evaluation of each run.
    """
    row = find_project(session, principal, project)
    alert_store.lock_rules(session, row.id, edit=True)  # evaluations in flight finish first
    stored = alert_store.stored_rules(session, row.id)
    base = {r.name: r for r in R.default_rules()}.get(rule)
    # a default never edited has its default state: a PATCH of parameters alone enabled an
    # off-by-default rule (correlation_traps)
    enabled, params = stored.get(rule, (base.enabled if base is not None else True, {}))
    merged = {**params, **body.params}
    if base is None and rule not in stored and "kind" not in merged:
        raise ApiError(
            404,
            "rule_not_found",
            f"project {project!r} has no rule {rule!r}; a new custom rule needs params.kind "
            "and params.metric (or params.scalar)",
        )
    enabled = enabled if body.enabled is None else body.enabled
    try:
        spec = R.build_rule(rule, merged, enabled=enabled, base=base)
    except R.RuleError as exc:
        raise ApiError(422, "invalid_rule", R.rule_problem(exc)) from exc
    now = {**stored, rule: (enabled, merged)}
    if base is not None and not merged and enabled == base.enabled:
        # a default switched back as it was (off, then on): nothing to store, not "customized"
        alert_store.delete_rule(session, row.id, rule)
        now.pop(rule)
    else:
        alert_store.upsert_rule(session, row.id, rule, enabled, merged)
    if not enabled:
        engine_for(state.settings).resolve_rule(session, row, rule, "rule disabled")
    elif merged != params:
        engine_for(state.settings).resolve_rule(session, row, rule, "rule changed")
    session.commit()
    return _rule_public(spec, now)


@router.delete(
    "/projects/{project}/alert-rules/{rule}", status_code=204, dependencies=[require_role("admin")]
)
def reset_rule(
    project: str, rule: str, principal: PrincipalDep, session: SessionDep, state: StateDep
) -> Response:
    """Reset a default rule to its defaults, or delete a custom rule.

    A deleted custom rule's open alerts are resolved (``values.resolved_reason``
    ``rule deleted``, an ``alert.resolved`` event each); a default rule is back on, and the
    engine goes on evaluating its open alerts, unless it had been customized: then they are
    resolved as ``rule changed`` (see :func:`update_rule`).
    """
    row = find_project(session, principal, project)
    alert_store.lock_rules(session, row.id, edit=True)
    base = {r.name: r for r in R.default_rules()}.get(rule)
    customized = alert_store.delete_rule(session, row.id, rule)
    if not customized and base is None:
        raise ApiError(404, "rule_not_found", f"project {project!r} has no rule {rule!r}")
    if base is None or not base.enabled:
        reason = "rule deleted" if base is None else "rule disabled"
        engine_for(state.settings).resolve_rule(session, row, rule, reason)
    elif customized:
        engine_for(state.settings).resolve_rule(session, row, rule, "rule changed")
    session.commit()
    return Response(status_code=204)
