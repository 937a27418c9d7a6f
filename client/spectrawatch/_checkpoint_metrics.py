"""The metric tables of ``spectrawatch analyze``: every weight metric of every layer of a
checkpoint, and the layer-by-layer comparison of two.

HT-SR and FARMS (:mod:`spectrawatch.spectral.htsr`, :mod:`spectrawatch.spectral.farms`) and
weight conditioning (:mod:`spectrawatch.spectral.conditioning`) of every 2-D / 4-D weight,
exactly as the server's worker computes them from a weights frame.
"""

from __future__ import annotations

import importlib
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from spectrawatch._checkpoint import AnalyzeError, TensorRef, checkpoint_tensors
from spectrawatch.spectral.conditioning import (
    CONDITION_NUMBER,
    GMCN,
    conditioning_metrics,
    singular_values,
)
from spectrawatch.spectral.farms import FARMS_CV, FarmsConfig
from spectrawatch.spectral.htsr import (
    ALPHA,
    ALPHA_WEIGHTED,
    ENTROPY,
    KS_DISTANCE,
    LOG_NORM,
    LOG_SPECTRAL_NORM,
    MP_SOFTRANK,
    NUM_SPIKES,
    NUM_TRAPS,
    RAND_DISTANCE,
    STABLE_RANK,
    XMIN,
    LayerReport,
    analyze_weights,
    farms_key,
    training_warning,
)

#: Columns of the printed table and of ``--compare`` (metric key, header).
TABLE_COLUMNS: tuple[tuple[str, str], ...] = (
    (ALPHA, "alpha"),
    (ALPHA_WEIGHTED, "alpha_w"),
    (farms_key(ALPHA), "farms_alpha"),
    (LOG_SPECTRAL_NORM, "log_spec"),
    (STABLE_RANK, "stable_rank"),
    (GMCN, "gmcn"),
    (CONDITION_NUMBER, "cond"),
)


#: The per-layer fields of ``--format json|csv`` (issue contract: WeightWatcher's column names),
#: each from a metric key; ``metrics`` in JSON (and the further CSV columns) hold every key.
FIELDS: tuple[tuple[str, str], ...] = (
    ("alpha", ALPHA),
    ("alpha_weighted", ALPHA_WEIGHTED),
    ("xmin", XMIN),
    ("ks_distance", KS_DISTANCE),
    ("log_spectral_norm", LOG_SPECTRAL_NORM),
    ("log_norm", LOG_NORM),
    ("stable_rank", STABLE_RANK),
    ("mp_softrank", MP_SOFTRANK),
    ("num_spikes", NUM_SPIKES),
    ("entropy", ENTROPY),
    ("farms_alpha", farms_key(ALPHA)),
    ("farms_alpha_weighted", farms_key(ALPHA_WEIGHTED)),
    ("num_traps", NUM_TRAPS),  # with --traps only
    ("rand_distance", RAND_DISTANCE),
)
_INTEGER_FIELDS = frozenset({"num_spikes", "num_traps"})
#: Floating dtypes the linear algebra takes as they are; others (float8, float4) are upcast.
_NATIVE_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: Bytes of working memory per weight element (a float64 copy, the SVD and its workspace).
_BYTES_PER_ELEMENT = 24


@dataclass(frozen=True)
class LayerResult:
    """Every weight metric of one tensor: ``values`` by metric key, the HT-SR report (ESDs for
    plots) when the layer passed WeightWatcher's size filter, and why not otherwise."""

    layer: str
    shape: tuple[int, ...]
    values: dict[str, float]
    warning: str
    note: str = ""
    report: LayerReport | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class CheckpointAnalysis:
    """The analysis of one checkpoint: per-layer results in checkpoint order."""

    source: str
    device: str
    layers: tuple[LayerResult, ...]
    ignored: int  # tensors that are not 2-D/4-D floating weights (biases, norms, buffers)
    unreadable: tuple[str, ...] = ()  # why each skipped shard of a directory could not be read

    def layer(self, name: str) -> LayerResult:
        for r in self.layers:
            if r.layer == name:
                return r
        raise KeyError(name)

    def keys(self) -> list[str]:
        """Every metric key present in any layer, in first-seen order."""
        seen: dict[str, None] = {}
        for r in self.layers:
            seen.update(dict.fromkeys(r.values))
        return list(seen)

    def to_json(self) -> list[dict[str, Any]]:
        """One object per weight: ``layer``, ``shape``, the :data:`FIELDS` (null when absent or
        not finite), ``warning``, ``note`` and ``metrics`` (every metric key; non-finite: null)."""
        return [
            {
                "layer": r.layer,
                "shape": list(r.shape),
                **{name: _field(r, name, key) for name, key in FIELDS},
                "warning": r.warning,
                "note": r.note,
                "metrics": {k: _json_float(v) for k, v in r.values.items()},
            }
            for r in self.layers
        ]


