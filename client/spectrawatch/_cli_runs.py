"""``spectrawatch runs list|show|delete|prune|lag``: the runs of a server, one run's state (frames,
the client's report, alerts, metrics, config), removing one with its data, releasing the stored
frame bodies of ended runs (their results stay), and a run's SED lag analysis."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from spectrawatch._cli_http import call, print_result, reporting_errors, server_args
from spectrawatch._export import resolve_run


def cmd_runs_list(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"limit": args.limit}
    if args.project:
        params["project"] = args.project
    runs = call(args, "GET", "/runs", params=params)
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
    for key, noun in (("dropped_frames", "dropped"), ("spooled_frames", "spooled")):
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
    run = resolve_run(args, args.run, args.project)
    label = f"run {run['id']} ({run['project']}/{run['name']})"
    if not args.yes:
        frames = sum((run.get("frames") or {}).values())
        print(
            f"would delete {label}: {frames} frames with their blobs, every metric, "
            "spectrum, scalar and alert of it; pass --yes to delete",
            file=sys.stderr,
        )
        return 1
    out = call(args, "DELETE", f"/runs/{run['id']}")
    print(f"deleted {label}: {out['frames']} frames, {out['bytes'] / 2**20:.1f} MiB of blobs")
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


def _days(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 36_500:
        raise argparse.ArgumentTypeError(f"must be 0-36500 days, got {text!r}")
    return value


def add_runs_commands(subparsers: Any) -> None:
    """Register ``runs list|show|delete|prune|lag`` on the top-level ``spectrawatch`` parser."""
    common = server_args()
    one_run = argparse.ArgumentParser(add_help=False)  # the commands about one run
    one_run.add_argument("run", help="run id; or run name, always with --project when given")
    one_run.add_argument("--project", default=None)
    runs = subparsers.add_parser("runs", help="list runs, delete a run with its data")
    sub = runs.add_subparsers(dest="runs_command", required=True)
    ls = sub.add_parser("list", parents=[common], help="runs, newest first")
    ls.add_argument("--project", default=None)
    ls.add_argument("--limit", type=int, default=100)
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
        "delete", parents=[common, one_run], help="delete a run and everything stored for it"
    )
    rm.add_argument("--yes", action="store_true", help="really delete (without it: a dry run)")
    rm.set_defaults(func=reporting_errors(cmd_runs_delete))
    prune = sub.add_parser(
        "prune",
        parents=[common],
        help="delete the stored frames (tensors) of ended runs, keeping every result",
        description="Delete the blobs (sketches, weights, activations) of analysed frames "
        "stored more than --older-than days ago, of finished or crashed runs. Metrics, "
        "spectra, scalars and alerts stay and dashboards keep working; only re-analysis of "
        "those frames becomes impossible. Running runs are never pruned.",
    )
    prune.add_argument("--older-than", type=_days, required=True, metavar="DAYS")
    prune.add_argument("--project", default=None, help="only this project")
    prune.add_argument("--run", default=None, help="only this run (id, or name with --project)")
    prune.add_argument("--yes", action="store_true", help="really delete (without it: a dry run)")
    prune.set_defaults(func=reporting_errors(cmd_runs_prune))
    lag = sub.add_parser(
        "lag",
        parents=[common, one_run],
        help="SED lag analysis: does the spectral gap lead a logged scalar, by how many steps",
    )
    lag.add_argument("--scalar", default="val_loss", help="logged scalar (default val_loss)")
    lag.add_argument("--layer", default="__model__", help="layer of the gap series")
    lag.add_argument("--max-lag", type=int, default=10, help="lags in points of the shared steps")
    lag.add_argument("--json", action="store_true", help="print the analysis as JSON")
    lag.set_defaults(func=reporting_errors(cmd_runs_lag))
