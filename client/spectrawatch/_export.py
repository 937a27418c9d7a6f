"""``spectrawatch export RUN`` and ``spectrawatch import DIR``: move a run between servers.

An export is a directory: ``run.json`` (project, name, status, config, tags, summary,
created_at, counts of rows, file names), ``scalars.csv`` (``step,name,value``) and
``metrics.csv`` (``step,layer,name,value``), or the same tables as ``.parquet``
(``--format parquet``, needs pyarrow). Values that were NaN/Inf on the server (stored as null)
are written empty / as NaN. Everything is read over the HTTP API at full resolution (no
downsampling). Not exported: frames (the raw tensors), spectra, alerts and client_stats.
Names are written exactly as stored, also one a spreadsheet would run as a formula (``=``,
``+``, ``-``, ``@`` first): the round trip stays exact, so open such files as data, not in a
spreadsheet.

Import works over the HTTP API alone. It reads and checks the whole export first (run.json,
every row against the server's rules, row counts against ``run.json``), so a damaged export is
refused before anything is created; a (step, [layer,] name) given twice keeps its last row, as
the server does within a batch. It then creates the run create-only (``resume: false``: an
existing run is refused, also when another import creates it concurrently), posts the scalars,
posts the metrics to ``POST /runs/{id}/metrics`` in batches (each with an idempotency key; the
server keeps them under a frame of kind ``import`` that is never re-analysed), and sets the
exported status, tags and summary (``summary.imported_from`` names the source run and its
``created_at``; the new run's own ``created_at`` is the import time). If a request fails after
the run was created, the run is deleted again, or, when the token may not delete (a ``write``
token), it stays marked partial (``summary.imported_from.partial``) and ``--resume`` finishes
it: the scalars are posted again (each replaces itself) and the metric batches with the same
idempotency keys (derived from the export and the target run), so nothing is stored twice.
``--skip-metrics`` imports the run and its scalars only.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import importlib
import io
import json
import math
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from spectrawatch._cli_http import CliError, call, call_pages, server_args, server_url
from spectrawatch._version import __version__
from spectrawatch.wire import (
    DOT_NAMES,
    LAYER_MAX,
    LAYER_PATTERN,
    MAX_STEP,
    NAME_MAX,
    NAME_PATTERN,
    TEXT_PATTERN,
)

FORMAT_NAME = "spectrawatch-export"
FORMAT_VERSION = 1
RUN_FILE = "run.json"
IMPORT_KIND = "import"  # frame kind and analysis name of imported metrics
ORIGIN = "imported_from"  # the imported run's summary key naming its source
PARTIAL = "partial"  # in it while the import is not complete
STATUSES = ("running", "finished", "crashed")
SCALAR_BATCH = 5000
METRIC_BATCH = 5000  # rows a metric request; the server takes at most 10,000 by default
FORMATS = ("csv", "parquet")
MAX_ROWS = 10_000_000  # rows per table import reads by default (--max-rows): bounds memory


class ExportError(CliError):
    """An export or import that cannot proceed; the message says why."""


@dataclass(frozen=True)
class Table:
    """One table of an export: its key in ``run.json`` (``files``, ``counts``), its columns
    (``step``, text columns, ``value``) and the server's rule (pattern, longest) per text."""

    key: str
    columns: tuple[str, ...]
    rules: tuple[tuple[str, int], ...]


SCALARS = Table("scalars", ("step", "name", "value"), ((TEXT_PATTERN, NAME_MAX),))
METRICS = Table(
    "metrics",
    ("step", "layer", "name", "value"),
    ((LAYER_PATTERN, LAYER_MAX), (NAME_PATTERN, NAME_MAX)),
)
TABLES = (SCALARS, METRICS)


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
        found: dict[str, Any] = call(args, "GET", f"/runs/{int(run)}")
        return found
    params: dict[str, Any] = {"name": run}  # a server without the filter lists every run
    if project:
        params["project"] = project
    matches: list[dict[str, Any]] = [
        r for r in call_pages(args, "/runs", params) if r["name"] == run
    ]
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


MAX_POINTS = 100_000  # the most points per series the server returns at once


