"""Client settings: one frozen object per run, from keyword arguments over ``SPECTRAWATCH_*`` env.

Every field can be set by the environment variable ``SPECTRAWATCH_<FIELD>`` (upper case), e.g.
``SPECTRAWATCH_URL``, ``SPECTRAWATCH_PROJECT``, ``SPECTRAWATCH_RUN``, ``SPECTRAWATCH_TOKEN``,
``SPECTRAWATCH_SPOOL_DIR``, ``SPECTRAWATCH_UPDATE_EVERY``; explicit arguments win over the env.
Nothing is read at import time: :meth:`ClientSettings.from_env` runs when a monitor starts.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from spectrawatch.wire import NAME_MAX, NAME_PATTERN

ENV_PREFIX = "SPECTRAWATCH_"
DEFAULT_URL = "http://127.0.0.1:8765"
API_PATH = "/api/v1"  # the API's path under the server root URL

WeightsDtype = Literal["float32", "float16", "bfloat16"]
ResumeMode = Literal["allow", "never", "must"]
RESUME_MODES = ("allow", "never", "must")


class SettingsError(ValueError):
    """A setting with an invalid value; the message names the field (or env variable)."""


def _default_spool_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "spectrawatch" / "spool")


@dataclass(frozen=True)
class ClientSettings:
    """What the client sends, how often, and how it behaves when the server is away.

    Cadences count optimizer steps; 0 turns a capture off. Sizes are bytes.
    """

    url: str = DEFAULT_URL
    project: str = "default"
    run: str | None = None  # None: generated, ``run-YYYYmmdd-HHMMSS-<pid>-<rand>``
    # an existing run of this name: "allow" joins it, "never" creates NAME-2 (NAME-3, ...)
    # instead, "must" expects it (none: a new run all the same, logged as an error)
    resume: ResumeMode = "allow"
    quiet: bool = False  # no "view run at URL" line on stderr when the run is reached
    token: str | None = field(default=None, repr=False)  # a secret: not in reprs, tracebacks
    # offline: everything goes to the spool, nothing to the network; `spectrawatch sync` uploads
    mode: Literal["online", "offline", "disabled"] = "online"

    # update sketches (DESIGN §3): d = sketch_dim or 20 * window
    window: int = 32
    sketch_dim: int | None = None
    sketch_seed: int = 0
    update_every: int = 1  # per-step update sketch every N optimizer steps
    # > 0: the client stretches update_every (never below the setting) so that the sketches
    # cost at most this fraction of the loop's step time, as measured (see _cadence)
    overhead_budget: float = 0.0
    frame_steps: int = 16  # rows (steps) batched into one update_sketch frame
    theta_every: int = 100  # param_sketch (sketch of theta, float64) every N steps: interval mode
    theta_frame_steps: int = 1  # rows batched into one param_sketch frame
    exact: bool = False  # send full per-layer updates instead of sketches (small models only)
    sketch_cache: bool = True  # cache the folded hash index (2 bytes / parameter, on its device)
    # CUDA: sketch on a side stream that overlaps the next step (off: on the training stream)
    sketch_stream: bool = True
    # CUDA (Triton sketch): the sketch's launches replayed from a CUDA graph (off: launched
    # one by one every step); graphs read parameters in place, at the addresses of the capture
    sketch_graph: bool = True
    # models up to this many parameters get their index built inside attach() (~30 ms per
    # million on a CPU core); larger ones on a background thread, sketches skipped until ready
    index_inline_max: int = 1 << 20

    weights_every: int = 500
    weights_at_finish: bool = True
    # a weight beyond float16/bfloat16's range goes in float32 (never as Inf; weights_widened)
    weights_dtype: WeightsDtype = "float32"
    # the server computes correlation traps on the snapshots (one more eigendecomposition per
    # layer; off for very large models whose weight frames take the worker long)
    weights_traps: bool = True
    # frozen weights (requires_grad False) go in the first snapshot and again only when they
    # change (replaced or written in place); True: in every snapshot
    weights_frozen_every: bool = False
    activations_every: int = 250
    max_activation_hidden: int = 4096  # default probe modules: Linear/Conv with <= this width
    defect_every: int = 100
    defect_samples: int = 5  # K pairs of batches per measurement (median reported)
    defect_eta: float = 1e-3
    # the weight that maps features to the model's outputs, named in weight frames for the
    # grokking detector's output-rank evidence; None: found (see _model.output_layer)
    output_layer: str | None = None

    # sender / spool
    queue_max_frames: int = 512
    queue_max_bytes: int = 1 << 30
    max_frame_bytes: int = 32 << 20  # weights snapshots are split into frames of at most this
    compress: bool = True  # zstd for weights and activations frames
    timeout_s: float = 10.0  # per connect/read/write
    # one request as a whole (plus 1 s per 100 kB of body): a reply that trickles in is abandoned
    request_deadline_s: float = 30.0
    retries: int = 2  # per request, before the item goes to the spool
    backoff_s: float = 0.25
    backoff_max_s: float = 30.0
    spool_dir: str = field(default_factory=_default_spool_dir)
    spool_max_bytes: int = 2 << 30
    flush_timeout_s: float = 30.0
    # SIGTERM with its default action (no handler of a framework, launcher or the user): close
    # the live runs as crashed (5 s at most for the server, then the spool), then die of it
    handle_sigterm: bool = True
    stats_every_s: float = 10.0
    # system metrics (process CPU and memory, CUDA memory, NVML utilisation/temperature/power)
    # sampled on a thread of their own every this many seconds, W&B's default (0: none)
    system_every_s: float = 10.0
    rank0_only: bool = True
    # attach() without start_step waits up to this long for the server's answer to "create or
    # resume run": a resumed run's steps then continue after its last step (0: never wait)
    resume_wait_s: float = 3.0

    @property
    def dim(self) -> int:
        """Sketch dimension d (DESIGN §3: 20 * W unless set)."""
        return self.sketch_dim if self.sketch_dim is not None else 20 * self.window

    def __post_init__(self) -> None:
        for name in (
            "update_every",
            "theta_every",
            "weights_every",
            "activations_every",
            "defect_every",
            "index_inline_max",
        ):
            if getattr(self, name) < 0:
                raise SettingsError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in (
            "window",
            "frame_steps",
            "theta_frame_steps",
            "queue_max_frames",
            "defect_samples",
        ):
            if getattr(self, name) < 1:
                raise SettingsError(f"{name} must be >= 1, got {getattr(self, name)}")
        problem = url_problem(self.url)
        if problem is not None:
            raise SettingsError(f"url {self.url!r:.200}: {problem}")
        for name in ("project", "run"):
            value = getattr(self, name)
            if value is not None and not _valid_name(value):
                raise SettingsError(
                    f"{name} name {value!r} is not accepted by the server: 1-200 characters, "
                    "not blank, no '/' and no control characters"
                )
        for name in ("timeout_s", "request_deadline_s", "flush_timeout_s"):
            if not getattr(self, name) > 0:
                raise SettingsError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.overhead_budget < 1:  # also refuses NaN
            raise SettingsError(
                "overhead_budget must be in [0, 1) (a fraction, 0 = off), "
                f"got {self.overhead_budget}"
            )
        if not 0 <= self.system_every_s < math.inf:  # also refuses NaN
            raise SettingsError(
                f"system_every_s must be >= 0 and finite (0 = off), got {self.system_every_s}"
            )
        if not 0 <= self.resume_wait_s <= 600:
            raise SettingsError(f"resume_wait_s must be in [0, 600], got {self.resume_wait_s}")
        if self.dim < 1:
            raise SettingsError(f"sketch_dim must be >= 1, got {self.sketch_dim}")
        if self.mode not in ("online", "offline", "disabled"):
            raise SettingsError(
                f"mode must be 'online', 'offline' or 'disabled', got {self.mode!r}"
            )
        if self.resume not in RESUME_MODES:
            raise SettingsError(f"resume must be 'allow', 'never' or 'must', got {self.resume!r}")
        if self.weights_dtype not in ("float32", "float16", "bfloat16"):
            raise SettingsError(
                f"weights_dtype must be float32|float16|bfloat16, got {self.weights_dtype!r}"
            )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> ClientSettings:
        """Settings from ``SPECTRAWATCH_*`` env, then ``overrides`` (``None`` values ignored)."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is not None and raw != "":
                values[f.name] = _parse(f.name, raw, cls._field_type(f))
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise SettingsError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        from_env = set(values)
        values.update({k: v for k, v in overrides.items() if v is not None})
        from_env -= {k for k, v in overrides.items() if v is not None}
        try:
            return cls(**values)
        except SettingsError as exc:  # "resume must be ...": name the variable it came from
            name = str(exc).split(" ", 1)[0]
            if name in from_env:
                raise SettingsError(f"{ENV_PREFIX}{name.upper()}: {exc}") from None
            raise

    def replace(self, **changes: Any) -> ClientSettings:
        return dataclasses.replace(self, **changes)

    @staticmethod
    def _field_type(f: dataclasses.Field[Any]) -> str:
        return str(f.type)


