"""``spectrawatch runs list|show|delete|prune|reanalyze|lag``: the runs of a server, one run's
state (frames, the client's report, alerts, metrics, config), removing one (or the old ones:
retention) with its data, releasing the stored frame bodies of ended runs (their results stay),
analysing a run's stored frames again, and a run's SED lag analysis; ``spectrawatch projects
delete``: a project with everything of it."""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

from spectrawatch._cli_http import (
    CliError,
    call,
    call_pages,
    print_result,
    reporting_errors,
    segment,
    server_args,
)
from spectrawatch._export import resolve_run
from spectrawatch.wire import MODEL_LAYER


def cmd_runs_list(args: argparse.Namespace) -> int:
    """``runs list``: the newest ``--limit`` runs (or ``--all``; with ``--status``, ``--tag``),
    read a page at a time."""
    if args.limit < 1:
        raise CliError("--limit must be at least 1")
    params: dict[str, Any] = {"project": args.project} if args.project else {}
    if args.status:
        params["status"] = args.status
    if args.tag:
        params["tag"] = args.tag
    runs = call_pages(args, "/runs", params, None if args.all else args.limit)
    runs = [  # a server without these filters lists every run
        r
        for r in runs
        if (not args.status or r["status"] in args.status)
        and set(args.tag or []) <= set(r.get("tags") or [])
    ]
    lines = [
        f"{r['id']:>6}  {r['project']}/{r['name']}  {r['status']}  "
        f"last step {r.get('last_step')}  {sum((r.get('frames') or {}).values())} frames"
        for r in runs
    ]
    print_result(args, runs, lines)
    return 0


def client_report(stats: dict[str, Any]) -> str:
    """The client's own report in one line: frames sent, dropped, spooled, errors, cadence."""
    bits = [f"{stats.get('sent_frames', 0)} frames sent"]
    for key, noun in (
        ("dropped_frames", "dropped"),
        ("spooled_frames", "spooled"),
        ("replayed_frames", "delivered from the spool"),
        ("spooled_pending", "still in the spool (spectrawatch sync)"),
    ):
        if stats.get(key):
            bits.append(f"{stats[key]} {noun}")
    if stats.get("errors"):
        bits.append(f"{stats['errors']} error{'s' if stats['errors'] != 1 else ''}")
    every = stats.get("update_every")
    if every:
        bits.append("update sketch every " + ("step" if every == 1 else f"{every} steps"))
    return ", ".join(bits)


def cmd_runs_show(args: argparse.Namespace) -> int:
    run = resolve_run(args, args.run, args.project)
    rid = run["id"]
    open_alerts = call(args, "GET", f"/runs/{rid}/alerts", params={"status": "open"})
    catalog = call(args, "GET", f"/runs/{rid}/metrics/catalog")
    if args.json:
        print_result(args, {**run, "open_alerts": len(open_alerts), "metrics": catalog}, [])
        return 0
    frames = run.get("frames") or {}
    queued = frames.get("pending", 0) + frames.get("running", 0)
    kinds = len({m["name"] for m in catalog})
    lines = [
        f"run {rid}: {run['project']}/{run['name']} ({run['status']})",
        f"  created {run['created_at']}, last seen {run.get('last_seen_at') or '-'}, "
        f"last step {run.get('last_step')}",
        f"  frames: {frames.get('done', 0)} analysed, {queued} queued, "
        f"{frames.get('failed', 0)} failed",
    ]
    if frames.get("failed"):  # why: the first failed frame's reason
        params = {"status": "failed", "limit": 1}
        for first in call(args, "GET", f"/runs/{rid}/frames", params=params):
            lines.append(
                f"  first failure: frame {first['id']} ({first['kind']}): {first['error']}"
            )
    stats = run.get("client_stats") or {}
    if stats:
        lines.append(f"  client: {client_report(stats)}")
        if stats.get("last_error"):
            lines.append(f"  client's last error: {stats['last_error']}")
    lines.append(f"  metrics: {kinds} kinds, {len(catalog)} series")
    by_rule: dict[str, int] = {}
    for a in open_alerts:
        by_rule[a["rule"]] = by_rule.get(a["rule"], 0) + 1
    lines.append(
        f"  open alerts: {len(open_alerts)}"
        + (
            " (" + ", ".join(f"{k} x{v}" for k, v in sorted(by_rule.items())) + ")"
            if by_rule
            else ""
        )
    )
    if run.get("tags"):
        lines.append(f"  tags: {', '.join(map(str, run['tags']))}")
    config = run.get("config") or {}
    if config:
        shown = ", ".join(f"{k}={v}" for k, v in list(config.items())[:12])
        more = f", ... ({len(config)} keys)" if len(config) > 12 else ""
        lines.append(f"  config: {shown}{more}")
    print_result(args, run, lines)
    return 0


