"""Grokking early warning: the commutator defect and a detector over monitored series.

*Commutator defect* (Xu, "Low-Dimensional and Transversely Curved Optimization Dynamics in
Grokking", arXiv 2602.16746; research note ``sed_eigentrack.md`` §2.2): for two independent
training mini-batches A, B and a plain SGD step size η,

    θ_AB = θ0 - η g_A(θ0) - η g_B(θ0 - η g_A(θ0)),   θ_BA likewise with A and B swapped,
    D = ‖θ_AB - θ_BA‖ / (‖η g_A‖ ‖η g_B‖).

The difference is formed without subtracting parameter vectors:
θ_AB - θ_BA = η [(g_A(θ0 - η g_B) - g_A) - (g_B(θ0 - η g_A) - g_B)], accumulated in float64, so
D = ‖(g_A' - g_A) - (g_B' - g_B)‖ / (η ‖g_A‖ ‖g_B‖). Each sample costs 4 backward passes.

The *detector* (:func:`detect_grokking`) reads only training-side series (defect, total weight
norm, per-matrix effective rank, SED phases); validation metrics may score it, never feed it.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import TypeVar

import numpy as np
import torch

from spectrawatch.spectral.eigen import svdvals

COMMUTATOR_DEFECT = "grok.commutator_defect"  # median D over K pairs (dimensionless)
GRADIENT_COHERENCE = "grok.gradient_coherence"  # median cosine of g_A, g_B over the same pairs
WARNING_SCORE = "grok.warning_score"  # fraction of evidence present, in [0, 1]
IMMINENT = "grok.imminent"  # 1.0 from the step the detector fires on
EFFECTIVE_RANK = "grok.effective_rank"  # exp(H) of a weight matrix (detector input)
OUTPUT_RANK = "grok.output_effective_rank"  # EFFECTIVE_RANK of the output layer, run-level
PREDICTION_AGREEMENT = "probe.prediction_agreement"  # probe predictions unchanged over 4 probes
PREDICTION_CHURN = "probe.prediction_churn"  # fraction of probe predictions changed since the last
PREDICTION_POSITIONS = "probe.prediction_positions"  # how many predictions the probe gives
PREDICTION_CONFIDENCE = "probe.prediction_confidence"  # mean max softmax over the probe's positions
AGREEMENT_WINDOW = 4  # probes a prediction must be unchanged through (the latest included)
HTSR_ALPHA = "htsr.alpha"  # per-layer power-law exponent of the weights frame (detector input)
EVIDENCE_PREFIX = "grok.evidence."  # + Evidence field: the step the piece of evidence appeared
EVIDENCE_LABELS = {  # Evidence field -> what a person reads in an alert
    "defect": "commutator defect above its baseline",
    "norm_turn": "weight-norm turnaround",
    "rank_turn": "effective-rank turnaround",
    "sed_collapse": "SED gap collapse",
    "alpha_floor": "median HT-SR alpha <= 2 (reported, not counted by default)",
    "agreement_turn": "probe-prediction agreement turnaround (reported, not counted by default)",
    "confidence_rise": "probe confidence rise after its plateau (reported, not counted by default)",
    "output_rank_fall": "output layer's effective rank falling again after a flat stretch "
    "(reported, not counted by default)",
}

B = TypeVar("B")


@dataclass(frozen=True)
class DefectSample:
    """One commutator-defect sample: ``defect`` D, the gradient norms ‖g_A‖, ‖g_B‖ at θ0 and
    their cosine ``grad_cosine`` = ⟨g_A, g_B⟩ / (‖g_A‖ ‖g_B‖) (gradient coherence of the pair)."""

    defect: float
    grad_norm_a: float
    grad_norm_b: float
    grad_cosine: float = math.nan


def _grads(
    loss_fn: Callable[[torch.nn.Module, B], torch.Tensor],
    model: torch.nn.Module,
    params: Sequence[torch.nn.Parameter],
    batch: B,
) -> list[torch.Tensor]:
    loss = loss_fn(model, batch)
    grads = torch.autograd.grad(loss, list(params), allow_unused=True)
    return [
        torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads, strict=True)
    ]


def _wide(t: torch.Tensor) -> torch.Tensor:
    """float64 where the device supports it (not MPS), else float32."""
    return t.to(torch.float32 if t.device.type == "mps" else torch.float64)


def _shift(
    params: Sequence[torch.nn.Parameter],
    saved: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    eta: float,
) -> None:
    with torch.no_grad():
        for p, s, g in zip(params, saved, grads, strict=True):
            p.copy_(s - eta * g.to(s.dtype))


def commutator_defect(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module, B], torch.Tensor],
    batch_a: B,
    batch_b: B,
    *,
    eta: float = 1e-3,
) -> DefectSample:
    """Commutator defect D of one pair of batches at the model's current parameters.

    ``loss_fn(model, batch)`` returns a scalar training loss. Gradients come from
    ``torch.autograd.grad`` (``.grad`` fields are never touched). Parameters and buffers are
    restored bit-identically; the caller restores RNG state (see :func:`preserved_rng`).
    The model is used in whatever mode it is in (the papers use train mode).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    saved = [p.detach().clone() for p in params]
    buffers = [b.detach().clone() for b in model.buffers()]
    try:
        g_a = _grads(loss_fn, model, params, batch_a)
        g_b = _grads(loss_fn, model, params, batch_b)
        _shift(params, saved, g_a, eta)
        g_b2 = _grads(loss_fn, model, params, batch_b)  # g_B(θ0 - η g_A)
        _shift(params, saved, g_b, eta)
        g_a2 = _grads(loss_fn, model, params, batch_a)  # g_A(θ0 - η g_B)
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)
            for b, s in zip(model.buffers(), buffers, strict=True):
                b.copy_(s)
    diff_sq = 0.0
    na_sq = 0.0
    nb_sq = 0.0
    dot = 0.0
    for ga, gb, ga2, gb2 in zip(g_a, g_b, g_a2, g_b2, strict=True):
        a, b_, a2, b2 = _wide(ga), _wide(gb), _wide(ga2), _wide(gb2)
        diff_sq += float(((a2 - a) - (b2 - b_)).square().sum())
        na_sq += float(a.square().sum())
        nb_sq += float(b_.square().sum())
        dot += float((a * b_).sum())
    na, nb = math.sqrt(na_sq), math.sqrt(nb_sq)
    cosine = dot / (na * nb) if na > 0 and nb > 0 else math.nan
    return DefectSample(math.sqrt(diff_sq) / (eta * na * nb + 1e-12 / eta), na, nb, cosine)


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Restore torch (CPU and initialised CUDA), numpy-global and ``random`` RNG state on exit.

    Wrap probe code that draws batches or runs dropout so the training loop sees the same
    random stream as without the probe.
    """
    cpu = torch.get_rng_state()
    initialised = torch.cuda.is_initialized()  # type: ignore[no-untyped-call]
    cuda = torch.cuda.get_rng_state_all() if initialised else None
    legacy = np.random.get_state()  # noqa: NPY002 - the user's global stream must be preserved
    py = random.getstate()
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        np.random.set_state(legacy)  # noqa: NPY002 - see above
        random.setstate(py)


def median_commutator_defect(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module, B], torch.Tensor],
    sample_batch: Callable[[], B],
    *,
    pairs: int = 5,
    eta: float = 1e-3,
) -> float:
    """Median D over ``pairs`` fresh (A, B) pairs from ``sample_batch()`` (papers: K = 5 inline).

    Restores parameters, buffers and RNG state; never calls the optimizer. Cost: 4 backward
    passes per pair. Raises whatever ``loss_fn`` / ``sample_batch`` raise (the client catches).
    """
    return commutator_probe(model, loss_fn, sample_batch, pairs=pairs, eta=eta)[0]


def commutator_probe(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module, B], torch.Tensor],
    sample_batch: Callable[[], B],
    *,
    pairs: int = 5,
    eta: float = 1e-3,
) -> tuple[float, float]:
    """Median defect D and median gradient cosine over ``pairs`` fresh (A, B) pairs.

    Same probe, state handling and cost as :func:`median_commutator_defect`; the cosine of the
    two batches' gradients comes free with it.
    """
    if pairs < 1:
        raise ValueError(f"pairs must be >= 1, got {pairs}")
    with preserved_rng():
        samples = [
            commutator_defect(model, loss_fn, sample_batch(), sample_batch(), eta=eta)
            for _ in range(pairs)
        ]
    return (
        float(statistics.median(s.defect for s in samples)),
        float(statistics.median(s.grad_cosine for s in samples)),
    )


# --------------------------------------------------------------------------------------------
# Detector


Series = Sequence[tuple[int, float]]


@dataclass(frozen=True)
class DetectorConfig:
    """Parameters of :func:`detect_grokking`. Defaults come from the reference rules of DESIGN §3/§6
    and the papers, fixed before any evaluation run; their evaluation (tuning seed 0, held-out
    seeds 1-2) is ``benchmarks/grokking.py`` -> ``benchmarks/results/grokking.md``.

    defect: the papers' rule, value > mean + ``defect_sigma`` sd of the first
    ``defect_baseline`` evaluations, ``defect_sustain`` evaluations in a row. ``defect_sigma`` is
    4, not the papers' 3: on the tuning seed the a³+ab control (no grokking) creeps to ~1.2x the
    3-sd threshold by step 3,200 and the detector false-alarmed there; 4 sd silenced it (to step
    6,000) and kept a 600-step lead on a+b (``benchmarks/results/grokking.md``).
    norm: total weight norm has fallen by ``norm_drop`` (fraction of its running maximum) and
    then risen ``norm_rise`` (fraction) above its running minimum.
    rank: median relative rise of per-matrix effective rank above its running minimum.
    alpha (HT-SR, where weight frames carry it): the median over matrices of the power-law
    exponent alpha has been <= ``alpha_floor`` (2, HT-SR's boundary of well-trained layers)
    for ``alpha_sustain`` evaluations in a row. It is reported in :class:`Evidence` but counts
    towards firing only with ``alpha_counts``: in the evaluation it came at or after the jump at
    p = 97 and on every run, grokking or not, at p = 59 (``benchmarks/results/grokking.md``,
    session 12).
    agreement (where the client's probe batch gives predictions, ideally on held-out inputs):
    :func:`agreement_turnaround` of ``probe.prediction_agreement`` with ``agreement_drop``,
    ``agreement_rise``, ``agreement_sustain`` and ``agreement_z``. Reported; it counts only with
    ``agreement_counts``: in the evaluation it warned 1,100-1,300 steps ahead on a+b but also
    turned on partly generalising, unstable (weight decay 0) and oscillating controls: 4/11
    grokking runs warned >= 600 ahead, 5/10 controls alarmed (``benchmarks/results/grokking.md``,
    session 14).
    confidence (where the probe gives logits and weight frames give the norm):
    :func:`confidence_rise` of ``probe.prediction_confidence`` with ``confidence_rise``,
    ``confidence_plateau``, ``confidence_sustain`` and ``norm_drop``. Reported; it counts only
    with ``confidence_counts``: chosen on seeds 0-2 and scored on fresh seeds 3-4, it had the
    fewest false alarms of the general rules (3/10) but short leads (3/11 grokking runs warned
    >= 600 ahead; ``benchmarks/results/grokking.md``, session 15).
    output rank (where weight frames name the output layer, ``grok.output_effective_rank``):
    :func:`output_rank_fall` with ``output_span``, ``output_fall``, ``output_flat`` and
    ``output_norm`` (the harness's rule H2, constants from its session-5 search). Reported; it
    counts only with ``output_counts``. On seeds 0-6 of the 2-layer mini-batch harness at
    train fraction 0.3 it warned 600-1,700 steps ahead on all 10 runs that grok after a plateau
    (3 of them on fresh seeds 5-6, predicted beforehand) and alarmed on none of 35 controls;
    but it missed the delayed a+b runs at fraction 0.5, alarmed on the a²+ab+b² controls of the
    1-layer full-batch transformer and never fired on an MLP. Counted, it left the detector's
    alarms and its fresh-seed leads as they were, so it is not counted by default
    (``benchmarks/results/grokking.md``, sessions 16-17).
    """

    defect_baseline: int = 10
    defect_sigma: float = 4.0
    defect_sustain: int = 2
    norm_drop: float = 0.3
    norm_rise: float = 0.02
    rank_rise: float = 0.1
    rank_drop: float = 0.2
    alpha_floor: float = 2.0
    alpha_sustain: int = 2
    alpha_counts: bool = False
    agreement_drop: float = 0.3
    agreement_rise: float = 0.25
    agreement_sustain: int = 2
    agreement_z: float = 3.0
    agreement_counts: bool = False
    confidence_rise: float = 0.05
    confidence_plateau: float = 0.02
    confidence_sustain: int = 2
    confidence_counts: bool = False
    output_span: int = 500
    output_fall: float = 0.4188
    output_flat: float = 0.25
    output_norm: float = 0.6
    output_counts: bool = False
    require: int = 2


@dataclass(frozen=True)
class Evidence:
    """When each piece of evidence first appeared (step) or ``None``."""

    defect: int | None
    norm_turn: int | None
    rank_turn: int | None
    sed_collapse: int | None
    alpha_floor: int | None = None
    agreement_turn: int | None = None
    confidence_rise: int | None = None
    output_rank_fall: int | None = None

    def steps(self) -> dict[str, int]:
        """``{piece: step}`` of the evidence present (field names: ``defect``, ``norm_turn``...)."""
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class GrokWarning:
    """Detector decision: firing ``step`` (or ``None``), per-step ``score``, ``evidence``."""

    step: int | None
    score: tuple[tuple[int, float], ...]
    evidence: Evidence
    available: tuple[str, ...] = field(default=())

    @property
    def fired(self) -> bool:
        return self.step is not None


def defect_alarm(
    series: Series, *, baseline: int = 10, sigma: float = 3.0, sustain: int = 2
) -> int | None:
    """The papers' rule: first step ending ``sustain`` evaluations in a row above
    mean + ``sigma`` sd of the first ``baseline`` evaluations (mini_gpt ``Config``)."""
    if len(series) <= baseline:
        return None
    ref = np.array([v for _, v in series[:baseline]], dtype=np.float64)
    thr = float(ref.mean() + sigma * ref.std(ddof=1 if baseline > 1 else 0))
    run = 0
    for step, value in series[baseline:]:
        run = run + 1 if value > thr else 0
        if run >= sustain:
            return step
    return None


def defect_spike(
    series: Series, *, factor: float = 10.0, floor: float = 20.0, baseline: int = 3
) -> int | None:
    """The grokking-integrability repo's rule (``find_spike_step``): first evaluation (index >= 2)
    with D > ``factor`` x max(median of the first ``baseline`` values, 0.1) and D > ``floor``."""
    if len(series) < baseline:
        return None
    ref = max(float(statistics.median(v for _, v in series[:baseline])), 0.1)
    for step, value in series[2:]:
        if value > factor * ref and value > floor:
            return step
    return None


def norm_turnaround(
    series: Series, *, drop: float = 0.3, rise: float = 0.02, sustain: int = 1
) -> int | None:
    """First step where the norm, after falling by ``drop`` of its running maximum to a running
    minimum, stands ``rise`` above that minimum (weight decay has given way to new growth), the
    last of ``sustain`` evaluations in a row that do."""
    return _turnaround(series, drop, rise, sustain, lambda _: 0.0)


def _turnaround(
    series: Series, drop: float, rise: float, sustain: int, margin: Callable[[float], float]
) -> int | None:
    """Fall by ``drop`` of the running maximum, then ``rise`` above the running minimum for
    ``sustain`` evaluations; each move must also exceed ``margin(level)`` (noise) in absolute
    terms. Non-finite values are skipped."""
    peak, low, run = -math.inf, math.inf, 0
    for step, value in series:
        if not math.isfinite(value):
            continue
        if value > peak and low == math.inf:
            peak = value
        if value <= peak * (1.0 - drop) and peak - value >= margin(peak):
            low = min(low, value)
        up = low < math.inf and value >= low * (1.0 + rise) and value - low >= margin(low)
        run = run + 1 if up else 0
        if run >= max(1, sustain):
            return step
    return None


def _logits_of(output: object) -> torch.Tensor | None:
    """A model output's logits: the tensor itself, the first element of a tuple or list, or
    ``output["logits"]`` / ``output.logits``; None unless floating with a last dimension >= 2."""
    if isinstance(output, Mapping) and "logits" in output:
        output = output["logits"]
    elif not isinstance(output, torch.Tensor) and isinstance(
        getattr(output, "logits", None), torch.Tensor
    ):
        output = output.logits  # type: ignore[attr-defined]
    elif isinstance(output, (tuple, list)) and output:
        output = output[0]
    if not isinstance(output, torch.Tensor) or not output.is_floating_point():
        return None
    if output.dim() < 1 or output.shape[-1] < 2:
        return None
    return output.detach()


def predictions_of(output: object) -> torch.Tensor | None:
    """Argmax over the last dimension of a model's output (a tensor, the first element of a
    tuple or list, or ``output["logits"]`` / ``output.logits``), or None when it has none to
    take (not a floating tensor, or a last dimension of 1: regression)."""
    logits = _logits_of(output)
    return None if logits is None else logits.argmax(-1)


_CONFIDENCE_CHUNK = 1 << 22  # float64 values per chunk of confidence_of (32 MB)


def confidence_of(output: object) -> float | None:
    """Mean over positions of the largest softmax probability of a model's output (found as by
    :func:`predictions_of`), exp(max - logsumexp) in float64 over chunks of at most
    ``_CONFIDENCE_CHUNK`` values (a language model's logits are not copied whole); None when
    there are no logits or a position has a non-finite one."""
    logits = _logits_of(output)
    if logits is None or logits.numel() == 0:
        return None
    flat = logits.reshape(-1, logits.shape[-1])
    total, rows = 0.0, max(1, _CONFIDENCE_CHUNK // flat.shape[1])
    for start in range(0, flat.shape[0], rows):
        c = flat[start : start + rows].to(torch.float64)
        total += float(torch.exp(c.amax(-1) - torch.logsumexp(c, -1)).sum())
    value = total / flat.shape[0]
    return value if math.isfinite(value) else None


def prediction_agreement(history: Sequence[torch.Tensor]) -> float:
    """Fraction of probe positions whose prediction (e.g. the argmax class or token) is the same
    in every one of ``history`` (the latest evaluation and the ones before it, equal shapes).

    On held-out inputs, predictions that stop changing are the ones a consistent rule gives; a
    model that only memorises keeps reshuffling them (``benchmarks/results/grokking.md``)."""
    if len(history) < 2:
        raise ValueError("need at least two evaluations")
    last = history[-1]
    if any(h.shape != last.shape for h in history):
        raise ValueError("predictions of different shapes")
    if last.numel() == 0:
        return math.nan
    same = torch.ones_like(last, dtype=torch.bool)
    for h in history[:-1]:
        same &= h == last
    return float(same.float().mean())


def agreement_turnaround(
    series: Series,
    *,
    probe_size: int,
    drop: float = 0.3,
    rise: float = 0.25,
    sustain: int = 2,
    z: float = 3.0,
) -> int | None:
    """First step where held-out prediction agreement (:func:`prediction_agreement`), after
    falling by ``drop`` of its running maximum to a running minimum, stands ``rise`` above that
    minimum, the last of ``sustain`` evaluations in a row that do.

    Each fall and rise must also exceed ``z`` binomial standard errors of a fraction measured on
    ``probe_size`` positions, so the noise of a small probe is not read as a turn."""
    if probe_size < 1:
        raise ValueError(f"probe_size must be >= 1, got {probe_size}")

    def se(q: float) -> float:  # z standard errors; never 0 (a fraction of 0 is not exact)
        return z * math.sqrt((max(q * (1.0 - q), 0.0) + 1.0 / probe_size) / probe_size)

    return _turnaround(series, drop, rise, sustain, se)


def confidence_rise(
    confidence: Series,
    weight_norm: Series,
    *,
    rise: float = 0.05,
    plateau: float = 0.02,
    lag: int = 3,
    sustain: int = 2,
    norm_drop: float = 0.3,
) -> int | None:
    """First step where held-out probe confidence (:func:`confidence_of`), after its
    memorisation plateau, stands ``rise`` (absolute) above its running minimum, the last of
    ``sustain`` evaluations in a row that do, once the weight norm has fallen by ``norm_drop``
    of its running maximum.

    The confidence is smoothed by a causal median of 3; its plateau starts at the first
    evaluation that is less than ``plateau`` above the one ``lag`` evaluations earlier. The
    weight-norm condition (the norm at the latest step <= the evaluation's) keeps out runs
    whose confidence grows with the scale of unregularised weights (weight decay 0), which
    rose without generalising (``benchmarks/results/grokking.md``, session 15)."""
    values = [(s, v) for s, v in confidence if math.isfinite(v)]
    norms = [(s, v) for s, v in weight_norm if math.isfinite(v)]
    smooth = [
        (step, statistics.median(v for _, v in values[max(0, i - 2) : i + 1]))
        for i, (step, _) in enumerate(values)
    ]
    low, run, k, peak, fallen, started = math.inf, 0, 0, -math.inf, False, False
    for i, (step, value) in enumerate(smooth):
        while k < len(norms) and norms[k][0] <= step:
            peak = max(peak, norms[k][1])
            fallen = fallen or norms[k][1] <= peak * (1.0 - norm_drop)
            k += 1
        if not started:
            started = i >= lag and value - smooth[i - lag][1] < plateau
            if not started:
                continue
        low = min(low, value)
        run = run + 1 if fallen and value >= low + rise else 0
        if run >= max(1, sustain):
            return step
    return None


def output_rank_fall(
    rank: Series,
    weight_norm: Series,
    *,
    span: int = 500,
    threshold: float = 0.4188,
    flat: float = 0.25,
    norm_below: float = 0.6,
) -> int | None:
    """First step where the output layer's effective rank falls faster than ``threshold`` % per
    100 steps (measured over the last ``span`` steps) at a new minimum, after it once fell
    slower than ``flat`` % per 100 steps, with the weight norm below ``norm_below`` of its
    running maximum.

    The rule H2 of ``benchmarks/grokking.py`` (constants from its session-5 search): in the
    mini-batch regime the unembedding's rank falls fast while the model memorises, flattens
    on the plateau, and falls again as the generalising circuit forms, 600-1,700 steps before
    val_acc reaches 0.9 on runs that grok after a plateau; in a 1-layer full-batch transformer
    it fires on non-grokking runs too, and in an MLP not at all
    (``benchmarks/results/grokking.md``, sessions 16-17). The fall at a step compares its rank
    with the rank at the latest step at least ``span`` earlier; the norm is the latest at or
    before the step."""
    if span < 1:
        raise ValueError(f"span must be >= 1 step, got {span}")
    values = [(s, v) for s, v in rank if math.isfinite(v) and v > 0]
    norms = [(s, v) for s, v in weight_norm if math.isfinite(v)]
    low, k, peak, norm, seen_flat, j = math.inf, 0, -math.inf, math.inf, False, -1
    for step, value in values:
        new_low, low = value <= low + 1e-9, min(low, value)
        while k < len(norms) and norms[k][0] <= step:
            peak, norm = max(peak, norms[k][1]), norms[k][1]
            k += 1
        while j + 1 < len(values) and values[j + 1][0] <= step - span:
            j += 1
        if j < 0:
            continue
        then, before = values[j]
        fall = (before - value) / value * 100.0 / ((step - then) / 100.0)
        seen_flat = seen_flat or fall < flat
        if seen_flat and new_low and norm < norm_below * peak and fall > threshold:
            return step
    return None


def rank_turnaround(
    series_by_matrix: Mapping[str, Series], *, drop: float = 0.2, rise: float = 0.1
) -> int | None:
    """First step where at least half of the matrices whose effective rank fell by ``drop``
    (fraction of its running maximum) have risen ``rise`` above their running minimum."""
    turns: list[int | None] = [
        norm_turnaround(s, drop=drop, rise=rise) for s in series_by_matrix.values() if s
    ]
    fallen = [t for t in turns if t is not None]
    eligible = len(turns)
    if not eligible or len(fallen) * 2 < eligible:
        return None
    fallen.sort()
    return fallen[(eligible + 1) // 2 - 1]


def median_series(series_by_matrix: Mapping[str, Series]) -> list[tuple[int, float]]:
    """Per step, the median over the matrices that have a finite value at that step."""
    by_step: dict[int, list[float]] = {}
    for series in series_by_matrix.values():
        for step, value in series:
            if math.isfinite(value):
                by_step.setdefault(step, []).append(value)
    return [(s, float(statistics.median(v))) for s, v in sorted(by_step.items())]


def alpha_floor(
    series_by_matrix: Mapping[str, Series], *, floor: float = 2.0, sustain: int = 2
) -> int | None:
    """First step ending ``sustain`` evaluations in a row at which the median HT-SR alpha over
    matrices is <= ``floor`` (HT-SR: alpha ~ 2 marks well-trained layers; Prakash & Martin,
    arXiv 2506.04434, saw the layer alphas fall towards 2 as an MLP grokked)."""
    run = 0
    for step, value in median_series(series_by_matrix):
        run = run + 1 if value <= floor else 0
        if run >= max(1, sustain):
            return step
    return None


def detect_grokking(
    *,
    defect: Series | None = None,
    weight_norm: Series | None = None,
    effective_rank: Mapping[str, Series] | None = None,
    sed_collapse_step: int | None = None,
    alpha: Mapping[str, Series] | None = None,
    agreement: Series | None = None,
    probe_size: int | None = None,
    confidence: Series | None = None,
    output_rank: Series | None = None,
    config: DetectorConfig | None = None,
) -> GrokWarning:
    """Combine the evidence into a warning; fires at the first step where at least
    ``config.require`` pieces have appeared (one alone is never enough by default: the weight-norm
    turnaround and the SED collapse each fired alone on a non-grokking run).

    Series are ``(step, value)`` sorted by step; any may be absent. ``sed_collapse_step`` is the
    first step at which the (causally computed) SED gap series entered its collapse phase;
    ``alpha`` holds per-matrix HT-SR alpha series and ``agreement`` the probe-prediction
    agreement series over ``probe_size`` positions, ``confidence`` the probe's confidence and
    ``output_rank`` the output layer's effective rank (see :class:`DetectorConfig` for whether
    they count). The score at a step is the fraction of the required evidence present by then
    (1.0 from the firing step on).
    """
    cfg = config or DetectorConfig()
    ev = Evidence(
        defect=defect_alarm(
            defect, baseline=cfg.defect_baseline, sigma=cfg.defect_sigma, sustain=cfg.defect_sustain
        )
        if defect
        else None,
        norm_turn=norm_turnaround(weight_norm, drop=cfg.norm_drop, rise=cfg.norm_rise)
        if weight_norm
        else None,
        rank_turn=rank_turnaround(effective_rank, drop=cfg.rank_drop, rise=cfg.rank_rise)
        if effective_rank
        else None,
        sed_collapse=sed_collapse_step,
        alpha_floor=alpha_floor(alpha, floor=cfg.alpha_floor, sustain=cfg.alpha_sustain)
        if alpha
        else None,
        agreement_turn=agreement_turnaround(
            agreement,
            probe_size=probe_size,
            drop=cfg.agreement_drop,
            rise=cfg.agreement_rise,
            sustain=cfg.agreement_sustain,
            z=cfg.agreement_z,
        )
        if agreement and probe_size
        else None,
        confidence_rise=confidence_rise(
            confidence,
            weight_norm,
            rise=cfg.confidence_rise,
            plateau=cfg.confidence_plateau,
            sustain=cfg.confidence_sustain,
            norm_drop=cfg.norm_drop,
        )
        if confidence and weight_norm
        else None,
        output_rank_fall=output_rank_fall(
            output_rank,
            weight_norm,
            span=cfg.output_span,
            threshold=cfg.output_fall,
            flat=cfg.output_flat,
            norm_below=cfg.output_norm,
        )
        if output_rank and weight_norm
        else None,
    )
    available = tuple(
        name
        for name, present in (
            ("defect", bool(defect)),
            ("norm", bool(weight_norm)),
            ("rank", bool(effective_rank)),
            ("sed", sed_collapse_step is not None),
            ("alpha", bool(alpha)),
            ("agreement", bool(agreement and probe_size)),
            ("confidence", bool(confidence and weight_norm)),
            ("output_rank", bool(output_rank and weight_norm)),
        )
        if present
    )
    steps = sorted(
        {s for series in _all_series(defect, weight_norm, effective_rank) for s, _ in series}
    )
    counted = [ev.defect, ev.norm_turn, ev.rank_turn, ev.sed_collapse]
    if cfg.alpha_counts:
        counted.append(ev.alpha_floor)
    if cfg.agreement_counts:
        counted.append(ev.agreement_turn)
    if cfg.confidence_counts:
        counted.append(ev.confidence_rise)
    if cfg.output_counts:
        counted.append(ev.output_rank_fall)
    times = [t for t in counted if t is not None]
    need = max(1, cfg.require)
    score = tuple((s, min(1.0, sum(t <= s for t in times) / need)) for s in steps)
    fired = sorted(times)[need - 1] if len(times) >= need else None
    return GrokWarning(fired, score, ev, available)


def _all_series(
    defect: Series | None, weight_norm: Series | None, rank: Mapping[str, Series] | None
) -> Iterable[Series]:
    if defect:
        yield defect
    if weight_norm:
        yield weight_norm
    if rank:
        yield from rank.values()


def effective_rank(weights: torch.Tensor) -> float:
    """Effective rank exp(H(p)), p_i = s_i / sum s (Roy & Vetterli 2007), of a 2-D matrix."""
    if weights.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(weights.shape)}")
    return effective_rank_of(svdvals(weights.detach().to(torch.float64)))


def effective_rank_of(s: torch.Tensor) -> float:
    """Effective rank exp(H(p)), p_i = s_i / sum s, of singular values ``s`` ``(k,)``."""
    total = float(s.sum())
    if total == 0.0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


__all__ = [
    "AGREEMENT_WINDOW",
    "COMMUTATOR_DEFECT",
    "EFFECTIVE_RANK",
    "EVIDENCE_LABELS",
    "EVIDENCE_PREFIX",
    "HTSR_ALPHA",
    "IMMINENT",
    "OUTPUT_RANK",
    "PREDICTION_AGREEMENT",
    "PREDICTION_CHURN",
    "PREDICTION_CONFIDENCE",
    "PREDICTION_POSITIONS",
    "WARNING_SCORE",
    "DefectSample",
    "DetectorConfig",
    "Evidence",
    "GrokWarning",
    "agreement_turnaround",
    "alpha_floor",
    "commutator_defect",
    "commutator_probe",
    "confidence_of",
    "confidence_rise",
    "defect_alarm",
    "defect_spike",
    "detect_grokking",
    "effective_rank",
    "effective_rank_of",
    "median_commutator_defect",
    "median_series",
    "norm_turnaround",
    "output_rank_fall",
    "prediction_agreement",
    "predictions_of",
    "preserved_rng",
    "rank_turnaround",
]
