"""Rich tables of what the advisor returned (GiB = 1024**3 bytes; conversion only here, at display)."""

from __future__ import annotations

from typing import Any

from rich.table import Table
from rich.text import Text

from advisor.cli import COMPONENT_LABELS

GIB = 1024**3
BADGE = {"fits": ("fits", "bold black on green"), "tight": ("tight", "bold black on yellow"),
         "oom": ("out of memory", "bold white on red"), "no-bf16": ("no bf16", "bold black on #888888")}
_ORDER = list(COMPONENT_LABELS)


def gib(b: int | float) -> str:
    return f"{b / GIB:,.2f}"


def short_gpu(name: str) -> str:
    """'NVIDIA GeForce RTX 4090 24GB' -> 'RTX 4090 24GB' (display only)."""
    return name.replace("NVIDIA ", "").replace("GeForce ", "")


def badge(status: str | None, short: bool = False) -> Text:
    if status is None:
        return Text(" no GPU chosen ", style="dim")
    word, style = BADGE[status]
    if short and status == "oom":
        word = "OOM"
    return Text(f" {word} ", style=style)


def _sorted(d: dict[str, int]) -> list[tuple[str, int]]:
    return sorted(d.items(), key=lambda kv: _ORDER.index(kv[0]) if kv[0] in _ORDER else 99)


def breakdown_table(res: dict[str, Any], title: str | None = None) -> Table:
    """The CLI's table: tensors at the peak, peak allocated, GPU overhead, peak reserved."""
    t = Table(title=title or f"at {res['peak_phase'].replace('_', ' ')}", title_justify="left", expand=True,
              box=None, padding=(0, 1), header_style="bold")
    t.add_column("component")
    t.add_column("GiB", justify="right")
    t.add_column("share", justify="right")
    total = res["peak_reserved_bytes"] or 1
    for k, v in _sorted(res["breakdown"]):
        t.add_row(COMPONENT_LABELS.get(k, k), gib(v), f"{100 * v / total:.0f}%")
    t.add_row(Text("peak allocated", style="bold"), Text(gib(res["peak_allocated_bytes"]), style="bold"), "")
    for k, v in res["overhead"].items():
        t.add_row(COMPONENT_LABELS.get(k, k), gib(v), f"{100 * v / total:.0f}%")
    if res["overhead"]:
        t.add_row(Text("peak reserved", style="bold"), Text(gib(res["peak_reserved_bytes"]), style="bold"), "")
    return t


def compare_table(variants: list[tuple[str, dict[str, Any]]], capacity: int | None, current: str | None,
                  status_of) -> Table:
    """Columns = variants (Full / LoRA / QLoRA); rows = components in GiB, trainable parameters, fit."""
    t = Table(title="same plan, three ways (GiB)", title_justify="left", expand=True, box=None,
              padding=(0, 1), header_style="bold")
    t.add_column("", no_wrap=True)
    for label, _ in variants:
        t.add_column(Text(label + (" ◀" if label.lower() == (current or "").lower() else "")), justify="right")
    keys: list[str] = []
    for _, r in variants:
        for k, _v in _sorted(r.get("breakdown", {})):
            if k not in keys:
                keys.append(k)
    keys.sort(key=lambda k: _ORDER.index(k) if k in _ORDER else 99)
    for k in keys:
        t.add_row(COMPONENT_LABELS.get(k, k), *[gib(r["breakdown"].get(k, 0)) if "breakdown" in r else "-"
                                               for _, r in variants])
    t.add_row(Text("peak reserved", style="bold"),
              *[Text(gib(r["peak_reserved_bytes"]), style="bold") if "breakdown" in r else Text("-")
                for _, r in variants])
    t.add_row("trainable", *[f"{r['model']['params_trainable'] / 1e6:,.1f}M" if "model" in r else "-"
                             for _, r in variants])
    if capacity:
        t.add_row("on this GPU", *[badge(status_of(r["peak_reserved_bytes"], capacity), short=True) if "breakdown" in r
                                   else Text(r.get("error", "-")[:20], style="red") for _, r in variants])
    return t


def report_table(report: dict, predicted: dict) -> Table:
    """Predicted vs measured from report.json: every number it carries, in GiB for bytes."""
    t = Table(title="predicted vs measured", title_justify="left", box=None, header_style="bold", expand=True)
    t.add_column("")
    t.add_column("GiB", justify="right")
    for k, v in (report.get("predicted") or predicted or {}).items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            t.add_row(f"predicted {k.replace('_bytes', '').replace('_', ' ')}", gib(v))
    for k, v in (report.get("measured") or {}).items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            t.add_row(f"measured {k.replace('_bytes', '').replace('_', ' ')}", gib(v))
    cmp = report.get("compare") or {}
    if cmp.get("ratio") is not None:
        t.add_row(Text("measured / predicted", style="bold"), Text(f"× {cmp['ratio']:.2f}", style="bold"))
    if cmp.get("what"):
        t.add_row(Text(cmp["what"], style="dim"), "")
    loss = report.get("loss") or {}
    if loss:
        t.add_row("loss first → last",
                  " → ".join(f"{loss[k]:.3f}" for k in ("first", "last") if loss.get(k) is not None))
        if loss.get("final_val") is not None:
            t.add_row("final val loss", f"{loss['final_val']:.3f}")
    for k in ("status", "steps", "runtime_s", "tokens_per_s", "adapter"):
        if report.get(k) is not None:
            t.add_row(k.replace("_", " "), str(report[k]))
    for n in report.get("notes") or []:
        t.add_row(Text(f"note: {n}", style="dim"), "")
    return t
