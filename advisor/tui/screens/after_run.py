"""The Chat screen's Eval and Export tabs: `tuneplan eval` and `tuneplan export` for the run loaded there.

Display only: the work is runner.api's (evaluate_run, read_eval, plan_export, export_run), called from worker
threads that post advisor.tui.messages; each message carries the key of the run it belongs to, so opening
another run makes the older ones stale.

- Eval: the run's eval.json when it has one, and a button that evaluates the loaded models (base against
  tuned: loss and perplexity with the training mask on the run's validation split, and a few held-out prompts
  answered by both beside the reference), writing eval.json and report.json's ``eval`` as the CLI does.
- Export: the folder, the dtype and the 4-bit copy; what it needs (RAM, disk, time: runner.export's checks,
  made again on every change) before the button starts it; then each step, and where it wrote and how much.
"""

from __future__ import annotations

import time
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Button, Checkbox, Input, Label, Select, Static

from advisor.problems import Problems
from advisor.spec import INFER_PRECISIONS
from advisor.tui.messages import EvalDone, EvalProgress, ExportChecked, ExportDone, ExportProgress
from advisor.units import mib_or_gib
from runner import api as runner_api


def _row(*widgets) -> Horizontal:
    return Horizontal(*widgets, classes="chat-row")


def _short(s: str, n: int) -> str:
    s = " ".join(s.split())
    return s if len(s) <= n else s[: n - 1] + "…"


def eval_view(r: dict[str, Any], just_now: bool) -> Group:
    """eval.json's object as the CLI prints it: the loss table, the change, then the samples side by side."""
    d = r["data"]
    head = Text()
    head.append("evaluated just now" if just_now else f"eval.json of {r.get('time', '?')}", style="bold")
    head.append(f": {r['weights']} on {d['what']}: {d['examples']} examples, {d['scored_tokens']:,} scored "
                "tokens (the training mask)", style="dim")
    losses = Table(box=None, pad_edge=False)
    for col in ("", "loss", "perplexity"):
        losses.add_column(col, justify="left" if not col else "right")
    for which in ("base", "tuned"):
        m = r[which]
        ppl = f"{m['perplexity']:,.2f}" if m.get("perplexity") is not None else "inf"
        losses.add_row(which, f"{m['loss']:.4f}", ppl, style="green" if which == "tuned" else None)
    ch = r["change"]
    change = Text(f"tuned - base: loss {ch['loss']:+.4f}, perplexity x{ch['perplexity_ratio']:.3g}",
                  style="bold green" if ch["loss"] < 0 else "bold yellow")
    change.append("  (lower is better)" if ch["loss"] < 0 else "  (the tuned model is not better on this data)",
                  style="dim")
    parts: list[Any] = [head, losses, change]
    if r.get("run_final_val_loss") is not None:
        parts.append(Text(f"the run's own validation loss at its last step: {r['run_final_val_loss']:.4f}",
                          style="dim"))
    if r.get("samples"):
        s = r["sampling"]
        how = "greedy" if not s["temperature"] else f"temperature {s['temperature']:g}, seed {s['seed']}"
        parts.append(Text(f"\nsamples ({how}, {s['max_new_tokens']} new tokens at most):", style="bold"))
    for i, row in enumerate(r.get("samples") or [], 1):
        parts.append(Text(f"[{i}] line {row['line']}: {_short(row['prompt'], 240)}"))
        side = Table(box=None, expand=True, pad_edge=False)
        for col, style in (("reference", "dim"), ("base", "yellow"), ("tuned", "green")):
            side.add_column(col, ratio=1, header_style=f"bold {style}")
        side.add_row(*(_short(row[k], 200) for k in ("reference", "base", "tuned")))
        parts.append(side)
    return Group(*parts)


