"""Registers the user-side tools on the ``spectrawatch`` command: ``analyze`` (offline weight
metrics of a checkpoint), ``export`` / ``import`` (move a run between servers) and ``doctor``.

``analyze`` needs torch and the spectral modules; they are imported when the command runs, so
that building the parser (every ``spectrawatch`` invocation) stays fast.
"""

from __future__ import annotations

import argparse
from typing import Any

from spectrawatch._cli_runs import add_runs_commands
from spectrawatch._doctor import add_doctor_command
from spectrawatch._export import add_export_commands
from spectrawatch._sync import add_sync_command


def _cmd_analyze(args: argparse.Namespace) -> int:
    from spectrawatch._analyze import cmd_analyze

    return cmd_analyze(args)


def add_analyze_command(subparsers: Any) -> None:
    """Register ``analyze`` (see :mod:`spectrawatch._analyze`)."""
    p = subparsers.add_parser(
        "analyze",
        help="offline weight metrics (HT-SR, FARMS, conditioning) of a checkpoint",
        description="Weight metrics of a checkpoint, offline: HT-SR and FARMS power-law fits "
        "and conditioning of every 2-D/4-D weight. PATH: a .safetensors file, a directory of "
        "shards or a Hugging Face model folder, or a PyTorch state dict (loaded with "
        "torch.load(weights_only=True) only).",
    )
    p.add_argument(
        "path",
        nargs="?",
        default=None,
        help=".safetensors file, directory of shards / HF model folder, or state dict",
    )
    p.add_argument(
        "--compare",
        nargs=2,
        metavar=("A", "B"),
        default=None,
        help="diff two checkpoints layer by layer",
    )
    p.add_argument(
        "--format",
        choices=["table", "json", "csv"],
        default="table",
        help="output format (default table): json, a list with one object per weight; csv, one "
        "row per weight",
    )
    p.add_argument(
        "-o", "--output", default=None, help="write the --format output to FILE (-: stdout)"
    )
    p.add_argument("--csv", default=None, help="also write all metrics per layer as CSV to FILE")
    p.add_argument("--json", default=None, help="also write all metrics per layer as JSON to FILE")
    p.add_argument(
        "--html",
        default=None,
        help="write a self-contained Plotly report (ESD plots, alpha per layer)",
    )
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--layers", default=None, help="only tensors whose name contains this text")
    p.add_argument(
        "--farms",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="FARMS metrics (default on; --no-farms is faster)",
    )
    p.add_argument(
        "--traps",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="correlation traps (WeightWatcher's randomize=True): the ESD of each weight with its "
        "entries shuffled, one more eigendecomposition per layer (default off)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no table, no progress bar")
    p.set_defaults(func=_cmd_analyze)


def add_tool_commands(subparsers: Any) -> None:
    """Add ``analyze``, ``runs``, ``export``, ``import``, ``sync`` and ``doctor``."""
    add_analyze_command(subparsers)
    add_runs_commands(subparsers)
    add_export_commands(subparsers)
    add_sync_command(subparsers)
    add_doctor_command(subparsers)
