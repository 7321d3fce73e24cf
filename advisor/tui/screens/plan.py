"""Plan: the form on the left, the estimate, the three-way comparison and the GPU table on the right."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.suggester import SuggestFromList
from textual.widgets import Checkbox, DataTable, Footer, Header, Input, Label, Select, Static

from advisor import present
from advisor.forms import CHECKBOXES, HARNESS_CHOICES, NO_GPU, TRANSFORMERS_CHOICES, Evaluation, fetch_model
from advisor.present import money
from advisor.tui.widgets.field import Field
from advisor.tui.widgets.membar import MemoryBar
from advisor.tui.widgets.tables import badge, breakdown_table, compare_table, short_gpu
from advisor.units import GIB, gib

INPUTS = ("model", "gpus", "batch", "seq", "accum", "lora_r", "lora_alpha", "lora_targets")
TRAIN_ONLY = ("method", "optimizer", "accum", "ckpt", "offload", "liger", "lora_r", "lora_alpha", "lora_targets",
              "transformers", "harness")
SELECTS = ("gpu", "zero", "task", "method", "precision", "optimizer", "weight_quant", "transformers", "harness",
           "device")
LORA_ONLY = ("lora_r", "lora_alpha", "lora_targets")


def _select(name: str, options, value) -> Select:
    return Select([(str(o), o) if not isinstance(o, tuple) else o for o in options], value=value,
                  allow_blank=False, compact=True, id=name)


class PlanScreen(Screen):
    AUTO_FOCUS = "#model"
    BINDINGS = [Binding("ctrl+r", "recompute", "Re-estimate", show=False),
                Binding("g", "focus_gpus", "GPU table", show=False)]

    def compose(self) -> ComposeResult:
        from advisor.gpus import gpu_table
        from advisor.model import bundled_profiles
        from advisor.spec import DEVICES, METHODS, OPTIMIZERS, PRECISIONS, TASKS, WEIGHT_QUANTS

        f = self.app.form
        gpus = [(short_gpu(g.name), g.id) for g in gpu_table().values()]
        gpus.append(("no GPU (tensors only)", NO_GPU))
        if f["gpu"] not in {v for _, v in gpus}:  # a loaded plan's unknown GPU: kept, and flagged on the field
            gpus.append((f"{f['gpu']} (unknown)", f["gpu"]))
        yield Header()
        with Horizontal(id="plan"):
            with VerticalScroll(id="form"):
                yield Label("Model and hardware", classes="section")
                yield Field("model", Input(f["model"], id="model", compact=True, suggester=SuggestFromList(
                    list(bundled_profiles()), case_sensitive=False), placeholder="profile, path or org/name"),
                    "model", "A bundled profile (type to complete), a local config.json / model dir, or a hub id "
                    "(Enter fetches its config.json).")
                yield Field("GPU", _select("gpu", gpus, f["gpu"]), "gpu")
                yield Field("GPUs", Input(f["gpus"], id="gpus", type="integer", compact=True), "gpus")
                yield Field("ZeRO", _select("zero", [("0 (none)", "0"), ("1", "1"), ("2", "2"),
                                                     ("3 / FSDP", "3")], f["zero"]), "zero")
                devices = [(f"{d} ({'GPU memory' if d == 'cuda' else 'RAM, tensors only'})", d) for d in DEVICES]
                yield Field("device", _select("device", devices, f["device"]), "device",
                            "cuda: GPU memory with the CUDA context and the allocator's cache; cpu: RAM for the "
                            "tensors alone (a CPU run).")
                yield Label("Job", classes="section")
                yield Field("task", _select("task", TASKS, f["task"]), "task")
                yield Field("method", _select("method", METHODS, f["method"]), "method")
                yield Field("precision", _select("precision", PRECISIONS, f["precision"]), "precision")
                yield Field("optimizer", _select("optimizer", OPTIMIZERS, f["optimizer"]), "optimizer")
                yield Field("weights", _select("weight_quant", WEIGHT_QUANTS, f["weight_quant"]),
                            "weight_quant")
                yield Field("micro-batch", Input(f["batch"], id="batch", type="integer", compact=True), "batch")
                yield Field("seq length", Input(f["seq"], id="seq", type="integer", compact=True), "seq")
                yield Field("grad accum", Input(f["accum"], id="accum", type="integer", compact=True), "accum")
                yield Field("checkpoint", Checkbox("recompute in backward", bool(f["ckpt"]), id="ckpt",
                                                   compact=True), "ckpt")
                yield Field("offload", Checkbox("checkpoints in host RAM", bool(f["offload"]), id="offload",
                                                compact=True), "offload")
                yield Field("liger", Checkbox("fused loss and kernels", bool(f["liger"]), id="liger",
                                              compact=True), "liger")
                releases = list(TRANSFORMERS_CHOICES)
                if f["transformers"] not in {v for _, v in releases}:  # a loaded plan's own release
                    releases.append((f"transformers {f['transformers']}", f["transformers"]))
                yield Field("stack", _select("transformers", releases, f["transformers"]), "transformers",
                            "The transformers release the run uses: the loss and mixture-of-experts layers "
                            "differ (tuneplan run uses 5).")
                yield Field("harness", _select("harness", HARNESS_CHOICES, f["harness"]), "harness",
                            "What runs the job: the band around the expected peak is that harness's (tuneplan's own "
                            "runner the tightest, another harness the widest); tight verdicts use its high end.")
                yield Label("LoRA", classes="section")
                yield Field("rank r", Input(f["lora_r"], id="lora_r", type="integer", compact=True), "lora_r")
                yield Field("alpha", Input(f["lora_alpha"], id="lora_alpha", type="number", compact=True),
                            "lora_alpha")
                yield Field("targets", Input(f["lora_targets"], id="lora_targets", compact=True), "lora_targets")
                yield Static("", id="general")
            with Vertical(id="results"):
                yield Static("", id="headline")
                yield MemoryBar(id="bar")
                yield Static("", id="time")
                with Horizontal(id="tables"):
                    yield Static("", id="components")
                    yield Static("", id="compare")
                yield Static("", id="gpus-title")
                yield DataTable(id="gpu-table", cursor_type="row", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        t = self.query_one("#gpu-table", DataTable)
        t.add_columns("GPU", "memory GiB", "need GiB", "fit", "time", "cost")
        self._timer = None
        self._shown = False  # a valid estimate is on screen (kept, dimmed, while the form has problems)
        self.watch(self.app, "form", self.write_form, init=False)  # a plan opened, a job changed elsewhere
        self.watch(self.app, "evaluation", self.show, init=True)

    # --- input -> debounced re-estimate -----------------------------------------------------------
    def read_form(self) -> dict[str, Any]:
        form = dict(self.app.form)
        for name in INPUTS:
            form[name] = self.query_one(f"#{name}", Input).value
        for name in SELECTS:
            form[name] = self.query_one(f"#{name}", Select).value
        for name in CHECKBOXES:
            form[name] = self.query_one(f"#{name}", Checkbox).value
        return form

    def write_form(self, form: dict[str, Any]) -> None:
        """The app's form into the widgets where they differ (a plan opened elsewhere)."""
        for name in INPUTS:
            w = self.query_one(f"#{name}", Input)
            if w.value != str(form[name]):
                w.value = str(form[name])
        for name in SELECTS:
            sel = self.query_one(f"#{name}", Select)
            if sel.value != form[name]:
                try:
                    sel.value = form[name]
                except Exception:  # a GPU named in the file but not in the table: flagged by the estimate
                    pass
        for name in CHECKBOXES:
            if self.query_one(f"#{name}", Checkbox).value != bool(form[name]):
                self.query_one(f"#{name}", Checkbox).value = bool(form[name])

    @on(Input.Changed)
    @on(Select.Changed)
    @on(Checkbox.Changed)
    def _changed(self, event) -> None:
        if self._timer is not None:
            self._timer.stop()
        self._timer = self.set_timer(0.12, self.recompute)

    @on(Input.Submitted, "#model")
    def _fetch(self, event: Input.Submitted) -> None:
        from advisor.forms import needs_fetch

        if needs_fetch(event.value):
            self.query_one("#field-model", Field).set_error(f"fetching config.json of {event.value.strip()} …")
            self._resolve(event.value)
        else:
            self.recompute()

    @work(thread=True, exclusive=True, group="fetch")
    def _resolve(self, ref: str) -> None:
        err = fetch_model(ref)
        self.app.call_from_thread(self._fetched, err)

    def _fetched(self, err: str | None) -> None:
        if err:
            self.query_one("#field-model", Field).set_error(err)
        else:
            self.app.form = self.read_form()  # re-evaluated now that the config is cached

    def on_resize(self, event) -> None:
        """Below 150 columns the tables stack and the results scroll (the side-by-side needs the width)."""
        self.set_class(event.size.width < 150, "-narrow")

    def action_recompute(self) -> None:
        self.recompute()

    def action_focus_gpus(self) -> None:
        self.query_one("#gpu-table").focus()

    def recompute(self) -> None:
        """The widgets into the app's form (its evaluation follows, and this screen shows it)."""
        self._timer = None
        form = self.read_form()
        if form != self.app.form:
            self.app.form = form

    @on(DataTable.RowSelected, "#gpu-table")
    def _pick_gpu(self, event: DataTable.RowSelected) -> None:
        self.query_one("#gpu", Select).value = str(event.row_key.value)

    # --- render ------------------------------------------------------------------------------------
    def show(self, ev: Evaluation | None) -> None:
        if ev is None:
            return
        f = ev.form
        training = f["task"] == "training"
        for name in TRAIN_ONLY:
            self.query_one(f"#field-{name}").display = training and (name not in LORA_ONLY or f["method"] != "full")
        self.query_one("#field-weight_quant").display = not training
        for field in self.query(Field):
            field.set_error(ev.errors.get(field.field_name))
        self.query_one("#general", Static).update(Text("\n".join(ev.general), style="bold red"))
        head = self.query_one("#headline", Static)
        if not ev.ok:
            n = len(ev.errors) + len(ev.general)
            msg = Text(f"{n} problem{'s' * (n != 1)} in the form — each is marked on its field", style="bold red")
            if self._shown:
                msg.append("\nthe numbers below are for the last valid plan", style="dim")
            else:
                self.query_one("#bar", MemoryBar).clear()
            head.update(msg)
            self.query_one("#results").add_class("-stale")
            return
        self._shown = True
        self.query_one("#results").remove_class("-stale")
        r, gpu = ev.result, ev.gpu
        line = Text()
        line.append(f"{r.shape.name}", style="bold")
        total = r.shape.params_total
        line.append(f"  {total / 1e9:,.2f}B" if total >= 1e9 else f"  {total / 1e6:,.1f}M")
        line.append(f" params, {r.params_trainable:,} trainable   ")
        v = r.verdict
        if v is not None and v.cache_limited:  # nvidia-smi never reads above the card
            line.append(f"nvidia-smi {gib(v.on_card_bytes)} GiB, the card's limit", style="bold")
            line.append(f" ({gib(r.peak_reserved_bytes)} with no limit)")
        else:
            line.append(f"peak {gib(r.peak_reserved_bytes)} GiB reserved", style="bold")
            if r.peak_reserved_high_bytes > r.peak_reserved_bytes:
                line.append(f" (p90 {gib(r.peak_reserved_high_bytes)})")
        line.append(f" · {gib(r.peak_allocated_bytes)} GiB tensors ")
        if gpu is not None and r.verdict is not None:
            line.append(f"on {gpu.name}: ")
            line.append_text(badge(r.status))
            room = r.verdict.headroom_bytes
            line.append(f" {'headroom' if room >= 0 else 'short by'} {gib(abs(room))} GiB")
        line.append(f"\nmodelled: {r.breakdown.reserved_model} · {present.stack_line(plan=r.plan)}", style="dim")
        for note in r.notes:
            line.append(f"\nnote: {note}", style="dim")
        head.update(line)
        bd = r.breakdown
        self.query_one("#bar", MemoryBar).show(bd.components, bd.overhead, gpu.memory_bytes if gpu else None,
                                               gpu.name if gpu else "")
        self.query_one("#time", Static).update(self._time_text(ev))
        self.query_one("#components", Static).update(
            breakdown_table(r, f"peak at {bd.peak_phase.replace('_', ' ')}", compact=True))
        current = f["method"] if training else {"none": "16-bit"}.get(f["weight_quant"], f["weight_quant"])
        self.query_one("#compare", Static).update(compare_table(ev.compare, current))
        self._gpu_table(ev)

    def _time_text(self, ev: Evaluation) -> Text:
        """Time and cost of the job for this plan, the assumptions in one line, and the plan's limits."""
        from advisor.present import limit_line, moments_line, time_line

        text = Text()
        for line in (moments_line(ev.result), time_line(ev.result)):
            if line is not None:
                if text.plain:
                    text.append("\n")
                text.append_text(line)
        if ev.result.time is not None:
            text.append(f"\nassumed: {ev.result.time.assumptions}", style="dim")
        for lim in ev.limits:
            text.append("\n")
            text.append_text(limit_line(lim))
        if ev.serving is not None or ev.serving_error:  # an inference plan on a GPU: vLLM's KV cache and command
            if text.plain:
                text.append("\n")
            text.append_text(present.serve_lines(ev.serving) if ev.serving is not None else
                             Text(f"vLLM: {ev.serving_error}", style="red"))
        return text

    def _gpu_table(self, ev: Evaluation) -> None:
        from advisor.units import duration

        t = self.query_one("#gpu-table", DataTable)
        row = t.cursor_row
        t.clear()
        job = ev.plan.job
        n = ev.plan.hardware.gpus
        fits = sum(r.status in ("fits", "tight") for r in ev.gpu_rows)
        self.query_one("#gpus-title", Static).update(Text.assemble(
            ("GPUs for this plan", "bold"), f"  {fits} of {len(ev.gpu_rows)} fit"
            + (f" · ×{n} GPUs each" if n > 1 else "")
            + (f" · time and cost for {job.examples:,} examples × {job.avg_tokens} tokens × "
               f"{ev.plan.run.epochs:g} epochs (set on the Advice screen) · Enter picks a GPU"
               if ev.plan.task == "training" else "")))
        for r in ev.gpu_rows:
            mark = "▶ " if r.id == (ev.gpu.id if ev.gpu else None) else "  "
            t.add_row(mark + short_gpu(r.name), f"{r.memory_bytes / GIB:,.1f}", gib(r.need_bytes), badge(r.status),
                      duration(r.hours) if r.hours is not None else "-", money(r.cost_usd), key=r.id)
        if row:
            t.move_cursor(row=min(row, t.row_count - 1))
