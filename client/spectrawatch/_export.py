"""``spectrawatch export RUN`` and ``spectrawatch import DIR``: move a run between servers.

An export is a directory: ``run.json`` (project, name, status, config, tags, summary, counts),
``scalars.csv`` (``step,name,value``) and ``metrics.csv`` (``step,layer,name,value``), or the
same tables as ``.parquet`` (``--format parquet``, needs pandas + pyarrow). Values that were
NaN/Inf on the server (stored as null) are written empty / as NaN. Everything is read over the
HTTP API at full resolution (no downsampling).

Import works over the HTTP API alone: it creates the run on the target server (refusing a run
name that already exists there), posts the scalars, posts the metrics to
``POST /runs/{id}/metrics`` in batches (each with an idempotency key, so a retried batch is
stored once; the server keeps them under a frame of kind ``import`` that is never re-analysed),
and sets status, tags and summary. ``--skip-metrics`` imports the run and its scalars only.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import math
import os
import sys
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from spectrawatch._cli_alerts import CliError, _call, server_args
from spectrawatch._version import __version__
from spectrawatch.config import DEFAULT_URL

FORMAT_NAME = "spectrawatch-export"
FORMAT_VERSION = 1
RUN_FILE = "run.json"
SCALAR_COLUMNS = ("step", "name", "value")
METRIC_COLUMNS = ("step", "layer", "name", "value")
IMPORT_KIND = "import"  # frame kind and analysis name of imported metrics
SCALAR_BATCH = 5000
METRIC_BATCH = 20000


class ExportError(CliError):
    """An export or import that cannot proceed; the message says why."""


@dataclass(frozen=True)
class ExportedRun:
    """A run read back from an export directory."""

    meta: dict[str, Any]
    scalars: list[tuple[int, str, float]]
    metrics: list[tuple[int, str, str, float]]


# --- export ------------------------------------------------------------------------------------
def resolve_run(args: argparse.Namespace, run: str, project: str | None) -> dict[str, Any]:
    """A run by id (digits, without ``--project``) or by name (``--project`` narrows it; a name
    must be unambiguous). With ``--project`` the argument is a name even when it is all digits,
    so ``runs delete 6 --project P`` can never pick run id 6 of another project."""
    if run.isdigit() and not project:
        found: dict[str, Any] = _call(args, "GET", f"/runs/{int(run)}")
        return found
    params: dict[str, Any] = {"limit": 1000}
    if project:
        params["project"] = project
    offset = 0
    matches: list[dict[str, Any]] = []
    while True:
        page = _call(args, "GET", "/runs", params={**params, "offset": offset})
        matches += [r for r in page if r["name"] == run]
        if len(page) < params["limit"]:
            break
        offset += len(page)
    if not matches:
        where = f" in project {project!r}" if project else ""
        raise ExportError(f"no run named {run!r}{where}")
    if len(matches) > 1:
        projects = ", ".join(sorted(r["project"] for r in matches))
        raise ExportError(
            f"run name {run!r} exists in several projects ({projects}): "
            "pass --project or the run id"
        )
    return matches[0]


def fetch_run(args: argparse.Namespace, run: dict[str, Any]) -> ExportedRun:
    """Every scalar and metric point of ``run`` over the HTTP API."""
    rid = run["id"]
    scalars = [
        (int(step), s["name"], _num(v))
        for s in _call(args, "GET", f"/runs/{rid}/scalars")
        for step, v in zip(s["steps"], s["values"], strict=True)
    ]
    names = sorted({m["name"] for m in _call(args, "GET", f"/runs/{rid}/metrics/catalog")})
    metrics = [
        (int(step), series["layer"], name, _num(v))
        for name in names
        for series in _call(args, "GET", f"/runs/{rid}/metrics", params={"name": name})["series"]
        for step, v in zip(series["steps"], series["values"], strict=True)
    ]
    scalars.sort(key=lambda r: (r[1], r[0]))
    metrics.sort(key=lambda r: (r[2], r[1], r[0]))
    keep = (
        "id",
        "project",
        "name",
        "status",
        "config",
        "tags",
        "summary",
        "last_step",
        "created_at",
        "updated_at",
    )
    meta = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "exported_at": datetime.now(timezone.utc).isoformat(),
        "exported_by": f"spectrawatch {__version__}",
        "source_url": _url(args),
        "run": {k: run.get(k) for k in keep},
        "counts": {"scalars": len(scalars), "metrics": len(metrics)},
    }
    return ExportedRun(meta, scalars, metrics)


def _num(v: Any) -> float:
    return math.nan if v is None else float(v)


def _url(args: argparse.Namespace) -> str:
    return str(args.url or os.environ.get("SPECTRAWATCH_URL") or DEFAULT_URL).rstrip("/")


def write_export(data: ExportedRun, out: Path, fmt: str) -> list[Path]:
    """Write ``run.json`` and the two tables into ``out`` (created); returns the files."""
    out.mkdir(parents=True, exist_ok=True)
    meta = {**data.meta, "files": {"scalars": f"scalars.{fmt}", "metrics": f"metrics.{fmt}"}}
    files = [out / RUN_FILE, out / f"scalars.{fmt}", out / f"metrics.{fmt}"]
    if fmt == "csv":
        _write_csv(files[1], SCALAR_COLUMNS, data.scalars)
        _write_csv(files[2], METRIC_COLUMNS, data.metrics)
    elif fmt == "parquet":
        pd = _pandas()
        pd.DataFrame(data.scalars, columns=list(SCALAR_COLUMNS)).to_parquet(files[1], index=False)
        pd.DataFrame(data.metrics, columns=list(METRIC_COLUMNS)).to_parquet(files[2], index=False)
    else:
        raise ExportError(f"unknown format {fmt!r} (csv or parquet)")
    files[0].write_text(json.dumps(meta, indent=1, default=str), encoding="utf-8")
    return files


def _write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for row in rows:
            writer.writerow(
                ""
                if isinstance(c, float) and not math.isfinite(c)
                else repr(c)
                if isinstance(c, float)
                else c
                for c in row
            )


def _pandas() -> Any:
    """pandas, with pyarrow present as its parquet engine (both optional, untyped)."""
    try:
        importlib.import_module("pyarrow")
        return importlib.import_module("pandas")
    except ImportError as exc:
        raise ExportError(
            f"parquet needs pandas and pyarrow: pip install pandas pyarrow ({exc})"
        ) from exc


# --- reading an export -------------------------------------------------------------------------
def read_export(path: Path) -> ExportedRun:
    """Read an export directory (CSV or Parquet tables); clear errors on anything else."""
    meta_path = path / RUN_FILE
    if not meta_path.is_file():
        raise ExportError(f"{path}: not a spectrawatch export (no {RUN_FILE})")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ExportError(f"{meta_path}: unreadable ({exc})") from exc
    if meta.get("format") != FORMAT_NAME or int(meta.get("version", 0)) > FORMAT_VERSION:
        raise ExportError(
            f"{meta_path}: unsupported export format {meta.get('format')!r} "
            f"version {meta.get('version')!r}"
        )
    files = meta.get("files") or {}
    scalars = [
        (int(r[0]), str(r[1]), float(r[2]))
        for r in _read_table(path / files.get("scalars", "scalars.csv"), SCALAR_COLUMNS)
    ]
    metrics = [
        (int(r[0]), str(r[1]), str(r[2]), float(r[3]))
        for r in _read_table(path / files.get("metrics", "metrics.csv"), METRIC_COLUMNS)
    ]
    return ExportedRun(meta, scalars, metrics)


def _read_table(path: Path, columns: Sequence[str]) -> Iterator[list[Any]]:
    if not path.is_file():
        raise ExportError(f"{path}: missing")
    if path.suffix == ".parquet":
        frame = _pandas().read_parquet(path)
        if list(frame.columns) != list(columns):
            raise ExportError(f"{path}: columns {list(frame.columns)}, expected {list(columns)}")
        yield from (list(r) for r in frame.itertuples(index=False, name=None))
        return
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        if next(reader, None) != list(columns):
            raise ExportError(f"{path}: expected the header {','.join(columns)}")
        for n, row in enumerate(reader, 2):
            if len(row) != len(columns):
                raise ExportError(f"{path}:{n}: expected {len(columns)} fields, got {len(row)}")
            try:
                step = int(row[0])
                value = float(row[-1]) if row[-1] != "" else math.nan
            except ValueError as exc:
                raise ExportError(f"{path}:{n}: {exc}") from exc
            yield [step, *row[1:-1], value]


# --- import ------------------------------------------------------------------------------------
def import_run(args: argparse.Namespace, data: ExportedRun) -> dict[str, Any]:
    """Create the run on the target server and load its scalars (HTTP) and metrics (database)."""
    src = data.meta["run"]
    project = args.project or src["project"]
    name = args.run or src["name"]
    existing = _find_run(args, project, name)
    if existing is not None:
        raise ExportError(
            f"run {name!r} already exists in project {project!r} on the target "
            f"server (id {existing['id']}): pass --run NEW_NAME"
        )
    _call(args, "POST", "/projects", json={"name": project})
    run = _call(
        args,
        "POST",
        "/runs",
        json={
            "project": project,
            "name": name,
            "config": src.get("config") or {},
            "tags": src.get("tags") or [],
        },
    )
    rid = run["id"]
    for i in range(0, len(data.scalars), SCALAR_BATCH):
        batch = data.scalars[i : i + SCALAR_BATCH]
        rows = [{"step": s, "name": n, "value": v} for s, n, v in batch]
        # json.dumps writes NaN (the server stores it as null); httpx's json= would refuse it
        _call(
            args,
            "POST",
            f"/runs/{rid}/scalars",
            content=json.dumps(rows),
            headers={"content-type": "application/json"},
        )
    if not args.skip_metrics:
        batch_id = uuid.uuid4().hex
        for i in range(0, len(data.metrics), METRIC_BATCH):
            rows = [
                {"step": s, "layer": la, "name": n, "value": v}
                for s, la, n, v in data.metrics[i : i + METRIC_BATCH]
            ]
            _call(
                args,
                "POST",
                f"/runs/{rid}/metrics",
                content=json.dumps({"source": IMPORT_KIND, "rows": rows}),
                headers={
                    "content-type": "application/json",
                    "Idempotency-Key": f"import-{batch_id}-{i}",
                },
            )
    summary = dict(src.get("summary") or {})
    summary["imported_from"] = {
        "url": data.meta.get("source_url"),
        "run_id": src.get("id"),
        "exported_at": data.meta.get("exported_at"),
    }
    status = src.get("status") if src.get("status") in ("finished", "crashed") else "finished"
    final: dict[str, Any] = _call(
        args, "PATCH", f"/runs/{rid}", json={"status": status, "summary": summary}
    )
    return final


def _find_run(args: argparse.Namespace, project: str, name: str) -> dict[str, Any] | None:
    try:
        return resolve_run(args, name, project)
    except ExportError:
        return None
    except CliError as exc:
        if "404" in str(exc):  # the project does not exist yet
            return None
        raise


# --- commands ----------------------------------------------------------------------------------
def cmd_export(args: argparse.Namespace) -> int:
    try:
        run = resolve_run(args, args.run, args.project)
        data = fetch_run(args, run)
        out = Path(args.output or f"{run['project']}-{run['name']}-export")
        files = write_export(data, out, args.format)
    except (CliError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    counts = data.meta["counts"]
    print(
        f"exported run {run['id']} ({run['project']}/{run['name']}): {counts['scalars']} "
        f"scalars, {counts['metrics']} metric points -> {', '.join(str(f) for f in files)}"
    )
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    try:
        data = read_export(Path(args.path))
        run = import_run(args, data)
    except (CliError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"imported into run {run['id']} ({run['project']}/{run['name']}): "
        f"{len(data.scalars)} scalars, "
        f"{0 if args.skip_metrics else len(data.metrics)} metric points"
    )
    return 0


def add_export_commands(subparsers: Any) -> None:
    """Register ``export`` and ``import`` on the top-level ``spectrawatch`` parser."""
    common = server_args()

    exp = subparsers.add_parser(
        "export", parents=[common], help="export a run's metrics and scalars to CSV or Parquet"
    )
    exp.add_argument("run", help="run id; or run name, always with --project when given")
    exp.add_argument("--project", default=None)
    exp.add_argument(
        "-o", "--output", default=None, help="output directory (default PROJECT-RUN-export)"
    )
    exp.add_argument("--format", choices=["csv", "parquet"], default="csv")
    exp.set_defaults(func=cmd_export)

    imp = subparsers.add_parser(
        "import", parents=[common], help="import an exported run into a server"
    )
    imp.add_argument("path", help="export directory (from spectrawatch export)")
    imp.add_argument("--project", default=None, help="target project (default: the exported one)")
    imp.add_argument("--run", default=None, help="target run name (default: the exported one)")
    imp.add_argument(
        "--skip-metrics",
        action="store_true",
        help="import the run and its scalars only",
    )
    imp.set_defaults(func=cmd_import)
