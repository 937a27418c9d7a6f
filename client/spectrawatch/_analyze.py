"""``spectrawatch analyze``: offline weight metrics of a checkpoint, no server needed.

Reads a ``.safetensors`` file, a directory of shards, a PyTorch state-dict file (only ever through
``torch.load(weights_only=True)``: arbitrary pickles are refused, never executed) or a Hugging
Face model directory; computes the HT-SR and FARMS metrics (:mod:`spectrawatch.spectral.htsr`,
:mod:`spectrawatch.spectral.farms`) and weight conditioning
(:mod:`spectrawatch.spectral.conditioning`) of every 2-D / 4-D weight, on CUDA when present, and
prints a table; ``--csv``, ``--json`` and ``--html`` (a self-contained Plotly report) write the
results, ``--compare A B`` diffs two checkpoints layer by layer. The numbers are exactly those the
server's worker computes from a weights frame (same pure functions, same FARMS configuration).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import html
import importlib
import io
import itertools
import json
import math
import os
import pickle
import re
import sys
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch

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
    esd_payload,
    farms_key,
    log_histogram,
    training_warning,
)

SAFETENSORS_SUFFIX = ".safetensors"
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
# Shard indexes written by transformers' save_pretrained: weight name -> shard file.
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_INDEX = "pytorch_model.bin.index.json"
# Keys under which training frameworks nest the state dict inside a checkpoint dictionary.
NESTED_STATE_KEYS = ("state_dict", "model_state_dict", "model", "module")

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


class AnalyzeError(Exception):
    """A checkpoint that cannot be read or analysed; the message says why and what to do."""


# --- loading -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorRef:
    """One tensor of a checkpoint, known by name, shape and kind before its data is read:
    safetensors files are read one tensor at a time, so a checkpoint larger than memory works."""

    name: str
    shape: tuple[int, ...]
    floating: bool
    load: Callable[[], torch.Tensor] = field(repr=False, compare=False)

    @property
    def is_weight(self) -> bool:
        """Analysed: a floating 2-D / 4-D tensor whose name does not contain ``norm``
        (:func:`~spectrawatch.spectral.htsr.analyze_model`'s state-dict selection; a file has
        no module types, so unlike WeightWatcher it includes e.g. ``nn.MultiheadAttention``'s
        ``in_proj_weight``)."""
        return len(self.shape) in (2, 4) and self.floating and "norm" not in self.name.lower()


def _read_safetensor(path: Path, name: str) -> torch.Tensor:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            tensor: torch.Tensor = f.get_tensor(name)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AnalyzeError(f"{path}: cannot read tensor {name!r} ({exc})") from exc
    return tensor


def _safetensors_refs(path: Path) -> list[TensorRef]:
    """Names, shapes and dtypes from the safetensors header (no tensor data read)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            refs = []
            for name in f.keys():  # noqa: SIM118 - a safe_open handle, not a dict
                sl = f.get_slice(name)
                refs.append(
                    TensorRef(
                        name,
                        tuple(int(d) for d in sl.get_shape()),
                        str(sl.get_dtype()).startswith(("F", "BF")),
                        functools.partial(_read_safetensor, path, name),
                    )
                )
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AnalyzeError(f"{path}: not a readable safetensors file ({exc})") from exc
    return refs


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _tensor_refs(tensors: Mapping[str, torch.Tensor]) -> list[TensorRef]:
    return [
        TensorRef(name, tuple(t.shape), t.is_floating_point(), functools.partial(_identity, t))
        for name, t in tensors.items()
    ]


