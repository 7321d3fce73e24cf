"""Launch: a dataset and its preview, the exact command and plan file, Start / Abort, then the run live:
progress with ETA, the loss curve, memory against the predicted peak, and predicted vs measured."""

from __future__ import annotations

import shlex
from pathlib import Path

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import Button, Footer, Header, Input, Label, ProgressBar, Select, Static

from advisor.problems import Problems
from advisor.spec import SpecError
from advisor.tui.messages import RunEvents, RunExited
from advisor.tui.runs import RunState, follow_events
from advisor.tui.widgets.chart import LineChart
from advisor.tui.widgets.tables import report_table
from advisor.units import GIB
from runner import api as runner_api

TARGETS = {"local": "this machine", "sky": "SkyPilot (rent the GPUs)", "slurm": "Slurm cluster (sbatch)"}
TARGET_SUFFIX = {"sky": ".sky.yaml", "slurm": ".sbatch"}


def _row(label: str, widget) -> Horizontal:
    return Horizontal(Label(label, classes="field-label"), widget, classes="launch-row")


class LaunchScreen(Screen):
    AUTO_FOCUS = "#dataset"
    # priority: they work while an input has focus (ctrl+x would otherwise be the input's "cut")
    BINDINGS = [Binding("ctrl+g", "start", "Start run", priority=True),
                Binding("ctrl+x", "abort", "Abort run", priority=True),
                Binding("escape", "dismiss_error", "Dismiss error", show=False)]

    def compose(self) -> ComposeResult:
        plan = self.app.plan
        data = (plan.data.path if plan is not None and plan.data.path else "") or ""
        yield Header()
        with Horizontal(id="launch"):
            with VerticalScroll(id="launch-left"):
                yield _row("dataset", Input(data, id="dataset", compact=True,
                                            placeholder=".jsonl / .json / .csv (Enter previews)"))
                yield _row("plan file", Input(str(self.app.plan_path), id="plan-file", compact=True))
                yield _row("run dir", Input("", id="run-dir", compact=True, placeholder="default: runs/<name>"))
                yield _row("overrides", Input("", id="overrides", compact=True,
                                              placeholder="key=value … e.g. run.max_steps=20"))
                yield _row("where", Select([(label, key) for key, label in TARGETS.items()], value="local",
                                           allow_blank=False, compact=True, id="target"))
                yield _row("write to", Input("", id="target-file", compact=True,
                                             placeholder="SkyPilot / Slurm: the file to write"))
                yield Static("", id="command")
                yield Static("", id="start-error")  # stays until dismissed (Esc) or the next start
                with Horizontal(id="launch-buttons"):
                    yield Button("Start  ^g", id="start", variant="success", compact=True)
                    yield Button("Abort  ^x", id="abort", variant="error", compact=True, disabled=True)
                    yield Button("Resume", id="resume", variant="primary", compact=True, disabled=True)
                    yield Button("Attach to run dir", id="attach", compact=True)
                    yield Button("Write file", id="write", compact=True)
                yield Label("Dataset preview", classes="section")
                yield Static("", id="preview")
            with Vertical(id="launch-right"):
                yield Static("", id="run-status")
                yield ProgressBar(total=None, id="run-progress", show_eta=False)
                yield LineChart("loss", id="loss-chart")
                yield LineChart("memory (torch allocated)", unit="GiB", scale=GIB, id="mem-chart")
                yield Static("", id="run-result")
        yield Footer()

    def on_mount(self) -> None:
        self._preview_text = Text()
        self.handle = None
        self.run: RunState | None = None
        self.query_one("#run-progress").display = False  # shown while a run is followed
        self.preview()
        self.show_command()

    def on_screen_resume(self) -> None:
        self.show_command()

    # --- inputs ------------------------------------------------------------------------------------
    @on(Input.Changed)
    @on(Select.Changed, "#target")
    def _changed(self, event) -> None:
        self.show_command()

    def target(self) -> str:
        return str(self.query_one("#target", Select).value)

    def target_file(self) -> Path:
        given = self.query_one("#target-file", Input).value.strip()
        if given:
            return Path(given).expanduser()
        plan_file = Path(self.query_one("#plan-file", Input).value.strip() or "plan.yaml")
        return plan_file.with_name(plan_file.stem + TARGET_SUFFIX.get(self.target(), ".txt"))

    @on(Input.Submitted, "#dataset")
    def _dataset(self, event: Input.Submitted) -> None:
        self.preview()

    @on(Input.Submitted, "#run-dir")
    def _attach_enter(self, event: Input.Submitted) -> None:
        self.action_attach()

    def overrides(self) -> list[str]:
        try:
            return shlex.split(self.query_one("#overrides", Input).value)
        except ValueError:
            return []

    def show_command(self) -> None:
        out = self.query_one("#command", Static)
        plan_file = self.query_one("#plan-file", Input).value.strip() or "plan.yaml"
        run_dir = self.query_one("#run-dir", Input).value.strip() or None
        target = self.target()
        self.query_one("#write", Button).display = target != "local"
        self.query_one("#start", Button).display = target == "local"
        text = Text()
        if self.app.plan is None:
            text.append("The plan has problems; fix them on the Plan screen (F2) before a run.\n", style="bold red")
            out.update(text)
            return
        try:
            if target == "local":
                text.append_text(self.local_text(plan_file, run_dir))
            else:
                text.append_text(self.file_text(target, plan_file))
        except (SpecError, Problems) as e:
            text.append("; ".join(p.message for p in e.items) + "\n", style="bold red")
        except Exception as e:  # noqa: BLE001 - anything else the runner refuses is shown, not raised
            text.append(f"{e}\n", style="red")
        out.update(text)

    def local_text(self, plan_file: str, run_dir: str | None) -> Text:
        """The command Start runs here; with several nodes, the command for each node."""
        text = Text()
        plan = self.plan_to_run()
        if plan.hardware.nodes > 1:
            text.append(f"{plan.hardware.nodes} nodes: run one command on each (node 0 first)\n", style="bold")
            for k, cmd in enumerate(runner_api.node_commands(plan, plan_file, run_dir or "runs/RUN")):
                text.append(f"node {k}  ", style="bold")
                text.append(runner_api.format_command(cmd) + "\n")
        else:
            text.append("command  ", style="bold")
            text.append(shlex.join(self.command(plan_file, run_dir)) + "\n")
        text.append(f"Start saves the plan (with this dataset) to {plan_file}, then runs it.", style="dim")
        return text

    def file_text(self, target: str, plan_file: str) -> Text:
        """The SkyPilot task or sbatch script `tuneplan cloud` would write for this plan (runner.rent)."""
        body = runner_api.render_cloud(self.plan_to_run(), target, plan_file, out=str(self.target_file()))
        text = Text()
        text.append(f"Write file saves the plan to {plan_file} and this to {self.target_file()}:\n", style="bold")
        text.append(body, style="")
        return text

    @on(Button.Pressed, "#write")
    def pressed_write(self) -> None:
        self.action_write()

    def action_write(self) -> None:
        """Save the plan and the SkyPilot task / sbatch script; launch nothing (the file names the command)."""
        from advisor.planfile import save_plan

        plan_file = Path(self.query_one("#plan-file", Input).value.strip() or "plan.yaml").expanduser()
        target, dest = self.target(), self.target_file()
        try:
            plan = self.plan_to_run()
            save_plan(plan, plan_file)
            body = runner_api.render_cloud(plan, target, plan_file, out=str(dest))
            dest.write_text(body)
        except (SpecError, Problems) as e:
            self.notify("; ".join(p.message for p in e.items), title="cannot write", severity="error", timeout=10)
            return
        except OSError as e:
            self.notify(f"cannot write {dest}: {e.strerror}", severity="error")
            return
        nxt = "sky launch" if target == "sky" else "sbatch"
        self.notify(f"wrote {dest}; next: {nxt} {dest}", timeout=10)

    def command(self, plan_file: str, run_dir: str | None) -> list[str]:
        """runner.launch.build_command for the plan as it will be saved (a scratch copy until Start)."""
        import tempfile

        from advisor.planfile import save_plan

        with tempfile.TemporaryDirectory() as tmp:
            scratch = save_plan(self.plan_to_run(), Path(tmp) / "plan.yaml")
            cmd = runner_api.build_command(scratch, run_dir=run_dir)
        return [plan_file if c == str(scratch) else c for c in cmd]

    def plan_to_run(self):
        """The form's plan with this dataset and the overrides applied (advisor.planfile.apply_overrides,
        which rejects unknown keys): the file the runner reads holds everything, the command nothing extra."""
        from advisor.planfile import apply_overrides

        plan = self.app.plan
        dataset = self.query_one("#dataset", Input).value.strip() or None
        plan = plan.model_copy(update={"data": plan.data.model_copy(update={"path": dataset})})
        known = getattr(self, "_data_job", None)  # the data's examples and mean tokens, once estimated
        if dataset and known and known[0] == str(Path(dataset).expanduser()):
            plan = plan.model_copy(update={"job": plan.job.model_copy(update=known[1])})
        return apply_overrides(plan, self.overrides()) if self.overrides() else plan

    def preview(self) -> None:
        out = self.query_one("#preview", Static)
        path = self.query_one("#dataset", Input).value.strip()
        if not path:
            out.update(Text("Name a dataset file; Enter shows its first records.", style="dim"))
            return
        if not Path(path).expanduser().is_file():
            out.update(Text(f"no such file: {path}", style="bold red"))
            return
        try:
            records, fmt, problems = runner_api.check_data(Path(path).expanduser())
        except Exception as e:  # noqa: BLE001 - a reader failure is shown on the preview
            out.update(Text(f"{type(e).__name__}: {e}", style="bold red"))
            return
        text = Text()
        text.append(f"{len(records):,} valid records · format {fmt or '?'}", style="bold")
        text.append(f" · {len(problems)} problems\n" if problems else "\n", style="bold red" if problems else "")
        for p in problems[:5]:
            text.append(f"  {p}\n", style="red")
        for r in records[:3]:
            text.append(f"line {r.line}: ", style="dim")
            text.append(_short(r.data) + "\n")
        out.update(text)
        self._preview_text = text
        if records and self.app.plan is not None:
            self.longest(str(Path(path).expanduser()), self.app.plan)

    @work(thread=True, exclusive=True, group="longest")
    def longest(self, path: str, plan) -> None:
        """The dataset's longest example in the model's tokens (loads the tokenizer: in a worker), with a
        warning when it is longer than the sequence length the estimate used."""
        d, t = plan.data, plan.training
        found = runner_api.longest_in_file(path, plan.model.ref, t.seq_len, d.format, d.template,
                                           d.prompt_loss_weight, plan.model.trust_remote_code)
        estimated = data_estimate(plan, path) if plan.task == "training" else None
        if found or estimated:
            self.app.call_from_thread(self._show_longest, path, found, estimated)

    def _show_longest(self, path: str, found: dict, estimated=None) -> None:
        if self.query_one("#dataset", Input).value.strip() and \
                str(Path(self.query_one("#dataset", Input).value.strip()).expanduser()) != path:
            return  # the user has named another file since
        text = self._preview_text.copy()
        if found:
            text.append(f"longest example: line {found['line']}, {found['tokens']:,} tokens\n", style="bold")
            if found.get("warning"):
                text.append(found["warning"] + "\n", style="bold yellow")
        if estimated is not None:  # the job and the peak from the data; Start saves its job fields in the plan
            self._data_job = (path, estimated.job.plan_values()["job"])
            text.append_text(data_text(estimated))
        self.query_one("#preview", Static).update(text)

    # --- start / abort / attach ----------------------------------------------------------------------
    @on(Button.Pressed, "#start")
    def pressed_start(self) -> None:
        self.action_start()

    @on(Button.Pressed, "#abort")
    def pressed_abort(self) -> None:
        self.action_abort()

    @on(Button.Pressed, "#attach")
    def pressed_attach(self) -> None:
        self.action_attach()

    def action_start(self) -> None:
        from advisor.planfile import save_plan

        plan = self.app.plan
        if plan is None:
            self.notify("the plan has problems; fix them on the Plan screen (F2)", severity="error")
            return
        if self.handle is not None and self.handle.poll() is None:
            self.notify("a run is already going; abort it first", severity="warning")
            return
        plan_file = Path(self.query_one("#plan-file", Input).value.strip() or "plan.yaml").expanduser()
        run_dir = self.query_one("#run-dir", Input).value.strip() or None
        self.action_dismiss_error()
        try:
            plan = self.plan_to_run()
            save_plan(plan, plan_file)
            self.handle = runner_api.start_run(plan_file, run_dir=run_dir)
        except Exception as e:  # noqa: BLE001 - a refused start (bad data, bad override) is shown until dismissed
            self.show_error("cannot start", e)
            return
        self.app.plan_path = plan_file
        self.started(str(self.handle.run_dir))

    def started(self, run_dir: str, resumed: bool = False) -> None:
        self.query_one("#abort", Button).disabled = False
        self.query_one("#start", Button).disabled = True
        self.query_one("#resume", Button).disabled = True
        self.app.run_dir = run_dir  # the Watch screen follows the run started here
        self.watch_run(run_dir, resumed)

    def show_error(self, title: str, e: Exception) -> None:
        """An error that stops a start, on screen until dismissed (Esc) or the next start; a plan's problems
        named by the app's fields, not by CLI flags."""
        from advisor.forms import place

        if isinstance(e, Problems):
            errors, general = place(e.items)
            lines = [f"{field}: {why}" for field, why in errors.items()] + general
        else:
            lines = [str(e)]
        text = Text(f"{title}: ", style="bold red")
        text.append("\n".join(lines), style="red")
        text.append("\n(Esc dismisses)", style="dim")
        self.query_one("#start-error", Static).update(text)

    def action_dismiss_error(self) -> None:
        self.query_one("#start-error", Static).update("")

    @on(Button.Pressed, "#resume")
    def pressed_resume(self) -> None:
        self.action_resume()

    def action_resume(self) -> None:
        """Continue the followed run from its newest checkpoint (or start it again when it has none), as
        `tuneplan run --resume RUN_DIR` does."""
        import subprocess

        if self.run is None:
            return
        if self.handle is not None and self.handle.poll() is None:
            try:  # it wrote its end event and is exiting (its lock goes with it)
                self.handle.wait(5)
            except subprocess.TimeoutExpired:
                self.notify("the run is still ending; resume it in a moment", severity="warning")
                return
        self.action_dismiss_error()
        try:
            self.handle = runner_api.start_run(None, resume=self.run.run_dir)
        except Exception as e:  # noqa: BLE001 - a refused resume is shown until dismissed
            self.show_error("cannot resume", e)
            return
        self.started(str(self.handle.run_dir), resumed=True)

    def action_abort(self) -> None:
        if self.handle is not None and self.handle.poll() is None:
            self.handle.stop()
            self.notify("stopping the run …")

    def action_attach(self) -> None:
        run_dir = self.query_one("#run-dir", Input).value.strip()
        if not run_dir or not Path(run_dir).expanduser().is_dir():
            self.notify(f"not a run directory: {run_dir or '(empty)'}", severity="error")
            return
        self.watch_run(str(Path(run_dir).expanduser()))

    def watch_run(self, run_dir: str, resumed: bool = False) -> None:
        self.run = RunState(run_dir)
        self.query_one("#run-progress").display = True
        self.query_one("#run-status", Static).update(f"following {run_dir} …")
        self.query_one("#run-result", Static).update("")
        self.tail(run_dir, self.handle, resumed)

    @work(thread=True, exclusive=True, group="launch-tail")
    def tail(self, run_dir: str, handle, resumed: bool = False) -> None:
        from textual.worker import get_current_worker

        worker = get_current_worker()
        own = handle is not None and str(handle.run_dir) == run_dir
        code = follow_events(run_dir, lambda events: self.post_message(RunEvents(run_dir, events)),
                             lambda: worker.is_cancelled, exited=handle.poll if own else (lambda: None),
                             interval=0.3, own_session=own and resumed)
        if not worker.is_cancelled:
            self.post_message(RunExited(run_dir, code))

    def on_run_events(self, m: RunEvents) -> None:
        if self.run is None or m.run_dir != self.run.run_dir:
            return
        self.run.apply(m.events)
        self.render_run()

    def on_run_exited(self, m: RunExited) -> None:
        if self.run is None or m.run_dir != self.run.run_dir:
            return
        self.run.load_report()
        if not self.run.finished:
            self.run.status = "exited" if m.returncode in (None, 0) else f"exited with code {m.returncode}"
            log = Path(self.run.run_dir) / "run.log"
            if m.returncode not in (None, 0) and log.is_file():
                tail = log.read_text(errors="replace").strip().splitlines()[-6:]
                self.run.error = {"kind": f"exit code {m.returncode}", "message": "\n".join(tail)}
        self.query_one("#abort", Button).disabled = True
        self.query_one("#start", Button).disabled = False
        # a stopped run (interrupted, failed) continues from here, as `tuneplan run --resume` does
        self.query_one("#resume", Button).disabled = (self.run.status == "completed"
                                                      or runner_api.next_command(self.run.run_dir) is None)
        self.render_run()

    def render_run(self) -> None:
        from advisor.units import duration

        run = self.run
        bar = self.query_one("#run-progress", ProgressBar)
        if run.total_steps:
            bar.update(total=run.total_steps, progress=run.step)
        status = Text()
        status.append(f"{run.run_dir}  ", style="bold")
        status.append(f"{run.status}", style="bold green" if run.status in ("running", "finished", "completed")
                      else "bold red" if run.error else "bold")
        status.append(f" · step {run.step}" + (f"/{run.total_steps}" if run.total_steps else ""))
        if run.losses:
            status.append(f" · loss {run.losses[-1]:.4f}")
        if run.tokens_per_s:
            status.append(f" · {run.tokens_per_s:,.0f} tok/s")
        if run.eta_s is not None and not run.finished:
            status.append(f" · ETA {duration(run.eta_s / 3600)}")
        if run.val_losses:
            status.append(f" · val loss {run.val_losses[-1][1]:.4f}")
        if run.speed:  # measured vs predicted speed, the job re-projected (runner.speed)
            status.append(f"\nspeed: {run.speed['words']}", style="cyan")
        if run.error:
            status.append(f"\n{run.error.get('kind', 'error')}: {run.error.get('message', '')}", style="bold red")
            sug = run.error.get("suggestion") or {}
            if sug.get("command"):
                status.append("\ntry: " + (sug["command"] if isinstance(sug["command"], str)
                                           else shlex.join(sug["command"])), style="yellow")
        self.query_one("#run-status", Static).update(status)
        self.query_one("#loss-chart", LineChart).set_data(run.losses)
        lines = []
        if run.predicted.get("peak_allocated_bytes"):
            lines.append((float(run.predicted["peak_allocated_bytes"]), "predicted peak", "bold red"))
        mem = run.series("torch_allocated") or run.series("rss")
        chart = self.query_one("#mem-chart", LineChart)
        chart.title = ("memory (torch allocated)" if run.series("torch_allocated") else
                       "memory: process RSS (no CUDA: includes the Python/torch runtime, so above the tensors)")
        chart.set_data(mem, lines)
        if run.report is not None:
            self.query_one("#run-result", Static).update(report_table(run.report, run.predicted))


