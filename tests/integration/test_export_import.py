"""``spectrawatch export`` / ``import`` against real servers: a run with worker-computed metrics
and scalars (one NaN) goes out as CSV and Parquet and comes back identical on another server."""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from spectrawatch import _export
from spectrawatch.cli import main
from tests.factories import make_run, post_frame, weight_frame
from tests.servers import DIALECT, ServerProcess, create_token, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SCALARS = [
    {"step": s, "name": n, "value": v}
    for s in range(0, 50, 10)
    for n, v in (("loss", 1.0 / (s + 1)), ("val_acc", s / 100))
] + [{"step": 60, "name": "loss", "value": float("nan")}]  # stored as null by the server


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A server with a finished run: 2 weights frames analysed by the worker, and scalars."""
    server = ServerProcess(tmp_path_factory.mktemp("source")).start()
    try:
        with httpx.Client(base_url=f"{server.url}/api/v1", timeout=30) as api:
            run_id = make_run(api, project="exp", name="src", config={"lr": 0.1}, tags=["a"])
            for seq in range(2):
                body = weight_frame(step=100 * seq, seq=seq)
                assert post_frame(api, run_id, body, seq=seq).is_success
            api.post(  # json.dumps writes NaN, which strict JSON encoders refuse
                f"/runs/{run_id}/scalars",
                content=json.dumps(SCALARS),
                headers={"content-type": "application/json"},
            ).raise_for_status()
            api.patch(f"/runs/{run_id}", json={"status": "finished"}).raise_for_status()

            def analysed() -> bool:
                frames = api.get(f"/runs/{run_id}/frames").json()
                return len(frames) == 2 and all(f["status"] == "done" for f in frames)

            wait_until(analysed, timeout=120)
        yield {"id": run_id, "url": server.url}
    finally:
        server.stop()


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path_factory.mktemp("target")).start()
    try:
        yield proc
    finally:
        proc.stop()


def _everything(
    url: str, run_id: int, headers: dict[str, str] | None = None
) -> tuple[dict[Any, Any], dict[Any, Any]]:
    """``{(name, step): value}`` of scalars and ``{(name, layer, step): value}`` of metrics."""
    with httpx.Client(base_url=f"{url}/api/v1", timeout=30, headers=headers) as api:
        scalars = {
            (s["name"], st): v
            for s in api.get(f"/runs/{run_id}/scalars").json()
            for st, v in zip(s["steps"], s["values"], strict=True)
        }
        metrics = {}
        for name in {m["name"] for m in api.get(f"/runs/{run_id}/metrics/catalog").json()}:
            for s in api.get(f"/runs/{run_id}/metrics", params={"name": name}).json()["series"]:
                for st, v in zip(s["steps"], s["values"], strict=True):
                    metrics[(name, s["layer"], st)] = v
    return scalars, metrics


def _run_named(
    url: str, project: str, name: str, headers: dict[str, str] | None = None
) -> dict[str, Any]:
    runs = httpx.get(f"{url}/api/v1/runs", params={"project": project}, headers=headers).json()
    run: dict[str, Any] = next(r for r in runs if r["name"] == name)
    return run


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_export_then_import_into_another_server_round_trips(
    source: dict[str, Any],
    target: ServerProcess,
    tmp_path: Path,
    fmt: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if fmt == "parquet":
        pytest.importorskip("pyarrow")
    out = tmp_path / f"export-{fmt}"
    assert (
        main(
            [
                "export",
                "src",
                "--project",
                "exp",
                "--url",
                source["url"],
                "--format",
                fmt,
                "-o",
                str(out),
            ]
        )
        == 0
    )
    meta = json.loads((out / "run.json").read_text())
    assert meta["run"]["name"] == "src"
    assert meta["run"]["config"] == {"lr": 0.1}
    want_scalars, want_metrics = _everything(source["url"], source["id"])
    assert meta["counts"] == {"scalars": len(SCALARS), "metrics": len(want_metrics)}
    assert ("htsr.alpha", "layer0.weight", 100) in want_metrics  # the worker's HT-SR output
    if fmt == "csv":
        with (out / "scalars.csv").open() as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == len(SCALARS)
        assert next(r for r in rows if r["step"] == "60")["value"] == ""  # NaN stays NaN

    project = f"moved-{fmt}"
    assert (
        main(
            [
                "import",
                str(out),
                "--url",
                target.url,
                "--project",
                project,
            ]
        )
        == 0
    )
    assert "imported into run" in capsys.readouterr().out
    run = _run_named(target.url, project, "src")
    assert run["status"] == "finished"
    assert run["config"] == {"lr": 0.1}
    assert run["tags"] == ["a"]
    assert run["summary"]["imported_from"]["run_id"] == source["id"]
    got_scalars, got_metrics = _everything(target.url, run["id"])
    assert got_scalars == want_scalars
    assert got_scalars[("loss", 60)] is None
    assert set(got_metrics) == set(want_metrics)
    for key, value in want_metrics.items():
        assert got_metrics[key] == value or (value is None and got_metrics[key] is None), key

    # a second import under the same name is refused; --skip-metrics leaves the metrics out
    assert main(["import", str(out), "--url", target.url, "--project", project]) == 1
    assert "already exists" in capsys.readouterr().err
    again_name = f"again-{fmt}"
    assert (
        main(["import", str(out), "--url", target.url, "--run", again_name, "--skip-metrics"]) == 0
    )
    again = _run_named(target.url, meta["run"]["project"], again_name)
    assert _everything(target.url, again["id"]) == (want_scalars, {})


def test_export_errors_are_clear(
    source: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["export", "nope", "--url", source["url"], "-o", str(tmp_path / "x")]) == 1
    assert "no run named 'nope'" in capsys.readouterr().err
    assert main(["export", "999", "--url", source["url"], "-o", str(tmp_path / "x")]) == 1
    assert "HTTP 404" in capsys.readouterr().err
    assert main(["import", str(tmp_path), "--url", source["url"]]) == 1
    assert "not a spectrawatch export" in capsys.readouterr().err


def test_doctor_reports_server_worker_auth_and_spool(
    source: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``spectrawatch doctor`` (it shares this module's server): every check against the real
    health endpoint, a spool with a waiting entry, and an unreachable server."""
    spool = tmp_path / "spool" / "proj" / "run-1"
    spool.mkdir(parents=True)
    (spool / "0000000000000001-us.sw").write_bytes(b'{"kind": "update_sketch"}\n' + b"x" * 100)
    monkeypatch.setenv("SPECTRAWATCH_SPOOL_DIR", str(tmp_path / "spool"))
    monkeypatch.delenv("SPECTRAWATCH_TOKEN", raising=False)
    assert main(["doctor", "--url", source["url"], "--json"]) == 0
    checks = {c["name"]: c for c in json.loads(capsys.readouterr().out)}
    assert checks["connectivity"]["status"] == "ok"
    assert checks["versions"]["status"] == "ok"
    assert DIALECT in checks["database"]["detail"]
    assert checks["auth"]["status"] == "ok"
    assert "anonymous" in checks["auth"]["detail"]
    # the server's worker runs on CUDA when this machine has it; on CPU doctor warns
    assert checks["worker"]["status"] == ("ok" if torch.cuda.is_available() else "warn")
    assert "running on" in checks["worker"]["detail"]
    assert "1 entries" in checks["spool"]["detail"]
    assert "proj/run-1" in checks["spool"]["detail"]

    assert main(["doctor", "--url", source["url"], "--token", "sw_wrong"]) == 1
    assert "[fail] auth          token rejected (HTTP 401)" in capsys.readouterr().out
    assert main(["doctor", "--url", "http://127.0.0.1:9"]) == 1
    assert "[fail] connectivity" in capsys.readouterr().out


