"""The TUI's tables: the shared presenters (advisor.present) plus the run report of the launch screen."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text

from advisor.present import badge, breakdown_table, compare_table, short_gpu  # noqa: F401  (the screens' tables)
from advisor.units import gib


def report_table(report: dict, predicted: dict) -> Table:
    """Predicted vs measured from report.json: every number it carries, in GiB for bytes."""
    t = Table(title="predicted vs measured", title_justify="left", box=None, header_style="bold", expand=True)
    t.add_column("")
    t.add_column("GiB", justify="right")
    def mapping(v) -> dict:
        return v if isinstance(v, dict) else {}

    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    for k, v in (mapping(report.get("predicted")) or mapping(predicted)).items():
        if number(v):
            t.add_row(f"predicted {k.replace('_bytes', '').replace('_', ' ')}", gib(v))
    for k, v in mapping(report.get("measured")).items():
        if number(v):
            t.add_row(f"measured {k.replace('_bytes', '').replace('_', ' ')}", gib(v))
    cmp = mapping(report.get("compare"))
    if number(cmp.get("ratio")):
        t.add_row(Text("measured / predicted", style="bold"), Text(f"× {cmp['ratio']:.2f}", style="bold"))
    if cmp.get("what"):
        t.add_row(Text(str(cmp["what"]), style="dim"), "")
    loss = mapping(report.get("loss"))
    if loss:
        t.add_row("loss first → last", " → ".join(f"{loss[k]:.3f}" for k in ("first", "last") if number(loss.get(k))))
        if number(loss.get("final_val")):
            t.add_row("final val loss", f"{loss['final_val']:.3f}")
    for k in ("status", "steps", "runtime_s", "tokens_per_s", "adapter"):
        if report.get(k) is not None:
            t.add_row(k.replace("_", " "), str(report[k]))
    notes = report.get("notes")
    for n in notes if isinstance(notes, list) else []:
        t.add_row(Text(f"note: {n}", style="dim"), "")
    return t