class EvalPanel(Vertical):
    """`tuneplan eval` for the loaded run (see the module doc)."""

    def compose(self) -> ComposeResult:
        yield _row(Button("Evaluate", id="eval-run", compact=True, disabled=True),
                   Label("samples", classes="field-label"),
                   Input("3", id="eval-n", type="integer", compact=True, classes="chat-num"),
                   Label("max new tokens", classes="field-label"),
                   Input("64", id="eval-max", type="integer", compact=True, classes="chat-num"),
                   Label("(greedy; writes eval.json)", classes="chat-hint"))
        yield Static(Text("base against tuned on the run's validation split, once the run is loaded", style="dim"),
                     id="eval-status")
        with VerticalScroll(id="eval-view"):
            yield Static("", id="eval-result")

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.key = 0
        self.run = None
        self.models = None  # the Chat screen's loaded runner.tuned.Models (shared: one user at a time)
        self.busy = False
        self.result: dict[str, Any] | None = None  # what is shown: eval.json's object
        self.read_error = False  # the run's eval.json could not be read (its line is shown)

    def say(self, text: Text) -> None:
        self.query_one("#eval-status", Static).update(text)

    def reset(self) -> None:
        """Another run is being opened: nothing of the last one stays."""
        self.key += 1
        self.run = self.models = self.result = None
        self.busy = self.read_error = False
        self.query_one("#eval-run", Button).disabled = True
        self.query_one("#eval-result", Static).update("")
        self.say(Text("base against tuned on the run's validation split, once the run is loaded", style="dim"))

    def opened(self, run) -> None:
        self.run = run
        self.say(Text("loading the models (Evaluate runs once they are loaded)", style="dim"))
        self.read_existing(run, self.key)

    def loaded(self, models) -> None:
        self.models = models
        self.query_one("#eval-run", Button).disabled = False
        if self.result is None and not self.read_error:
            self.say(Text("no eval.json yet: Evaluate measures the base and the tuned model", style="dim"))

    def not_loaded(self) -> None:
        if self.run is not None and self.models is None:
            self.say(Text("the models did not load (the line above says why); Evaluate needs them", style="dim"))

    @work(thread=True, group="eval-read")
    def read_existing(self, run, key: int) -> None:
        try:
            found = runner_api.read_eval(run)
        except Problems as e:
            self.post_message(EvalDone(key, None, error=str(e)))  # a link, not JSON: its one line
            return
        if found is not None:
            self.post_message(EvalDone(key, found))

    @on(Button.Pressed, "#eval-run")
    def _evaluate(self) -> None:
        if self.models is None or self.busy:
            return
        if getattr(self.screen, "replying", False):
            self.say(Text("a chat reply is being written with these models; wait for it (or Esc on the Chat tab)",
                          style="bold red"))
            return
        try:
            samples = int(self.query_one("#eval-n", Input).value or 0)
            max_new = int(self.query_one("#eval-max", Input).value or 0)
        except ValueError as e:
            self.say(Text(str(e), style="bold red"))
            return
        self.busy = True
        self.query_one("#eval-run", Button).disabled = True
        self.say(Text("evaluating … (the base, the tuned model, then the samples)", style="bold"))
        self.evaluate(self.models, samples, max_new, self.key)

    @work(thread=True, exclusive=True, group="eval")
    def evaluate(self, models, samples: int, max_new: int, key: int) -> None:
        t0 = time.perf_counter()
        try:
            result, path, report = runner_api.evaluate_run(
                models, samples=samples, max_new_tokens=max_new,
                progress=lambda words: self.post_message(EvalProgress(key, words)))
        except Problems as e:
            self.post_message(EvalDone(key, None, error=str(e), ran=True))
            return
        except Exception as e:  # noqa: BLE001 - anything else the evaluation raises is shown, never a crash
            self.post_message(EvalDone(key, None, error=f"the evaluation failed: {type(e).__name__}: {e}", ran=True))
            return
        where = (f"wrote {path}" + ("; report.json has it under 'eval'" if report else " (no report.json to add "
                 "it to)") + f" · {time.perf_counter() - t0:.1f} s")
        self.post_message(EvalDone(key, result, where=where, ran=True))

    def on_eval_progress(self, m: EvalProgress) -> None:
        if m.key == self.key and self.busy:
            self.say(Text(f"evaluating … {m.text}", style="bold"))

    def on_eval_done(self, m: EvalDone) -> None:
        if m.key != self.key:
            return
        if m.ran:
            self.busy = False
            self.query_one("#eval-run", Button).disabled = self.models is None
        if m.error or m.result is None:
            self.read_error = self.read_error or not m.ran
            self.say(Text(m.error or "no result", style="bold red"))
            return
        self.result = m.result
        self.query_one("#eval-result", Static).update(eval_view(m.result, m.ran))
        self.say(Text(m.where, style="green") if m.where else
                 Text("the run's eval.json (Evaluate measures again and replaces it)", style="dim"))