def _state_dict_of(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a loaded checkpoint: a flat name -> tensor mapping, or one nested under
    ``state_dict`` / ``model`` ... (Lightning and common training-loop checkpoints)."""
    if isinstance(obj, torch.nn.Module):  # pragma: no cover - weights_only never yields one
        obj = obj.state_dict()
    if isinstance(obj, Mapping):
        tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
        for key in NESTED_STATE_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping):
                return _state_dict_of(inner, path)
    raise AnalyzeError(
        f"{path}: no tensors found (expected a state dict of name -> tensor, or one under "
        f"{', '.join(repr(k) for k in NESTED_STATE_KEYS)})"
    )


def _load_torch(path: Path) -> dict[str, torch.Tensor]:
    """``torch.load(weights_only=True)`` on CPU; a pickle that needs arbitrary code is refused."""
    try:
        with warnings.catch_warnings():
            # torch notes any pickle protocol other than 2; the refusal below says what matters
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            # a file object, not a path: torch >= 2.13 hands a path ending in .safetensors to
            # safetensors whatever the file holds; the first bytes decided the format here
            with path.open("rb") as f:
                obj = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise AnalyzeError(
            f"{path}: refused: this checkpoint holds Python objects beyond tensors and can only be "
            f"loaded by unpickling arbitrary code, which spectrawatch never does "
            f"({_unpickling_reason(exc)}). "
            "Re-save it with torch.save(model.state_dict(), path) or as .safetensors."
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise AnalyzeError(f"{path}: not a readable PyTorch checkpoint ({exc})") from exc
    return _state_dict_of(obj, path)


def _unpickling_reason(exc: Exception) -> str:
    """The informative line of torch's weights-only refusal (e.g. ``Unsupported global: ...``)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    for line in text.splitlines():
        if "unsupported global" in line.lower() or "unsupported operand" in line.lower():
            return line.strip().rstrip(".")
    return type(exc).__name__


def _sniff(path: Path) -> str:
    """``"safetensors"``, ``"torch"`` or ``""`` from the first bytes of a file."""
    with path.open("rb") as f:
        head = f.read(16)
    size = path.stat().st_size
    header_len = int.from_bytes(head[:8], "little") if len(head) >= 9 else 0
    if head[8:9] == b"{" and 2 <= header_len <= size - 8:  # u64 header length, then JSON
        return "safetensors"
    if head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in b"\x02\x03\x04\x05"):
        return "torch"  # torch zip archive / legacy pickle (protocol 2-5)
    return ""


def _file_refs(path: Path) -> list[TensorRef]:
    """The tensors of one file, its format told by its first bytes (a suffix can lie)."""
    suffix = path.suffix.lower()
    try:
        kind = _sniff(path)
    except OSError as exc:
        raise AnalyzeError(f"{path}: cannot read ({exc})") from exc
    if not kind and (suffix == SAFETENSORS_SUFFIX or suffix in TORCH_SUFFIXES):
        expected = "safetensors" if suffix == SAFETENSORS_SUFFIX else "PyTorch checkpoint"
        raise AnalyzeError(
            f"{path}: not a {expected} (its first bytes are neither a safetensors header nor a "
            "PyTorch zip archive or pickle): truncated, or another kind of file"
        )
    if kind == "safetensors":
        return _safetensors_refs(path)
    if kind == "torch":
        return _tensor_refs(_load_torch(path))
    raise AnalyzeError(
        f"{path}: unsupported file: expected .safetensors or a PyTorch state dict "
        f"({', '.join(TORCH_SUFFIXES)})"
    )


def checkpoint_files(path: Path) -> list[Path]:
    """The weight files a path stands for: itself, or a directory's shards.

    In a directory (a Hugging Face model folder or any folder of shards) ``*.safetensors`` files
    win over PyTorch ones (``pytorch_model*.bin``, ``*.pt``, ``*.pth``, ``*.ckpt``), as
    ``transformers`` prefers them; shards are read in name order. Where the folder has the shard
    index ``save_pretrained`` writes (``model.safetensors.index.json``,
    ``pytorch_model.bin.index.json``), only the files its ``weight_map`` names are read, as
    ``transformers`` does: other weight files beside them (a Hub snapshot's
    ``consolidated.safetensors``, a stale single-file save) are other copies of the same layers.
    """
    if not path.exists():
        raise AnalyzeError(f"{path}: no such file or directory")
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise AnalyzeError(f"{path}: not a regular file or directory")
    files = sorted(p for p in path.iterdir() if p.is_file())
    shards = [p for p in files if p.suffix.lower() == SAFETENSORS_SUFFIX]
    index = path / SAFETENSORS_INDEX
    if not shards:
        shards = [p for p in files if p.suffix.lower() in TORCH_SUFFIXES]
        index = path / TORCH_INDEX
    if not shards:
        raise AnalyzeError(
            f"{path}: no weight files in this directory (looked for *.safetensors, "
            f"{', '.join('*' + s for s in TORCH_SUFFIXES)})"
        )
    return _indexed_shards(index) if index.is_file() else shards