def cmd_runs_delete(args: argparse.Namespace) -> int:
    if args.older_than is not None:
        if args.run is not None:
            raise CliError("give a run or --older-than, not both")
        return _delete_stale(args)
    if args.run is None:
        raise CliError("give a run (id, or name with --project) or --older-than DURATION")
    if args.status is not None:
        raise CliError("--status selects runs for --older-than only")
    run = resolve_run(args, args.run, args.project)
    label = f"run {run['id']} ({run['project']}/{run['name']})"
    if args.dry_run or not args.yes:
        frames = sum((run.get("frames") or {}).values())
        print(
            f"would delete {label}: {frames} frames with their blobs, every metric, "
            "spectrum, scalar and alert of it" + ("" if args.dry_run else "; pass --yes to delete"),
            file=sys.stderr,
        )
        return 0 if args.dry_run else 1
    out = call(args, "DELETE", f"/runs/{run['id']}")
    print(f"deleted {label}: {out['frames']} frames, {out['bytes'] / 2**20:.1f} MiB of blobs")
    if out.get("blobs_not_deleted"):
        print(
            f"{out['blobs_not_deleted']} blob(s) could not be deleted now; the server removes "
            "them at its next start"
        )
    return 0


RETENTION_BATCH = 100  # runs per request: each call stays well within the HTTP timeout


def _delete_stale(args: argparse.Namespace) -> int:
    """``runs delete --older-than``: list what matches; with ``--yes`` delete it in batches."""
    body: dict[str, Any] = {
        "older_than_days": args.older_than,
        "statuses": args.status or ["finished", "crashed"],
        "limit": RETENTION_BATCH,
    }
    if args.project:
        body["project"] = args.project
    what = f"{'/'.join(body['statuses'])} runs inactive for more than {args.older_than:g} days"
    if args.dry_run or not args.yes:
        out = call(args, "POST", "/runs/bulk-delete", json={**body, "dry_run": True})
        for r in out["runs"]:
            print(f"{r['id']:>6}  {r['project']}/{r['name']}  {r['status']}  {r['updated_at']}")
        more = out["matched"] - len(out["runs"])
        if more > 0:
            print(f"... and {more} more")
        print(
            f"would delete {out['matched']} {what}"
            + ("" if args.dry_run else "; pass --yes to delete"),
            file=sys.stderr,
        )
        return 0 if args.dry_run else 1
    runs = frames = size = failed = 0
    while True:
        out = call(args, "POST", "/runs/bulk-delete", json=body)
        for r in out["runs"]:
            print(f"deleted run {r['id']} ({r['project']}/{r['name']})")
        runs, frames, size = runs + len(out["runs"]), frames + out["frames"], size + out["bytes"]
        failed += out.get("blobs_not_deleted", 0)
        if not out["runs"] or out["matched"] <= len(out["runs"]):
            break  # done, or the rest changed meanwhile (resumed): never loop on them
    print(f"deleted {runs} {what}: {frames} frames, {size / 2**20:.1f} MiB of blobs")
    if failed:
        print(
            f"{failed} blob(s) could not be deleted now; the server removes them at its next start"
        )
    return 0


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([hdw]?)\s*$")
_UNIT_DAYS = {"h": 1 / 24, "d": 1.0, "w": 7.0, "": 1.0}


def _duration_days(text: str) -> float:
    """``30d``, ``12h``, ``2w`` or a plain number of days, as days (0-36500)."""
    match = _DURATION.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(
            f"expected a duration such as 30d, 12h or 2w, got {text!r}"
        )
    days = float(match.group(1)) * _UNIT_DAYS[match.group(2)]
    if not 0 <= days <= 36_500:
        raise argparse.ArgumentTypeError(f"must be 0-36500 days, got {text!r}")
    return days


_RUN_STATUSES = ("running", "finished", "crashed")


def _statuses(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in names if s not in _RUN_STATUSES]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"statuses are {', '.join(_RUN_STATUSES)} (comma-separated), got {text!r}"
        )
    return names


def cmd_projects_delete(args: argparse.Namespace) -> int:
    name = args.name
    if not args.yes:
        runs = call(args, "GET", "/runs", params={"project": name, "limit": 1000})
        frames = sum(sum((r.get("frames") or {}).values()) for r in runs)
        count = f"{len(runs)}{'+' if len(runs) == 1000 else ''}"
        print(
            f"would delete project {name!r}: {count} run(s), {frames} frames with their blobs, "
            "every metric, spectrum, scalar and alert, its alert rules and webhooks, and revoke "
            "its tokens; pass --yes to delete",
            file=sys.stderr,
        )
        return 1
    out = call(args, "DELETE", f"/projects/{segment(name)}")
    print(
        f"deleted project {name!r}: {out['runs']} run(s), {out['frames']} frames, "
        f"{out['bytes'] / 2**20:.1f} MiB of blobs, {out['alert_rules']} alert rule(s), "
        f"{out['webhooks']} webhook(s) ({out['deliveries_dropped']} pending deliveries "
        f"dropped), {out['tokens_revoked']} token(s) revoked"
    )
    if out.get("blobs_not_deleted"):
        print(
            f"{out['blobs_not_deleted']} blob(s) could not be deleted now; the server removes "
            "them at its next start"
        )
    return 0