class ExportPanel(Vertical):
    """`tuneplan export` for the opened run (see the module doc)."""

    def compose(self) -> ComposeResult:
        yield _row(Label("folder", classes="field-label"),
                   Input("", id="export-out", compact=True, placeholder="a new or empty folder"))
        yield _row(Label("dtype", classes="field-label"),
                   Select([(d, d) for d in INFER_PRECISIONS], id="export-dtype", allow_blank=False, compact=True,
                          value=INFER_PRECISIONS[0]),
                   Checkbox("also a 4-bit copy (bitsandbytes NF4, FOLDER-nf4)", id="export-nf4", compact=True),
                   Button("Export", id="export-run", compact=True, disabled=True))
        yield Static(Text("the merged model as a standalone folder, once a run is open", style="dim"),
                     id="export-check")
        yield Static("", id="export-log")

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.key = 0
        self.check = 0
        self.run = None
        self.busy = False
        self.ready = False  # the last check passed
        self.done: dict[str, Any] | None = None
        self.log_lines: list[Text] = []

    def reset(self) -> None:
        self.key += 1
        self.run = self.done = None
        self.busy = self.ready = False
        self.log_lines = []
        self.query_one("#export-log", Static).update("")
        self.query_one("#export-run", Button).disabled = True
        self.query_one("#export-check", Static).update(
            Text("the merged model as a standalone folder, once a run is open", style="dim"))

    def opened(self, run) -> None:
        """Fill in the CLI's defaults (RUN_DIR-export, the run's compute dtype) and check them."""
        self.run = run
        defaults = runner_api.export_defaults(run)
        with self.prevent(Input.Changed, Select.Changed):
            self.query_one("#export-out", Input).value = str(defaults["out"])
            self.query_one("#export-dtype", Select).value = defaults["dtype"]
        self.recheck()

    def choices(self) -> tuple[str, str, bool]:
        dtype = self.query_one("#export-dtype", Select).value
        return (self.query_one("#export-out", Input).value.strip(), str(dtype),
                self.query_one("#export-nf4", Checkbox).value)

    @on(Input.Changed, "#export-out")
    @on(Select.Changed, "#export-dtype")
    @on(Checkbox.Changed, "#export-nf4")
    def recheck(self, event=None) -> None:
        if self.run is None or self.busy:
            return
        self.check += 1
        self.ready = False
        self.query_one("#export-run", Button).disabled = True
        out, dtype, nf4 = self.choices()
        if not out:
            self.query_one("#export-check", Static).update(Text("name the folder to write", style="bold red"))
            return
        self.check_export(self.run, out, dtype, nf4, self.key, self.check)

    @work(thread=True, group="export-check")
    def check_export(self, run, out: str, dtype: str, nf4: bool, key: int, check: int) -> None:
        try:
            xp = runner_api.plan_export(run, out, dtype, nf4)
        except Problems as e:
            self.post_message(ExportChecked(key, check, None, str(e)))
            return
        except Exception as e:  # noqa: BLE001 - shown, never a crash
            self.post_message(ExportChecked(key, check, None, f"cannot check the export: {type(e).__name__}: {e}"))
            return
        self.post_message(ExportChecked(key, check, xp.words()))

    def on_export_checked(self, m: ExportChecked) -> None:
        if m.key != self.key or m.check != self.check or self.busy:
            return
        out = self.query_one("#export-check", Static)
        if m.error:
            out.update(Text(m.error, style="bold red"))
            return
        text = Text()
        for i, line in enumerate(m.lines or []):
            text.append(line + "\n", style="bold" if i == 0 else "yellow" if "tight" in line else None)
        text.append("Export starts it (the run's own files are not touched)", style="dim")
        out.update(text)
        self.ready = True
        self.query_one("#export-run", Button).disabled = False

    @on(Button.Pressed, "#export-run")
    def _export(self) -> None:
        if self.run is None or self.busy or not self.ready:
            return
        self.busy = True
        for sel in ("#export-run", "#export-out", "#export-dtype", "#export-nf4"):
            self.query_one(sel).disabled = True
        self.log_lines = [Text("exporting …", style="bold")]
        self.show_log()
        self.export(self.run, *self.choices(), self.key)

    @work(thread=True, exclusive=True, group="export")
    def export(self, run, out: str, dtype: str, nf4: bool, key: int) -> None:
        from advisor.tui.serve_this import serve_this

        try:  # checked again: the disk may have filled since
            xp = runner_api.plan_export(run, out, dtype, nf4)
            done = runner_api.export_run(xp, progress=lambda words: self.post_message(ExportProgress(key, words)))
        except Problems as e:
            self.post_message(ExportDone(key, None, str(e)))
            return
        except Exception as e:  # noqa: BLE001 - shown, never a crash
            self.post_message(ExportDone(key, None, f"the export failed: {type(e).__name__}: {e}"))
            return
        serve = None
        try:
            serve = serve_this(run, done["merged"], exported=written_words(done))
        except Exception:  # noqa: BLE001 - the serving panel keeps what it had; the export is done
            pass
        self.post_message(ExportDone(key, done, serve=serve))

    def on_export_progress(self, m: ExportProgress) -> None:
        if m.key == self.key:
            self.log_lines.append(Text(m.text, style="dim"))
            self.show_log()

    def on_export_done(self, m: ExportDone) -> None:
        """Say what was written (the Chat screen then points "serve this" at it: the message bubbles up)."""
        if m.key != self.key:
            m.stop()
            return
        self.busy = False
        for sel in ("#export-out", "#export-dtype", "#export-nf4"):
            self.query_one(sel).disabled = False
        if m.error or m.done is None:
            self.log_lines.append(Text(m.error or "the export wrote nothing", style="bold red"))
            self.show_log()
            self.recheck()
            return
        self.done = done = m.done
        self.log_lines.append(Text(f"exported in {done['seconds']:.1f} s: {written_words(done)}",
                                   style="bold green"))
        self.log_lines.append(Text(f"chat template: {done['chat_template']}", style="dim"))
        self.show_log()
        self.query_one("#export-check", Static).update(
            Text("exported; another folder (or this one emptied) exports again", style="dim"))

    def show_log(self) -> None:
        self.query_one("#export-log", Static).update(Text("\n").join(self.log_lines))


def written_words(done: dict[str, Any]) -> str:
    """'wrote DIR (24.6 MiB)' and the 4-bit copy's, from runner.api.export_run's answer."""
    sizes = done.get("bytes") or {}
    words = f"wrote {done['merged']} ({mib_or_gib(sizes.get('merged'))})"
    if done.get("nf4"):
        words += f" and the 4-bit copy {done['nf4']} ({mib_or_gib(sizes.get('nf4'))})"
    return words