def _field(r: LayerResult, name: str, key: str) -> float | int | None:
    v = _json_float(r.values[key]) if key in r.values else None
    return int(v) if v is not None and name in _INTEGER_FIELDS else v


def resolve_device(device: str | None) -> torch.device:
    """``auto`` (or None): the first CUDA device when present, else CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise AnalyzeError(f"invalid device {device!r} ({exc})") from exc
    if dev.type not in ("cpu", "cuda"):
        raise AnalyzeError(f"device {device!r}: use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise AnalyzeError(f"device {device!r} requested but CUDA is not available")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise AnalyzeError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s)")
    return dev


def conditioning_values(weight: torch.Tensor) -> dict[str, float]:
    """Conditioning metrics of one 2-D weight, exactly as the server's ``conditioning`` analysis."""
    return conditioning_metrics(singular_values(weight), (weight.shape[0], weight.shape[1]))


def analyze_layer(
    name: str,
    weight: torch.Tensor,
    *,
    device: torch.device,
    farms: FarmsConfig | None = FARMS_CV,
    traps: bool = False,
) -> LayerResult:
    """HT-SR + FARMS (:func:`~spectrawatch.spectral.htsr.analyze_weights`) and conditioning of
    one weight (4-D conv kernels: HT-SR per kernel position, conditioning of ``(out, in*kh*kw)``,
    the matrix the client sends); ``traps`` adds the correlation traps. Non-finite values are
    kept as NaN/inf here."""
    w = weight.detach()
    if w.is_meta:
        raise AnalyzeError("a meta tensor: shape only, no values")
    if w.layout != torch.strided:  # sparse COO/CSR from a .pt file
        w = w.to_dense()
    if w.dtype not in _NATIVE_FLOATS:  # float8 / float4: no linear algebra kernels
        w = w.to(torch.float32)
    w = w.to(device)
    values: dict[str, float] = {}
    notes: list[str] = []
    matrix = w.flatten(1) if w.ndim == 4 else w  # reshape(n, -1) fails on 0 elements
    sv: torch.Tensor | None = None
    if min(matrix.shape) < 2:
        notes.append("conditioning skipped: fewer than 2 rows or columns")
    elif not bool(torch.isfinite(matrix).all()):
        notes.append("conditioning skipped: NaN or Inf in weights")
    else:
        sv = singular_values(matrix)
    # a 2-D weight's float64 singular values give HT-SR its ESD without a second decomposition
    share = sv is not None and w.ndim == 2 and sv.dtype == torch.float64
    esds = {name: sv.square()} if share and sv is not None else None
    model = analyze_weights({name: w}, farms=farms, device=device, esds=esds, traps=traps)
    report = model.layers[0] if model.layers else None
    if report is not None:
        values.update(report.values())
    else:
        notes.append(f"HT-SR skipped: {model.skipped[0].reason}")
    if sv is not None:
        values.update(conditioning_metrics(sv, (matrix.shape[0], matrix.shape[1])))
    warning = training_warning(values[ALPHA]) if ALPHA in values else ""
    return LayerResult(name, tuple(weight.shape), values, warning, "; ".join(notes), report)


