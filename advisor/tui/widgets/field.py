"""A labelled form row whose error line shows the reason a value is wrong, on the field itself."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widget import Widget
from textual.widgets import Label, Static

from advisor.forms import FIELD_HELP


class Field(Vertical):
    DEFAULT_CSS = """
    Field { height: auto; }
    Field > Horizontal { height: auto; }
    Field .field-label { width: 12; padding: 0 1 0 0; color: $text-muted; }
    Field .field-error { color: $error; display: none; padding: 0 0 0 12; }
    Field.-invalid .field-error { display: block; }
    Field.-invalid .field-label { color: $error; text-style: bold; }
    """

    def __init__(self, label: str, control: Widget, name: str, tooltip: str | None = None) -> None:
        super().__init__(id=f"field-{name}")
        self.label, self.control, self.field_name = label, control, name
        self._message = ""
        tooltip = tooltip or FIELD_HELP.get(name)  # the plan schema's description of the field it edits
        if tooltip:
            control.tooltip = tooltip

    def compose(self) -> ComposeResult:
        with Horizontal():
            yield Label(self.label, classes="field-label")
            yield self.control
        yield Static("", classes="field-error", id=f"error-{self.field_name}")

    @property
    def error(self) -> str:
        return self._message

    def set_error(self, message: str | None) -> None:
        self._message = message or ""
        self.query_one(".field-error", Static).update(message or "")
        self.set_class(bool(message), "-invalid")
