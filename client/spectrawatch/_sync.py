"""``spectrawatch sync``: deliver what runs left in the local spool, without their scripts.

A run whose server was away (or too slow) when it finished leaves its frames and scalars in
``<spool_dir>/<project>/<run>/``, with ``run.json`` naming the run. ``sync`` replays each such
spool in order with the entries' own idempotency keys (so nothing is stored twice, however
often it is run), then sets the run's final status if the run had finished. A spool that a live
training process holds (its ``.lock``) is skipped. Like ``wandb sync`` for offline runs.

Each run goes to ``--url``, else to the server its ``run.json`` records. With a token, a run
recorded for another server than the configured one (``SPECTRAWATCH_URL``) is skipped: anyone
who can write to the spool directory could otherwise name a URL that collects the token.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spectrawatch._sender import Sender
from spectrawatch._spool import RUN_META, Spool, spooled_run_dirs
from spectrawatch._transport import Api, Rejected, Unavailable
from spectrawatch.config import ClientSettings, SettingsError


@dataclass
class SyncResult:
    """What happened to one run's spool."""

    project: str
    run: str
    entries: int
    delivered: int = 0
    left: int = 0
    note: str = ""
    status_pending: bool = False  # run.json's final status is still to be set (run.json kept)


def spooled_runs(spool_dir: str | Path) -> list[tuple[Path, dict[str, Any] | None]]:
    """``(directory, run.json or None)`` of every run directory holding spooled entries."""
    return [(d, Spool(d, 0).read_meta()) for d, _ in spooled_run_dirs(spool_dir)]


def _names(meta: dict[str, Any] | None) -> tuple[str, str] | None:
    """The run's project and name from ``run.json`` (directory names may be shortened)."""
    project, run = (meta or {}).get("project"), (meta or {}).get("run")
    if isinstance(project, str) and isinstance(run, str) and project and run:
        return project, run
    return None


SYNC_COUNTERS = (
    "replayed_frames",
    "sent_scalars",
    "rejected_frames",
    "rejected_scalars",
    "spool_unreadable",
)
"""The sync's own counters added to the run's: what it delivered and what it lost."""


def _run_stats(summary: Any, sender: Sender, left: int) -> dict[str, Any] | None:
    """The run's client report for ``/client-stats``: the counters its process kept in
    ``run.json`` (``summary.client``: drops, errors, the loss's first NaN...), which it could not
    send, plus what this sync delivered and lost; None for a run.json without them."""
    client = summary.get("client") if isinstance(summary, dict) else None
    if not isinstance(client, dict):
        return None
    stats = dict(client)
    for name in SYNC_COUNTERS:
        before = stats.get(name, 0)
        stats[name] = (before if isinstance(before, int) else 0) + sender.stats.get(name)
    stats["spooled_pending"] = left
    return stats


