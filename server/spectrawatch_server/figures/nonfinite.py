"""Where data went NaN/Inf: the layers' onsets as a sentence and a marker (their series end at
the last finite frame), and the scalars' onsets (a NaN/Inf value is stored as null, a gap in the
line; the client reports where each began and which it was) as a red point where a line stops,
a red vertical line, or a sentence.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Mapping
from typing import Any

from spectrawatch_server.figures.base import LayerKey, natural_key, plot_text
from spectrawatch_server.figures.lines import Line, Marker

NONFINITE_COLOR = "#a40e26"
NONFINITE_KINDS = {
    "weights": "weights",
    "activations": "activations",
    "update_sketch": "update sketches",
    "param_sketch": "parameter sketches",
}


def nonfinite_note(
    onsets: Mapping[str, tuple[int, str]],
    layers: Iterable[str] | None = None,
    order: LayerKey = natural_key,
) -> str:
    """Why a run's per-layer series stop early: ``onsets`` (``{layer: (first step, frame
    kind)}`` of NaN/Inf data, see ``dashboard_reads.nonfinite_onsets``) as one sentence per frame
    kind, e.g. "weights non-finite (NaN/Inf) from step 61 in fc1, fc2: HT-SR and the other
    analyses skip them, so their series end at the last finite frame". ``layers``: only those
    (all when None), named in ``order`` (the model's, :func:`.base.model_order_key`); "" when
    none of them went non-finite."""
    wanted = None if layers is None else set(layers)
    by_kind: dict[str, list[tuple[int, str]]] = {}
    for layer, (step, kind) in onsets.items():
        if wanted is None or layer in wanted:
            by_kind.setdefault(kind, []).append((step, layer))
    parts = []
    for kind, hits in sorted(by_kind.items(), key=lambda kv: min(kv[1])):
        first = min(step for step, _ in hits)
        names = sorted((layer for _, layer in hits), key=order)
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        parts.append(
            f"{NONFINITE_KINDS.get(kind, kind)} non-finite (NaN/Inf) from step {first} in {shown}"
        )
    if not parts:
        return ""
    return (
        "; ".join(parts)
        + ": HT-SR and the other analyses skip non-finite layers, so their series end at the"
        " last finite frame."
    )


def scalar_onsets(client_stats: Any) -> dict[str, tuple[int, str]]:
    """``{scalar: (first step, "nan"|"inf"|"-inf")}`` from a run's client stats
    (``nonfinite_scalars``: where each began and which it was; the stored values are nulls,
    and older clients sent none); entries of another shape are skipped (the stats are the
    client's JSON)."""
    raw = client_stats.get("nonfinite_scalars") if isinstance(client_stats, Mapping) else None
    out: dict[str, tuple[int, str]] = {}
    for name, onset in raw.items() if isinstance(raw, Mapping) else ():
        step = onset.get("step") if isinstance(onset, Mapping) else None
        if isinstance(name, str) and isinstance(step, int) and not isinstance(step, bool):
            value = onset.get("value")
            out[name] = (step, value if value in ("nan", "inf", "-inf") else "nan")
    return out


def scalar_onset_line(line: Line, step: int, value: str) -> Line:
    """One red point where scalar ``line`` went non-finite (its line stops there: NaN/Inf is
    stored as a gap), at its last finite value before ``step``; in the legend as
    "loss: nan from step 61" (TensorBoard marks non-finite points on its charts likewise)."""
    before = [y for x, y in zip(line.x, line.y, strict=True) if x <= step and y is not None]
    finite = [y for y in line.y if y is not None]
    y = before[-1] if before else (finite[0] if finite else 0.0)
    return Line(f"{line.name}: {value} from step {step}", [step], [y], color=NONFINITE_COLOR)


def scalar_onset_marker(name: str, step: int, value: str) -> Marker:
    """A red vertical line at ``step`` for scalar ``name`` that was non-finite from its first
    logged step: it has no finite value at all, so there is no line whose end a point could
    mark."""
    label = f"{name}: {value} from step {step}"
    return Marker(step, plot_text(label, 60), NONFINITE_COLOR, "solid", plot_text(label, 200))


def scalar_onsets_note(
    onsets: Mapping[str, tuple[int, str]],
    names: Iterable[str],
    drawn: Container[str] | None = None,
) -> str:
    """One sentence on the scalars of ``names`` that went non-finite, "" when none did.
    ``drawn``: the names with a line (finite values before their onset); the others (all when
    None: every name has one) were non-finite from their first logged step."""
    hits = sorted((onsets[n][0], n, onsets[n][1]) for n in names if n in onsets)
    if not hits:
        return ""
    ended = [h for h in hits if drawn is None or h[1] in drawn]
    never = [h for h in hits if h not in ended]
    parts = [f"{name} became {value} at step {step}" for step, name, value in ended]
    parts += [
        f"{name} was {value} from its first logged step, {step}" for step, name, value in never
    ]
    if not never:
        why = "the line stops there (red point)"
    elif not ended:
        why = "there is no line to draw (red line at that step)"
    else:
        why = "a line stops there (red point) or is not drawn at all (red line)"
    return "; ".join(parts) + f": NaN/Inf values are gaps in a chart, so {why}."


def drawn_scalars(lines: Mapping[str, Line]) -> set[str]:
    """The names of ``lines`` with a finite point: a scalar NaN/Inf from its first logged step
    (all nulls) has no line whose end a red point could mark (a red line marks it instead)."""
    return {name for name, line in lines.items() if any(y is not None for y in line.y)}


def nonfinite_marker(
    onsets: Mapping[str, tuple[int, str]],
    layers: Iterable[str] | None = None,
    order: LayerKey = natural_key,
) -> Marker | None:
    """A marker at the first step where ``layers`` (all when None) went NaN/Inf, or None; its
    hover is :func:`nonfinite_note` (layers named in ``order``)."""
    wanted = None if layers is None else set(layers)
    steps = [step for layer, (step, _) in onsets.items() if wanted is None or layer in wanted]
    if not steps:
        return None
    first = min(steps)
    return Marker(
        first,
        f"non-finite from step {first}",
        NONFINITE_COLOR,
        "solid",
        plot_text(nonfinite_note(onsets, layers, order), 400),
    )
