"""Alert rules: a table of specs and pure decisions over metric values and episode state.

A rule watches one signal per (run, layer) and opens an *episode* (one ``alert`` row) when the
signal breaches, resolving it when the signal clears (DESIGN §7). Flapping is damped two ways:

- *hysteresis*: the clear condition is stricter than the fire condition (a threshold rule with
  ``above=6, hysteresis=0.1`` fires above 6 and clears only at or below 5.9; values in between
  keep the current state);
- *persistence*: ``fire_after`` / ``clear_after`` consecutive points must agree before a
  transition.

Everything here is a pure function of the values handed in (the latest metric points of a
series, oldest first, and whether an episode is open): the engine reads them from SQL, so a
restart or a redelivered job reaches the same decision. Rules are data (:class:`RuleSpec`); a
metric no analysis produces simply never fires.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache
from typing import Any, Literal, get_args

from spectrawatch.spectral import keys as metric_keys
from spectrawatch.wire import LAYER_MAX, MAX_STEP, NAME_MAX, TEXT_PATTERN
from spectrawatch_server.analyses.registry import MODEL_LAYER

RuleKind = Literal["threshold", "growth", "nonfinite", "client_drops", "silence"]
RULE_KINDS: tuple[RuleKind, ...] = ("threshold", "growth", "nonfinite", "client_drops", "silence")
Severity = Literal["info", "warning", "critical"]
SEVERITIES: tuple[Severity, ...] = get_args(Severity)
METRIC_KINDS = ("threshold", "growth")

PointState = Literal["fire", "clear", "hold"]
RULE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
SCALAR_NAME = re.compile(TEXT_PATTERN)  # what POST /runs/{id}/scalars accepts as a name


class Transition(str, Enum):
    """What the latest observation does to the episode of one (rule, run, layer)."""

    NONE = "none"
    OPEN = "open"
    RESOLVE = "resolve"


class RuleError(ValueError):
    """A rule definition that cannot be used; ``field`` names the offending parameter."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class RuleSpec:
    """One rule. Which fields matter depends on ``kind``:

    - ``threshold``: ``metric`` or ``scalar``; fires when value < ``below`` or > ``above``;
      clears when ``below + hysteresis <= value <= above - hysteresis`` (metric units).
    - ``growth``: ``metric`` or ``scalar``; fires when value / min(previous ``window``
      positive values) >= ``factor``; clears when that ratio < ``factor * (1 - hysteresis)``,
      the minimum then including the baseline the episode fired against (a grown value that
      stays grown does not clear once the window has slid past the jump).
    - ``nonfinite``: fires when a frame carries NaN/Inf in a covered layer: one episode per
      run and incident, naming the layers; clears on a finite frame past its last bad step.
    - ``client_drops``: fires when the client's dropped + spool-overflow count > ``above``.
    - ``silence``: fires when a running run sent nothing for ``minutes``.

    ``scalar`` (instead of ``metric``): a custom threshold or growth rule on a scalar the run
    logs (``monitor.log``, ``POST /runs/{id}/scalars``): one series per run (layer ``""``),
    decided when a batch of it is stored; a NaN/Inf value of it (stored as null) fires.
    ``layers`` is a glob on layer names; ``include_model`` says whether the whole-model series
    (layer ``__model__``, e.g. the mean alpha over layers) is watched too.
    ``after_step`` (threshold, growth): points at steps below it are not evaluated, as if the
    series began there (a warm-up: early in training every value is out of range); they are
    no growth baseline and do not arm ``above_after_in_range`` either.
    ``expires_with_run``: deliveries of this rule's events are dropped once the run ended.
    ``above_after_in_range`` (threshold rules): a value above ``above`` fires only for a series
    that was once within range; a run trained from scratch starts with every layer near-random
    (HT-SR alpha > 6), which is not news, while a layer that learned and then drifts is.
    """

    name: str
    kind: RuleKind
    metric: str | None = None
    scalar: str | None = None
    below: float | None = None
    above: float | None = None
    factor: float | None = None
    window: int = 10
    hysteresis: float = 0.0
    fire_after: int = 1
    clear_after: int = 1
    after_step: int = 0
    minutes: float | None = None
    layers: str = "*"
    include_model: bool = True
    above_after_in_range: bool = False
    severity: str = "warning"
    expires_with_run: bool = False
    enabled: bool = True
    description: str = ""

    @property
    def history_needed(self) -> int:
        """Points of the series the decision reads (the latest one included)."""
        extra = self.window if self.kind == "growth" else 0
        return extra + max(self.fire_after, self.clear_after)

    def params(self) -> dict[str, Any]:
        """The editable parameters, as stored in ``alert_rule.params`` and shown by the API."""
        out = dataclasses.asdict(self)
        for key in ("name", "enabled", "description"):
            out.pop(key)
        return out

    def covers(self, layer: str) -> bool:
        if layer == MODEL_LAYER:
            return self.include_model
        return fnmatch.fnmatchcase(layer, self.layers)

    @property
    def watches_scalar(self) -> bool:
        """A threshold or growth rule on a logged scalar rather than an analysis metric."""
        return self.scalar is not None

    def matches_metric(self, name: str) -> bool:
        """``name`` is this rule's metric or a windowed variant of it (``sed.phase.w32``)."""
        if self.metric is None:
            return False
        if name == self.metric:
            return True
        # plain string test: this runs for every metric row of every frame
        prefix = self.metric + ".w"
        return name.startswith(prefix) and name[len(prefix) :].isdigit()


