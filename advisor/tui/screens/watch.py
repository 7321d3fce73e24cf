"""Watch: live GPU memory per device and per process (NVML), or system memory without a GPU; with a
run directory, the run's own allocator numbers against its plan."""

from __future__ import annotations

import time
from collections import deque

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Input, Label, Static

from advisor.tui.messages import MemorySample, RunEvents
from advisor.tui.runs import RunState, follow_events
from advisor.tui.widgets.chart import LineChart
from advisor.units import GIB
from runner import api as runner_api

HISTORY = 600
MAX_CHARTS = 4


class WatchScreen(Screen):
    AUTO_FOCUS = "#watch-charts"  # not the input, so p and c work at once
    BINDINGS = [Binding("p", "pause", "Pause/resume"), Binding("c", "clear", "Clear history")]

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical(id="watch"):
            yield Static("", id="watch-status")
            with Horizontal(id="watch-run-row"):
                yield Label("run dir ", classes="field-label")
                yield Input(self.app.run_dir or "", id="watch-run", compact=True,
                            placeholder="a run directory to follow (Enter); empty: the machine only")
            with VerticalScroll(id="watch-charts"):
                for i in range(MAX_CHARTS):
                    yield LineChart(id=f"dev-{i}", unit="GiB", scale=GIB)
                yield LineChart("system memory used", unit="GiB", scale=GIB, id="sys-chart")
                yield LineChart("run: torch allocated", unit="GiB", scale=GIB, id="run-chart")
            yield DataTable(id="procs", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        self.history: dict[str, deque] = {}
        self.paused = False
        self.run: RunState | None = None
        for i in range(MAX_CHARTS):
            self.query_one(f"#dev-{i}").display = False
        self.query_one("#run-chart").display = False
        self.query_one("#procs", DataTable).add_columns("GPU", "pid", "process", "GiB")
        self.poll()
        if self.app.run_dir:
            self.follow(self.app.run_dir)

    def on_screen_resume(self) -> None:
        """Follow the run started (or resumed) on the Launch screen since this screen was last shown."""
        run_dir = self.app.run_dir
        if run_dir and (self.run is None or self.run.run_dir != run_dir):
            self.query_one("#watch-run", Input).value = run_dir
            self.follow(run_dir)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "watch-run":
            self.follow(event.value.strip())

    def follow(self, run_dir: str) -> None:
        self.run = RunState(run_dir) if run_dir else None
        self.query_one("#run-chart").display = bool(run_dir)
        if run_dir:
            self.tail(run_dir)

    @work(thread=True, exclusive=True, group="watch-poll")
    def poll(self) -> None:
        from textual.worker import get_current_worker

        worker = get_current_worker()
        while not worker.is_cancelled:
            try:
                self.post_message(MemorySample(runner_api.gpu_snapshot(), runner_api.system_memory()))
            except Exception as e:  # noqa: BLE001 - a sampler failure is shown, the loop goes on
                self.post_message(MemorySample(None, None, f"{type(e).__name__}: {e}"))
            time.sleep(1.0)

    @work(thread=True, exclusive=True, group="watch-tail")
    def tail(self, run_dir: str) -> None:
        from textual.worker import get_current_worker

        worker = get_current_worker()
        follow_events(run_dir, lambda events: self.post_message(RunEvents(run_dir, events)),
                      lambda: worker.is_cancelled)

    def on_run_events(self, m: RunEvents) -> None:
        if self.run is None or m.run_dir != self.run.run_dir:
            return
        self.run.apply(m.events)
        run = self.run
        lines = []
        for key, label in (("peak_reserved_bytes", "predicted reserved"),
                           ("peak_allocated_bytes", "predicted allocated")):
            if run.predicted.get(key):
                lines.append((float(run.predicted[key]), label, "bold red" if "reserved" in key else "bold yellow"))
        chart = self.query_one("#run-chart", LineChart)
        what = "torch allocated" if run.series("torch_allocated") else "process RSS (no CUDA: above the tensors)"
        chart.title = f"run {run.run_dir}: {what} ({run.status}, step {run.step})"
        if run.speed:  # measured vs predicted speed, the job re-projected (runner.speed)
            chart.title += f" · {run.speed['words']}"
        chart.set_data(run.series("torch_allocated") or run.series("rss"), lines)

    def on_memory_sample(self, m: MemorySample) -> None:
        if self.paused:
            return
        status = self.query_one("#watch-status", Static)
        text = Text()
        if m.gpus is None:
            text.append("No NVIDIA GPU visible (no NVML or no device): showing system memory. ", style="bold yellow")
        if m.error:
            text.append(m.error, style="dim")
        status.update(text)
        procs = self.query_one("#procs", DataTable)
        procs.clear()
        procs.display = bool(m.gpus)
        for i, dev in enumerate((m.gpus or [])[:MAX_CHARTS]):
            h = self.history.setdefault(f"dev-{i}", deque(maxlen=HISTORY))
            h.append(dev["used"])
            chart = self.query_one(f"#dev-{i}", LineChart)
            chart.display = True
            chart.title = (f"GPU {dev['index']} {dev['name']}: {dev['used'] / GIB:.2f} / {dev['total'] / GIB:.1f} GiB"
                           + (f" · util {dev['utilization']}%" if dev.get("utilization") is not None else ""))
            chart.set_data(list(h), [(float(dev["total"]), "capacity", "bold red")])
            for p in dev["processes"]:
                procs.add_row(str(dev["index"]), str(p["pid"]), p.get("name") or "?",
                              f"{p['used'] / GIB:.2f}" if p.get("used") else "-")
        if m.system:
            h = self.history.setdefault("sys", deque(maxlen=HISTORY))
            h.append(m.system["used"])
            chart = self.query_one("#sys-chart", LineChart)
            chart.title = f"system memory: {m.system['used'] / GIB:.2f} / {m.system['total'] / GIB:.1f} GiB used"
            chart.set_data(list(h), [(float(m.system["total"]), "total", "bold red")])

    def action_pause(self) -> None:
        self.paused = not self.paused
        self.notify("paused" if self.paused else "resumed")

    def action_clear(self) -> None:
        self.history.clear()