def data_estimate(plan, path: str):
    """The plan estimated from the dataset (runner.api.data_lengths + advisor.service.data_estimate), or None
    when it cannot be told (the data's problems show in the preview already)."""
    from advisor import service

    try:
        plan = plan.model_copy(update={"data": plan.data.model_copy(update={"path": path})})
        return service.data_estimate(service.context_of(plan), runner_api.data_lengths(plan))
    except Exception:  # noqa: BLE001 - a preview: what cannot be estimated is simply not shown
        return None


def data_text(de) -> Text:
    """The data-driven job and peak, three lines under the preview."""
    from advisor.units import duration, gib_str

    j, res = de.job, de.result
    text = Text()
    text.append("from the data" + ("" if de.data.exact else " (approximate: no tokenizer)") + ": ", style="bold")
    text.append(f"{j.steps:,} steps, {j.tokens:,} tokens, {j.positions_per_token:.3g} positions per token\n")
    text.append(f"longest batch {j.longest.rows} x {j.longest.length}: peak {gib_str(res.peak_reserved_bytes)}")
    if res.status:
        text.append(f" ({res.status})", style="green" if res.status == "fits" else "bold red")
    text.append(f"; every batch at seq_len: {gib_str(de.nominal_reserved_bytes)}\n")
    if res.time is not None:
        cost = f", ${res.time.cost_usd:,.2f}" if res.time.cost_usd is not None else ""
        text.append(f"time {duration(res.time.hours)}{cost}; ")
    text.append(f"job: {j.examples:,} examples x {j.avg_tokens:,} tokens (Start saves them in the plan)\n")
    return text


def _short(d: dict, width: int = 110) -> str:
    import json

    s = json.dumps(d, ensure_ascii=False)
    return s if len(s) <= width else s[: width - 1] + "…"