def _key(module: str, constant: str, fallback: str) -> str:
    """A metric key from the spectral module that defines it, or its documented dotted name."""
    try:
        value = getattr(importlib.import_module(f"spectrawatch.spectral.{module}"), constant)
    except (ImportError, AttributeError):
        return fallback
    return value if isinstance(value, str) else fallback


@lru_cache(maxsize=1)
def evidence_sources() -> dict[str, tuple[str, dict[str, str]]]:
    """Metric -> (prefix of the metrics that explain it, {suffix: label}): an alert on the
    grokking detector's ``grok.imminent`` quotes the evidence it fired on."""
    try:
        labels = importlib.import_module("spectrawatch.spectral.grokking").EVIDENCE_LABELS
    except (ImportError, AttributeError):
        labels = {}
    return {
        _key("grokking", "IMMINENT", "grok.imminent"): (
            _key("grokking", "EVIDENCE_PREFIX", "grok.evidence."),
            dict(labels) if isinstance(labels, Mapping) else {},
        )
    }


def describe_evidence(evidence: Mapping[str, Any], labels: Mapping[str, str]) -> str:
    """``"evidence: weight-norm turnaround at step 1400, ..."`` in step order."""
    parts = sorted(
        (int(at), labels.get(piece, piece))
        for piece, at in evidence.items()
        if isinstance(at, int | float) and math.isfinite(at)
    )
    return "evidence: " + ", ".join(f"{label} at step {at}" for at, label in parts)


