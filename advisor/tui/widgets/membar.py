"""A stacked bar of an estimate's components against the GPU's capacity (proportions only)."""

from __future__ import annotations

from rich.text import Text
from textual.widget import Widget

from advisor.present import label
from advisor.units import GIB

COLORS = {
    "weights": "#4e79a7", "lora_adapters": "#59a14f", "gradients": "#f28e2b", "optimizer_states": "#e15759",
    "activations": "#76b7b2", "logits_and_loss": "#edc948", "transient": "#b07aa1", "kv_cache": "#ff9da7",
    "prefill_activations": "#76b7b2", "zero3_gathered_params": "#9c755f", "ddp_buckets": "#bab0ac",
    "zero_buckets": "#bab0ac", "cuda_context": "#7f7f7f", "cublas_workspace": "#999999",
    "attention_workspace": "#8a8a8a", "nccl_buffers": "#6f6f6f", "allocator_cache": "#5f5f5f",
}


class MemoryBar(Widget):
    """Segments in the order the advisor reports them: tensors first, then GPU overhead."""

    DEFAULT_CSS = "MemoryBar { height: auto; min-height: 4; }"

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.parts: list[tuple[str, int]] = []
        self.capacity: int | None = None
        self.capacity_label = ""

    def show(self, components: dict[str, int], overhead: dict[str, int], capacity: int | None, label: str = "") -> None:
        self.parts = [(k, v) for k, v in {**components, **overhead}.items() if v > 0]
        self.capacity, self.capacity_label = capacity, label
        self.refresh(layout=True)

    def clear(self) -> None:
        self.parts, self.capacity = [], None
        self.refresh(layout=True)

    def get_content_height(self, container, viewport, width: int) -> int:
        return 2 + max(1, self._legend(width).count("\n") + 1) if self.parts else 1

    def _legend(self, width: int) -> str:
        lines, line = [], ""
        for k, v in self.parts:
            item = f"■ {label(k)} {v / GIB:.2f}  "
            if len(line) + len(item) > width and line:
                lines.append(line)
                line = ""
            line += item
        return "\n".join([*lines, line])

    def render(self) -> Text:
        width = max(10, self.size.width)
        if not self.parts:
            return Text("no estimate", style="dim")
        total = sum(v for _, v in self.parts)
        scale = max(total, self.capacity or 0)
        bar = Text()
        used = 0
        for k, v in self.parts:
            cells = round(v / scale * width)
            cells = min(cells, width - used)
            bar.append("█" * cells, style=COLORS.get(k, "white"))
            used += cells
        if used < width:
            bar.append("░" * (width - used), style="dim")
        ruler = Text()
        if self.capacity:
            at = min(width - 1, max(0, round(self.capacity / scale * width) - 1))  # the capacity's column
            cap = f"{self.capacity / GIB:.1f} GiB {self.capacity_label}"
            left = cap + " ▲"
            if at + 1 >= len(left):
                ruler.append(" " * (at + 1 - len(left)) + left, style="bold")
            else:
                ruler.append(" " * at + "▲ " + cap, style="bold")
            if total > self.capacity:
                ruler.append(f"   over by {(total - self.capacity) / GIB:.2f} GiB", style="bold red")
            ruler.truncate(width)
        out = Text("\n").join([bar, ruler])
        legend = Text()
        for k, v in self.parts:
            legend.append("■ ", style=COLORS.get(k, "white"))
            legend.append(f"{label(k)} {v / GIB:.2f}  ")
        out.append("\n")
        out.append_text(legend)
        return out
