"""A small line/area chart of one series, with optional horizontal reference lines (predicted peak)."""

from __future__ import annotations

from rich.text import Text
from textual.widget import Widget

BLOCKS = " ▁▂▃▄▅▆▇█"


class LineChart(Widget):
    DEFAULT_CSS = "LineChart { height: 8; }"

    def __init__(self, title: str = "", unit: str = "", scale: float = 1.0, **kw) -> None:
        super().__init__(**kw)
        self.title, self.unit, self.scale = title, unit, scale
        self.values: list[float] = []
        self.lines: list[tuple[float, str, str]] = []  # (value, label, style)

    def set_data(self, values: list[float], lines: list[tuple[float, str, str]] | None = None) -> None:
        self.values = list(values)
        self.lines = list(lines or [])
        self.refresh()

    def render(self) -> Text:
        w, h = max(8, self.size.width), max(3, self.size.height)
        rows = h - 1
        vals = self.values[-w:] if len(self.values) > w else self.values
        top = max([*vals, *(v for v, _, _ in self.lines), 1e-12])
        top *= 1.05
        head = f"{self.title}"
        if vals:
            head += f"  last {vals[-1] / self.scale:,.3g} {self.unit}  max {max(vals) / self.scale:,.3g} {self.unit}"
        else:
            head += "  (no data yet)"
        out = Text(head[:w], style="bold")
        line_rows = {min(rows - 1, int((1 - v / top) * rows)): (v, lab, st) for v, lab, st in self.lines}
        for r in range(rows):
            out.append("\n")
            lo = (rows - 1 - r) / rows * top  # value at the bottom of this row
            row = Text()
            for v in vals:
                eighths = int(max(0.0, min(1.0, (v - lo) / (top / rows))) * 8)
                row.append(BLOCKS[eighths] if eighths else " ", style="cyan")
            row.append(" " * (w - len(vals)))
            if r in line_rows:
                v, lab, st = line_rows[r]
                label = f" {lab} {v / self.scale:,.3g} {self.unit} "
                merged = Text()
                for ch in row.plain[: max(0, w - len(label))]:
                    merged.append("─" if ch == " " else ch, style=st if ch == " " else "cyan")
                merged.append(label, style=st)
                row = merged
            out.append_text(row)
        return out
