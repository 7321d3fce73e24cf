"""Chat: talk to a run's tuned model (the run started on Launch, or any run directory), with the base model's
reply beside it for the same prompt and sampling, the tokens/s and the memory of each reply; its Eval and Export
tabs (advisor.tui.screens.after_run: `tuneplan eval` and `tuneplan export` for the same run); and "serve this":
the export command (or the export written), the `vllm serve` command and the GPU it needs.

The run is opened and its models loaded in a worker thread (runner.api.open_run / load_models: seconds); each
reply streams from another worker (runner.chat.ChatSession.stream) as ChatChunk messages, a newer chunk of a
reply replacing an older one still queued.
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import Button, Checkbox, Footer, Header, Input, Label, Static, TabbedContent, TabPane

from advisor.problems import Problems
from advisor.tui.messages import ChatChunk, ChatFailed, ChatLoaded, ChatOpened, ChatReplied, ExportDone
from advisor.tui.screens.after_run import EvalPanel, ExportPanel
from advisor.units import mib_or_gib
from runner import api as runner_api

METHODS = {"qlora": "QLoRA (NF4 base)", "lora": "LoRA", "full": "full fine-tune"}


def _row(*widgets) -> Horizontal:
    return Horizontal(*widgets, classes="chat-row")


def stats_words(st: dict) -> str:
    """'24 tokens in 0.18 s · 136.7 tokens/s · first token 0.02 s · weights 1.2 MiB · RSS 0.43 GiB (peak ...)'."""
    parts = [f"{st['new_tokens']} tokens in {st['seconds']:.2f} s"]
    if st.get("tokens_per_s"):
        parts.append(f"{st['tokens_per_s']:.1f} tokens/s")
    if st.get("first_token_s") is not None:
        parts.append(f"first token {st['first_token_s']:.2f} s")
    parts.append({"eos": "ended its turn", "length": "stopped at max new tokens", "stopped": "stopped",
                  "error": "failed"}.get(st.get("stop"), str(st.get("stop"))))
    mem = st.get("memory") or {}
    used = f"weights {mib_or_gib(st.get('weights_bytes'))} · RSS {mib_or_gib(mem.get('rss'))} " \
           f"(peak {mib_or_gib(mem.get('rss_peak'))})"
    if mem.get("cuda_peak") is not None:
        used += f" · GPU peak {mib_or_gib(mem['cuda_peak'])}"
    return " · ".join(parts) + " · " + used


class ChatScreen(Screen):
    AUTO_FOCUS = "#chat-prompt"
    BINDINGS = [Binding("escape", "stop", "Stop reply")]

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical(id="chat"):
            yield _row(Label("run dir", classes="field-label"),
                       Input(self.app.run_dir or "", id="chat-run", compact=True,
                             placeholder="a run directory (Enter loads it); the run started on Launch comes here"),
                       Button("Load", id="chat-load", compact=True),
                       Checkbox("trust remote code", id="chat-trust", compact=True))
            yield Static("", id="chat-status")
            with Horizontal(id="chat-body"):
                with TabbedContent(id="chat-tabs"):
                    with TabPane("Chat", id="tab-chat"), Vertical(id="chat-left"):
                        yield _row(Checkbox("compare with the base", id="chat-compare", compact=True),
                                   Label("max new tokens", classes="field-label"),
                                   Input("128", id="chat-max", type="integer", compact=True, classes="chat-num"),
                                   Label("temperature", classes="field-label"),
                                   Input("0", id="chat-temp", type="number", compact=True, classes="chat-num"),
                                   Label("(0: greedy; seed 0 for both)", classes="chat-hint"))
                        yield VerticalScroll(id="chat-log")
                        yield Input("", id="chat-prompt", compact=True,
                                    placeholder="a message (Enter sends; /reset forgets the conversation; Esc "
                                    "stops)")
                        yield Static("", id="chat-note")  # why a message was not sent
                    with TabPane("Eval", id="tab-eval"):
                        yield EvalPanel(id="eval-panel")
                    with TabPane("Export", id="tab-export"):
                        yield ExportPanel(id="export-panel")
                with VerticalScroll(id="chat-serve"):
                    yield Label("Serve this", classes="section")
                    yield Static("", id="serve-text")
                    with Horizontal(id="serve-buttons"):
                        yield Button("Copy export command", id="copy-export", compact=True, disabled=True)
                        yield Button("Copy vllm serve", id="copy-serve", compact=True, disabled=True)
        yield Footer()

    def on_mount(self) -> None:
        self.key = 0  # the newest load; messages of older loads are stale
        self.loaded_dir: str | None = None  # the directory whose models are loaded (or loading)
        self.followed: str | None = None  # the app's run_dir (the Launch screen's run) last opened here
        self.run = None  # runner.tuned.TunedRun
        self.session = None  # runner.chat.ChatSession, once loaded
        self.serve = None  # advisor.tui.serve_this.ServeThis
        self.turn = 0
        self.replying = False
        self.error: str | None = None  # why the run named last cannot be used
        self.set_status(Text("Name a run directory and press Enter: its tuned model loads here, with the base "
                             "beside it.", style="dim"))

    def on_screen_resume(self) -> None:
        """Open the run started (or resumed) on the Launch screen when this screen is shown: once for each new
        run, and again while the screen still says why that run could not be used (it was still training)."""
        run_dir = self.app.run_dir
        if run_dir and (run_dir != self.followed or (run_dir == self.loaded_dir and self.error is not None)):
            self.followed = run_dir
            self.query_one("#chat-run", Input).value = run_dir
            self.open(run_dir)

    def set_status(self, text: Text) -> None:
        self.query_one("#chat-status", Static).update(text)

    # --- loading --------------------------------------------------------------------------------------
    @on(Input.Submitted, "#chat-run")
    @on(Button.Pressed, "#chat-load")
    def _load(self, event) -> None:
        run_dir = self.query_one("#chat-run", Input).value.strip()
        if not run_dir:
            self.set_status(Text("name a run directory first (the folder `tuneplan run` printed as 'run "
                                 "directory:')", style="bold red"))
            return
        self.open(run_dir)

    def open(self, run_dir: str) -> None:
        self.workers.cancel_group(self, "chat-reply")
        self.key += 1
        self.loaded_dir = run_dir
        self.run = self.session = self.serve = self.error = None
        self.replying = False
        self.query_one(EvalPanel).reset()
        self.query_one(ExportPanel).reset()
        self.show_serve()
        self.set_status(Text(f"opening {run_dir} …", style="bold"))
        self.load(str(Path(run_dir).expanduser().absolute()), self.query_one("#chat-trust", Checkbox).value,
                  self.key)

    @work(thread=True, exclusive=True, group="chat-load")
    def load(self, run_dir: str, trust: bool, key: int) -> None:
        from advisor.tui.serve_this import serve_this

        try:
            run = runner_api.open_run(run_dir, trust_remote_code=trust)
        except Problems as e:
            self.post_message(ChatFailed(key, str(e)))
            return
        serve = serve_error = None
        try:
            serve = serve_this(run)
        except Problems as e:
            serve_error = "; ".join(p.message for p in e.items)
        except Exception as e:  # noqa: BLE001 - the serving panel says it; the chat still loads
            serve_error = f"{type(e).__name__}: {e}"
        self.post_message(ChatOpened(key, run, serve, serve_error))
        t0 = time.perf_counter()
        try:
            models = runner_api.load_models(run)
            session = runner_api.chat_session(models)
        except Problems as e:
            self.post_message(ChatFailed(key, str(e)))
            return
        except Exception as e:  # noqa: BLE001 - anything the load raises is shown, never a crash
            self.post_message(ChatFailed(key, f"cannot load {run.weights}: {type(e).__name__}: {e}"))
            return
        self.post_message(ChatLoaded(key, session, time.perf_counter() - t0))

    def on_chat_failed(self, m: ChatFailed) -> None:
        if m.key != self.key:
            return
        self.error = m.text
        self.query_one(EvalPanel).not_loaded()
        text = Text(m.text, style="bold red")
        if "trust-remote-code" in m.text or "trust_remote_code" in m.text:
            text.append("\nhere: tick 'trust remote code' and Load, if you trust that model's code", style="yellow")
        self.set_status(text)

    def on_chat_opened(self, m: ChatOpened) -> None:
        if m.key != self.key:
            return
        self.run, self.serve = m.run, m.serve
        run = m.run
        self.query_one(EvalPanel).opened(run)
        self.query_one(ExportPanel).opened(run)
        self.set_status(Text(f"loading {run.run_dir}/{run.label} ({METHODS.get(run.method, run.method)}, "
                             f"{run.precision}) … (seconds: the base model and the adapter)", style="bold"))
        self.show_serve(m.serve_error)

    def on_chat_loaded(self, m: ChatLoaded) -> None:
        if m.key != self.key:
            return
        self.session = s = m.session
        run, models = s.models.run, s.models
        self.query_one(EvalPanel).loaded(models)
        text = Text()
        text.append(f"loaded {run.run_dir}/{run.label} ", style="bold green")
        text.append(f"({METHODS.get(run.method, run.method)}, {run.precision}, {models.device}) in {m.seconds:.1f} s; "
                    f"weights {mib_or_gib(models.weights_bytes())}\n")
        text.append(f"prompt format: {run.data_format} records, {s.template} template"
                    + ("" if s.multi_turn else " (one message at a time, as the run trained)"), style="dim")
        self.set_status(text)
        self.query_one("#chat-log", VerticalScroll).mount(Static(Text(f"— {run.run_dir}/{run.label} —", style="dim")))
        if self.query_one("#chat-tabs", TabbedContent).active == "tab-chat":  # focus would switch the tab
            self.query_one("#chat-prompt", Input).focus()

    # --- serve this -------------------------------------------------------------------------------------
    def show_serve(self, error: str | None = None) -> None:
        from advisor.tui.serve_this import serve_text

        out = self.query_one("#serve-text", Static)
        if self.serve is not None:
            out.update(serve_text(self.serve))
        elif error:
            out.update(Text(f"no serving estimate: {error}", style="red"))
        else:
            out.update(Text("the `vllm serve` command and the GPU it needs, once a run is open", style="dim"))
        self.query_one("#copy-export", Button).disabled = self.serve is None
        self.query_one("#copy-serve", Button).disabled = self.serve is None or self.serve.serve_cmd is None

    def on_export_done(self, m: ExportDone) -> None:
        """The Export tab wrote the merged model: "serve this" serves that folder."""
        if m.serve is not None:
            self.serve = m.serve
            self.show_serve()

    @on(Button.Pressed, "#copy-export")
    def _copy_export(self) -> None:
        if self.serve is not None:
            self.copy(self.serve.export_cmd)

    @on(Button.Pressed, "#copy-serve")
    def _copy_serve(self) -> None:
        if self.serve is not None and self.serve.serve_cmd is not None:
            self.copy(self.serve.serve_cmd)

    def copy(self, cmd: list[str]) -> None:
        line = shlex.join(cmd)
        self.app.copy_to_clipboard(line)
        self.notify(f"copied: {line}", timeout=4)

    # --- replies ----------------------------------------------------------------------------------------
    @on(Input.Submitted, "#chat-prompt")
    def _send(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        if not text:
            return
        if self.session is None:
            self.notify("no model loaded yet: name a run directory and press Enter" if self.run is None else
                        "the model is still loading", severity="warning")
            return
        if self.replying:
            self.notify("a reply is being written; Esc stops it", severity="warning")
            return
        if self.query_one(EvalPanel).busy:
            self.notify("the evaluation is using the models (Eval tab); send when it has finished",
                        severity="warning")
            return
        note = self.query_one("#chat-note", Static)
        if text == "/reset":
            self.session.reset()
            event.input.value = ""
            self.query_one("#chat-log").mount(Static(Text("(conversation forgotten)", style="dim")))
            return
        try:  # the message stays in the box until it is sent
            self.session.sampling = runner_api.sampling(
                max_new_tokens=int(self.query_one("#chat-max", Input).value or 0),
                temperature=float(self.query_one("#chat-temp", Input).value or 0))
        except (Problems, ValueError) as e:
            note.update(Text(str(e), style="bold red"))
            return
        whiches = ("tuned", "base") if self.query_one("#chat-compare", Checkbox).value else ("tuned",)
        for which in whiches:
            problem = runner_api.prompt_problem(self.session, text, which)
            if problem:
                note.update(Text(problem, style="bold red"))
                return
        event.input.value = ""
        note.update("")
        self.ask(text, whiches)

    def ask(self, text: str, whiches: tuple[str, ...]) -> None:
        """Show the prompt and an empty reply for each model, then stream them from a worker."""
        self.turn += 1
        columns = [Vertical(Static(Text(f"{which}>", style="bold " + ("green" if which == "tuned" else "yellow"))),
                            Static(Text("…", style="dim"), id=f"reply-{self.turn}-{which}", classes="chat-text"),
                            Static("", id=f"stats-{self.turn}-{which}", classes="chat-stats"),
                            classes="chat-reply") for which in whiches]
        turn = Vertical(Static(Text.assemble(("you> ", "bold"), text)), Horizontal(*columns, classes="chat-replies"),
                        classes="chat-turn")
        log = self.query_one("#chat-log", VerticalScroll)
        log.mount(turn)
        log.scroll_end(animate=False)
        self.replying = True
        self.reply(self.session, text, whiches, self.turn)

    @work(thread=True, exclusive=True, group="chat-reply")
    def reply(self, session, text: str, whiches: tuple[str, ...], turn: int) -> None:
        from textual.worker import get_current_worker

        worker = get_current_worker()
        for which in whiches:
            so_far, error = "", None
            session.last_stats = None
            stream = session.stream(text, which)
            try:
                for chunk in stream:
                    so_far += chunk
                    self.post_message(ChatChunk(turn, which, so_far))
                    if worker.is_cancelled:
                        break
            except Exception as e:  # noqa: BLE001 - a failed generation is shown in its reply
                error = f"{type(e).__name__}: {e}"
            finally:
                stream.close()  # stops the generation at the next token when we left early
            st = session.last_stats
            last = which == whiches[-1] or worker.is_cancelled
            self.post_message(ChatReplied(turn, which, so_far, st.as_dict() if st is not None else None, error,
                                          last))
            if last:
                break

    def on_chat_chunk(self, m: ChatChunk) -> None:
        for w in self.query(f"#reply-{m.turn}-{m.which}"):
            w.update(Text(m.text))
        self.query_one("#chat-log", VerticalScroll).scroll_end(animate=False)

    def on_chat_replied(self, m: ChatReplied) -> None:
        for w in self.query(f"#reply-{m.turn}-{m.which}"):
            w.update(Text(m.text) if m.text else Text("(no text)", style="dim"))
        stats = Text()
        if m.error:
            stats.append(m.error + "\n", style="bold red")
        if m.stats:
            stats.append(stats_words(m.stats), style="dim")
        for w in self.query(f"#stats-{m.turn}-{m.which}"):
            w.update(stats)
        if m.last and m.turn == self.turn:
            self.replying = False
        self.query_one("#chat-log", VerticalScroll).scroll_end(animate=False)

    def action_stop(self) -> None:
        """Stop the reply at its next token (the worker closes the stream; the session is free when it says so)."""
        if self.replying:
            self.workers.cancel_group(self, "chat-reply")
