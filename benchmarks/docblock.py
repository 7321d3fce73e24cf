"""Replace a generated block of a markdown file, between <!-- NAME:begin --> and <!-- NAME:end -->."""

from __future__ import annotations

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
