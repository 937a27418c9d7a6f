"""``POST /runs/{id}/client-stats`` bodies: what the bundled client sends is taken as it is;
values that are not counters, overlong texts and unbounded objects are refused by name."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from spectrawatch._sender import ClientStats as SenderStats
from spectrawatch_server.schemas import INT_STATS, ClientStats


def _sent() -> dict[str, Any]:
    stats = SenderStats()
    for name in ("sent_frames", "captures", "sketch_steps_skipped", "layout_changes"):
        stats.incr(name, 3)
    stats.set("update_every", 10)
    stats.set("row_groups", 12)
    stats.drop("update_sketch", 2)
    stats.nonfinite_scalar("loss", 20, float("nan"))
    stats.nonfinite_scalar("grad_norm", 7, float("-inf"))
    stats.last_error = "ConnectionError: " + "x" * 900
    stats.off_reason = "the server refused this client's token (role read)"
    return stats.snapshot()


def test_the_bundled_clients_report_is_kept_as_sent() -> None:
    sent = _sent()
    assert ClientStats.model_validate(sent).model_dump() == sent
    # every integer the client reports is one the server checks as a counter
    ints = {k for k, v in sent.items() if type(v) is int}
    assert ints <= INT_STATS | set(ClientStats.model_fields)


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"dropped_frames": 2**70}, "dropped_frames"),
        ({"dropped_frames": -1}, "dropped_frames"),
        ({"update_every": "zz"}, "update_every"),
        ({"sent_frames": 1.5}, "sent_frames"),
        ({"last_error": "y" * 20_000}, "last_error"),
        ({"extra": [1, 2]}, "extra"),
        ({"extra": {"a": 1}}, "extra"),
        ({"extra": float("nan")}, "extra"),
        ({"extra": 2**64}, "extra"),
        ({"k" * 100: 1}, "kkkk"),
        ({f"s{i}": i for i in range(201)}, "at most 200"),
        ({"dropped_by_kind": {"weights": -3}}, "dropped_by_kind"),
        ({"dropped_by_kind": {f"k{i}": 1 for i in range(40)}}, "dropped_by_kind"),
        ({"nonfinite_scalars": {"loss": {"step": -1, "value": "nan"}}}, "step"),
        ({"nonfinite_scalars": {"loss": {"step": 1, "value": "n" * 100}}}, "value"),
        ({"nonfinite_scalars": {"loss": 3}}, "nonfinite_scalars"),
        ({"nonfinite_scalars": {"loss": {"step": 1, "value": "nan", "more": 1}}}, "more"),
    ],
)
def test_bad_stats_are_refused_by_name(body: dict[str, Any], named: str) -> None:
    with pytest.raises(ValidationError, match=named):
        ClientStats.model_validate(body)


def test_other_keys_take_numbers_booleans_and_short_texts() -> None:
    body = {"custom_rate": 0.25, "custom_flag": True, "note": "resumed", "unset": None, "n": -4}
    assert ClientStats.model_validate(body).model_dump() == {
        "dropped_frames": 0,
        "spooled_frames": 0,
        "spool_bytes": 0,
        "spool_overflow": 0,
        "errors": 0,
        **body,
    }