def _indexed_shards(index: Path) -> list[Path]:
    """The shard files a Hugging Face shard index names (its ``weight_map`` values), in name
    order; a malformed index or a missing shard is an error."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
        if not names or not all(isinstance(n, str) and n for n in names):
            raise ValueError("no shard file names")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise AnalyzeError(f"{index}: not a readable shard index ({exc!r})") from exc
    shards = [index.parent / n for n in names]
    if missing := [n for n, p in zip(names, shards, strict=True) if not p.is_file()]:
        raise AnalyzeError(
            f"{index}: names {_count(len(missing), 'shard')} not in the folder "
            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})"
        )
    return shards


def shadowed_files(path: Path) -> list[Path]:
    """PyTorch weight files of a directory that :func:`checkpoint_files` passes over because
    ``*.safetensors`` shards are present (empty for a file or a directory without both)."""
    if not path.is_dir():
        return []
    files = sorted(p for p in path.iterdir() if p.is_file())
    if not any(p.suffix.lower() == SAFETENSORS_SUFFIX for p in files):
        return []
    return [p for p in files if p.suffix.lower() in TORCH_SUFFIXES]


def checkpoint_tensors(path: str | Path, unreadable: list[str] | None = None) -> list[TensorRef]:
    """Every tensor of a checkpoint (shards merged, in file then checkpoint order), unread;
    a name found in two shards is an error.

    A shard that cannot be read ends the call, unless ``unreadable`` is given and the directory
    has other shards: then its error message is appended there and the rest are read (a
    checkpoint whose every shard is unreadable still fails with the first one's error).
    """
    out: dict[str, TensorRef] = {}
    files = checkpoint_files(Path(path))
    skipped: list[AnalyzeError] = []
    for file in files:
        try:
            refs = _file_refs(file)
        except AnalyzeError as exc:
            if unreadable is None or len(files) == 1:
                raise
            skipped.append(exc)
            continue
        for ref in refs:
            if ref.name in out:
                raise AnalyzeError(f"{file}: tensor {ref.name!r} already read from another shard")
            out[ref.name] = ref
    if skipped and len(skipped) == len(files):
        raise skipped[0]
    if unreadable is not None:
        unreadable.extend(str(exc) for exc in skipped)
    if not out:
        raise AnalyzeError(f"{path}: the checkpoint holds no tensors")
    return list(out.values())


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint on CPU, by name (all read into memory)."""
    return {ref.name: ref.load() for ref in checkpoint_tensors(path)}


# --- analysis ----------------------------------------------------------------------------------
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


# --- output ------------------------------------------------------------------------------------
def _json_float(v: float) -> float | None:
    """Strict JSON: a non-finite value is null (the table and CSV say inf/nan)."""
    return v if math.isfinite(v) else None


def _printable(text: str) -> str:
    """``text`` with control characters escaped: a tensor name cannot drive the terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def _fmt(v: float | None, *, integer: bool = False) -> str:
    if v is None:
        return "-"
    if not math.isfinite(v):
        return str(v)
    if integer:
        return str(int(v))
    if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
        return f"{v:.3e}"
    return f"{v:.4g}" if abs(v) >= 100 else f"{v:.3f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def format_table(analysis: CheckpointAnalysis) -> str:
    """The printed per-layer table (selected metrics; CSV/JSON hold all of them)."""
    columns = list(TABLE_COLUMNS)
    if any(NUM_TRAPS in r.values for r in analysis.layers):  # --traps
        columns.append((NUM_TRAPS, "traps"))
    header = ["layer", "shape", *(h for _, h in columns), "warning"]
    rows = []
    for r in analysis.layers:
        cells = [_printable(r.layer), "x".join(map(str, r.shape))]
        cells += [_fmt(r.values.get(k), integer=k == NUM_TRAPS) for k, _ in columns]
        cells.append(r.warning or (r.note and f"({r.note})"))
        rows.append(cells)
    return _table(header, rows)


def format_compare(diffs: Sequence[LayerDiff]) -> str:
    """One row per layer: A -> B and the change, for the table's metrics."""
    header = ["layer"]
    for _, h in TABLE_COLUMNS[:5]:
        header += [f"{h} A", f"{h} B", f"d{h}"]
    rows = []
    for d in diffs:
        cells = [_printable(d.layer) + _presence(d)]
        for k, _ in TABLE_COLUMNS[:5]:
            cells += [_fmt(d.a.get(k)), _fmt(d.b.get(k)), _fmt(d.delta(k))]
        rows.append(cells)
    return _table(header, rows)


def write_csv(analysis: CheckpointAnalysis, out: TextIO) -> None:
    """One row per layer: ``layer, shape``, the :data:`FIELDS`, ``warning, note``, then one
    column per metric key (all of them; empty when absent)."""
    keys = analysis.keys()
    writer = csv.writer(out)
    writer.writerow(["layer", "shape", *(n for n, _ in FIELDS), "warning", "note", *keys])
    for r in analysis.layers:
        fields = [_csv_value(_field(r, n, k)) for n, k in FIELDS]  # as the JSON's values
        vals = [_csv_value(r.values.get(k)) for k in keys]
        shape = "x".join(map(str, r.shape))
        writer.writerow([r.layer, shape, *fields, r.warning, r.note, *vals])


def _count(n: int, noun: str) -> str:
    """``"1 layer"``, ``"2 layers"``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _csv_value(v: float | int | None) -> str:
    return "" if v is None else repr(v)


def _presence(d: LayerDiff) -> str:
    """What the layer's row notes: only in one checkpoint, or a changed shape."""
    if not d.shape_b:
        return " (only A)"
    if not d.shape_a:
        return " (only B)"
    if d.shape_a != d.shape_b:
        return f" (shape {'x'.join(map(str, d.shape_a))} -> {'x'.join(map(str, d.shape_b))})"
    return ""


def write_compare_csv(diffs: Sequence[LayerDiff], out: TextIO) -> None:
    """Long format: ``layer, metric, a, b, delta`` for every metric in either checkpoint."""
    writer = csv.writer(out)
    writer.writerow(["layer", "metric", "a", "b", "delta"])
    for d in diffs:
        for k in dict.fromkeys([*d.a, *d.b]):
            delta = d.delta(k)
            writer.writerow(
                [
                    d.layer,
                    k,
                    repr(d.a[k]) if k in d.a else "",
                    repr(d.b[k]) if k in d.b else "",
                    "" if delta is None else repr(delta),
                ]
            )


def compare_json(
    a: CheckpointAnalysis, b: CheckpointAnalysis, diffs: Sequence[LayerDiff]
) -> dict[str, Any]:
    return {
        "a": a.source,
        "b": b.source,
        "layers": [
            {
                "layer": d.layer,
                "shape_a": list(d.shape_a) if d.shape_a else None,
                "shape_b": list(d.shape_b) if d.shape_b else None,
                "metrics": {
                    k: {
                        "a": _json_float(d.a[k]) if k in d.a else None,
                        "b": _json_float(d.b[k]) if k in d.b else None,
                        "delta": (None if (x := d.delta(k)) is None else _json_float(x)),
                    }
                    for k in dict.fromkeys([*d.a, *d.b])
                },
            }
            for d in diffs
        ],
    }


# the report's plots: no Plotly logo, no "Share chart" to Plotly Cloud (plotly.js 4 offers it
# by default): a checkpoint's spectra stay with the report
REPORT_CONFIG = {"displaylogo": False, "showSendToCloud": False}


def _plotly() -> Any:
    try:
        import plotly.graph_objects as go
        import plotly.io as pio
        from plotly.offline import get_plotlyjs
    except ImportError as exc:
        raise AnalyzeError(
            "--html needs plotly: pip install plotly (or 'spectrawatch[server]')"
        ) from exc
    return go, pio, get_plotlyjs


def _density_points(hist: Mapping[str, Any]) -> tuple[list[float], list[float]]:
    """Geometric bin centres and densities of a log-binned ESD histogram's non-empty bins."""
    mids = [math.sqrt(lo * hi) for lo, hi in itertools.pairwise(hist["edges"])]
    keep = [i for i, d in enumerate(hist["density"]) if d > 0]
    return [mids[i] for i in keep], [hist["density"][i] for i in keep]


def html_report(analyses: Sequence[CheckpointAnalysis], title: str) -> str:
    """A self-contained HTML page (plotly.js inlined, no CDN): alpha per layer (plain and FARMS,
    every checkpoint), a warnings table, and per-layer ESD log-log plots with the power-law fit
    and the Marchenko-Pastur bulk of the first checkpoint (with ``--traps``, the shuffled
    weight's ESD too)."""
    go, pio, get_plotlyjs = _plotly()
    figures: list[tuple[str, Any]] = []
    bar = go.Figure()
    for a in analyses:
        tag = Path(a.source).name if len(analyses) > 1 else ""
        layers = [r.layer for r in a.layers]
        for key, label in ((ALPHA, "alpha"), (farms_key(ALPHA), "FARMS alpha")):
            bar.add_trace(
                go.Bar(
                    name=f"{label} {tag}".strip(),
                    x=layers,
                    y=[r.values.get(key) for r in a.layers],
                )
            )
    bar.add_hrect(y0=2, y1=6, fillcolor="green", opacity=0.08, line_width=0)
    bar.update_layout(
        title="Power-law exponent per layer (2-6: well trained)",
        barmode="group",
        yaxis_title="alpha",
        height=450,
    )
    figures.append(("alpha", bar))
    for r in analyses[0].layers:
        if r.report is None:
            continue
        fig = go.Figure()
        for which, evals, metrics in (
            ("ESD", r.report.evals, r.report.plain),
            ("FARMS ESD", r.report.farms_evals, r.report.farms),
        ):
            if evals is None or metrics is None:
                continue
            p = esd_payload(evals, metrics)
            xs, ys = _density_points(p["hist"])
            fig.add_trace(go.Scatter(x=xs, y=ys, mode="markers", name=which))
            fig.add_trace(
                go.Scatter(
                    x=p["fit"]["x"],
                    y=p["fit"]["pdf"],
                    mode="lines",
                    name=f"{which} power law, alpha={p['fit']['alpha']:.2f}",
                )
            )
            if which == "ESD" and "mp" in p:
                fig.add_trace(
                    go.Scatter(
                        x=p["mp"]["x"],
                        y=p["mp"]["pdf"],
                        mode="lines",
                        line={"dash": "dot"},
                        name="Marchenko-Pastur bulk",
                    )
                )
        if r.report.traps is not None and r.report.rand_evals is not None:  # --traps
            xs, ys = _density_points(log_histogram(r.report.rand_evals))
            fig.add_trace(
                go.Scatter(
                    x=xs,
                    y=ys,
                    mode="markers",
                    marker={"symbol": "x"},
                    name=f"shuffled weight's ESD: {r.report.traps.num_traps} correlation trap(s)",
                )
            )
        fig.update_layout(
            title=f"{r.layer} {'x'.join(map(str, r.shape))}"
            + (f" - {r.warning}" if r.warning else ""),
            height=380,
        )
        fig.update_xaxes(type="log", title="eigenvalue of W^T W")
        fig.update_yaxes(type="log", title="density")
        figures.append((r.layer, fig))
    warn_rows = (
        "".join(
            f"<tr><td>{html.escape(Path(a.source).name)}</td><td>{html.escape(r.layer)}</td>"
            f"<td>{_fmt(r.values.get(ALPHA))}</td><td>{html.escape(r.warning or r.note)}</td></tr>"
            for a in analyses
            for r in a.layers
            if r.warning or r.note
        )
        or "<tr><td colspan=4>no warnings</td></tr>"
    )
    body = io.StringIO()
    body.write(
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 8px}</style>"
        f"<script type='text/javascript'>{get_plotlyjs()}</script></head><body>"
        f"<h1>{html.escape(title)}</h1><p>"
        + "<br>".join(
            html.escape(f"{a.source} ({len(a.layers)} layers, device {a.device})") for a in analyses
        )
        + "</p>"
        + "".join(
            f"<p><b>not read</b>: {html.escape(reason)}</p>"
            for a in analyses
            for reason in a.unreadable
        )
        + "<h2>Warnings</h2><table><tr><th>checkpoint</th><th>layer</th><th>alpha</th>"
        f"<th>warning</th></tr>{warn_rows}</table>"
    )
    for i, (_, fig) in enumerate(figures):
        if i == 1:
            body.write("<h2>Eigenvalue spectra</h2>")
        body.write(
            pio.to_html(
                fig,
                include_plotlyjs=False,
                full_html=False,
                div_id=f"fig{i}",
                config=REPORT_CONFIG,
            )
        )
    body.write("</body></html>")
    return body.getvalue()