@lru_cache(maxsize=1)
def default_rules() -> tuple[RuleSpec, ...]:
    """The rules every project has, on by default (DESIGN §7, issue 8) but the opt-in
    ``correlation_traps``."""
    alpha = _key("htsr", "ALPHA", "htsr.alpha")
    farms_prefix = _key("htsr", "FARMS_PREFIX", "farms.")
    collapse = 3  # spectrawatch.spectral.sed.Phase.COLLAPSE
    return (
        RuleSpec(
            "grokking_imminent",
            "threshold",
            metric=_key("grokking", "IMMINENT", "grok.imminent"),
            above=0.5,
            expires_with_run=True,
            severity="info",
            description="the grokking early-warning detector fired (defect, weight norm, "
            "effective rank, SED); the alert quotes each piece of evidence and its step",
        ),
        RuleSpec(
            "alpha_out_of_range",
            "threshold",
            metric=alpha,
            below=2.0,
            above=6.0,
            hysteresis=0.1,
            include_model=False,
            above_after_in_range=True,
            description="HT-SR alpha < 2 (over-fit layer) or > 6 (under-trained layer)",
        ),
        RuleSpec(
            "farms_alpha_out_of_range",
            "threshold",
            metric=farms_prefix + alpha.split(".", 1)[1],
            below=2.0,
            above=6.0,
            hysteresis=0.1,
            include_model=False,
            above_after_in_range=True,
            description="FARMS alpha < 2 or > 6 (aspect-ratio-corrected heavy-tail exponent)",
        ),
        RuleSpec(
            "correlation_traps",
            "threshold",
            metric=_key("htsr", "NUM_TRAPS", "htsr.num_traps"),
            above=0.5,
            include_model=False,
            # off by default: traps also appear in runs that generalise (a 1-layer transformer
            # at lr 1e-2 groks with one in its key projection; benchmarks/RESULTS.md)
            enabled=False,
            description="a layer's shuffled ESD has eigenvalues past its MP edge: a few "
            "outsized weight entries (WeightWatcher's correlation traps); off by default",
        ),
        RuleSpec(
            "spectral_norm_blowup",
            "growth",
            metric=_key("norms", "SPECTRAL_NORM", "norm.spectral"),
            factor=10.0,
            window=10,
            hysteresis=0.5,
            severity="critical",
            description="spectral norm grew by factor x over the previous window of frames",
        ),
        RuleSpec(
            "nonfinite",
            "nonfinite",
            severity="critical",
            description="NaN/Inf values in an update, weight or activation frame",
        ),
        RuleSpec(
            "gap_collapse",
            "threshold",
            metric=_key("sed", "PHASE", "sed.phase"),
            above=collapse - 0.5,
            # The whole model only: a layer's gap (a bias's above all) rises and collapses in
            # ordinary training; on a clean 300-step MLP run every bias "collapsed".
            layers=MODEL_LAYER,
            description="the whole model's SED gap series entered its collapse phase "
            "(sed.phase = 3)",
        ),
        RuleSpec(
            "activation_change",
            "threshold",
            metric=_key("activations", "CHANGE_SCORE", "eigentrack.change_score"),
            above=6.0,
            hysteresis=2.0,
            description="activation-spectrum change score (EigenTrack z-score) above threshold",
        ),
        RuleSpec(
            "client_drops",
            "client_drops",
            above=0.0,
            description="the client dropped frames or overflowed its spool",
        ),
        RuleSpec(
            "run_silent",
            "silence",
            minutes=30.0,
            description="a running run sent nothing for longer than `minutes`",
        ),
    )


# --- metric names ------------------------------------------------------------------------


@lru_cache(maxsize=1)
def known_metrics() -> frozenset[str]:
    """Every metric key the worker stores (:mod:`spectrawatch.spectral.keys`; SED keys without
    their window), plus the default rules' metrics."""
    keys = set(metric_keys.rule_keys())
    keys.update(rule.metric for rule in default_rules() if rule.metric is not None)
    return frozenset(keys)


def is_known_metric(name: str) -> bool:
    """A stored key: a defined one, its FARMS twin (``farms.alpha``), an SED key with or without
    its window (``sed.phase``, ``sed.phase.w32``), an interval variant, a grokking evidence key."""
    return name in known_metrics() or metric_keys.is_stored_key(name)


# --- building specs from stored parameters --------------------------------------------------