def url_problem(url: str) -> str | None:
    """Why ``url`` cannot be a server root URL (httpx refuses to parse it, it is not http(s)
    with a host, or it names the API's path: refused, not cut off, as any other wrong URL: a
    URL rewritten behind the user's back is one the logs, the spool and ``doctor`` disagree
    on), or None. Checked up front: httpx raises its ``InvalidURL`` only when a client is built
    or a request made, where a command would print a traceback."""
    import httpx

    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as exc:
        return f"not a valid URL ({exc})"
    if parsed.scheme not in ("http", "https") or not parsed.host:
        return "must be http:// or https:// with a host, e.g. " + DEFAULT_URL
    api = re.search(re.escape(API_PATH) + "(?=/|$)", parsed.path)
    if api is not None:
        root = parsed.copy_with(path=parsed.path[: api.start()] or "/", query=None, fragment=None)
        return (
            f"the server root is wanted, without {API_PATH} (the client adds it): "
            f"use {str(root).rstrip('/')}"
        )
    return None


def _valid_name(name: str) -> bool:
    """The server's rule for every project and run name (``schemas.StoredName``). ``.`` and
    ``..`` pass: the server resumes a run or project stored under them before new ones were
    refused, and answers a 422 for a new one (recorded in the client's errors, training
    unaffected); only it knows which they are."""
    return (
        isinstance(name, str)
        and len(name) <= NAME_MAX
        and re.fullmatch(NAME_PATTERN, name) is not None
    )


def _parse(name: str, raw: str, type_name: str) -> Any:
    var = ENV_PREFIX + name.upper()
    try:
        if type_name.startswith("bool"):
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if type_name.startswith("int"):
            return int(raw)
        if type_name.startswith("float"):
            return float(raw)
    except ValueError:
        raise SettingsError(f"{var}={raw!r} is not a valid {type_name.split(' ')[0]}") from None
    return raw
