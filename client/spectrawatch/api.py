"""Read results back in Python: runs, metric and scalar series, alerts, spectra.

The notebook side of the HTTP API (like ``wandb.Api`` or ``mlflow.search_runs``)::

    from spectrawatch import Api
    api = Api()                                   # SPECTRAWATCH_URL / SPECTRAWATCH_TOKEN, or args
    run = api.run("p97-wd1", project="grok")      # or api.run(42)
    alpha = run.metric("htsr.alpha")              # {layer: Series(steps, values)}, full resolution
    df = run.history(["htsr.alpha", "sed.gap_ratio.w32"], layer="__model__")  # pandas, if present

Values the server stored as NaN/Inf come back as ``nan``. Every call is one or a few HTTP
requests; errors raise :class:`ApiError` with the server's message, also a reply larger than
1 GiB (a run's every point fits several times over), which is not read further.
"""

from __future__ import annotations

import difflib
import importlib
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from spectrawatch._paging import read_pages
from spectrawatch._reply import ACCEPT_ENCODING, REPLY_MAX, ReplyError, read_reply
from spectrawatch._transport import error_of
from spectrawatch.config import API_PATH, DEFAULT_URL, SettingsError, url_problem
from spectrawatch.spectral.keys import is_stored_key, stored_keys
from spectrawatch.wire import MODEL_LAYER as MODEL_LAYER  # the layer of whole-model series

_PAGE = 1000
_MAX_POINTS = 100_000  # the most points per series the server returns at once
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})  # repeating one changes nothing
# a connection closed or reset under a request (not: refused, timed out)
_BROKEN_CONNECTION = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)