def _number(params: Mapping[str, Any], key: str, *, positive: bool = False) -> float | None:
    value = params.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RuleError(key, f"must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise RuleError(key, f"must be > 0, got {value!r}")
    return float(value)


def _count(params: Mapping[str, Any], key: str, default: int, upper: int) -> int:
    value = params.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= upper:
        raise RuleError(key, f"must be an integer in 1..{upper}, got {value!r}")
    return value


def _after_step(kind: str, params: Mapping[str, Any]) -> int:
    """``after_step``: an integer in 0..MAX_STEP; above 0 on threshold and growth rules only
    (the other kinds watch frames, counters or time, not a series of points)."""
    value = params.get("after_step", 0)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_STEP:
        raise RuleError("after_step", f"must be an integer in 0..{MAX_STEP}, got {value!r}")
    if value and kind not in METRIC_KINDS:
        raise RuleError("after_step", f"only {' and '.join(METRIC_KINDS)} rules take after_step")
    return value


def build_rule(
    name: str, params: Mapping[str, Any], *, enabled: bool = True, base: RuleSpec | None = None
) -> RuleSpec:
    """A validated spec: ``base`` (a default rule) overridden by ``params``, or a custom rule.

    Raises :class:`RuleError` naming the parameter for unknown keys, bad numbers, an unknown
    metric, a threshold rule without a bound, or a kind that differs from the default's.
    """
    if not RULE_NAME.match(name):
        raise RuleError("rule", f"rule names are lower_snake_case (<= 64 chars), got {name!r}")
    allowed = set(RuleSpec("x", "threshold").params())
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise RuleError(unknown[0], f"unknown rule parameter; known: {', '.join(sorted(allowed))}")
    merged: dict[str, Any] = base.params() if base is not None else {}
    merged.update(params)
    kind = merged.get("kind")
    if kind not in RULE_KINDS:
        raise RuleError("kind", f"must be one of {', '.join(RULE_KINDS)}, got {kind!r}")
    if base is not None and kind != base.kind:
        raise RuleError(
            "kind", f"rule {name!r} is of kind {base.kind!r}; create a new rule instead"
        )
    metric = merged.get("metric")
    scalar = _scalar(name, kind, merged, base)
    if kind in METRIC_KINDS and scalar is None:
        if not isinstance(metric, str) or not metric:
            raise RuleError("metric", f"a {kind} rule needs a metric (or a scalar) name")
        if not is_known_metric(metric):
            raise RuleError("metric", f"unknown metric {metric!r}")
    severity = merged.get("severity", "warning")
    if severity not in SEVERITIES:
        raise RuleError("severity", f"must be one of {', '.join(SEVERITIES)}, got {severity!r}")
    layers = merged.get("layers", "*")
    if not isinstance(layers, str) or not layers or len(layers) > LAYER_MAX:
        raise RuleError(
            "layers", f"must be a non-empty glob pattern of at most {LAYER_MAX} characters"
        )
    below = _number(merged, "below")
    above = _number(merged, "above")
    hysteresis = _number(merged, "hysteresis") or 0.0
    if hysteresis < 0:
        raise RuleError("hysteresis", f"must be >= 0, got {hysteresis}")
    factor = _number(merged, "factor", positive=True)
    minutes = _number(merged, "minutes", positive=True)
    if kind == "threshold":
        if below is None and above is None:
            raise RuleError("above", "a threshold rule needs `below`, `above` or both")
        if below is not None and above is not None and below + hysteresis > above - hysteresis:
            raise RuleError("below", "`below` + hysteresis must not exceed `above` - hysteresis")
    if kind == "growth":
        if factor is None or factor <= 1:
            raise RuleError("factor", f"a growth rule needs factor > 1, got {factor}")
        if hysteresis >= 1:
            raise RuleError("hysteresis", "for a growth rule it is a fraction of factor, < 1")
    if kind == "client_drops" and (above is None or above < 0):
        raise RuleError("above", "client_drops needs above >= 0")
    if kind == "silence" and minutes is None:
        raise RuleError("minutes", "a silence rule needs minutes > 0")
    expires = merged.get("expires_with_run", False)
    include_model = merged.get("include_model", True)
    armed_above = merged.get("above_after_in_range", False)
    flags = (
        ("expires_with_run", expires),
        ("include_model", include_model),
        ("above_after_in_range", armed_above),
    )
    for key, flag in flags:
        if not isinstance(flag, bool):
            raise RuleError(key, "must be true or false")
    return RuleSpec(
        name=name,
        kind=kind,
        metric=metric if kind in METRIC_KINDS and scalar is None else None,
        scalar=scalar,
        below=below,
        above=above,
        factor=factor,
        window=_count(merged, "window", 10, 1000),
        hysteresis=hysteresis,
        fire_after=_count(merged, "fire_after", 1, 1000),
        clear_after=_count(merged, "clear_after", 1, 1000),
        after_step=_after_step(kind, merged),
        minutes=minutes,
        layers=layers,
        include_model=include_model,
        above_after_in_range=armed_above and kind == "threshold",
        severity=severity,
        expires_with_run=expires,
        enabled=enabled,
        description=base.description if base is not None else f"custom {kind} rule",
    )


def _scalar(name: str, kind: str, merged: Mapping[str, Any], base: RuleSpec | None) -> str | None:
    """The logged scalar a custom threshold/growth rule watches (``params.scalar``), if any.

    Refused on a default rule (it watches its analysis metric), beside a ``metric`` (one
    series or the other), on other kinds, with a ``layers`` glob (a scalar has no layers), and
    for a name ``POST /runs/{id}/scalars`` would not take."""
    scalar = merged.get("scalar")
    if scalar is None:
        return None
    if base is not None:
        raise RuleError("scalar", f"rule {name!r} watches {base.metric!r}; create a new rule")
    if kind not in METRIC_KINDS:
        raise RuleError("scalar", f"only {' and '.join(METRIC_KINDS)} rules watch a scalar")
    if not isinstance(scalar, str) or not SCALAR_NAME.match(scalar) or len(scalar) > NAME_MAX:
        raise RuleError("scalar", f"must be a scalar name of 1-{NAME_MAX} characters")
    if merged.get("metric") is not None:
        raise RuleError("scalar", "a rule watches a metric or a scalar, not both (metric: null)")
    if merged.get("layers", "*") != "*":
        raise RuleError("layers", "a scalar rule watches one series per run: no layers glob")
    return scalar


def effective_rules(stored: Mapping[str, tuple[bool, Mapping[str, Any]]]) -> list[RuleSpec]:
    """Defaults overridden by a project's stored ``{rule: (enabled, params)}``, plus custom rules.

    A stored row that no longer validates (e.g. a metric renamed) disables that rule rather than
    breaking evaluation of the others (:func:`invalid_rules` says which and why).
    """
    defaults = {r.name: r for r in default_rules()}
    out: list[RuleSpec] = []
    for name, rule in defaults.items():
        if name in stored:
            enabled, params = stored[name]
            try:
                rule = build_rule(name, params, enabled=enabled, base=rule)
            except RuleError:
                rule = dataclasses.replace(rule, enabled=False)
        out.append(rule)
    for name in sorted(set(stored) - set(defaults)):
        enabled, params = stored[name]
        try:
            out.append(build_rule(name, params, enabled=enabled))
        except RuleError:
            continue
    return out


def invalid_rules(stored: Mapping[str, tuple[bool, Mapping[str, Any]]]) -> dict[str, str]:
    """The stored rules that no longer validate (a parameter an upgrade renamed or tightened):
    ``{rule: "params.<field>: <message>"}``, the message a ``PATCH`` would answer with.
    :func:`effective_rules` leaves them off (a default rule disabled, a custom one out)."""
    defaults = {r.name: r for r in default_rules()}
    problems: dict[str, str] = {}
    for name, (enabled, params) in stored.items():
        try:
            build_rule(name, params, enabled=enabled, base=defaults.get(name))
        except RuleError as exc:
            problems[name] = rule_problem(exc)
    return problems


def rule_problem(exc: RuleError) -> str:
    """How an API answer and a stored rule's ``problem`` name a parameter error."""
    return f"params.{exc.field}: {exc.message}"


# --- decisions ------------------------------------------------------------------------------


def point_states(
    rule: RuleSpec, values: Sequence[float], baseline: float | None = None
) -> list[PointState]:
    """State of each point of a series (oldest first) under a threshold or growth rule.

    Growth points with fewer than one earlier point, or no positive earlier value, are ``hold``.
    A non-finite value is ``hold`` (the ``nonfinite`` rule reports NaN/Inf in frames), but
    ``fire`` for a rule on a logged scalar (a NaN loss is the divergence it watches for).
    ``baseline`` (an open growth episode's reference value) joins every point's earlier values,
    so the episode clears only once the value is back near it, not when the window has slid
    into the grown values.
    """
    states: list[PointState] = []
    for i, v in enumerate(values):
        if not math.isfinite(v):  # a NaN/Inf scalar: the run diverged; a metric's: no news
            states.append("fire" if rule.watches_scalar else "hold")
        elif rule.kind == "threshold":
            states.append(_threshold_state(rule, v))
        elif rule.kind == "growth":
            earlier = [x for x in values[max(0, i - rule.window) : i] if math.isfinite(x) and x > 0]
            if baseline is not None and math.isfinite(baseline) and baseline > 0:
                earlier.append(baseline)
            states.append(_growth_state(rule, v, min(earlier)) if earlier else "hold")
        else:
            raise ValueError(f"rule kind {rule.kind!r} has no metric series")
    return states


def _threshold_state(rule: RuleSpec, v: float) -> PointState:
    low, high, h = rule.below, rule.above, rule.hysteresis
    if (low is not None and v < low) or (high is not None and v > high):
        return "fire"
    if (low is None or v >= low + h) and (high is None or v <= high - h):
        return "clear"
    return "hold"


def _growth_state(rule: RuleSpec, v: float, baseline: float) -> PointState:
    assert rule.factor is not None
    ratio = v / baseline
    if ratio >= rule.factor:
        return "fire"
    if ratio < rule.factor * (1.0 - rule.hysteresis):
        return "clear"
    return "hold"


def evaluated_points(
    rule: RuleSpec, points: Sequence[tuple[int, float]]
) -> list[tuple[int, float]]:
    """The ``(step, value)`` points of a series (oldest first) that ``rule`` evaluates: those at
    steps ``>= after_step``. The rest count for nothing (no fire, no clear, no growth baseline)."""
    return [p for p in points if p[0] >= rule.after_step]


def decide(rule: RuleSpec, is_open: bool, states: Sequence[PointState]) -> Transition:
    """Open when the last ``fire_after`` states all fire (no episode open); resolve when the last
    ``clear_after`` all clear (episode open); otherwise nothing changes."""
    if is_open:
        tail = states[-rule.clear_after :]
        if len(tail) == rule.clear_after and all(s == "clear" for s in tail):
            return Transition.RESOLVE
        return Transition.NONE
    tail = states[-rule.fire_after :]
    if len(tail) == rule.fire_after and all(s == "fire" for s in tail):
        return Transition.OPEN
    return Transition.NONE


def decide_series(
    rule: RuleSpec, is_open: bool, values: Sequence[float], baseline: float | None = None
) -> Transition:
    """:func:`decide` over :func:`point_states` of a metric series (oldest first)."""
    return decide(rule, is_open, point_states(rule, values, baseline))


Watched = dict[str, dict[str, set[str]]]
"""``{rule name: {layer: metric names}}``: the series of a frame each metric rule watches."""


def watched_series(rules: Sequence[RuleSpec], series: Sequence[tuple[str, str]]) -> Watched:
    """The ``(layer, name)`` series of a frame each enabled metric rule watches (names are
    matched once per distinct name)."""
    layers_by_name: dict[str, set[str]] = {}
    for layer, name in series:
        layers_by_name.setdefault(name, set()).add(layer)
    out: Watched = {}
    for rule in rules:
        if not rule.enabled or rule.kind not in METRIC_KINDS or rule.watches_scalar:
            continue
        per_layer: dict[str, set[str]] = {}
        for name, layers in layers_by_name.items():
            if rule.matches_metric(name):
                for layer in layers:
                    if rule.covers(layer):
                        per_layer.setdefault(layer, set()).add(name)
        out[rule.name] = per_layer
    return out


def history_wanted(rules: Sequence[RuleSpec], watched: Watched) -> dict[tuple[str, str], int]:
    """``{(name, layer): points}``: the most points any rule reads from each watched series."""
    wanted: dict[tuple[str, str], int] = {}
    for rule in rules:
        for layer, names in watched.get(rule.name, {}).items():
            for name in names:
                wanted[(name, layer)] = max(wanted.get((name, layer), 0), rule.history_needed)
    return wanted


def growth_ratio(rule: RuleSpec, values: Sequence[float]) -> float | None:
    """Latest value over the minimum positive value of the preceding window (for messages)."""
    if not values:
        return None
    earlier = [x for x in values[-1 - rule.window : -1] if math.isfinite(x) and x > 0]
    return values[-1] / min(earlier) if earlier else None


def drops_state(rule: RuleSpec, dropped: int, overflow: int) -> PointState:
    """Client-drop counters are cumulative: once above the threshold the episode stays open."""
    threshold = rule.above if rule.above is not None else 0.0
    return "fire" if dropped + overflow > threshold else "clear"


def silence_state(rule: RuleSpec, silent_minutes: float, running: bool) -> PointState:
    """A running run silent for longer than ``minutes`` fires; activity or the run ending clears."""
    if not running:
        return "clear"
    assert rule.minutes is not None
    return "fire" if silent_minutes > rule.minutes else "clear"


NONFINITE_LAYERS_MAX = 200  # layer names an episode keeps (``layer_count`` counts them all)
NONFINITE_LAYERS_SHOWN = 3  # named in the message


def nonfinite_layers(rule: RuleSpec, layers: Sequence[str], counts: Mapping[str, int]) -> list[str]:
    """The layers of a frame with NaN/Inf values that ``rule`` covers: in the frame's order,
    then any others counted (by name), the whole-model series last."""
    order = [x for x in layers if counts.get(x)] + sorted(set(counts) - set(layers))
    order.sort(key=lambda x: x == MODEL_LAYER)  # stable: only moves __model__ last
    return [x for x in order if counts.get(x) and rule.covers(x)]


def nonfinite_layer_values(values: Mapping[str, Any], bad: Sequence[str]) -> dict[str, Any]:
    """``{"layers", "layer_count"}`` of an episode after ``bad`` layers joined it: the first
    :data:`NONFINITE_LAYERS_MAX` names in order of appearance, and how many there are (a lower
    bound once the list is full: names past it cannot be told apart)."""
    kept = [str(x) for x in values.get("layers") or []]
    count = int(values.get("layer_count", len(kept)))
    known = set(kept)
    new = [x for x in bad if x not in known]
    if count > len(kept):  # truncated before: new names may have been counted already
        return {"layers": kept, "layer_count": max(count, len(bad))}
    layers = kept + new
    return {"layers": layers[:NONFINITE_LAYERS_MAX], "layer_count": len(layers)}


def _named_layers(layers: Sequence[str], count: int) -> str:
    """``"3 layers: a, b, c"`` / ``"150 layers: a, b, c and 147 more"`` / ``"layer a"``."""
    if count <= 1 and len(layers) == 1:
        return f"layer {layers[0]}"
    shown = ", ".join(layers[:NONFINITE_LAYERS_SHOWN])
    more = count - min(len(layers), NONFINITE_LAYERS_SHOWN)
    return f"{count} layers: {shown}" + (f" and {more} more" if more > 0 else "")


def _span(first: Any, last: Any) -> str:
    """``", steps 129-140"`` / ``", step 140"`` / nothing when unknown."""
    if first is None or last is None:
        return ""
    return f", step {first}" if first == last else f", steps {first}-{last}"


def _points(rule: RuleSpec) -> str:
    """``" for 3 points"`` when a rule needs several points past its limit to fire, and
    ``" from step 500"`` when it skips the steps before ``after_step``."""
    text = f" for {rule.fire_after} points" if rule.fire_after > 1 else ""
    return text + (f" from step {rule.after_step}" if rule.after_step else "")


def describe(rule: RuleSpec, layer: str, values: Mapping[str, Any]) -> str:
    """One human line for an alert (also the Slack text)."""
    where = f" in {layer}" if layer else ""
    if rule.kind == "threshold":
        bounds = " or ".join(
            b
            for b in (
                f"< {rule.below:g}" if rule.below is not None else "",
                f"> {rule.above:g}" if rule.above is not None else "",
            )
            if b
        )
        value = values.get("value")
        shown_value = f"{value:.4g}" if isinstance(value, float) else str(value)
        if value is None and rule.watches_scalar:
            shown_value = "NaN/Inf"
        # the windowed name, e.g. sed.phase.w32
        metric = values.get("metric") or rule.metric or rule.scalar
        line = f"{rule.name}: {metric} = {shown_value}{where} (fires {bounds}{_points(rule)})"
        evidence = values.get("evidence")
        if isinstance(evidence, Mapping) and evidence:
            source = evidence_sources().get(str(metric))
            line += "; " + describe_evidence(evidence, source[1] if source else {})
        return line
    if rule.kind == "growth":
        ratio = values.get("ratio")
        shown = f"{ratio:.3g}" if isinstance(ratio, float) else "?"
        return (
            f"{rule.name}: {rule.metric or rule.scalar} grew x{shown}{where} over the previous "
            f"{rule.window} points (fires at x{rule.factor:g}{_points(rule)})"
        )
    if rule.kind == "nonfinite":
        layers = values.get("layers")
        if not layer and isinstance(layers, list) and layers:
            where = " in " + _named_layers(layers, int(values.get("layer_count", len(layers))))
        return (
            f"{rule.name}: {values.get('count')} NaN/Inf values{where} ({values.get('kind')} frame"
            + _span(values.get("first_step"), values.get("last_step"))
            + ")"
        )
    if rule.kind == "client_drops":
        return (
            f"{rule.name}: client dropped {values.get('dropped_frames')} frame(s), "
            f"spool overflow {values.get('spool_overflow')}"
        )
    return f"{rule.name}: no data from the run for {values.get('silent_minutes')} min"


__all__ = [
    "RULE_KINDS",
    "RuleError",
    "RuleKind",
    "RuleSpec",
    "Transition",
    "build_rule",
    "decide",
    "decide_series",
    "default_rules",
    "describe",
    "drops_state",
    "effective_rules",
    "evaluated_points",
    "growth_ratio",
    "is_known_metric",
    "known_metrics",
    "nonfinite_layer_values",
    "nonfinite_layers",
    "point_states",
    "silence_state",
]
