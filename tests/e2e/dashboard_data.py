"""Seed a server's SQLite with a run that exercises every dashboard panel (plain functions).

Rows go through ``storage.repository`` (and the ORM for alert/webhook rows, which have no
repository functions yet) into a database migrated by Alembic, before the server starts.
The HT-SR drill-down payload is the real ``esd_payload`` (and ``traps_payload``) of a random
matrix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from spectrawatch.spectral.htsr import analyze_weights, esd_payload, traps_payload
from spectrawatch_server.db.models import Alert, Delivery, DeliveryAttempt, Webhook
from spectrawatch_server.storage import alert_store, result_store
from spectrawatch_server.storage import repository as repo
from spectrawatch_server.storage.result_store import MetricRow, SpectrumRow
from tests.dashboard_seed import done_frame, migrated

LAYERS = ("blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp", "head")
STEPS = tuple(range(0, 200, 10))  # 20 weight frames
WARNING_STEP = 80
EVIDENCE = {"norm_turn": 40, "defect": 80}  # grok.evidence.*: the second piece at the warning
CROSSING_STEP = 130
ALERT_STEP = 150


@dataclass(frozen=True)
class SeededRun:
    run_id: int
    empty_run_id: int
    other_run_id: int
    layers: tuple[str, ...] = LAYERS


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def htsr_payloads(seed: int = 0) -> dict[str, dict[str, Any]]:
    """Real HT-SR drill-down payloads (plain, with the shuffled ESD of the correlation traps) for
    heavy-tailed random matrices."""
    gen = torch.Generator().manual_seed(seed)
    weights = {
        name: torch.randn(96, 64, generator=gen, dtype=torch.float64)
        * (1 + 3 * torch.rand(1, 64, generator=gen, dtype=torch.float64) ** 4)
        for name in LAYERS
    }
    report = analyze_weights(weights, traps=True)
    out = {}
    for layer in report.layers:
        plain = esd_payload(layer.evals, layer.plain)
        if layer.traps is not None and layer.rand_evals is not None:
            plain["traps"] = traps_payload(layer.rand_evals, layer.traps)
        out[layer.layer] = _finite({"analysis": "htsr", "plain": plain})
    return out


def seed(data_dir: Path, project: str = "demo") -> SeededRun:
    """Create the database under ``data_dir`` and fill three runs (full, empty, a second one)."""
    engine, sessions = migrated(data_dir)
    payloads = htsr_payloads()
    with sessions.begin() as s:
        proj, _ = repo.get_or_create_project(s, project)
        run, _ = repo.get_or_create_run(s, proj, "grokking-demo", {"lr": 1e-3}, ["demo"])
        empty, _ = repo.get_or_create_run(s, proj, "empty-run", {}, [])
        other, _ = repo.get_or_create_run(s, proj, "baseline", {}, [])
        run.status = "finished"
        other.status = "finished"
        run.client_stats = {  # what a client reports; the run pages show it
            "sent_frames": 120,
            "dropped_frames": 3,
            "spooled_frames": 2,
            "errors": 1,
            "update_every": 100,
            "last_error": "update sketch: RuntimeError: out of memory",
        }
        for target, shift in ((run, 0.0), (other, 0.4)):
            _fill(s, target.id, payloads, shift)
        webhook = Webhook(
            project_id=proj.id, url="http://127.0.0.1:9/hook", secret="whsec_x", events=[]
        )
        s.add(webhook)
        s.flush()
        alert = Alert(
            run_id=run.id,
            rule="heavy_tail_out_of_range",
            layer="blocks.1.mlp",
            severity="warning",
            status="open",
            step=ALERT_STEP,
            message="alpha 1.7 < 2",
            values={"htsr.alpha": 1.7},
        )
        s.add(alert)
        s.add(
            Alert(
                run_id=run.id,
                rule="grokking_imminent",
                layer="",
                severity="info",
                status="resolved",
                step=WARNING_STEP,
                resolved_step=CROSSING_STEP,
                message="SED early warning",
            )
        )
        s.flush()
        delivery = Delivery(
            webhook_id=webhook.id,
            alert_id=alert.id,
            message_id="msg_1",
            event="alert.opened",
            payload={"rule": alert.rule},
            status="delivered",
            attempts=2,
            last_status_code=200,
        )
        s.add(delivery)
        s.flush()
        s.add(
            DeliveryAttempt(delivery_id=delivery.id, status_code=503, latency_ms=12.0, error="503")
        )
        s.add(DeliveryAttempt(delivery_id=delivery.id, status_code=200, latency_ms=8.5))
        result = SeededRun(run.id, empty.id, other.id)
    engine.dispose()
    return result


def _fill(s: Any, run_id: int, payloads: dict[str, dict[str, Any]], shift: float) -> None:
    for seq, step in enumerate(STEPS):
        frame = done_frame(s, run_id, step, seq, layers=LAYERS)
        metrics = []
        for i, layer in enumerate(LAYERS):
            alpha = 5.5 - 3.5 * step / STEPS[-1] + 0.2 * i + shift
            metrics += [
                MetricRow(layer, "htsr.alpha", step, alpha),
                MetricRow(layer, "farms.alpha", step, alpha + 0.3),
                MetricRow(layer, "htsr.stable_rank", step, 10 + i + step / 50),
                MetricRow(layer, "norm.spectral", step, 1 + step / 100 + i),
                MetricRow(layer, "eigentrack.entropy", step, 0.9 - step / 1000 - 0.01 * i),
                MetricRow(layer, "eigentrack.outliers", step, float(i % 3 + step // 100)),
                MetricRow(layer, "norm.update_ratio", step, 1e-3 * (1 + i) * (1 + step / 100)),
                MetricRow(layer, "conditioning.condition_number", step, 10.0 ** (i + step / 100)),
            ]
        spectra = [SpectrumRow(layer, payloads[layer]) for layer in LAYERS if layer in payloads]
        result_store.replace_results(s, run_id, frame.id, step, "htsr", metrics, spectra)
    # Update-sketch derived SED at __model__, every step, windows 16 and 32, with phases.
    frame = done_frame(s, run_id, STEPS[-1], len(STEPS), "update_sketch", ["__model__"])
    sed = []
    for step in range(200):
        rise = (
            1 + 4 * step / 60
            if step < 60
            else (5.0 if step < 120 else max(1.1, 5 - (step - 120) / 10))
        )
        phase = 1.0 if step < 60 else (2.0 if step < 120 else 3.0)
        for w, scale in ((16, 1.0), (32, 1.2)):
            sed += [
                MetricRow("__model__", f"sed.gap_ratio.w{w}", step, rise * scale + shift),
                MetricRow("__model__", f"sed.edge.w{w}", step, 3.0 if step < 120 else 1.0),
                MetricRow("__model__", f"sed.phase.w{w}", step, phase),
            ]
        sed.append(
            MetricRow("__model__", "grok.warning_score", step, min(1.0, step / WARNING_STEP))
        )
        sed.append(
            MetricRow("__model__", "grok.imminent", step, 1.0 if step >= WARNING_STEP else 0.0)
        )
        sed.append(MetricRow("__model__", "norm.update_ratio", step, 1e-2 * math.exp(-step / 80)))
        sed += [  # the detector's evidence: the step each piece appeared, once present
            MetricRow("__model__", f"grok.evidence.{piece}", step, float(at))
            for piece, at in EVIDENCE.items()
            if step >= at
        ]
    result_store.replace_results(s, run_id, frame.id, STEPS[-1], "sed", sed, [])
    scalars = []
    for step in range(200):
        scalars.append((step, "loss", 2.5 * math.exp(-step / 40) + 0.01))
        acc = 0.2 + 0.78 / (1 + math.exp(-(step - CROSSING_STEP + 8) / 3))
        scalars.append((step, "val_acc", acc))
        scalars.append((step, "train_acc", min(1.0, 0.3 + step / 50)))
    result_store.upsert_scalars(s, run_id, scalars)


NAN_FROM = 70  # the first weight frame with NaN/Inf of seed_nonfinite's run
NAN_ACTIVATIONS_FROM = 40  # ... and its first activations frame with NaN/Inf (one module)
MODULES = ("block.0", "block.1")  # that run's probed modules


def seed_nonfinite(data_dir: Path) -> int:
    """A run whose weights went NaN at step ``NAN_FROM`` of 120: its frames from there carry
    ``nonfinite`` counts and no metrics (HT-SR skips them), as the worker leaves them."""
    engine, sessions = migrated(data_dir)
    with sessions.begin() as s:
        proj, _ = repo.get_or_create_project(s, "nan")
        run, _ = repo.get_or_create_run(s, proj, "nan-weights", {}, [])
        run.status = "crashed"
        for seq, step in enumerate(range(0, 121, 10)):
            frame = done_frame(s, run.id, step, seq, layers=LAYERS)
            if step >= NAN_FROM:
                frame.nonfinite = dict.fromkeys(LAYERS, 12)
                continue
            metrics = [MetricRow(la, "htsr.alpha", step, 4.0 - step / 60) for la in LAYERS]
            result_store.replace_results(s, run.id, frame.id, step, "htsr", metrics, [])
        # the probe's activations of one module went NaN/Inf earlier: their frames say so
        for seq, step in enumerate(range(0, 121, 10), start=100):
            frame = done_frame(s, run.id, step, seq, kind="activations", layers=MODULES)
            gone = [m for m in MODULES if m == MODULES[1] and step >= NAN_ACTIVATIONS_FROM]
            frame.nonfinite = dict.fromkeys(gone, 64)
            rows = [
                MetricRow(m, "eigentrack.entropy", step, 2.0 + step / 100)
                for m in MODULES
                if m not in gone
            ]
            result_store.replace_results(s, run.id, frame.id, step, "activations", rows, [])
        run_id = run.id
    engine.dispose()
    return run_id


def seed_open_alert(data_dir: Path) -> tuple[int, int]:
    """A finished run with one open ``nonfinite`` alert (nothing evaluates it again): the
    alerts page's acknowledge button. Returns the run's and the alert's ids."""
    engine, sessions = migrated(data_dir)
    with sessions.begin() as s:
        proj, _ = repo.get_or_create_project(s, "acked")
        run, _ = repo.get_or_create_run(s, proj, "done", {}, [])
        run.status = "finished"
        alert = alert_store.insert_alert(
            s,
            Alert(
                run_id=run.id,
                rule="nonfinite",
                severity="critical",
                status="open",
                step=60,
                message="nonfinite: 5 NaN/Inf values in 5 layers: 0.weight, 0.bias, 2.weight "
                "and 2 more (weights frame, step 60)",
                values={"layers": ["0.weight"], "layer_count": 1},
            ),
        )
        ids = run.id, alert.id
    engine.dispose()
    return ids


