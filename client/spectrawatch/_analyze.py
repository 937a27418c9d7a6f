"""``spectrawatch analyze``: offline weight metrics of a checkpoint, no server needed.

Reads a ``.safetensors`` file, a directory of shards, a PyTorch state-dict file (only ever through
``torch.load(weights_only=True)``: arbitrary pickles are refused, never executed) or a Hugging
Face model directory; computes the HT-SR and FARMS metrics (:mod:`spectrawatch.spectral.htsr`,
:mod:`spectrawatch.spectral.farms`) and weight conditioning
(:mod:`spectrawatch.spectral.conditioning`) of every 2-D / 4-D weight, on CUDA when present, and
prints a table; ``--csv``, ``--json`` and ``--html`` (a self-contained Plotly report) write the
results, ``--compare A B`` diffs two checkpoints layer by layer. The numbers are exactly those the
server's worker computes from a weights frame (same pure functions, same FARMS configuration).

The command is here; :mod:`spectrawatch._checkpoint` reads the inputs,
:mod:`spectrawatch._checkpoint_metrics` computes the metric tables and comparisons,
:mod:`spectrawatch._analysis_formats` writes tables, CSV and JSON and
:mod:`spectrawatch._analysis_report` the HTML report.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from spectrawatch._analysis_formats import (
    compare_json,
    format_compare,
    format_table,
    write_compare_csv,
    write_csv,
)
from spectrawatch._analysis_report import html_report
from spectrawatch._checkpoint import (
    AnalyzeError,
    TensorRef,
    _count,
    checkpoint_files,
    checkpoint_tensors,
    load_weights,
    shadowed_files,
)
from spectrawatch._checkpoint_metrics import (
    FIELDS,
    TABLE_COLUMNS,
    CheckpointAnalysis,
    LayerDiff,
    LayerResult,
    analyze_checkpoint,
    analyze_layer,
    compare,
    conditioning_values,
    resolve_device,
)
from spectrawatch.spectral.farms import FARMS_CV

__all__ = [
    "FIELDS",
    "TABLE_COLUMNS",
    "AnalyzeError",
    "CheckpointAnalysis",
    "LayerDiff",
    "LayerResult",
    "TensorRef",
    "analyze_checkpoint",
    "analyze_layer",
    "checkpoint_files",
    "checkpoint_tensors",
    "cmd_analyze",
    "compare",
    "compare_json",
    "conditioning_values",
    "format_compare",
    "format_table",
    "html_report",
    "load_weights",
    "resolve_device",
    "shadowed_files",
    "write_compare_csv",
    "write_csv",
]


def _write(path: str, text: str) -> None:
    try:
        Path(path).write_text(text, encoding="utf-8")
    except OSError as exc:
        raise AnalyzeError(f"cannot write {path}: {exc}") from exc


def cmd_analyze(args: argparse.Namespace) -> int:
    """``spectrawatch analyze PATH`` / ``spectrawatch analyze --compare A B``: 0 on success,
    1 when some shards of a directory could not be read (the rest is analysed and written, each
    unreadable shard named on stderr), 2 for an input or output that cannot be used, 130 when
    interrupted."""
    _tolerant_stdout()
    try:
        return _cmd_analyze(args)
    except AnalyzeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`| head`): cli.main ends quietly
        raise
    except OSError as exc:  # stdout itself failed (disk full)
        print(f"error: cannot write the output: {exc}", file=sys.stderr)
        return 2


def _tolerant_stdout() -> None:
    """Names outside the terminal's encoding are printed escaped instead of failing."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]