# --- command -----------------------------------------------------------------------------------
def _write(path: str, text: str) -> None:
    try:
        Path(path).write_text(text, encoding="utf-8")
    except OSError as exc:
        raise AnalyzeError(f"cannot write {path}: {exc}") from exc


def cmd_analyze(args: argparse.Namespace) -> int:
    """``spectrawatch analyze PATH`` / ``spectrawatch analyze --compare A B``: 0 on success,
    1 when some shards of a directory could not be read (the rest is analysed and written, each
    unreadable shard named on stderr), 2 for an input or output that cannot be used, 130 when
    interrupted."""
    _tolerant_stdout()
    try:
        return _cmd_analyze(args)
    except AnalyzeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`| head`): cli.main ends quietly
        raise
    except OSError as exc:  # stdout itself failed (disk full)
        print(f"error: cannot write the output: {exc}", file=sys.stderr)
        return 2


def _tolerant_stdout() -> None:
    """Names outside the terminal's encoding are printed escaped instead of failing."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]


def _check_output(path: str | None, option: str) -> None:
    """Fail before any analysis when an output file cannot be written."""
    if path is None or (path == "-" and option == "-o"):  # -o -: stdout, as without -o
        return
    if path == "-":
        raise AnalyzeError(f"{option} -: stdout is for the --format output (-o -); give a file")
    if not path.strip():
        raise AnalyzeError(f"{option}: empty file name")
    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise AnalyzeError(f"{option} {path}: is a directory")
    if not parent.is_dir():
        raise AnalyzeError(f"{option} {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise AnalyzeError(f"{option} {path}: not writable")


def _csv_text(write: Callable[[Any, TextIO], None], data: Any) -> str:
    buf = io.StringIO()
    write(data, buf)
    return buf.getvalue()


def _emit(args: argparse.Namespace, text: str) -> None:
    """The ``--format`` output: to ``-o FILE`` or stdout (also ``-o -``)."""
    if args.output and args.output != "-":
        _write(args.output, text if text.endswith("\n") else text + "\n")
    else:
        print(text)


def _cmd_analyze(args: argparse.Namespace) -> int:
    if (args.path is None) == (args.compare is None):
        raise AnalyzeError("give either a checkpoint PATH or --compare A B")
    for option in ("output", "csv", "json", "html"):
        _check_output(getattr(args, option), "-o" if option == "output" else f"--{option}")
    inputs = [args.path] if args.path is not None else list(args.compare)
    for path in inputs:  # a missing second checkpoint is reported before the first is analysed
        checkpoint_files(Path(path))
        if passed_over := shadowed_files(Path(path)):
            print(
                f"note: {path}: reading its .safetensors shards; "
                f"{_count(len(passed_over), 'PyTorch file')} beside them not read "
                f"({', '.join(p.name for p in passed_over[:3])}"
                f"{', ...' if len(passed_over) > 3 else ''}), as transformers does",
                file=sys.stderr,
            )
    farms = FARMS_CV if args.farms else None
    opts: dict[str, Any] = {
        "device": args.device,
        "farms": farms,
        "progress": not args.quiet,
        "traps": args.traps,
    }
    if args.layers:
        needle = args.layers
        opts["layers"] = lambda name: needle in name
    render: dict[str, Callable[[], str]]
    if args.compare is not None:
        a = analyze_checkpoint(args.compare[0], **opts)
        b = analyze_checkpoint(args.compare[1], **opts)
        diffs = compare(a, b)
        analyses = [a, b]
        render = {
            "json": lambda: json.dumps(compare_json(a, b, diffs), indent=1),
            "csv": lambda: _csv_text(write_compare_csv, diffs),
            "table": lambda: format_compare(diffs),
            "html": lambda: html_report([a, b], f"spectrawatch compare: {a.source} vs {b.source}"),
        }
        summary = ""
    else:
        analysis = analyze_checkpoint(args.path, **opts)
        analyses = [analysis]
        render = {
            "json": lambda: json.dumps(analysis.to_json(), indent=1),
            "csv": lambda: _csv_text(write_csv, analysis),
            "table": lambda: format_table(analysis),
            "html": lambda: html_report([analysis], f"spectrawatch analyze: {analysis.source}"),
        }
        warned = sum(1 for r in analysis.layers if r.warning)
        failed = sum(1 for r in analysis.layers if r.note.startswith("not analysed"))
        summary = (
            f"\n{_count(len(analysis.layers), 'layer')} analysed on {analysis.device}, "
            f"{warned} with warnings, {_count(analysis.ignored, 'other tensor')} ignored"
            + (f", {failed} not analysed (see their notes)" if failed else "")
            + (
                f", {_count(len(analysis.unreadable), 'file')} not read"
                if analysis.unreadable
                else ""
            )
        )
    if args.format != "table" or args.output or not args.quiet:
        _emit(args, render[args.format]())
    if args.format == "table" and summary and not args.quiet:
        print(summary, file=sys.stderr if args.output else sys.stdout)
    for option in ("csv", "json", "html"):  # the extra files
        if getattr(args, option):
            _write(getattr(args, option), render[option]())
    unread = [reason for a in analyses for reason in a.unreadable]
    for reason in unread:
        print(f"error: not read, skipped: {reason}", file=sys.stderr)
    return 1 if unread else 0
