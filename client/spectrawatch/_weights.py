"""Weight snapshots: every 2-D parameter and 4-D conv kernel of the model as a 2-D matrix, sent
in frames of bounded size and tensor count, each weight in ``weights_dtype`` unless that would
turn its finite entries into Inf. A frozen weight (``requires_grad`` False) is sent in the first
snapshot and again only when it changes (:func:`frozen_state`); the snapshots that leave it out
name it with the step it was last sent (``info["unchanged"]``), so the server's whole-model
values still cover it. Other weights (3-D, 5-D, complex) are not sent: the frames name them with
the reason (``info["skipped"]``), which the server shows on their layer pages."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from spectrawatch import _shards, wire
from spectrawatch._model import output_layer
from spectrawatch._sender import ClientStats, ErrorLog, FrameItem
from spectrawatch.config import ClientSettings

_MAX_TENSORS = wire.FrameLimits().max_tensors  # per frame: the server refuses more (default)
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_DTYPE_NAMES = {torch.float64: "float64", **{v: k for k, v in _DTYPES.items()}}
# bytes of info["unchanged"] per snapshot (~7,000 names of 60 characters): the rest is counted in
# info["unchanged_more"], within the server's 2 MiB of frame info with the part's own entries
UNCHANGED_INFO_BYTES = 512 * 1024


def skip_reason(p: torch.Tensor) -> str | None:
    """Why the >= 2-D weight ``p`` is left out of snapshots, or None to send it.

    The server analyses 2-D matrices and 4-D conv kernels only, as ``spectrawatch analyze`` and
    WeightWatcher do, with the same reason for the others: a 3-D MoE expert stack
    ``(E, d_in, d_out)`` flattened to ``(E, d_in * d_out)`` gave an alpha from ``E`` eigenvalues
    and a spectral norm no expert has; a Conv1d ``(out, in, k)`` or Conv3d kernel likewise. A
    complex weight would lose its imaginary part in a real cast."""
    if p.is_complex():
        return "complex parameter"
    if p.dim() not in (2, 4):
        return f"{p.dim()}-D tensor"
    return None


def frozen_state(p: torch.Tensor) -> tuple[object, ...]:
    """What must stay equal for a frozen weight ``p`` to count as unchanged since it was sent:
    the same tensor object, shape and dtype, and no in-place write (its version counter, which
    ``copy_``, ``load_state_dict`` and optimizer steps bump); on an unsharded weight also the
    same storage (``p.data = ...`` replaces it). A sharded weight leaves its storage address out:
    it is rank-local, and every rank must take the same decision (each joins the gather of what
    is sent). Writes through ``p.data`` go unseen (``weights_frozen_every`` sends every time)."""
    storage = None if _shards.is_sharded(p) else p.data_ptr()
    return id(p), p._version, tuple(p.shape), p.dtype, storage


def _host_weight(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A CPU copy of weight ``w`` in ``dtype``, or in float32 (float64 for a float64 weight)
    where that cast would turn finite entries into Inf: a float16 copy of a weight beyond
    +-65504 reached the server as Inf, with a ``nonfinite`` alert and no norms. Entries that
    are NaN/Inf already stay so in either dtype, for the server to alert on. The check is one
    ``aminmax`` of ``w`` where ``dtype`` is narrower (~0.6 ms per million parameters on a CPU,
    at snapshot steps only); a weight with NaN/Inf entries is looked at entry by entry."""
    if not w.is_floating_point() or torch.finfo(dtype).max >= torch.finfo(w.dtype).max:
        return w.to(device="cpu", dtype=dtype, copy=True)
    limit = torch.finfo(dtype).max
    low, high = (float(x) for x in torch.aminmax(w))
    wide = torch.float64 if w.dtype == torch.float64 else torch.float32
    if -limit <= low and high <= limit:  # False for NaN
        overflow = False
    elif math.isfinite(low) and math.isfinite(high):
        overflow = True  # (an entry just past the limit may round to it: sent wide all the same)
    else:
        size = w.abs()
        overflow = bool(torch.logical_and(size > limit, size != math.inf).any())
    return w.to(device="cpu", dtype=wide if overflow else dtype, copy=True)