def cmd_runs_prune(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"older_than_days": args.older_than, "dry_run": not args.yes}
    if args.run is not None:
        body["run_id"] = resolve_run(args, args.run, args.project)["id"]
    elif args.project:
        body["project"] = args.project
    out = call(args, "POST", "/blobs/prune", json=body)
    size = f"{out['frames']} frame blob(s), {out['bytes'] / 2**20:.1f} MiB"
    if out["dry_run"]:
        print(f"would delete {size}; pass --yes to delete", file=sys.stderr)
        return 1
    print(f"deleted {size} (metrics, spectra and alerts kept)")
    if out.get("blobs_not_deleted"):
        print(f"{out['blobs_not_deleted']} could not be deleted now; removed at the next start")
    return 0


def cmd_runs_reanalyze(args: argparse.Namespace) -> int:
    """``runs reanalyze``: queue a run's stored frames for analysis again (the server answers
    at once; the worker recomputes them in order)."""
    run = resolve_run(args, args.run, args.project)
    body = {} if args.from_step is None else {"from_step": args.from_step}
    out = call(args, "POST", f"/runs/{run['id']}/reanalyze", json=body)
    where = "" if args.from_step is None else f" from step {args.from_step}"
    skipped = [
        f"{n} {what}"
        for n, what in (
            (out["skipped_pruned"], "pruned (blobs deleted)"),
            (out["skipped_imported"], "imported (never analysed)"),
        )
        if n
    ]
    lines = [
        f"run {run['id']} ({run['project']}/{run['name']}){where}: {out['queued']} frame(s) "
        "queued for analysis" + (f"; kept as they are: {', '.join(skipped)}" if skipped else ""),
        f"  follow it with: spectrawatch runs show {run['id']}",
    ]
    print_result(args, out, lines)
    return 0


def cmd_runs_lag(args: argparse.Namespace) -> int:
    run = resolve_run(args, args.run, args.project)
    params = {"scalar": args.scalar, "layer": args.layer, "max_lag": args.max_lag}
    out = call(args, "GET", f"/runs/{run['id']}/sed/lag", params=params)
    lines = [
        f"SED gap series of {args.layer} vs {out['scalar']}, lags -{args.max_lag}..{args.max_lag}"
    ]
    for series in out["series"]:
        best = series["best"]
        reading = "no variation to correlate, or fewer than 10 point pairs"
        if best is not None:
            steps = best["steps"]
            who = "gap leads" if steps > 0 else "gap lags" if steps < 0 else "in step"
            reading = (
                f"strongest r = {best['r']:+.2f} at {steps:+d} steps ({who}, {best['pairs']} pairs)"
            )
            if abs(best["lag"]) == args.max_lag:
                reading += ", at the edge of the range"
        lines.append(f"  {series['metric']:<30} {series['points']:>6} shared steps  {reading}")
    if not out["series"]:
        lines.append("  (no SED gap series in this layer)")
    print_result(args, out, lines)
    return 0


