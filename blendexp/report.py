"""Sweep report entry point: ``python -m blendexp.report <sweep folder> [--out DIR]``.

Reads every job's ``result.json`` and writes ``report.csv``, ``report.md`` (jobs × swept values and metrics; failed
jobs with their error) and ``plots/<swept key>.png`` (each metric against each swept value) into the sweep folder,
or into ``--out`` (e.g. ``experiments/<study>/results``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

def main(argv: list[str] | None = None) -> int:
    """CLI; a missing or empty sweep folder is one clear line and exit status 1."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path, help="a multirun folder (hydra.sweep.dir)")
    parser.add_argument("--out", type=Path, default=None, help="where to write the report (default: the sweep folder)")
    args = parser.parse_args(argv)
    from blendexp.eval.sweep_report import write_sweep_report  # pandas and matplotlib: not needed for --help

    try:
        files = write_sweep_report(args.sweep, args.out)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(files["table"])
    print(f"blendexp: {files['summary']}\n  report: {files['markdown']}\n  csv:    {files['csv']}"
          + "".join(f"\n  plot:   {p}" for p in files["plots"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