# --- audit of export/import: everything wrong is refused before anything is created ----------
@pytest.fixture(scope="module")
def exported(source: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The source run exported once as CSV and once as Parquet."""
    pytest.importorskip("pyarrow")
    out = {}
    for fmt in ("csv", "parquet"):
        out[fmt] = tmp_path_factory.mktemp("exported") / fmt
        argv = ["export", str(source["id"]), "--url", source["url"], "--format", fmt]
        assert main([*argv, "-o", str(out[fmt])]) == 0
    return out


def _edit_csv(name: str, line: int, text: str) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        lines = (folder / name).read_text().splitlines(keepends=True)
        lines[line - 1] = text
        (folder / name).write_text("".join(lines))

    return edit


def _edit_meta(change: Callable[[dict[str, Any]], Any]) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        meta = json.loads((folder / "run.json").read_text())
        change(meta)
        (folder / "run.json").write_text(json.dumps(meta))

    return edit


def _write_bytes(name: str, data: bytes) -> Callable[[Path], None]:
    return lambda folder: (folder / name).write_bytes(data)


def _parquet(file: str, **columns: list[Any]) -> Callable[[Path], None]:
    """Replace ``file`` with a Parquet table of ``columns`` (pyarrow infers their types)."""

    def edit(folder: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table(columns), folder / file)

    return edit


def _truncate(name: str, cut: int) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[:-cut])

    return edit


def _append(name: str, text: str) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        with (folder / name).open("a", newline="") as f:
            f.write(text)

    return edit


def _symlink(folder: Path) -> None:
    (folder / "elsewhere.csv").write_text((folder / "scalars.csv").read_text())
    (folder / "scalars.csv").unlink()
    (folder / "scalars.csv").symlink_to(folder / "elsewhere.csv")


BROKEN_CSV = {
    "bad layer halfway": (
        _edit_csv("metrics.csv", 50, "5,.,htsr.alpha,1.0\n"),
        "metrics.csv:50: layer",
    ),
    "fractional step": (_edit_csv("scalars.csv", 3, "1.5,loss,1.0\n"), "scalars.csv:3: step '1.5'"),
    "step past 2^62": (_edit_csv("scalars.csv", 3, f"{2**62 + 1},loss,1\n"), "scalars.csv:3: step"),
    "negative step": (_edit_csv("scalars.csv", 3, "-1,loss,1\n"), "scalars.csv:3: step"),
    "text value": (_edit_csv("scalars.csv", 4, "1,loss,abc\n"), "scalars.csv:4: value 'abc'"),
    "control in a name": (_edit_csv("scalars.csv", 2, "1,a\x01b,1\n"), "scalars.csv:2: name"),
    "slash in a metric name": (_edit_csv("metrics.csv", 2, "1,l,a/b,1\n"), "metrics.csv:2: name"),
    "fields missing": (_edit_csv("scalars.csv", 5, "1,loss\n"), "scalars.csv:5: expected 3"),
    "a row cut off": (_truncate("metrics.csv", 30), "metrics.csv:"),
    "the last field cut": (_truncate("scalars.csv", 3), "no line end"),
    "a row more": (
        _append("scalars.csv", "7,loss,1.0\r\n"),
        "12 rows, but run.json counts 11",
    ),
    "not UTF-8": (
        _write_bytes("scalars.csv", b"step,name,value\r\n1,lo\xffss,1\r\n"),
        "scalars.csv:2: not UTF-8",
    ),
    "a huge field": (_edit_csv("scalars.csv", 2, '1,"' + "x" * 140_000 + '",1\n'), "scalars.csv:"),
    "run.json a list": (_write_bytes("run.json", b"[1, 2]"), "not a spectrawatch export"),
    "version abc": (
        _edit_meta(lambda m: m.update(version="abc")),
        "unsupported export format version 'abc'",
    ),
    "version 2": (_edit_meta(lambda m: m.update(version=2)), "version 2"),
    "run missing": (_edit_meta(lambda m: m.pop("run")), "'run' must be an object"),
    "run null": (_edit_meta(lambda m: m.update(run=None)), "'run' must be an object"),
    "name an int": (_edit_meta(lambda m: m["run"].update(name=5)), "run.name must be a string"),
    "summary a list": (
        _edit_meta(lambda m: m["run"].update(summary=[1])),
        "run.summary must be a dict",
    ),
    "counts missing": (_edit_meta(lambda m: m.pop("counts")), "counts.scalars"),
    "files entry an int": (_edit_meta(lambda m: m["files"].update(scalars=5)), "files entry 5"),
    "files entry ..": (
        _edit_meta(lambda m: m["files"].update(scalars="../scalars.csv")),
        "not a file name",
    ),
    "files entry absolute": (
        _edit_meta(lambda m: m["files"].update(scalars="/etc/hostname")),
        "not a file name",
    ),
    "files entry a symlink": (_symlink, "not a plain file"),
}
BROKEN_PARQUET = {
    "garbage": (_write_bytes("scalars.parquet", b"PAR1 not really"), "not a readable Parquet file"),
    "empty": (_write_bytes("scalars.parquet", b""), "not a readable Parquet file"),
    "truncated": (_truncate("metrics.parquet", 100), "not a readable Parquet file"),
    "NaN step": (
        _parquet("scalars.parquet", step=[1.0, float("nan")], name=["a", "b"], value=[1.0, 2.0]),
        "row 1: step 1.0",
    ),
    "fractional step": (
        _parquet("scalars.parquet", step=[1.5], name=["a"], value=[1.0]),
        "row 1: step 1.5",
    ),
    "bool step": (
        _parquet("scalars.parquet", step=[True], name=["a"], value=[1.0]),
        "row 1: step True",
    ),
    "string value": (
        _parquet("scalars.parquet", step=[1, 2], name=["a", "b"], value=["1", "x"]),
        "row 1: value '1'",
    ),
    "null name": (
        _parquet("scalars.parquet", step=[1, 2], name=["a", None], value=[1.0, 2.0]),
        "row 2: name None",
    ),
    "int names": (_parquet("scalars.parquet", step=[1], name=[5], value=[1.0]), "row 1: name 5"),
    "other columns": (
        _parquet("scalars.parquet", step=[1], label=["a"], value=[1.0]),
        "columns ['step', 'label', 'value']",
    ),
}


def _import_broken(
    exported: Path, tmp_path: Path, edit: Callable[[Path], None], url: str, *args: str
) -> int:
    folder = tmp_path / "broken"
    shutil.copytree(exported, folder)
    edit(folder)
    return main(["import", str(folder), "--url", url, "--project", "broken", "--run", "x", *args])


@pytest.mark.parametrize(
    ("fmt", "case"), [("csv", c) for c in BROKEN_CSV] + [("parquet", c) for c in BROKEN_PARQUET]
)
def test_a_broken_export_is_refused_before_anything_is_created(
    exported: dict[str, Path],
    target: ServerProcess,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    fmt: str,
    case: str,
) -> None:
    edit, message = (BROKEN_CSV if fmt == "csv" else BROKEN_PARQUET)[case]
    code = _import_broken(exported[fmt], tmp_path, edit, target.url)
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("error: "), err
    assert err.count("\n") == 1, err  # one line, no traceback
    assert message in err, err
    assert httpx.get(f"{target.url}/api/v1/runs", params={"project": "broken"}).status_code == 404


def test_a_table_past_max_rows_is_refused_from_its_metadata(
    exported: dict[str, Path], target: ServerProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    for fmt in ("csv", "parquet"):
        argv = ["import", str(exported[fmt]), "--url", target.url, "--max-rows", "100"]
        assert main(argv) == 1
        assert f"metrics.{fmt}: more than 100 rows (--max-rows)" in capsys.readouterr().err


def test_a_failure_after_the_run_was_created_deletes_it(
    exported: dict[str, Path],
    target: ServerProcess,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(_export, "IMPORT_KIND", "weights")  # refused by the server (a frame kind)
    argv = ["import", str(exported["csv"]), "--url", target.url, "--project", "rolled-back"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "HTTP 422" in err, err
    assert "was deleted" in err, err
    assert httpx.get(f"{target.url}/api/v1/runs", params={"project": "rolled-back"}).json() == []


def test_a_row_given_twice_across_batches_is_stored_once_last_wins(
    exported: dict[str, Path],
    target: ServerProcess,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_export, "METRIC_BATCH", 7)
    folder = tmp_path / "dupes"
    shutil.copytree(exported["csv"], folder)
    rows = (folder / "metrics.csv").read_text().splitlines(keepends=True)
    step, layer, name, _ = rows[1].split(",")
    rows.append(f"{step},{layer},{name},42.0\r\n")
    (folder / "metrics.csv").write_text("".join(rows))
    _edit_meta(lambda m: m["counts"].update(metrics=m["counts"]["metrics"] + 1))(folder)
    assert main(["import", str(folder), "--url", target.url, "--project", "dupes"]) == 0
    run = _run_named(target.url, "dupes", "src")
    metrics = _everything(target.url, run["id"])[1]
    assert metrics[(name, layer, int(step))] == 42.0
    catalog = httpx.get(f"{target.url}/api/v1/runs/{run['id']}/metrics/catalog").json()
    assert sum(c["points"] for c in catalog) == len(rows) - 2  # less the header and the duplicate


def test_concurrent_imports_into_one_name_create_one_run(
    exported: dict[str, Path], target: ServerProcess
) -> None:
    argv = ["import", str(exported["csv"]), "--url", target.url, "--project", "race"]
    with ThreadPoolExecutor(3) as pool:
        codes = sorted(pool.map(lambda _: main(argv), range(3)))
    assert codes == [0, 1, 1]
    (run,) = httpx.get(f"{target.url}/api/v1/runs", params={"project": "race"}).json()
    assert run["frames"] == {"done": 1}  # one import batch, not three


def test_status_and_formula_like_names_round_trip_exactly(
    source: dict[str, Any], target: ServerProcess, tmp_path: Path
) -> None:
    """Names a spreadsheet would run are kept as they are (documented)."""
    names = ["=1+1", "+a", "-b", "@c", "'d", 'e,"f"']
    with httpx.Client(base_url=f"{source['url']}/api/v1") as api:
        run_id = make_run(api, project="exp", name="formulas")
        rows = [{"step": 1, "name": n, "value": 1.0} for n in names]
        api.post(f"/runs/{run_id}/scalars", json=rows).raise_for_status()
    for fmt in ("csv", "parquet"):
        out = tmp_path / fmt
        assert (
            main(["export", str(run_id), "--url", source["url"], "--format", fmt, "-o", str(out)])
            == 0
        )
        assert main(["import", str(out), "--url", target.url, "--project", f"formulas-{fmt}"]) == 0
        run = _run_named(target.url, f"formulas-{fmt}", "formulas")
        # exported while running: the copy is finished (nothing writes to it, no run_silent
        # alert), its summary says what the source was
        assert run["status"] == "finished"
        assert run["summary"]["imported_from"]["status"] == "running"
        assert run["summary"]["imported_from"]["created_at"]
        assert set(_everything(target.url, run["id"])[0]) == {(n, 1) for n in names}


def test_export_output_and_url_mistakes_are_clear(
    source: dict[str, Any],
    exported: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    run = str(source["id"])
    assert main(["export", run, "--url", source["url"], "-o", "-"]) == 1
    assert "not a stream" in capsys.readouterr().err
    assert not (tmp_path / "-").exists()

    out = tmp_path / "again"
    shutil.copytree(exported["csv"], out)
    assert main(["export", run, "--url", source["url"], "-o", str(out)]) == 1
    assert "already holds an export" in capsys.readouterr().err
    argv = ["export", run, "--url", source["url"], "-o", str(out), "--format", "parquet"]
    assert main([*argv, "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "metrics.parquet",
        "run.json",
        "scalars.parquet",
    ]

    assert main(["export", run, "--url", f"{source['url']}/api/v1"]) == 1
    assert f"without /api/v1 (the client adds it): use {source['url']}" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("project", "name", "folder"),
    [
        ("{outside}", "x", "_{outside_flat}-x-export"),
        ("..", "../../x", "-.._.._x-export"),
        (".hidden", "r\x00\n", "hidden-r__-export"),
        ("my proj", "ré", "my proj-ré-export"),
    ],
)
def test_the_default_export_folder_is_one_folder_whatever_the_server_names_the_run(
    project: str,
    name: str,
    folder: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A server's project and run names make the default folder's name, never its path: a
    hostile server naming its project ``/elsewhere`` cannot have the export written there."""
    outside = tmp_path / "outside" / "escaped"
    outside.parent.mkdir()
    project = project.format(outside=outside)
    folder = folder.format(outside_flat=str(outside).strip("/").replace("/", "_"))
    run = {"id": 7, "project": project, "name": name, "status": "finished", "config": {}}
    replies = {"/runs/7": run, "/runs/7/scalars": [], "/runs/7/metrics/catalog": []}
    monkeypatch.setattr(_export, "call", lambda _args, _method, path, *_a, **_k: replies[path])
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main(["export", "7", "--url", "http://127.0.0.1:9"]) == 0, capsys.readouterr().err
    assert [p.name for p in work.iterdir()] == [folder]
    assert (work / folder / "run.json").is_file()
    assert not list(outside.parent.iterdir())


def test_help_says_what_is_not_exported(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("export", "import"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "Not exported: frames (raw tensors), spectra, alerts, client_stats" in out
    assert "formulas" in out
    assert "created_at is the import time" in out


def test_an_import_cut_short_with_a_write_token_is_finished_by_resume(
    exported: dict[str, Path],
    source: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A write token cannot delete the partial run; ``--resume`` finishes it with the same
    idempotency keys (each batch stored once), refuses a run of another origin and leaves a
    complete import as it is."""
    monkeypatch.setattr(_export, "METRIC_BATCH", 7)
    data_dir = tmp_path / "secure"
    token = create_token(data_dir, "resumed", role="write")
    auth = {"authorization": f"Bearer {token}"}
    proc = ServerProcess(data_dir, args=["--require-auth"]).start()
    try:
        api = f"{proc.url}/api/v1"
        argv = ["import", str(exported["csv"]), "--url", proc.url, "--token", token]
        real_call = _export.call
        posted: list[str] = []

        def cut_at_the_fourth_batch(args: Any, method: str, path: str, **kw: Any) -> Any:
            if path.endswith("/metrics"):
                if len(posted) == 3:
                    raise _export.CliError("connection lost (injected)")
                posted.append(kw["headers"]["Idempotency-Key"])
            return real_call(args, method, path, **kw)

        monkeypatch.setattr(_export, "call", cut_at_the_fourth_batch)
        assert main([*argv, "--project", "resumed"]) == 1
        err = capsys.readouterr().err
        assert "connection lost (injected)" in err, err
        assert "run the same import with --resume to finish it" in err, err
        run = _run_named(proc.url, "resumed", "src", auth)  # kept: a write token cannot delete
        assert run["summary"]["imported_from"]["partial"] is True
        assert len(httpx.get(f"{api}/runs/{run['id']}/frames", headers=auth).json()) == 3

        monkeypatch.setattr(_export, "call", real_call)
        assert main([*argv, "--project", "resumed"]) == 1  # refused without --resume
        assert "--resume to finish" in capsys.readouterr().err
        assert main([*argv, "--project", "resumed", "--resume"]) == 0
        assert "resuming the import into run" in capsys.readouterr().err
        run = httpx.get(f"{api}/runs/{run['id']}", headers=auth).json()
        assert "partial" not in run["summary"]["imported_from"]
        assert run["status"] == "finished"
        points = json.loads((exported["csv"] / "run.json").read_text())["counts"]["metrics"]
        batches = -(-points // 7)
        frames = httpx.get(f"{api}/runs/{run['id']}/frames", headers=auth).json()
        assert len(frames) == batches  # the three posted before the cut are not stored twice
        expected = _everything(source["url"], source["id"])
        assert _everything(proc.url, run["id"], auth) == expected

        assert main([*argv, "--project", "resumed", "--resume"]) == 0  # complete already
        assert "holds this export already" in capsys.readouterr().err
        assert len(httpx.get(f"{api}/runs/{run['id']}/frames", headers=auth).json()) == batches

        body = {"project": "resumed", "name": "other"}
        httpx.post(f"{api}/runs", json=body, headers=auth).raise_for_status()
        assert main([*argv, "--project", "resumed", "--run", "other", "--resume"]) == 1
        assert "is not an import of this export" in capsys.readouterr().err
    finally:
        proc.stop()
