"""What the client tells the user about the run it reached: where to see it, a run joined by
name (with how its config differs), a run ``resume="must"`` did not find.

Warnings go to the ``spectrawatch`` logger, which Python prints on stderr when the script set up
no logging (as it does the client's other warnings: the server away, the spool full). The
"view run" line is information: logged at INFO where the script's logging shows INFO, else
printed on stderr, so it is seen either way (like W&B's "View run at").
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping
from typing import Any

from spectrawatch._transport import finite_json

logger = logging.getLogger("spectrawatch")

CHANGES_SHOWN = 5  # config keys a warning names at most
_ABSENT = object()


def config_changes(sent: Mapping[str, Any], stored: Any) -> str:
    """The config keys at which this session's ``sent`` and the run's ``stored`` config differ,
    in words (``lr (stored 0.001, now 0.1), wd (stored 1, now absent)``, the first
    :data:`CHANGES_SHOWN` by name and how many more); ``""`` when none differ or this session
    sent no config (a resumed script that passes none has not changed it)."""
    if not sent or not isinstance(stored, dict):
        return ""
    now = json.loads(json.dumps(finite_json(dict(sent)), default=str))  # as the server stores it
    keys = sorted(
        k for k in now.keys() | stored.keys() if now.get(k, _ABSENT) != stored.get(k, _ABSENT)
    )
    shown = [
        f"{k} (stored {_short(stored.get(k, _ABSENT))}, now {_short(now.get(k, _ABSENT))})"
        for k in keys[:CHANGES_SHOWN]
    ]
    more = len(keys) - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more else "")


def _short(value: Any) -> str:
    if value is _ABSENT:
        return "absent"
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def joined_message(
    project: str, name: str, resume: str, info: Mapping[str, Any], sent: Mapping[str, Any]
) -> str:
    """The warning of a session that joined the existing run ``name`` (``info``: the server's
    reply to ``POST /runs``): the run, its last step and status before, how to get a new run
    instead, and the config keys this session's config differs at (the stored one is kept)."""
    status = info.get("resumed_status") or info.get("status") or "unknown"
    last = info.get("last_step")
    where = f"last step {last}" if isinstance(last, int) else "no step yet"
    text = (
        f"spectrawatch: run {name!r} of project {project!r} exists (status {status}, {where}); "
        f"this session joins it (resume={resume!r}). For a new run instead, pass another run "
        "name or resume='never' (SPECTRAWATCH_RESUME=never)"
    )
    changes = config_changes(sent, info.get("config"))
    if changes:
        text += (
            f". The run keeps its stored config, which this session's differs from at: {changes}"
        )
    return text


def run_url(server_url: str, info: Mapping[str, Any]) -> str:
    """The run's dashboard page: the server's ``dashboard_url`` (absolute, or a path under
    ``server_url``, the URL this client reached it at), or ``/runs/<id>`` from an older server."""
    link = info.get("dashboard_url")
    if isinstance(link, str) and link.startswith(("http://", "https://")):
        return link
    path = link if isinstance(link, str) and link.startswith("/") else f"/runs/{info.get('id')}"
    return server_url.rstrip("/") + path


def notice(message: str) -> None:
    """Show ``message`` (information, not a warning): through logging where it shows INFO of
    the ``spectrawatch`` logger, else on stderr."""
    if logger.isEnabledFor(logging.INFO) and logger.hasHandlers():
        logger.info(message)
    else:
        print(message, file=sys.stderr, flush=True)