def _metric_series(args: argparse.Namespace, rid: int, name: str) -> list[dict[str, Any]]:
    """Every layer's series of metric ``name`` at full resolution: without a layer the server
    bounds each series (``max_points``), so a layer still cut short is read again alone."""
    path = f"/runs/{rid}/metrics"
    out = []
    every = call(args, "GET", path, params={"name": name, "max_points": MAX_POINTS})
    for series in every["series"]:
        if series.get("downsampled"):
            params = {"name": name, "layer": series["layer"]}
            (series,) = call(args, "GET", path, params=params)["series"]
        out.append(series)
    return out


def fetch_run(args: argparse.Namespace, run: dict[str, Any]) -> ExportedRun:
    """Every scalar and metric point of ``run`` over the HTTP API."""
    rid = run["id"]
    scalars = [
        (int(step), s["name"], _num(v))
        for s in call(args, "GET", f"/runs/{rid}/scalars")
        for step, v in zip(s["steps"], s["values"], strict=True)
    ]
    names = sorted({m["name"] for m in call(args, "GET", f"/runs/{rid}/metrics/catalog")})
    metrics = [
        (int(step), series["layer"], name, _num(v))
        for name in names
        for series in _metric_series(args, rid, name)
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
        "source_url": server_url(args),
        "run": {k: run.get(k) for k in keep},
        "counts": {"scalars": len(scalars), "metrics": len(metrics)},
    }
    return ExportedRun(meta, scalars, metrics)


def _num(v: Any) -> float:
    return math.nan if v is None else float(v)


def write_export(data: ExportedRun, out: Path, fmt: str, force: bool = False) -> list[Path]:
    """Write ``run.json`` and the two tables into ``out`` (created); returns the files.

    An ``out`` that already holds export files is refused unless ``force``; then every one of
    them is removed first, so no table of another format is left beside the new ``run.json``.
    """
    if str(out) == "-":
        raise ExportError("-o -: an export is a folder (run.json and two tables), not a stream")
    old = [out / n for n in (RUN_FILE, *(f"{t.key}.{f}" for t in TABLES for f in FORMATS))]
    old = [f for f in old if f.exists() or f.is_symlink()]
    if old and not force:
        raise ExportError(
            f"{out} already holds an export ({old[0].name}): pass --force to replace it"
        )
    out.mkdir(parents=True, exist_ok=True)
    for f in old:
        f.unlink()
    meta = {**data.meta, "files": {t.key: f"{t.key}.{fmt}" for t in TABLES}}
    files = [out / RUN_FILE, *(out / f"{t.key}.{fmt}" for t in TABLES)]
    tables: tuple[list[Any], ...] = (data.scalars, data.metrics)
    for table, rows, path in zip(TABLES, tables, files[1:], strict=True):
        if fmt == "csv":
            _write_csv(path, table.columns, rows)
        else:
            pa = _pyarrow()
            columns: list[Sequence[Any]] = list(zip(*rows, strict=True)) or [
                [] for _ in table.columns
            ]
            types = [pa.int64(), *(pa.string() for _ in table.rules), pa.float64()]
            arrays = [pa.array(c, type=t) for c, t in zip(columns, types, strict=True)]
            pa.parquet.write_table(pa.table(arrays, names=list(table.columns)), path)
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


def _pyarrow() -> Any:
    """pyarrow with its parquet module loaded (optional, untyped)."""
    try:
        importlib.import_module("pyarrow.parquet")
        return importlib.import_module("pyarrow")
    except ImportError as exc:
        raise ExportError(f"parquet needs pyarrow: pip install pyarrow ({exc})") from exc


# --- reading an export -------------------------------------------------------------------------
def read_export(path: Path, max_rows: int = MAX_ROWS) -> ExportedRun:
    """Read and check an export directory (CSV or Parquet tables) completely; a clear
    :class:`ExportError` on anything the server would refuse or that looks damaged."""
    meta = _read_meta(path)
    files = meta.get("files") or {}
    tables = [
        _read_table(
            _table_file(path, files.get(t.key, f"{t.key}.csv")), t, meta["counts"][t.key], max_rows
        )
        for t in TABLES
    ]
    return ExportedRun(meta, tables[0], tables[1])