RULES_PROJECT = "guarded"


def seed_rules(data_dir: Path) -> int:
    """A project whose rules show every state on the rules page: two open alerts (one
    resolved) under ``alpha_out_of_range``, a customized default (``spectral_norm_blowup``,
    factor 20) and a stored custom rule that no longer validates (an unknown parameter, as an
    upgrade that renamed one leaves it). Returns the run's id."""
    engine, sessions = migrated(data_dir)
    with sessions.begin() as s:
        proj, _ = repo.get_or_create_project(s, RULES_PROJECT)
        run, _ = repo.get_or_create_run(s, proj, "watched", {}, [])
        run.status = "finished"
        for layer, status in (("fc1", "open"), ("fc2", "open"), ("fc3", "resolved")):
            s.add(
                Alert(
                    run_id=run.id,
                    rule="alpha_out_of_range",
                    layer=layer,
                    severity="warning",
                    status=status,
                    step=10,
                    message="alpha 1.5 < 2",
                    values={"htsr.alpha": 1.5},
                )
            )
        alert_store.upsert_rule(s, proj.id, "spectral_norm_blowup", True, {"factor": 20.0})
        alert_store.upsert_rule(
            s,
            proj.id,
            "old_custom",
            True,
            {"kind": "threshold", "metric": "htsr.alpha", "below": 1.0, "renamed_param": 3},
        )
        run_id = run.id
    engine.dispose()
    return run_id
