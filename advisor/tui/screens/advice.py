"""Advice: the advisor's recommendation and its options, RAG vs fine-tuning, and the exact estimate."""

from __future__ import annotations

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import Screen
from textual.widgets import Checkbox, DataTable, Footer, Header, Input, Label, ProgressBar, Select, Static

from advisor.tui.messages import SimDone, SimProgress
from advisor.tui.widgets.field import Field

# the job's inputs: form fields of the app's one form (advisor.forms: job.* and run.epochs in the plan)
JOB = (("job_examples", "examples", "int"), ("job_avg_tokens", "avg tokens", "int"), ("epochs", "epochs", "float"),
       ("job_target_batch", "target batch", "int"), ("job_budget", "budget $", "float"))
QUESTIONS = (("knowledge_changes_often", "the facts change often"), ("must_cite_sources", "answers must cite sources"),
             ("prompting_tried", "careful prompting was tried and measured"),
             ("latency_or_cost_limits", "latency or cost is a hard limit"),
             ("many_query_types", "it must keep serving other tasks"))


class AdviceScreen(Screen):
    AUTO_FOCUS = "#options"  # not an input, so `e` runs the exact estimate at once
    BINDINGS = [Binding("e", "exact", "Exact estimate"), Binding("r", "refresh_advice", "Re-advise", show=False)]

    def compose(self) -> ComposeResult:
        form = self.app.form
        yield Header()
        with Horizontal(id="advice"):
            with VerticalScroll(id="advice-left"):
                yield Label("The job (time and cost)", classes="section")
                with Horizontal(id="job"):
                    for key, label, kind in JOB:
                        yield Field(label, Input(str(form[key]), id=key, type="number" if kind == "float" else
                                                 "integer", compact=True, placeholder="none"), key)
                yield Field("GPUs", Select([("the plan's GPU", "plan"), ("every priced GPU", "all")], value="plan",
                                           allow_blank=False, compact=True, id="scope"), "scope")
                yield Static("", id="recommendation")
                yield Label("Enter on a row applies it to the plan (F2 shows it)", classes="hint")
                yield DataTable(id="options", cursor_type="row", zebra_stripes=True)
                yield Static("", id="nearest-title")
                yield DataTable(id="nearest", cursor_type="row", zebra_stripes=True)
                yield Label("Exact estimate (press e): the real architecture on fake tensors", classes="section")
                yield ProgressBar(total=1.0, id="sim-progress", show_eta=False)
                yield Static("", id="sim-status")
                yield Static("", id="sim-result")
            with VerticalScroll(id="advice-right"):
                yield Label("Fine-tune, RAG, or just prompt?", classes="section")
                yield Field("the gap", Select([("unsure", "unsure"), ("knowledge (facts missing)", "knowledge"),
                                               ("behaviour (form, style)", "behaviour"), ("both", "both")],
                                              value="unsure", allow_blank=False, compact=True, id="q-gap"), "q-gap")
                yield Field("examples", Input("0", id="q-examples", type="integer", compact=True), "q-examples")
                for key, label in QUESTIONS:
                    yield Checkbox(label, id=f"q-{key}", compact=True)
                yield Static("", id="verdict")
        yield Footer()

    def on_mount(self) -> None:
        from advisor.present import OPTION_COLUMNS

        self.query_one("#options", DataTable).add_columns(*OPTION_COLUMNS)
        self.query_one("#nearest", DataTable).add_columns("the nearest plan that fits", "GiB / card", "fit", "time",
                                                          "cost")
        self._advice = None
        self.query_one("#sim-progress").display = False
        self.watch(self.app, "evaluation", self._evaluated, init=False)
        self.refresh_all()

    def on_screen_resume(self) -> None:
        self.refresh_all()

    def refresh_all(self) -> None:
        self.action_refresh_advice()
        self.refresh_guide()

    # --- the job -------------------------------------------------------------------------------------
    @on(Input.Changed, "#job Input")
    def _job_changed(self, event: Input.Changed) -> None:
        """A job input into the app's form: its evaluation (time and cost on every screen) follows."""
        key = event.input.id or ""
        if self.app.form.get(key) != event.value:
            self.app.update_form(**{key: event.value})

    @on(Select.Changed, "#scope")
    def _scope_changed(self, event) -> None:
        self.action_refresh_advice()

    def _evaluated(self, ev) -> None:
        if self.is_current:
            self.action_refresh_advice()

    # --- recommendation ----------------------------------------------------------------------------
    def action_refresh_advice(self) -> None:
        from advisor import present, service
        from advisor.problems import Problems

        out = self.query_one("#recommendation", Static)
        table = self.query_one("#options", DataTable)
        table.clear()
        near = self.query_one("#nearest", DataTable)
        near.clear()
        near.display = False
        self.query_one("#nearest-title", Static).update("")
        self._advice = None
        ev = self.app.evaluation
        if ev is None:
            return
        for key, _label, _kind in JOB:  # the job's problems, from the one evaluation, on their fields
            self.query_one(f"#field-{key}", Field).set_error(ev.errors.get(key))
        if any(key in ev.errors for key, _label, _kind in JOB):
            out.update(Text("fix the job fields above", style="red"))
            return
        if not ev.ok:
            out.update(Text("The plan has problems; fix them on the Plan screen (F2).", style="bold red"))
            return
        gpu = ev.gpu if self.query_one("#scope", Select).value == "plan" else None
        try:
            adv = service.advise(ev.context, None, gpu)  # the plan's job
        except Problems as e:
            out.update(Text("; ".join(p.message for p in e.items), style="bold red"))
            return
        out.update(present.recommendation_text(adv))
        self._advice = adv
        for i, o in enumerate(adv.options):
            table.add_row(*present.option_row(o), key=str(i))
        if adv.nearest:
            near.display = True
            self.query_one("#nearest-title", Static).update(Text("Nothing fits as asked: the nearest plans that fit "
                                                                 "(Enter applies one)", style="bold"))
            for i, n in enumerate(adv.nearest):
                near.add_row(*present.nearest_row(n), key=str(i))

    # --- act: apply an option or a nearest plan to the plan ------------------------------------------
    @on(DataTable.RowSelected, "#options")
    def _apply_option(self, event: DataTable.RowSelected) -> None:
        adv = self._advice
        if adv is None:
            return
        o = adv.options[int(str(event.row_key.value))]
        if not o.fits:
            self.notify(f"{o.method} on {o.gpu} does not fit: {o.reasons[0]}", severity="warning")
            return
        self._apply(o.changes(), f"{o.method} on {o.num_gpus} × {o.gpu}, micro-batch {o.micro_batch} × "
                                 f"grad-accum {o.grad_accum}")

    @on(DataTable.RowSelected, "#nearest")
    def _apply_nearest(self, event: DataTable.RowSelected) -> None:
        adv = self._advice
        if adv is None:
            return
        n = adv.nearest[int(str(event.row_key.value))]
        self._apply({**n.changes, "hardware.gpu": n.gpu_id, "hardware.gpus": n.num_gpus}, n.what)

    def _apply(self, changes: dict, what: str) -> None:
        from advisor.forms import apply_changes

        self.app.form = apply_changes(self.app.form, changes)
        self.notify(f"applied to the plan: {what} (F2 shows it; ctrl+s saves it)")

    # --- questionnaire -----------------------------------------------------------------------------
    @on(Select.Changed, "#q-gap")
    @on(Input.Changed, "#q-examples")
    @on(Checkbox.Changed)
    def _question_changed(self, event) -> None:
        self.refresh_guide()

    def refresh_guide(self) -> None:
        from advisor import present, service
        from advisor.problems import Problems

        answers = {key: self.query_one(f"#q-{key}", Checkbox).value for key, _ in QUESTIONS}
        answers["gap"] = self.query_one("#q-gap", Select).value
        answers["labelled_examples"] = self.query_one("#q-examples", Input).value or "0"
        field = self.query_one("#field-q-examples", Field)
        try:
            _, g = service.guide(answers)
        except Problems as e:
            field.set_error("; ".join(p.message for p in e.items))
            return
        field.set_error(None)
        self.query_one("#verdict", Static).update(present.guide_text(g))

    # --- exact (simulate) ----------------------------------------------------------------------------
    def action_exact(self) -> None:
        ev = self.app.evaluation
        if ev is None or not ev.ok:
            self.notify("the plan has problems; fix them on the Plan screen first", severity="error")
            return
        bar = self.query_one("#sim-progress", ProgressBar)
        bar.display = True
        bar.update(progress=0)
        self.query_one("#sim-status", Static).update("starting (imports torch and transformers) …")
        self.query_one("#sim-result", Static).update("")
        self._analytic = ev.result
        self.simulate(ev.context)

    @work(thread=True, exclusive=True, group="simulate")
    def simulate(self, ctx) -> None:
        from advisor import service
        from advisor.problems import Problems

        def progress(fraction: float, message: str) -> None:
            self.post_message(SimProgress(fraction, message))

        try:
            res = service.estimate(ctx, "simulate", progress)
        except Problems as e:
            self.post_message(SimDone(None, "; ".join(p.message for p in e.items)))
        except Exception as e:  # noqa: BLE001 - a missing torch/transformers or an architecture it cannot trace
            self.post_message(SimDone(None, f"{type(e).__name__}: {e}"))
        else:
            self.post_message(SimDone(res))

    def on_sim_progress(self, m: SimProgress) -> None:
        self.query_one("#sim-progress", ProgressBar).update(progress=m.fraction)
        self.query_one("#sim-status", Static).update(f"simulating: {m.text}")

    def on_sim_done(self, m: SimDone) -> None:
        from advisor.present import exact_table

        status = self.query_one("#sim-status", Static)
        if m.error:
            status.update(Text(f"exact estimate failed: {m.error}", style="bold red"))
            return
        self.query_one("#sim-progress", ProgressBar).update(progress=1.0)
        status.update(Text("exact estimate done", style="green"))
        self.query_one("#sim-result", Static).update(exact_table(self._analytic, m.result))
        self.sim_result = m.result