class ApiError(Exception):
    """A request the server refused or could not be reached for (``status`` None then), or a
    run, metric or scalar asked for that is not there (``status`` None)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Series:
    """One series: ``steps`` ascending and their ``values`` (``nan`` where NaN/Inf was stored)."""

    steps: list[int]
    values: list[float]


class Api:
    """A connection to a spectrawatch server (``url``/``token`` default to the environment).

    A ``url`` that cannot be the server root (not http(s), or ending in ``/api/v1``) raises
    :class:`~spectrawatch.config.SettingsError` here, as ``monitor.init`` and ``--url`` do."""

    def __init__(
        self, url: str | None = None, token: str | None = None, timeout_s: float = 30.0
    ) -> None:
        self.url = (url or os.environ.get("SPECTRAWATCH_URL") or DEFAULT_URL).rstrip("/")
        problem = url_problem(self.url)
        if problem is not None:
            raise SettingsError(f"url {self.url!r:.200}: {problem}")
        token = token or os.environ.get("SPECTRAWATCH_TOKEN")
        headers = {"Accept-Encoding": ACCEPT_ENCODING}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(base_url=self.url + API_PATH, headers=headers, timeout=timeout_s)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Api:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def get(self, path: str, **params: Any) -> Any:
        """``GET /api/v1{path}`` with query ``params`` (None values left out): the JSON body."""
        return self._call("GET", path, params={k: v for k, v in params.items() if v is not None})

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        resp = self._send(method, path, **kwargs)
        return resp.json() if resp.content else None

    def _send(self, method: str, path: str | httpx.URL, **kwargs: Any) -> httpx.Response:
        """One request; a safe one (a read) whose connection broke is sent once more, on a new
        connection: a kept-alive connection the server closed (as it does after some errors)
        while the client reused it fails before any reply, with the server up."""
        try:
            try:
                resp = self._read(method, path, **kwargs)
            except _BROKEN_CONNECTION:
                if method not in _SAFE_METHODS:  # it may have run: repeating it is not safe
                    raise
                resp = self._read(method, path, **kwargs)  # the broken one is discarded
        except ReplyError as exc:
            raise ApiError(f"{method} {path}: {exc}") from exc
        except httpx.HTTPError as exc:
            raise ApiError(f"cannot reach {self.url}: {exc}") from exc
        if resp.status_code >= 400:
            _, message = error_of(resp)
            raise ApiError(f"{method} {path}: HTTP {resp.status_code}: {message}", resp.status_code)
        return resp

    def _read(self, method: str, path: str | httpx.URL, **kwargs: Any) -> httpx.Response:
        request = self._http.build_request(method, path, **kwargs)
        return read_reply(self._http, request, REPLY_MAX)

    def whoami(self) -> dict[str, Any]:
        """``GET /token``: this client's token's ``project`` (None: every project), ``role``
        (``read``/``write``/``admin``) and ``token`` (``id``, ``name``, ``prefix``,
        ``created_at``); without a token on a server that does not require auth,
        ``anonymous`` true and role ``admin``."""
        out: dict[str, Any] = self.get("/token")
        return out

    def projects(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = self.get("/projects")
        return out

    def runs(
        self,
        project: str | None = None,
        status: str | Sequence[str] | None = None,
        tags: str | Sequence[str] | None = None,
    ) -> list[Run]:
        """Every run (of ``project``; with ``status``, or one of several, a list or
        comma-separated: ``running``, ``finished``, ``crashed``; having every one of ``tags``),
        newest first. The server filters (one without these filters lists every run: filtered
        here)."""
        statuses = [s.strip() for word in _words(status) for s in word.split(",") if s.strip()]
        wanted = _words(tags)
        listed = self._every("/runs", project=project, status=statuses or None, tag=wanted or None)
        return [
            Run(self, r)
            for r in listed
            if (not statuses or r["status"] in statuses) and set(wanted) <= set(r.get("tags") or [])
        ]

    def _every(self, path: str, **params: Any) -> list[Any]:
        """Every item of a paged list endpoint, read ``_PAGE`` at a time (one request returns
        at most the server's page size): by the response's ``Link: <...>; rel="next"`` where
        it sends one, else by ``offset`` with an item read twice kept once
        (:func:`~spectrawatch._paging.read_pages`)."""
        query = {k: v for k, v in params.items() if v is not None}
        return read_pages(lambda target, q: self._send("GET", target, params=q), path, query, _PAGE)

    def run(self, run: int | str, project: str | None = None) -> Run:
        """A run by id (an int, or a string of digits without ``project``), or by name
        (``project`` needed when the name is in several projects; with ``project``, a string is
        always a name, as in ``spectrawatch runs delete RUN --project P``)."""
        if isinstance(run, int) or (project is None and run.isdigit()):
            return Run(self, self.get(f"/runs/{int(run)}"))
        # by the server's name filter; a server without one lists every run: filtered here
        listed = self._every("/runs", project=project, name=run)
        matches = [Run(self, r) for r in listed if r["name"] == run]
        if len(matches) != 1:
            where = f" in project {project!r}" if project else ""
            many = f"{len(matches)} runs are" if matches else "no run is"
            raise ApiError(f"{many} named {run!r}{where}" + (": pass project=" if matches else ""))
        return matches[0]


class Run:
    """One run: its record (``id``, ``name``, ``project``, ``status``, ``config``, ``summary``,
    ``tags``, ``last_step``; all of it in ``info``) and its series."""

    def __init__(self, api: Api, info: dict[str, Any]) -> None:
        self.api = api
        self.info = info
        self.id: int = info["id"]
        self.name: str = info["name"]
        self.project: str = info["project"]
        self.status: str = info["status"]
        self.config: dict[str, Any] = info.get("config") or {}
        self.summary: dict[str, Any] = info.get("summary") or {}
        self.tags: list[str] = info.get("tags") or []
        self.last_step: int | None = info.get("last_step")
        self._names: dict[str, list[str]] = {}  # "metric"/"scalar": the run's names, as last read

    def __repr__(self) -> str:
        return f"<Run {self.id} {self.project}/{self.name} ({self.status})>"

    def metric_keys(self) -> list[tuple[str, str]]:
        """``(metric name, layer)`` of every stored series."""
        return [(m["name"], m["layer"]) for m in self.api.get(f"/runs/{self.id}/metrics/catalog")]

    def metric(
        self, name: str, layer: str | None = None, max_points: int | None = None
    ) -> dict[str, Series]:
        """Series of metric ``name`` by layer (all points unless ``max_points``: LTTB).

        Without ``layer`` the server bounds each layer's series (1,000 points unless told
        otherwise); all points are asked for, and a layer still cut short is read again alone.

        Empty for a key the worker stores that the run has no rows of yet (early in a run), or
        none at ``layer``; a ``name`` that is neither such a key nor one of the run's metrics
        (a typo) raises :class:`ApiError` naming the closest keys."""
        path = f"/runs/{self.id}/metrics"
        out: dict[str, Series] = {}
        if max_points is not None or layer is not None:
            body = self.api.get(path, name=name, layer=layer, max_points=max_points)
            out = {s["layer"]: _series(s) for s in body["series"]}
        else:
            for s in self.api.get(path, name=name, max_points=_MAX_POINTS)["series"]:
                if s.get("downsampled"):
                    (s,) = self.api.get(path, name=name, layer=s["layer"])["series"]
                out[s["layer"]] = _series(s)
        if not out and not is_stored_key(name):
            self._check_name("metric", name)
        return out

    def scalars(self, name: str | None = None) -> dict[str, Series]:
        """Logged scalars (``monitor.log``) by name; a ``name`` the run never logged raises
        :class:`ApiError` naming the closest it did (it may still log it later)."""
        out = self._read_scalars(name)
        if name is not None and not out:
            self._check_name("scalar", name)
        return out

    def _read_scalars(self, name: str | None) -> dict[str, Series]:
        body = self.api.get(f"/runs/{self.id}/scalars", name=name)
        return {s["name"]: _series(s) for s in body}

    def _check_name(self, kind: str, name: str) -> None:
        """Raise :class:`ApiError` when the run has no ``kind`` (metric or scalar) ``name``
        (whose read came back empty): the run's names are read only then, and again only when
        ``name`` is not among those read before (the run may have stored it since)."""
        if name in self._names.get(kind, ()):
            return
        names = self._names[kind] = self._read_names(kind)
        if name not in names:
            known = [*names, *stored_keys()] if kind == "metric" else names
            raise ApiError(f"run {self.id}: {_unknown(kind, name, known)}")

    def _read_names(self, kind: str) -> list[str]:
        """The run's metric (by its catalog) or scalar names (by a read of all their points,
        thinned: no endpoint lists them alone)."""
        if kind == "metric":
            return list(dict.fromkeys(name for name, _ in self.metric_keys()))
        return [s["name"] for s in self.api.get(f"/runs/{self.id}/scalars", max_points=3)]

    def alerts(self, status: str | None = None) -> list[dict[str, Any]]:
        """Every alert episode of the run (``status``: open or resolved), newest first."""
        return self.api._every(f"/runs/{self.id}/alerts", status=status)

    def sed_lag(
        self, scalar: str = "val_loss", layer: str = MODEL_LAYER, max_lag: int = 10
    ) -> list[dict[str, Any]]:
        """SED lag analysis: per gap-ratio series, r(gap_t, ``scalar``_{t+lag}) for each lag and
        the strongest (``best``: ``lag`` > 0 means the gap leads, by ``steps``)."""
        body = self.api.get(f"/runs/{self.id}/sed/lag", scalar=scalar, layer=layer, max_lag=max_lag)
        out: list[dict[str, Any]] = body["series"]
        return out

    def spectra(
        self, layer: str | None = None, analysis: str | None = None
    ) -> list[dict[str, Any]]:
        """Stored spectra (ESD histograms and fits, per layer and frame) for drill-down plots,
        by step then layer: every one, read a page of 1,000 at a time (the server returns 100
        a request unless told more)."""
        return self.api._every(f"/runs/{self.id}/spectra", layer=layer, analysis=analysis)

    def history(
        self,
        names: str | Sequence[str],
        layer: str = MODEL_LAYER,
        scalars: str | Iterable[str] = (),
    ) -> Any:
        """A ``pandas.DataFrame`` indexed by step: one column per metric (at ``layer``) and per
        scalar, NaN where a series has no point at a step. Needs pandas.

        ``names`` are metric keys as :meth:`metric_keys` lists them; an SED key ends in its
        window, ``.w<W>`` (``sed.gap_ratio.w32``: one series per window the client computed).
        A key the run has no series of at ``layer``, or a scalar it never logged, raises
        :class:`ApiError` naming it and the closest keys it has (it was left out silently)."""
        try:
            pd = importlib.import_module("pandas")  # optional, untyped
        except ImportError as exc:
            raise ImportError("Run.history needs pandas: pip install pandas") from exc
        names = _words(names)  # one key as a string: not its letters
        scalars = [scalars] if isinstance(scalars, str) else list(scalars)
        problems = _missing_metrics(names, layer, self.metric_keys())
        found = {name: self._read_scalars(name).get(name) for name in dict.fromkeys(scalars)}
        missing = [name for name, series in found.items() if series is None]
        if missing:  # only then every scalar's name (a read of all their points, thinned)
            logged = self._names["scalar"] = self._read_names("scalar")
            problems += [_unknown("scalar", name, logged) for name in missing]
        if problems:
            raise ApiError(f"Run.history of run {self.id}: " + "; ".join(problems))
        columns: dict[str, Any] = {}
        for name in names:
            series = self.metric(name, layer=layer)[layer]
            columns[name] = pd.Series(series.values, index=series.steps, dtype=float)
        for name, scalar in found.items():
            assert scalar is not None
            columns[name] = pd.Series(scalar.values, index=scalar.steps, dtype=float)
        frame = pd.DataFrame(columns)
        frame.index.name = "step"
        return frame.sort_index()

    def delete(self) -> dict[str, Any]:
        """Delete the run and everything stored for it (see ``spectrawatch runs delete``)."""
        out: dict[str, Any] = self.api._call("DELETE", f"/runs/{self.id}")
        return out


def _missing_metrics(
    names: Sequence[str], layer: str, keys: Sequence[tuple[str, str]]
) -> list[str]:
    """What is wrong with each of ``names`` that has no series at ``layer`` among ``keys``
    (``(metric, layer)`` pairs): unknown (with the closest known keys), or at other layers."""
    layers: dict[str, list[str]] = {}
    for name, at in keys:
        layers.setdefault(name, []).append(at)
    problems = []
    for name in names:
        if name not in layers:
            problems.append(_unknown("metric", name, list(layers)))
        elif layer not in layers[name]:
            shown = ", ".join(layers[name][:5]) + (", ..." if len(layers[name]) > 5 else "")
            problems.append(f"metric {name!r} has no series at layer {layer!r} (it has: {shown})")
    return problems


def _unknown(kind: str, name: str, known: Sequence[str]) -> str:
    """``kind`` ``name`` is unknown, and the closest of ``known``: its SED windows
    (``name.w<W>``) first, then those ``difflib`` finds alike."""
    windows = sorted(k for k in known if k.startswith(f"{name}.w"))
    close = [*windows, *difflib.get_close_matches(name, known, n=3, cutoff=0.6)]
    hint = ", ".join(repr(k) for k in dict.fromkeys(close)) or "none alike"
    suffix = " (SED keys end in their window: .w<W>)" if windows else ""
    return f"no {kind} {name!r}; closest: {hint}{suffix}"


def _words(value: str | Sequence[str] | None) -> list[str]:
    """A filter given as one word or several, as a list (empty: no filter)."""
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _series(body: dict[str, Any]) -> Series:
    values = [math.nan if v is None else float(v) for v in body["values"]]
    return Series([int(s) for s in body["steps"]], values)
