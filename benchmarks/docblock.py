"""Replace a generated block of a markdown file, between <!-- NAME:begin --> and <!-- NAME:end -->."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path


def write_between(path: str | Path, name: str, markdown: str) -> None:
    path = Path(path)
    text = path.read_text()
    start, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    if start not in text or end not in text:
        raise SystemExit(f"{path} has no {start} ... {end} block")
    head, _, rest = text.partition(start)
    _, _, tail = rest.partition(end)
    path.write_text(f"{head}{start}\n{markdown}\n{end}{tail}")


def table_arguments(name: str, results: Path) -> argparse.Namespace:
    """The command line of a benchmark that measures cases and writes a block: --write FILE, --table (the stored
    results, nothing measured), --only TEXT (the cases whose id holds it; the stored results are kept)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--write", help=f"markdown file with the {name} block (docs/accuracy.md)")
    ap.add_argument("--table", action="store_true", help=f"use {results.relative_to(results.parents[2])}, "
                    "measure nothing")
    ap.add_argument("--only", help="measure only cases whose id contains this")
    return ap.parse_args()


def stored_or_measured(a: argparse.Namespace, results: Path, cases: Sequence, case_id: Callable,
                       measure: Callable) -> list[dict]:
    """The rows of :func:`table_arguments`'s command: stored, or measured (and stored when every case ran)."""
    if a.table:
        return json.loads(results.read_text())
    rows = [measure(c) for c in cases if not a.only or a.only in case_id(c)]
    if not a.only:
        results.write_text(json.dumps(rows, indent=1) + "\n")
    return rows
