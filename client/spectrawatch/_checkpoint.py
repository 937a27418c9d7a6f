"""Reading checkpoints for ``spectrawatch analyze``: files, shard indexes, state dicts.

A ``.safetensors`` file, a directory of shards, a PyTorch state-dict file (only ever through
``torch.load(weights_only=True)``: arbitrary pickles are refused, never executed) or a Hugging
Face model directory, as :class:`TensorRef` s whose data is read one tensor at a time.
"""

from __future__ import annotations

import functools
import json
import pickle
import re
import warnings
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

SAFETENSORS_SUFFIX = ".safetensors"
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
# Shard indexes written by transformers' save_pretrained: weight name -> shard file.
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_INDEX = "pytorch_model.bin.index.json"
# Keys under which training frameworks nest the state dict inside a checkpoint dictionary.
NESTED_STATE_KEYS = ("state_dict", "model_state_dict", "model", "module")


class AnalyzeError(Exception):
    """A checkpoint that cannot be read or analysed; the message says why and what to do."""


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
    ``state_dict`` / ``model`` ... (Lightning and common training-loop checkpoints), also
    beside top-level tensors that are no weights (``rng_state``, ``step``)."""
    if isinstance(obj, torch.nn.Module):  # pragma: no cover - weights_only never yields one
        obj = obj.state_dict()
    if isinstance(obj, Mapping):
        tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        inner = next((obj[k] for k in NESTED_STATE_KEYS if isinstance(obj.get(k), Mapping)), None)
        # a training checkpoint's own tensors (an RNG state, a step) are no state dict
        weights = any(t.is_floating_point() and t.dim() >= 2 for t in tensors.values())
        if tensors and (inner is None or weights):
            return tensors
        if inner is not None:
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


def _count(n: int, noun: str) -> str:
    """``"1 layer"``, ``"2 layers"``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"