def _read_meta(path: Path) -> dict[str, Any]:
    """``run.json``, with the types import relies on checked."""
    meta_path = path / RUN_FILE
    if not meta_path.is_file():
        raise ExportError(f"{path}: not a spectrawatch export (no {RUN_FILE})")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ExportError(f"{meta_path}: unreadable ({exc})") from exc

    def need(ok: bool, problem: str) -> None:
        if not ok:
            raise ExportError(f"{meta_path}: {problem}")

    need(isinstance(meta, dict) and meta.get("format") == FORMAT_NAME, "not a spectrawatch export")
    version = meta.get("version")
    need(
        type(version) is int and 1 <= version <= FORMAT_VERSION,
        f"unsupported export format version {version!r:.40} (reads 1..{FORMAT_VERSION})",
    )
    run = meta.get("run")
    need(isinstance(run, dict), "'run' must be an object")
    for key in ("project", "name"):
        need(isinstance(run.get(key), str), f"run.{key} must be a string")
    for key, kind in (("config", dict), ("summary", dict), ("tags", list)):
        need(
            run.get(key) is None or isinstance(run[key], kind),
            f"run.{key} must be a {kind.__name__}",
        )
    need(run.get("status") is None or isinstance(run["status"], str), "run.status must be a string")
    counts, files = meta.get("counts"), meta.get("files") or {}
    need(
        isinstance(counts, dict) and all(type(counts.get(t.key)) is int for t in TABLES),
        "counts.scalars and counts.metrics must be integers",
    )
    need(isinstance(files, dict), "'files' must be an object")
    checked: dict[str, Any] = meta
    return checked


def _table_file(folder: Path, name: Any) -> Path:
    """``folder / name``, only for a plain file directly inside ``folder`` (no path, no ``..``,
    no symlink): an export never points anywhere else."""
    if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name:
        raise ExportError(f"{folder / RUN_FILE}: files entry {name!r:.80} is not a file name")
    path = folder / name
    if path.is_symlink() or not path.is_file():
        raise ExportError(f"{path}: missing, or not a plain file")
    if path.suffix not in (".csv", ".parquet"):
        raise ExportError(f"{path}: neither .csv nor .parquet")
    return path


def _read_table(path: Path, table: Table, expected: int, max_rows: int) -> list[Any]:
    """Every row of one table, checked (:func:`check_row`); a (step, [layer,] name) given
    twice keeps its last row. The number of rows must be ``expected`` (``run.json`` counts)."""
    reader = _parquet_rows if path.suffix == ".parquet" else _csv_rows
    rows: dict[tuple[Any, ...], tuple[Any, ...]] = {}
    found = 0
    for where, raw in reader(path, table, max_rows):
        found += 1
        try:
            row = check_row(table, raw)
        except ValueError as exc:
            raise ExportError(f"{where}: {exc}") from None
        rows[row[:-1]] = row
    if found != expected:
        raise ExportError(
            f"{path}: {found} rows, but run.json counts {expected} (truncated or edited?)"
        )
    return list(rows.values())


def check_row(table: Table, row: Sequence[Any]) -> tuple[Any, ...]:
    """``(step, *texts, value)`` as the server accepts it: step an int in 0..2^62, each text
    by the server's rule, value a number (None: NaN); else ``ValueError`` naming the column."""
    step, *texts, value = row
    if type(step) is not int or not 0 <= step <= MAX_STEP:
        raise ValueError(f"step {step!r:.40} is not an integer in 0..2^62")
    for column, (pattern, longest), text in zip(
        table.columns[1:-1], table.rules, texts, strict=True
    ):
        if type(text) is not str or len(text) > longest or not re.fullmatch(pattern, text):
            raise ValueError(
                f"{column} {text!r:.80} is refused by the server "
                f"(1-{longest} characters matching {pattern})"
            )
    if value is None:
        value = math.nan
    if type(value) not in (int, float):
        raise ValueError(f"value {value!r:.40} is not a number")
    return (step, *texts, float(value))


