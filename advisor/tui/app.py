"""The tuneplan app: plan, compare, decide, launch and watch. ``make_app`` is the factory tests reuse."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.reactive import reactive
from textual.screen import Screen

from advisor.forms import FORM_DEFAULTS, Evaluation, evaluate, form_from_plan

SCREENS = {"plan": "Plan: estimate, compare, GPUs", "advice": "Advice: recommendation, RAG vs fine-tune, exact",
           "launch": "Launch: dataset, command, run", "watch": "Watch: live GPU memory",
           "chat": "Chat: talk to the tuned model beside its base; serve it"}


def _plan_screen():
    from advisor.tui.screens.plan import PlanScreen
    return PlanScreen()


def _advice_screen():
    from advisor.tui.screens.advice import AdviceScreen
    return AdviceScreen()


def _launch_screen():
    from advisor.tui.screens.launch import LaunchScreen
    return LaunchScreen()


def _watch_screen():
    from advisor.tui.screens.watch import WatchScreen
    return WatchScreen()


def _chat_screen():
    from advisor.tui.screens.chat import ChatScreen
    return ChatScreen()


class TunePlanApp(App):
    """The app's state is one reactive: ``form``, every input of the plan (the Plan screen's fields and
    the job's, on the Advice screen). ``evaluation`` is derived from it in one place (:meth:`watch_form`
    -> :meth:`evaluate_form`, advisor.forms.evaluate), once per change, and every screen watches it, so
    a change made on one screen is on every screen. (Not a Textual compute method: those run on every
    read, and an evaluation takes a few milliseconds.)"""

    form: reactive[dict[str, Any]] = reactive(dict, always_update=True, init=False)
    evaluation: reactive[Evaluation | None] = reactive(None, always_update=True, init=False)
    TITLE = "tuneplan"
    SUB_TITLE = "will this fine-tune fit?"
    CSS_PATH = "tuneplan.tcss"
    MODES = {"plan": _plan_screen, "advice": _advice_screen, "launch": _launch_screen, "watch": _watch_screen,
             "chat": _chat_screen}
    DEFAULT_MODE = "plan"
    BINDINGS = [
        Binding("f2", "switch_mode('plan')", "Plan"),
        Binding("f3", "switch_mode('advice')", "Advice"),
        Binding("f4", "switch_mode('launch')", "Launch"),
        Binding("f5", "switch_mode('watch')", "Watch"),
        Binding("f6", "switch_mode('chat')", "Chat"),
        Binding("ctrl+s", "save", "Save plan"),
        Binding("ctrl+o", "open", "Open plan"),
        Binding("ctrl+t", "toggle_theme", "Theme"),
    ]

    def __init__(self, form: dict[str, Any] | None = None, plan_base: dict | None = None,
                 plan_path: str | Path | None = None, mode: str = "plan", run_dir: str | None = None) -> None:
        super().__init__()
        self.plan_base = plan_base
        self.plan_path = Path(plan_path) if plan_path else Path("plan.yaml")
        self.start_mode = mode
        self.run_dir = run_dir
        self.set_reactive(TunePlanApp.form, {**FORM_DEFAULTS, **(form or {})})
        self.set_reactive(TunePlanApp.evaluation, self.evaluate_form())

    def on_mount(self) -> None:
        self.theme = "textual-dark"
        if self.start_mode != "plan":
            self.switch_mode(self.start_mode)
        else:
            self.switch_mode("plan")
        self._say_gpu_reading()

    # --- shared state -------------------------------------------------------------------------------
    def evaluate_form(self) -> Evaluation:
        """The one evaluation of the app's plan (advisor.forms.evaluate): every screen shows this."""
        return evaluate(self.form, self.plan_base)

    def watch_form(self, form: dict[str, Any]) -> None:
        self.evaluation = self.evaluate_form()

    def update_form(self, **changes: Any) -> None:
        """Change some inputs; the evaluation follows, and every screen watching it."""
        self.form = {**self.form, **changes}

    @property
    def plan(self):
        """The current valid Plan, or None while the form has problems."""
        ev = self.evaluation
        return ev.plan if ev is not None and ev.ok else None

    # --- actions -----------------------------------------------------------------------------------
    def action_toggle_theme(self) -> None:
        self.theme = "textual-light" if self.theme == "textual-dark" else "textual-dark"

    def action_save(self) -> None:
        from advisor.tui.screens.dialogs import PathPrompt

        if self.plan is None:
            self.notify("the plan has problems (marked on the Plan screen); fix them before saving",
                        severity="error")
            return
        self.push_screen(PathPrompt("Save plan to", str(self.plan_path)), self.save_plan)

    def save_plan(self, path: str | None) -> Path | None:
        from advisor.planfile import save_plan

        if not path or self.plan is None:
            return None
        try:
            out = save_plan(self.plan, Path(path).expanduser())
        except OSError as e:
            self.notify(f"cannot save {path}: {e.strerror}", severity="error")
            return None
        self.plan_path = out
        self.notify(f"saved {out}")
        return out

    def action_open(self) -> None:
        from advisor.tui.screens.dialogs import PathPrompt

        self.push_screen(PathPrompt("Open plan", str(self.plan_path)), self.open_plan)

    def open_plan(self, path: str | None) -> bool:
        from advisor.planfile import load_plan
        from advisor.spec import SpecError

        if not path:
            return False
        try:
            plan = load_plan(Path(path).expanduser())
        except SpecError as e:
            self.notify("\n".join(e.problems), title=f"cannot open {path}", severity="error", timeout=10)
            return False
        self.plan_base = plan.model_dump(mode="json")
        self.plan_path = Path(path).expanduser()
        self.form = gpu_ids(form_from_plan(plan))  # every screen shows it (they watch the evaluation)
        self.switch_mode("plan")
        self.notify(f"opened {path}")
        self._say_gpu_reading()
        return True

    def _say_gpu_reading(self) -> None:
        """A plan's GPU name that fits several cards ('a100') is read as one of them: say which, and the others."""
        from advisor.gpus import gpu_name_note

        note = gpu_name_note(((self.plan_base or {}).get("hardware") or {}).get("gpu"))
        if note:
            self.notify(note, title="GPU name", timeout=12)

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        for mode, help in SCREENS.items():
            yield SystemCommand(f"Go to {mode}", help, lambda m=mode: self.switch_mode(m))
        yield SystemCommand("Save plan", "Write plan.yaml (advisor.planfile)", self.action_save)
        yield SystemCommand("Open plan", "Load a plan.yaml into the form", self.action_open)
        yield SystemCommand("Toggle light/dark theme", "Switch between textual-dark and textual-light",
                            self.action_toggle_theme)


def gpu_ids(form: dict[str, Any]) -> dict[str, Any]:
    """A plan names its GPU as the user typed it ('RTX 4090'); the form's select holds table ids."""
    from advisor.gpus import GpuError, find_gpu

    if form.get("gpu") and form["gpu"] != "none":
        try:
            form["gpu"] = find_gpu(form["gpu"]).id
        except GpuError:
            pass
    return form


def make_app(plan=None, plan_path: str | Path | None = None, mode: str = "plan",
             run_dir: str | None = None) -> TunePlanApp:
    """``plan``: an advisor.spec.Plan (or None for the default: Llama-3.1-8B QLoRA on an RTX 4090);
    ``plan_path``: a plan.yaml to load (and to save back to)."""
    base = None
    if plan is None and plan_path is not None and Path(plan_path).is_file():
        from advisor.planfile import load_plan

        plan = load_plan(plan_path)  # SpecError reaches the caller: `tuneplan tui --plan` reports it
    form = None
    if plan is not None:
        base = plan.model_dump(mode="json")
        form = gpu_ids(form_from_plan(plan))
    return TunePlanApp(form, base, plan_path, mode, run_dir)