def analyze_checkpoint(
    path: str | Path,
    *,
    device: str | None = None,
    farms: FarmsConfig | None = FARMS_CV,
    progress: bool = True,
    layers: Callable[[str], bool] | None = None,
    traps: bool = False,
) -> CheckpointAnalysis:
    """Analyse every weight of ``path`` (:attr:`TensorRef.is_weight`), reading and analysing one
    tensor at a time with a progress bar on stderr; ``layers`` filters tensor names. Unreadable
    shards of a directory are skipped and named in :attr:`CheckpointAnalysis.unreadable`."""
    dev = resolve_device(device)
    unreadable: list[str] = []
    refs = checkpoint_tensors(path, unreadable)
    weights = [r for r in refs if r.is_weight]
    if not weights:
        raise AnalyzeError(
            f"{path}: no 2-D or 4-D floating-point weights to analyse among its {len(refs)} "
            f"tensors (the others are 1-D/3-D, integer, boolean or complex, or norm layers)"
        )
    selected = [r for r in weights if layers is None or layers(r.name)]
    if not selected:
        raise AnalyzeError(f"{path}: the layer filter matched none of its {len(weights)} weights")
    desc = f"analyze {_printable(Path(path).name)}"
    results = [
        _analyze_ref(ref, dev, farms, traps) for ref in _progress(selected, desc, enabled=progress)
    ]
    ignored = sum(1 for r in refs if not r.is_weight)
    return CheckpointAnalysis(str(path), str(dev), tuple(results), ignored, tuple(unreadable))


def _analyze_ref(
    ref: TensorRef, device: torch.device, farms: FarmsConfig | None, traps: bool
) -> LayerResult:
    """One weight; what cannot be computed for it (too large for this machine's memory, a tensor
    kind the linear algebra lacks) becomes a note on its row instead of ending the run."""
    need = math.prod(ref.shape) * _BYTES_PER_ELEMENT
    available = _available_memory()
    if available is not None and need > available:
        note = f"not analysed: needs ~{need / 2**30:.1f} GiB, {available / 2**30:.1f} GiB available"
        return LayerResult(ref.name, ref.shape, {}, "", note)
    weight = ref.load()  # a read error is the file's: it ends the run (AnalyzeError)
    try:
        return analyze_layer(ref.name, weight, device=device, farms=farms, traps=traps)
    except (AnalyzeError, RuntimeError, NotImplementedError, ValueError, MemoryError) as exc:
        reason = str(exc).splitlines()[0][:300] if str(exc) else ""
        note = f"not analysed: {type(exc).__name__}: {reason}"
        return LayerResult(ref.name, ref.shape, {}, "", note)


def _available_memory() -> int | None:
    """``MemAvailable`` from ``/proc/meminfo`` in bytes (None where there is no such file)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _progress(refs: Sequence[TensorRef], desc: str, *, enabled: bool) -> Iterator[TensorRef]:
    """A tqdm bar on stderr when tqdm is installed, else a one-line counter (when enabled)."""
    if not enabled:
        yield from refs
        return
    try:
        tqdm = importlib.import_module("tqdm.auto").tqdm  # optional, untyped
    except ImportError:
        for i, ref in enumerate(refs, 1):
            print(
                f"\r{desc}: {i}/{len(refs)} {_printable(ref.name)[:60]:<60}",
                end="",
                file=sys.stderr,
            )
            yield ref
        print(file=sys.stderr)
        return
    with tqdm(total=len(refs), desc=desc, unit="layer", file=sys.stderr, leave=False) as bar:
        for ref in refs:
            bar.set_postfix_str(_printable(ref.name)[-40:], refresh=False)
            yield ref
            bar.update(1)


# --- comparison --------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerDiff:
    """One layer in two checkpoints: metric values in A and B (None where absent)."""

    layer: str
    shape_a: tuple[int, ...] | None
    shape_b: tuple[int, ...] | None
    a: dict[str, float]
    b: dict[str, float]

    def delta(self, key: str) -> float | None:
        if key in self.a and key in self.b:
            return self.b[key] - self.a[key]
        return None


def compare(a: CheckpointAnalysis, b: CheckpointAnalysis) -> list[LayerDiff]:
    """Layer-by-layer pairing by tensor name: A's order, then layers only in B."""
    bmap = {r.layer: r for r in b.layers}
    out = []
    for r in a.layers:
        other = bmap.pop(r.layer, None)
        out.append(
            LayerDiff(
                r.layer,
                r.shape,
                other.shape if other else None,
                r.values,
                other.values if other else {},
            )
        )
    out.extend(LayerDiff(r.layer, None, r.shape, {}, r.values) for r in bmap.values())
    return out


def _json_float(v: float) -> float | None:
    """Strict JSON: a non-finite value is null (the table and CSV say inf/nan)."""
    return v if math.isfinite(v) else None


def _printable(text: str) -> str:
    """``text`` with control characters escaped: a tensor name cannot drive the terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)