class WeightSnapshots:
    """Takes the weight snapshots of one model (at most one per step) and emits them."""

    def __init__(
        self,
        model: nn.Module,
        settings: ClientSettings,
        emit_frame: Callable[[FrameItem], None],
        errors: ErrorLog,
        stats: ClientStats,
        *,
        emits: bool,
    ) -> None:
        self.model = model
        self.s = settings
        self.emit_frame = emit_frame
        self.errors = errors
        self.stats = stats
        self.emits = emits  # False: a non-zero rank, which joins the gathers and sends nothing
        self._last_weights_step: int | None = None
        self._frozen_sent: dict[str, tuple[object, ...]] = {}  # by name: frozen_state when sent
        self._frozen_step: dict[str, int] = {}  # by name: the step a frozen weight was sent at
        self._lost_seen = 0  # weights frames dropped or refused at the last snapshot
        self._resend = False  # this snapshot: frozen (unsharded) weights go again

    @torch.no_grad()
    def capture_weights(self, n: int) -> None:
        """All 2-D and 4-D parameters as 2-D matrices (conv ``(out, in*kh*kw)``), split into
        frames of at most ``max_frame_bytes`` (a larger matrix travels alone in its frame) and of
        at most the server's default tensor count; the first frame names the weights left out
        (:func:`skip_reason`) and the frozen weights left out as unchanged since they were sent
        (:func:`unchanged_info`)."""
        if self._last_weights_step == n:
            return
        self._last_weights_step = n
        # a weights frame lost since (queue or spool full, refused) may have held a frozen
        # weight's only copy: they all go again
        lost = self.stats.weights_lost()
        self._resend, self._lost_seen = lost != self._lost_seen, lost
        dtype = _DTYPES[self.s.weights_dtype]
        part: dict[str, torch.Tensor] = {}
        shapes: dict[str, dict[str, list[int]]] = {}
        widened: dict[str, str] = {}  # sent wider than weights_dtype, by name
        size = 0
        parts = 0
        head = self.s.output_layer or output_layer(self.model)
        skipped = self._skipped()
        unchanged: dict[str, int] = {}  # frozen weights left out: the step each was last sent

        def emit() -> None:
            nonlocal part, shapes, size, parts
            if part:
                info: dict[str, Any] = {
                    "dtype": self.s.weights_dtype,
                    "layers": shapes,
                    "part": parts,
                    "shapes": {k: v["orig_shape"] for k, v in shapes.items()},
                    "traps": self.s.weights_traps,
                }
                if head in part:
                    info["output_layer"] = head
                if skipped and parts == 0:
                    info["skipped"] = skipped
                if unchanged and parts == 0:
                    info.update(self._unchanged_info(unchanged))
                wider = {k: v for k, v in widened.items() if k in part}
                if wider:
                    info["widened"] = wider
                self.emit_frame(FrameItem(wire.FrameKind.WEIGHTS, n, part, info, compress=True))
                parts += 1
            part, shapes, size = {}, {}, 0

        def add(name: str, p: torch.Tensor, full: torch.Tensor) -> None:
            nonlocal size
            w = _host_weight(full.reshape(p.shape[0], -1), dtype)
            if w.dtype != dtype:
                widened[name] = _DTYPE_NAMES[w.dtype]
                self.stats.incr("weights_widened")
                self.errors.note(
                    f"weights dtype {name}",
                    f"weights {name} sent as {_DTYPE_NAMES[w.dtype]}: finite entries beyond "
                    f"{self.s.weights_dtype}'s range would arrive as Inf (weights_dtype)",
                )
            nbytes = w.numel() * w.element_size()
            if part and (size + nbytes > self.s.max_frame_bytes or len(part) >= _MAX_TENSORS):
                emit()
            part[name] = w
            shapes[name] = {"orig_shape": list(p.shape)}
            size += nbytes

        # which frozen weights stay out, decided before any frame leaves: the first frame names
        # them all (a frame filled before the walk reached one named none of the later ones)
        sending = []
        for name, p in self.model.named_parameters():
            if not _snapshotted(p) or name in skipped:
                continue
            if self._sent_as_is(name, p, n):
                unchanged[name] = self._frozen_step[name]
            else:
                sending.append((name, p))
        failed: Exception | None = None
        for name, p in sending:
            full = _shards.full_tensor(p.detach())  # sharded: every rank joins the gather
            if not self.emits or failed is not None:
                continue  # after a failure of this rank's own work: still join the gathers
            try:
                add(name, p, full)
            except Exception as exc:
                failed = exc
        if failed is not None:
            raise failed
        emit()

    def _sent_as_is(self, name: str, p: torch.Tensor, n: int) -> bool:
        """Whether ``p`` is a frozen weight sent already and unchanged since (then it is left
        out: its metrics would repeat); remembers it, sent at step ``n``, otherwise. Not for
        trainable weights, nor with ``weights_frozen_every``. A weight frozen later goes once
        more, as it is then; every unsharded one again after a weights frame was lost (a sharded
        one's choice must not depend on rank 0's sender: every rank joins its gather)."""
        if p.requires_grad or self.s.weights_frozen_every:
            self._frozen_sent.pop(name, None)
            self._frozen_step.pop(name, None)
            return False
        state = frozen_state(p)
        resend = self._resend and not _shards.is_sharded(p)
        if self._frozen_sent.get(name) == state and not resend:
            return True
        self._frozen_sent[name] = state
        self._frozen_step[name] = n
        return False

    def _unchanged_info(self, unchanged: Mapping[str, int]) -> dict[str, Any]:
        """:func:`unchanged_info`, noting once when names did not fit."""
        info = unchanged_info(unchanged)
        if "unchanged_more" in info:
            self.errors.note(
                "weights unchanged more",
                f"{info['unchanged_more']} of {len(unchanged)} unchanged frozen weights not "
                "named in weight snapshots (over the info budget): the server's whole-model "
                "values leave them out (weights_frozen_every=True sends them instead)",
            )
        return info

    def _skipped(self) -> dict[str, dict[str, Any]]:
        """``{name: {"shape", "reason"}}`` of the weights a snapshot leaves out (logged once)."""
        skipped: dict[str, dict[str, Any]] = {}
        for name, p in self.model.named_parameters():
            reason = skip_reason(p) if _snapshotted(p) else None
            if reason is not None:
                skipped[name] = {"shape": list(p.shape), "reason": reason}
        if skipped:
            listed = [f"{k} ({v['reason']})" for k, v in skipped.items()]
            more = f" and {len(listed) - 5} more" if len(listed) > 5 else ""
            self.errors.note(
                "weights skipped",
                f"weights not in snapshots: {', '.join(listed[:5])}{more}; only real 2-D "
                "matrices and 4-D conv kernels are analysed (their layer pages say why)",
            )
        return skipped


def unchanged_info(
    unchanged: Mapping[str, int], budget: int = UNCHANGED_INFO_BYTES
) -> dict[str, Any]:
    """Frame info naming the frozen weights a snapshot leaves out as unchanged:
    ``{"unchanged": {name: step last sent}}``, whose server summary carries their values of that
    step forward; names past ``budget`` bytes of JSON are only counted (``"unchanged_more"``)."""
    named: dict[str, int] = {}
    size = 2  # {}
    for name, step in unchanged.items():
        size += len(json.dumps(name)) + len(str(step)) + 2  # "name": step,
        if size > budget:
            break
        named[name] = step
    info: dict[str, Any] = {"unchanged": named}
    if len(named) < len(unchanged):
        info["unchanged_more"] = len(unchanged) - len(named)
    return info


def _snapshotted(p: torch.Tensor) -> bool:
    """Whether ``p`` is a weight that snapshots consider (>= 2-D, not empty, not lazy: a lazy
    parameter has no shape before the first forward)."""
    return not is_lazy(p) and p.dim() >= 2 and p.numel() > 0