def _csv_rows(path: Path, table: Table, max_rows: int) -> Iterator[tuple[str, list[Any]]]:
    """``(where, row)`` per CSV line, step and value converted where they parse."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ExportError(f"{path}:{line}: not UTF-8 ({exc.reason})") from None
    if text and not text.endswith("\n"):  # the writer ends every line: a cut-off file
        raise ExportError(f"{path}:{text.count(chr(10)) + 1}: no line end (truncated?)")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        if next(reader, None) != list(table.columns):
            raise ExportError(f"{path}: expected the header {','.join(table.columns)}")
        for n, row in enumerate(reader, 1):
            where = f"{path}:{reader.line_num}"
            if n > max_rows:
                raise ExportError(f"{path}: more than {max_rows} rows (--max-rows)")
            if len(row) != len(table.columns):
                raise ExportError(f"{where}: expected {len(table.columns)} fields, got {len(row)}")
            step, *texts, value = row
            yield where, [_int(step), *texts, _float(value)]
    except csv.Error as exc:
        raise ExportError(f"{path}:{reader.line_num}: {exc}") from None


def _int(field: str) -> int | str:
    return int(field) if field.isascii() and field.isdigit() else field


def _float(field: str) -> float | str | None:
    try:
        return None if field == "" else float(field)
    except ValueError:
        return field


def _parquet_rows(path: Path, table: Table, max_rows: int) -> Iterator[tuple[str, tuple[Any, ...]]]:
    """``(where, row)`` per Parquet row; the row count is read from the file's metadata first,
    so a small file that would expand to more than ``max_rows`` rows is refused unread."""
    pa = _pyarrow()
    try:
        parquet = pa.parquet.ParquetFile(path)
        names, count = parquet.schema_arrow.names, parquet.metadata.num_rows
        if names != list(table.columns):
            raise ExportError(f"{path}: columns {names}, expected {list(table.columns)}")
        if count > max_rows:
            raise ExportError(f"{path}: more than {max_rows} rows (--max-rows): {count}")
        data = parquet.read()
        columns = [data.column(c).to_pylist() for c in table.columns]
    except (OSError, ValueError, pa.ArrowException) as exc:  # damaged, truncated, not Parquet
        raise ExportError(f"{path}: not a readable Parquet file ({exc})") from None
    for i, row in enumerate(zip(*columns, strict=True), 1):
        yield f"{path} row {i}", row


# --- import ------------------------------------------------------------------------------------
def import_run(args: argparse.Namespace, data: ExportedRun) -> dict[str, Any]:
    """Create the run on the target server (create-only) and load its scalars and metrics; a
    failure after the run was created deletes it again (if the token may: a ``write`` token
    leaves it, and ``--resume`` finishes it). With ``--resume`` an existing run that a cut-short
    import of this export left is finished instead of refused."""
    src = data.meta["run"]
    project = args.project or src["project"]
    name = args.run or src["name"]
    for what, value in (("project", project), ("run name", name)):
        if len(value) > NAME_MAX or not re.fullmatch(NAME_PATTERN, value) or value in DOT_NAMES:
            raise ExportError(
                f"{what} {value!r:.80}: 1-{NAME_MAX} characters, not '.' or '..', no '/' or control"
            )
    body = {
        "project": project,
        "name": name,
        "config": src.get("config") or {},
        "tags": src.get("tags") or [],
        "resume": False,
    }
    origin = _origin(data)
    try:
        run = call(args, "POST", "/runs", json=body)
    except CliError as exc:
        if exc.status != 409:
            raise
        if not args.resume:
            raise ExportError(
                f"run {name!r} already exists in project {project!r} on the target server: "
                "pass --run NEW_NAME (or --resume to finish an import of this export that was "
                "cut short)"
            ) from exc
        run = _resumable(args, name, project, origin)
        if run is None:  # imported completely already
            return resolve_run(args, name, project)
        try:
            return _load_run(args, data, run["id"], origin)
        except CliError as again:
            raise ExportError(
                f"{again}; run {run['id']} stays partly imported: run the same import with "
                "--resume again to finish it"
            ) from again
    try:
        # marked partial until the last request: --resume recognises it by this
        call(
            args,
            "PATCH",
            f"/runs/{run['id']}",
            json={"summary": {ORIGIN: {**origin, PARTIAL: True}}},
        )
        return _load_run(args, data, run["id"], origin)
    except (CliError, KeyboardInterrupt) as exc:
        try:
            call(args, "DELETE", f"/runs/{run['id']}")
            note = f"the partly imported run {run['id']} was deleted"
        except CliError as again:
            note = (
                f"deleting the partly imported run {run['id']} failed too ({again}); "
                "run the same import with --resume to finish it"
            )
        if isinstance(exc, KeyboardInterrupt):
            print(f"interrupted: {note}", file=sys.stderr)
            raise
        raise ExportError(f"{exc}; {note}") from exc


def _origin(data: ExportedRun) -> dict[str, Any]:
    """``summary.imported_from`` of the imported run: the source server, run and times."""
    src = data.meta["run"]
    return {
        "url": data.meta.get("source_url"),
        "run_id": src.get("id"),
        "created_at": src.get("created_at"),
        "exported_at": data.meta.get("exported_at"),
    }


def _resumable(
    args: argparse.Namespace, name: str, project: str, origin: dict[str, Any]
) -> dict[str, Any] | None:
    """The existing run ``project/name`` if a cut-short import of this export left it (None:
    this export is imported there completely); any other run is refused."""
    run = resolve_run(args, name, project)
    stored = (run.get("summary") or {}).get(ORIGIN)
    if not isinstance(stored, dict) or {k: stored.get(k) for k in origin} != origin:
        raise ExportError(
            f"run {name!r} in project {project!r} is not an import of this export "
            f"(summary.{ORIGIN} differs): --resume finishes only a cut-short import of the same "
            "export; pass --run NEW_NAME"
        )
    if not stored.get(PARTIAL):
        print(f"run {run['id']} ({project}/{name}) holds this export already", file=sys.stderr)
        return None
    print(f"resuming the import into run {run['id']} ({project}/{name})", file=sys.stderr)
    return run


def _load_run(
    args: argparse.Namespace, data: ExportedRun, rid: int, origin: dict[str, Any]
) -> dict[str, Any]:
    """Post the scalars and metrics of ``data`` into run ``rid``, then its status and summary.

    A scalar posted again replaces itself; each metric batch's idempotency key is derived
    from the export and the target run, so the batches a resumed import posts again are
    stored once."""
    batches: list[tuple[str, Any, str | None]] = [
        (f"/runs/{rid}/scalars", [{"step": s, "name": n, "value": v} for s, n, v in b], None)
        for b in _chunks(data.scalars, SCALAR_BATCH)
    ]
    if not args.skip_metrics:
        identity = json.dumps([rid, origin, METRIC_BATCH, len(data.metrics)], sort_keys=True)
        batch_id = hashlib.sha256(identity.encode()).hexdigest()[:32]
        batches += [
            (
                f"/runs/{rid}/metrics",
                {
                    "source": IMPORT_KIND,
                    "rows": [{"step": s, "layer": la, "name": n, "value": v} for s, la, n, v in b],
                },
                f"import-{batch_id}-{i}",
            )
            for i, b in enumerate(_chunks(data.metrics, METRIC_BATCH))
        ]
    for path, rows, key in batches:
        headers = {"content-type": "application/json", **({"Idempotency-Key": key} if key else {})}
        # json.dumps writes NaN (the server stores it as null); httpx's json= would refuse it
        call(args, "POST", path, content=json.dumps(rows), headers=headers)
    src = data.meta["run"]
    status = src.get("status") if src.get("status") in STATUSES else "finished"
    if status == "running":  # a snapshot: nothing writes to the copy (no run_silent alert)
        status, origin = "finished", {**origin, "status": "running"}
    summary = {**(src.get("summary") or {}), ORIGIN: origin}
    final: dict[str, Any] = call(
        args, "PATCH", f"/runs/{rid}", json={"status": status, "summary": summary}
    )
    return final


def _chunks(rows: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    return (rows[i : i + size] for i in range(0, len(rows), size))


# --- commands ----------------------------------------------------------------------------------
_UNSAFE_IN_NAME = re.compile(r"[\x00-\x1f\x7f/\\\ud800-\udfff]")
_OUTPUT_NAME_BYTES = 200  # of the default output folder's name (filesystems allow 255)


def default_output(project: object, name: object) -> Path:
    """``PROJECT-RUN-export`` as one folder of the working directory, whatever names the server
    sends: path separators, control characters and lone surrogates as ``_``, no leading dot (no
    hidden folder, no ``..``), at most 200 bytes (one cut short ends in a digest of both)."""
    text = f"{project}-{name}-export"
    clean = _UNSAFE_IN_NAME.sub("_", text).lstrip(".")
    if len(clean.encode()) > _OUTPUT_NAME_BYTES:
        digest = hashlib.sha256(clean.encode()).hexdigest()[:8]
        head = clean.encode()[: _OUTPUT_NAME_BYTES - 16].decode(errors="ignore")
        clean = f"{head}-{digest}-export"
    return Path(clean)


def cmd_export(args: argparse.Namespace) -> int:
    try:
        run = resolve_run(args, args.run, args.project)
        out = Path(args.output) if args.output else default_output(run["project"], run["name"])
        if args.format == "parquet":
            _pyarrow()  # before fetching everything
        data = fetch_run(args, run)
        files = write_export(data, out, args.format, args.force)
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
        data = read_export(Path(args.path), args.max_rows)
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


EXPORT_HELP = """\
Writes run.json (project, name, status, config, tags, summary, created_at, row counts) and
every scalar and metric point at full resolution as CSV or Parquet. Not exported: frames (raw
tensors), spectra, alerts, client_stats. Names are written exactly as stored, also ones a
spreadsheet would run as formulas (starting with = + - @): treat the files as data, not as
spreadsheets."""

IMPORT_HELP = """\
Checks the whole export first (run.json, every row against the server's rules, row counts),
then creates the run (refused if it exists), posts scalars and metrics and sets the exported
status, tags and summary; summary.imported_from names the source run and its created_at (the
new run's created_at is the import time). A run exported while running is imported finished
(summary.imported_from.status says "running"): nothing will write to the copy. A failure after
the run was created deletes it; if the token may not delete (a write token), the run stays
marked partial and the same import with --resume finishes it. A row given twice (same step and
name, and layer) keeps its last value."""


def add_export_commands(subparsers: Any) -> None:
    """Register ``export`` and ``import`` on the top-level ``spectrawatch`` parser."""
    common = server_args()

    exp = subparsers.add_parser(
        "export",
        parents=[common],
        help="export a run's metrics and scalars to CSV or Parquet",
        description=EXPORT_HELP,
    )
    exp.add_argument("run", help="run id; or run name, always with --project when given")
    exp.add_argument("--project", default=None, help="the run's project")
    exp.add_argument(
        "-o",
        "--output",
        default=None,
        help="output directory (default PROJECT-RUN-export, one folder of the working "
        "directory: separators and control characters in the names become _)",
    )
    exp.add_argument(
        "--format", choices=FORMATS, default="csv", help="file format (parquet needs pyarrow)"
    )
    exp.add_argument(
        "--force", action="store_true", help="replace an export already in the output directory"
    )
    exp.set_defaults(func=cmd_export)

    imp = subparsers.add_parser(
        "import",
        parents=[common],
        help="import an exported run into a server",
        description=IMPORT_HELP,
    )
    imp.add_argument("path", help="export directory (from spectrawatch export)")
    imp.add_argument("--project", default=None, help="target project (default: the exported one)")
    imp.add_argument("--run", default=None, help="target run name (default: the exported one)")
    imp.add_argument(
        "--resume",
        action="store_true",
        help="finish an import of this export that was cut short (the run exists, marked "
        "partial) instead of refusing the existing run",
    )
    imp.add_argument(
        "--skip-metrics",
        action="store_true",
        help="import the run and its scalars only",
    )
    imp.add_argument(
        "--max-rows",
        type=int,
        default=MAX_ROWS,
        help=f"refuse a table with more rows (default {MAX_ROWS:,}; bounds memory)",
    )
    imp.set_defaults(func=cmd_import)