def _check_output(path: str | None, option: str) -> None:
    """Fail before any analysis when an output file cannot be written."""
    if path is None or (path == "-" and option == "-o"):  # -o -: stdout, as without -o
        return
    if path == "-":
        raise AnalyzeError(f"{option} -: stdout is for the --format output (-o -); give a file")
    if not path.strip():
        raise AnalyzeError(f"{option}: empty file name")
    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise AnalyzeError(f"{option} {path}: is a directory")
    if not parent.is_dir():
        raise AnalyzeError(f"{option} {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise AnalyzeError(f"{option} {path}: not writable")


def _csv_text(write: Callable[[Any, TextIO], None], data: Any) -> str:
    buf = io.StringIO()
    write(data, buf)
    return buf.getvalue()


def _emit(args: argparse.Namespace, text: str) -> None:
    """The ``--format`` output: to ``-o FILE`` or stdout (also ``-o -``)."""
    if args.output and args.output != "-":
        _write(args.output, text if text.endswith("\n") else text + "\n")
    else:
        print(text)


def _cmd_analyze(args: argparse.Namespace) -> int:
    if (args.path is None) == (args.compare is None):
        raise AnalyzeError("give either a checkpoint PATH or --compare A B")
    for option in ("output", "csv", "json", "html"):
        _check_output(getattr(args, option), "-o" if option == "output" else f"--{option}")
    inputs = [args.path] if args.path is not None else list(args.compare)
    for path in inputs:  # a missing second checkpoint is reported before the first is analysed
        checkpoint_files(Path(path))
        if passed_over := shadowed_files(Path(path)):
            print(
                f"note: {path}: reading its .safetensors shards; "
                f"{_count(len(passed_over), 'PyTorch file')} beside them not read "
                f"({', '.join(p.name for p in passed_over[:3])}"
                f"{', ...' if len(passed_over) > 3 else ''}), as transformers does",
                file=sys.stderr,
            )
    farms = FARMS_CV if args.farms else None
    opts: dict[str, Any] = {
        "device": args.device,
        "farms": farms,
        "progress": not args.quiet,
        "traps": args.traps,
    }
    if args.layers:
        needle = args.layers
        opts["layers"] = lambda name: needle in name
    render: dict[str, Callable[[], str]]
    if args.compare is not None:
        a = analyze_checkpoint(args.compare[0], **opts)
        b = analyze_checkpoint(args.compare[1], **opts)
        diffs = compare(a, b)
        analyses = [a, b]
        render = {
            "json": lambda: json.dumps(compare_json(a, b, diffs), indent=1),
            "csv": lambda: _csv_text(write_compare_csv, diffs),
            "table": lambda: format_compare(diffs),
            "html": lambda: html_report([a, b], f"spectrawatch compare: {a.source} vs {b.source}"),
        }
        summary = ""
    else:
        analysis = analyze_checkpoint(args.path, **opts)
        analyses = [analysis]
        render = {
            "json": lambda: json.dumps(analysis.to_json(), indent=1),
            "csv": lambda: _csv_text(write_csv, analysis),
            "table": lambda: format_table(analysis),
            "html": lambda: html_report([analysis], f"spectrawatch analyze: {analysis.source}"),
        }
        warned = sum(1 for r in analysis.layers if r.warning)
        failed = sum(1 for r in analysis.layers if r.note.startswith("not analysed"))
        summary = (
            f"\n{_count(len(analysis.layers), 'layer')} analysed on {analysis.device}, "
            f"{warned} with warnings, {_count(analysis.ignored, 'other tensor')} ignored"
            + (f", {failed} not analysed (see their notes)" if failed else "")
            + (
                f", {_count(len(analysis.unreadable), 'file')} not read"
                if analysis.unreadable
                else ""
            )
        )
    if args.format != "table" or args.output or not args.quiet:
        _emit(args, render[args.format]())
    if args.format == "table" and summary and not args.quiet:
        print(summary, file=sys.stderr if args.output else sys.stdout)
    for option in ("csv", "json", "html"):  # the extra files
        if getattr(args, option):
            _write(getattr(args, option), render[option]())
    unread = [reason for a in analyses for reason in a.unreadable]
    for reason in unread:
        print(f"error: not read, skipped: {reason}", file=sys.stderr)
    return 1 if unread else 0