def add_runs_commands(subparsers: Any) -> None:
    """Register ``runs list|show|delete|prune|reanalyze|lag`` on the top-level parser."""
    common = server_args()
    one_run = argparse.ArgumentParser(add_help=False)  # the commands about one run
    one_run.add_argument("run", help="run id; or run name, always with --project when given")
    one_run.add_argument("--project", default=None, help="the run's project")
    runs = subparsers.add_parser("runs", help="list runs, delete a run with its data")
    sub = runs.add_subparsers(dest="runs_command", required=True)
    ls = sub.add_parser("list", parents=[common], help="runs, newest first")
    ls.add_argument("--project", default=None, help="only runs of this project")
    ls.add_argument(
        "--status",
        type=_statuses,
        action="extend",
        default=None,
        help="only runs with this status (running, finished, crashed; comma-separated or "
        "repeated: any of them)",
    )
    ls.add_argument(
        "--tag",
        action="append",
        default=None,
        help="only runs with this tag (repeated: with every one of them)",
    )
    most = ls.add_mutually_exclusive_group()
    most.add_argument(
        "--limit", type=int, default=100, help="at most this many runs (read 1,000 a request)"
    )
    most.add_argument("--all", action="store_true", help="every run")
    ls.add_argument("--json", action="store_true", help="print the runs as JSON")
    ls.set_defaults(func=reporting_errors(cmd_runs_list))
    show = sub.add_parser(
        "show",
        parents=[common, one_run],
        help="one run: status, frames, the client's report, open alerts, metrics, config",
    )
    show.add_argument(
        "--json", action="store_true", help="the run, open alerts and catalog as JSON"
    )
    show.set_defaults(func=reporting_errors(cmd_runs_show))
    rm = sub.add_parser(
        "delete",
        parents=[common],
        help="delete a run (or, with --older-than, the old ones) and everything stored for it",
        description="Delete one run, or (retention) every run inactive for more than "
        "--older-than (its last write and last client contact both older), with its frames, "
        "blobs, metrics, spectra, scalars and alerts. Retention deletes finished and crashed "
        "runs only, unless --status names running too.",
    )
    rm.add_argument(
        "run", nargs="?", default=None, help="run id; or run name, with --project when given"
    )
    rm.add_argument("--project", default=None, help="the run's project; with --older-than: only it")
    rm.add_argument(
        "--older-than",
        type=_duration_days,
        default=None,
        metavar="DURATION",
        help="retention: runs inactive for longer than this (30d, 12h, 2w; a number is days)",
    )
    rm.add_argument(
        "--status",
        type=_statuses,
        default=None,
        help="with --older-than: run statuses to delete, comma-separated (default "
        "finished,crashed; running only when named)",
    )
    rm.add_argument("--dry-run", action="store_true", help="list what would go, delete nothing")
    rm.add_argument("--yes", action="store_true", help="really delete (without it: a dry run)")
    rm.set_defaults(func=reporting_errors(cmd_runs_delete))
    prune = sub.add_parser(
        "prune",
        parents=[common],
        help="delete the stored frames (tensors) of ended runs, keeping every result",
        description="Delete the blobs (sketches, weights, activations) of analysed frames "
        "stored longer than --older-than ago, of finished or crashed runs. Metrics, "
        "spectra, scalars and alerts stay and dashboards keep working; only re-analysis of "
        "those frames becomes impossible. Running runs are never pruned.",
    )
    prune.add_argument(
        "--older-than",
        type=_duration_days,
        required=True,
        metavar="DURATION",
        help="frames stored longer ago than this (30d, 12h, 2w; a number is days)",
    )
    prune.add_argument("--project", default=None, help="only this project")
    prune.add_argument("--run", default=None, help="only this run (id, or name with --project)")
    prune.add_argument("--yes", action="store_true", help="really delete (without it: a dry run)")
    prune.set_defaults(func=reporting_errors(cmd_runs_prune))
    again = sub.add_parser(
        "reanalyze",
        parents=[common, one_run],
        help="analyse a run's stored frames again (after an upgrade that fixed a metric)",
        description="Queue a finished or crashed run's stored frames for analysis again, in "
        "their original order: their metrics and spectra are deleted and recomputed, each "
        "frame reading only what the frames before it stored. Frames whose blobs were pruned "
        "and imported metrics keep their results; alerts are not evaluated again. Needs an "
        "admin token; refused while the run is running or frames of it wait for analysis.",
    )
    again.add_argument(
        "--from-step",
        type=int,
        default=None,
        metavar="N",
        help="from the first frame at step N or later (default: every frame)",
    )
    again.add_argument("--json", action="store_true", help="print the server's answer as JSON")
    again.set_defaults(func=reporting_errors(cmd_runs_reanalyze))
    lag = sub.add_parser(
        "lag",
        parents=[common, one_run],
        help="SED lag analysis: does the spectral gap lead a logged scalar, by how many steps",
    )
    lag.add_argument("--scalar", default="val_loss", help="logged scalar (default val_loss)")
    lag.add_argument("--layer", default=MODEL_LAYER, help="layer of the gap series")
    lag.add_argument("--max-lag", type=int, default=10, help="lags in points of the shared steps")
    lag.add_argument("--json", action="store_true", help="print the analysis as JSON")
    lag.set_defaults(func=reporting_errors(cmd_runs_lag))

    projects = subparsers.add_parser("projects", help="delete a project with everything of it")
    projects_sub = projects.add_subparsers(dest="projects_command", required=True)
    prm = projects_sub.add_parser(
        "delete",
        parents=[common],
        help="delete a project: its runs with their data, alert rules, webhooks; revoke tokens",
        description="Delete a project: every run of it as `runs delete` does (a client still "
        "streaming stops), its alert rules, webhooks and their pending deliveries; its tokens "
        "are revoked. With --require-auth the token must be one of this project's.",
    )
    prm.add_argument("name", help="project name")
    prm.add_argument("--yes", action="store_true", help="really delete (without it: a dry run)")
    prm.set_defaults(func=reporting_errors(cmd_projects_delete))
