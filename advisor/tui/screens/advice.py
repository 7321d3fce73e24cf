"""Advice: the advisor's recommendation and its options, RAG vs fine-tuning, and the exact estimate."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import Screen
from textual.widgets import Checkbox, DataTable, Footer, Header, Input, Label, ProgressBar, Select, Static

from advisor.tui.messages import SimDone, SimProgress
from advisor.tui.widgets.field import Field
from advisor.tui.widgets.tables import gib, short_gpu

JOB = (("examples", "examples", "int"), ("avg_tokens", "avg tokens", "int"), ("epochs", "epochs", "float"),
       ("target_batch", "target batch", "int"), ("budget", "budget $", "float"))
QUESTIONS = (("knowledge_changes_often", "the facts change often"), ("must_cite_sources", "answers must cite sources"),
             ("prompting_tried", "careful prompting was tried and measured"),
             ("latency_or_cost_limits", "latency or cost is a hard limit"),
             ("many_query_types", "it must keep serving other tasks"))


class AdviceScreen(Screen):
    AUTO_FOCUS = "#options"  # not an input, so `e` runs the exact estimate at once
    BINDINGS = [Binding("e", "exact", "Exact estimate"), Binding("r", "refresh_advice", "Re-advise", show=False)]

    def compose(self) -> ComposeResult:
        job = self.app.job
        yield Header()
        with Horizontal(id="advice"):
            with VerticalScroll(id="advice-left"):
                yield Label("The job (time and cost)", classes="section")
                with Horizontal(id="job"):
                    for key, label, kind in JOB:
                        v = job[key]
                        yield Field(label, Input("" if v is None else f"{v:g}" if kind == "float" else str(v),
                                                 id=f"job-{key}", type="number" if kind == "float" else "integer",
                                                 compact=True, placeholder="none"), f"job-{key}")
                yield Field("GPUs", Select([("the plan's GPU", "plan"), ("every priced GPU", "all")], value="plan",
                                           allow_blank=False, compact=True, id="scope"), "scope")
                yield Static("", id="recommendation")
                yield DataTable(id="options", cursor_type="row", zebra_stripes=True)
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
        self.query_one("#options", DataTable).add_columns("method", "GPU", "×", "strategy", "batch", "ckpt",
                                                          "GiB / card", "fits", "time", "cost")
        self.query_one("#sim-progress").display = False
        self.refresh_all()

    def on_screen_resume(self) -> None:
        self.refresh_all()

    def refresh_all(self) -> None:
        self.action_refresh_advice()
        self.refresh_guide()

    # --- recommendation ----------------------------------------------------------------------------
    @on(Input.Changed, "#job Input")
    @on(Select.Changed, "#scope")
    def _job_changed(self, event) -> None:
        self.action_refresh_advice()

    def read_job(self) -> bool:
        ok = True
        for key, _label, kind in JOB:
            raw = self.query_one(f"#job-{key}", Input).value.strip()
            field = self.query_one(f"#field-job-{key}", Field)
            try:
                v = None if (key == "budget" and not raw) else (float(raw) if kind == "float" else int(raw))
            except ValueError:
                field.set_error("a number")
                ok = False
                continue
            field.set_error(None)
            self.app.job[key] = v
        return ok

    def action_refresh_advice(self) -> None:
        from advisor.recommend import METHOD_WORDS, AdviceError, duration, recommend

        out = self.query_one("#recommendation", Static)
        table = self.query_one("#options", DataTable)
        table.clear()
        ev = self.app.evaluate_form()
        if not self.read_job():
            out.update(Text("fix the job fields above", style="red"))
            return
        if not ev.ok:
            out.update(Text("The plan has problems; fix them on the Plan screen (F2).", style="bold red"))
            return
        job = self.app.job
        gpu = ev.gpu if self.query_one("#scope", Select).value == "plan" else None
        try:
            adv = recommend(ev.shape, ev.plan, gpu, gpus=None, examples=job["examples"], avg_tokens=job["avg_tokens"],
                            epochs=job["epochs"], target_batch=job["target_batch"], budget_usd=job["budget"])
        except AdviceError as e:
            out.update(Text(str(e), style="bold red"))
            return
        c = adv.choice
        text = Text()
        if c is None:
            text.append("Nothing fits.\n", style="bold red")
        else:
            text.append("Recommended: ", style="bold")
            cost = f"${c.cost_usd:,.2f}" if c.cost_usd is not None else "no price"
            text.append(f"{METHOD_WORDS[c.method]} on {c.num_gpus} × {short_gpu(c.gpu)} · micro-batch "
                        f"{c.micro_batch} × grad-accum {c.grad_accum} · checkpointing "
                        f"{'on' if c.gradient_checkpointing else 'off'} · {gib(c.peak_reserved_bytes)} GiB · "
                        f"{duration(c.hours) if c.hours else '-'} · {cost}\n", style="bold green")
            for reason in c.reasons:
                text.append(f"  • {reason}\n")
        for note in adv.notes:
            text.append(f"note: {note}\n", style="dim")
        out.update(text)
        for o in adv.options:
            table.add_row(o.method, short_gpu(o.gpu), str(o.num_gpus), o.strategy, f"{o.micro_batch}×{o.grad_accum}",
                          "on" if o.gradient_checkpointing else "off",
                          f"{gib(o.peak_reserved_bytes)} / {gib(o.capacity_bytes)}",
                          Text("yes", style="green") if o.fits else Text("no", style="red"),
                          duration(o.hours) if o.hours else "-",
                          f"${o.cost_usd:,.2f}" if o.cost_usd is not None else "-")

    # --- questionnaire -----------------------------------------------------------------------------
    @on(Select.Changed, "#q-gap")
    @on(Input.Changed, "#q-examples")
    @on(Checkbox.Changed)
    def _question_changed(self, event) -> None:
        self.refresh_guide()

    def refresh_guide(self) -> None:
        from pydantic import ValidationError

        from advisor.guide import Questionnaire, guide

        answers = {key: self.query_one(f"#q-{key}", Checkbox).value for key, _ in QUESTIONS}
        answers["gap"] = self.query_one("#q-gap", Select).value
        answers["labelled_examples"] = self.query_one("#q-examples", Input).value or "0"
        field = self.query_one("#field-q-examples", Field)
        try:
            g = guide(Questionnaire(**answers))
        except ValidationError as e:
            field.set_error("; ".join(err["msg"] for err in e.errors()))
            return
        field.set_error(None)
        text = Text()
        text.append("Verdict: ", style="bold")
        text.append(f"{g.verdict}\n", style="bold green")
        for r in g.reasons:
            text.append(f"  • {r}\n")
        text.append("Next steps\n", style="bold")
        for i, s in enumerate(g.next_steps, 1):
            text.append(f"  {i}. {s}\n")
        self.query_one("#verdict", Static).update(text)

    # --- exact (simulate) ----------------------------------------------------------------------------
    def action_exact(self) -> None:
        ev = self.app.evaluate_form()
        if not ev.ok:
            self.notify("the plan has problems; fix them on the Plan screen first", severity="error")
            return
        bar = self.query_one("#sim-progress", ProgressBar)
        bar.display = True
        bar.update(progress=0)
        self.query_one("#sim-status", Static).update("starting (imports torch and transformers) …")
        self.query_one("#sim-result", Static).update("")
        self._analytic = ev.result
        self.simulate(ev.plan, ev.shape, ev.gpu)

    @work(thread=True, exclusive=True, group="simulate")
    def simulate(self, plan, shape, gpu) -> None:
        from advisor.cli import UserError, estimate_result

        def progress(fraction: float, message: str) -> None:
            self.post_message(SimProgress(fraction, message))

        try:
            res = estimate_result(plan, shape, gpu, "simulate", progress)
        except UserError as e:
            self.post_message(SimDone(None, "; ".join(e.problems)))
        except Exception as e:  # noqa: BLE001 - a missing torch/transformers or an architecture it cannot trace
            self.post_message(SimDone(None, f"{type(e).__name__}: {e}"))
        else:
            self.post_message(SimDone(res))

    def on_sim_progress(self, m: SimProgress) -> None:
        self.query_one("#sim-progress", ProgressBar).update(progress=m.fraction)
        self.query_one("#sim-status", Static).update(f"simulating: {m.text}")

    def on_sim_done(self, m: SimDone) -> None:
        from advisor.cli import COMPONENT_LABELS

        status = self.query_one("#sim-status", Static)
        if m.error:
            status.update(Text(f"exact estimate failed: {m.error}", style="bold red"))
            return
        self.query_one("#sim-progress", ProgressBar).update(progress=1.0)
        status.update(Text("exact estimate done", style="green"))
        a, s = self._analytic, m.result
        t = Table(title="analytic vs exact (GiB)", title_justify="left", box=None, header_style="bold",
                  caption_style="dim")
        for col in ("component", "analytic", "exact"):
            t.add_column(col, justify="left" if col == "component" else "right")
        for k in dict.fromkeys([*a["breakdown"], *s["breakdown"]]):
            t.add_row(COMPONENT_LABELS.get(k, k), gib(a["breakdown"].get(k, 0)), gib(s["breakdown"].get(k, 0)))
        t.add_row(Text("peak allocated", style="bold"), gib(a["peak_allocated_bytes"]), gib(s["peak_allocated_bytes"]))
        t.add_row(Text("peak reserved", style="bold"), gib(a["peak_reserved_bytes"]), gib(s["peak_reserved_bytes"]))
        t.caption = "\n".join(s["notes"])
        t.caption_justify = "left"
        self.query_one("#sim-result", Static).update(t)
        self.sim_result = s