def sync_run(
    settings: ClientSettings,
    run_dir: Path,
    meta: dict[str, Any] | None,
    *,
    deadline_s: float,
    dry_run: bool = False,
) -> SyncResult:
    """Replay one run's spool; stops at the first failure (what is left stays spooled)."""
    names = _names(meta)
    spool = Spool(run_dir, settings.spool_max_bytes)
    count = len(spool)
    if names is None:
        return SyncResult(
            run_dir.parent.name,
            run_dir.name,
            count,
            left=count,
            note=f"no {RUN_META} (an older client's spool): resume the run to deliver it",
        )
    project, run = names
    result = SyncResult(project, run, count, left=count)
    if dry_run:
        result.note = "dry run"
        return result
    if not spool.lock():
        result.note = "in use by a running process: skipped"
        return result
    meta = meta or {}
    try:
        # the run joined by name, unless its session never learnt it was created (see below)
        resume = "never" if meta.get("resume") == "never" else "allow"
        s = settings.replace(
            project=project,
            run=run,
            spool_dir=str(run_dir.parent.parent),
            mode="online",
            resume=resume,
        )
    except SettingsError as exc:  # a hand-edited run.json
        spool.unlock()
        result.note = f"{RUN_META}: {exc}: skipped"
        return result
    api = Api(s.url, s.token, s.timeout_s, deadline_s=s.request_deadline_s)
    sender = Sender(s, api, run, config=meta.get("config"), tags=meta.get("tags"))
    sender.spool = spool  # the one scanned and locked above (same directory)
    sender.reopen = False  # a finished run stays finished; its final status is set below
    sender.announce = False
    try:
        result.note = sender.drain_spool(time.monotonic() + deadline_s)
        if resume == "never" and sender.run_id is not None:
            # created now (NAME, or NAME-2 if NAME exists): a later sync continues this one
            meta = {**{k: v for k, v in meta.items() if k != "resume"}, "run": sender.run_name}
            spool.write_meta(meta)
            result.run = sender.run_name
        result.left = len(spool)
        result.delivered = count - result.left
        lost = {
            "unreadable entries": sender.stats.get("spool_unreadable"),
            "frames refused by the server": sender.stats.get("rejected_frames"),
            "scalar rows refused by the server": sender.stats.get("rejected_scalars"),
        }
        if any(lost.values()):
            result.note = ", ".join(f"{n} {what}" for what, n in lost.items() if n) + " (dropped)"
        status = meta.get("status")
        if not result.left and isinstance(status, str):
            result.status_pending = True
            summary = meta.get("summary")
            if sender.run_id is None:
                result.note = result.note or "final status not set: the server was not reached"
            else:
                stats = _run_stats(summary, sender, result.left)
                if stats is not None:
                    try:
                        api.post_client_stats(sender.run_id, stats, uid=sender.run_uid)
                    except (Unavailable, Rejected) as exc:  # the status still goes
                        result.note = f"client stats not delivered: {exc}"
                try:
                    api.update_run(
                        sender.run_id,
                        status,
                        summary if isinstance(summary, dict) else None,
                        uid=sender.run_uid,
                    )
                    result.status_pending = False
                    if not count:
                        result.note = f"final status set: {status}"
                except Unavailable as exc:
                    result.note = f"entries delivered; final status not set: {exc}"
                except Rejected as exc:  # retrying cannot help
                    result.status_pending = False
                    result.note = f"final status refused by the server: {exc} (dropped)"
        if not result.left and not result.status_pending:  # else run.json stays, for next time
            spool.remove_if_empty()
    finally:
        spool.unlock()
        api.close()
    return result


def cmd_sync(args: argparse.Namespace) -> int:
    try:
        settings = ClientSettings.from_env(url=args.url, token=args.token, spool_dir=args.spool_dir)
    except SettingsError as exc:
        print(f"spectrawatch sync: {exc}")
        return 2
    chosen = []
    for run_dir, meta in spooled_runs(settings.spool_dir):
        project, run = _names(meta) or (None, None)
        if args.project in (None, project) and args.run in (None, run):
            chosen.append((run_dir, meta))
    if not chosen:
        print(f"nothing to sync in {settings.spool_dir}")
        return 0
    failed = 0
    for run_dir, meta in chosen:
        url = args.url or (meta or {}).get("url") or settings.url
        if settings.token and not args.url and str(url).rstrip("/") != settings.url.rstrip("/"):
            print(
                f"{run_dir}: skipped: recorded for {url!r:.200}, not the configured server "
                f"{settings.url}, and the token is sent only there (--url with that server's "
                "root, and its token, delivers it there)"
            )
            failed += not args.dry_run
            continue
        try:
            run_settings = settings.replace(url=url)
        except SettingsError as exc:  # a run.json URL this client refuses (ending in /api/v1)
            print(f"{run_dir}: {exc}: skipped (--url gives the server root to use)")
            failed += 1
            continue
        r = sync_run(run_settings, run_dir, meta, deadline_s=args.timeout, dry_run=args.dry_run)
        failed += (r.left > 0 or r.status_pending) and not args.dry_run
        note = f" ({r.note})" if r.note else ""
        print(f"{r.project}/{r.run}: {r.delivered} of {r.entries} entries delivered to {url}{note}")
    return 1 if failed else 0


def add_sync_command(subparsers: Any) -> None:
    """Register ``sync`` on the top-level ``spectrawatch`` parser."""
    p = subparsers.add_parser(
        "sync", help="deliver frames and scalars that runs left in the local spool"
    )
    p.add_argument(
        "--url",
        default=None,
        help="server URL for every run (default: the one each run used, then "
        "SPECTRAWATCH_URL; with a token, runs used with another server are skipped)",
    )
    p.add_argument("--token", default=None, help="API token (SPECTRAWATCH_TOKEN)")
    p.add_argument("--spool-dir", default=None, help="spool directory (SPECTRAWATCH_SPOOL_DIR)")
    p.add_argument("--project", default=None, help="only runs of this project")
    p.add_argument("--run", default=None, help="only the run of this name")
    p.add_argument(
        "--timeout", type=float, default=600.0, help="seconds to spend per run (default 600)"
    )
    p.add_argument("--dry-run", action="store_true", help="list what would be delivered")
    p.set_defaults(func=cmd_sync)
