"""Typed problems: what is wrong with the user's input, where in the plan, and how to fix it.

Every layer raises :class:`Problems` (one or many at once); each front end renders them its own way:
the CLI with flag names (``--batch (training.micro_batch): ...``), the TUI on the form field the
problem belongs to, ``--json`` as a list of objects. No front end parses another's text.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class Change:
    """A fix that is a change to the plan: set ``field`` to one of ``values`` (``bound`` "max": that or
    less, "min": that or more). The core states it; each front end words it its own way (a flag on the
    CLI, a field on the app's form) with :meth:`words`."""

    field: str
    values: tuple[Any, ...]
    bound: Literal["max", "min"] | None = None

    def words(self, name: str, joiner: str = " ") -> str:
        """'--seq 1024 or less' (name '--seq'), 'seq length 1024 or less'; ``joiner`` between name and value."""
        vals = " or ".join(_value(v) for v in self.values)
        return f"{name}{joiner}{vals}" + {"max": " or less", "min": " or more"}.get(self.bound or "", "")


def _value(v: Any) -> str:
    """As it is typed (a flag's value, an override): no thousands separators."""
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


@dataclass(frozen=True)
class Problem:
    """One user mistake. ``field`` is the plan location ("training.micro_batch", "model.ref",
    "hardware.gpu") or None when it belongs to no single field; ``what`` says what is wrong and
    ``fix`` (optional) how to put it right, in words that name no front end; ``change`` (optional) the
    fix as a plan change, which each front end words in its own terms."""

    what: str
    field: str | None = None
    fix: str | None = None
    change: Change | None = None

    @property
    def message(self) -> str:
        return self.worded(lambda c: "use " + c.words(c.field, "="))

    def worded(self, say_change) -> str:
        """The message with the change (if any) said by ``say_change(change) -> str`` (a front end's words)."""
        fix = " ".join(x for x in (say_change(self.change) if self.change else None, self.fix) if x)
        return f"{self.what}; {fix}" if fix else self.what

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"what": self.what, "field": self.field, "fix": self.fix, "message": self.message}
        if self.change is not None:
            out["change"] = {**asdict(self.change), "values": list(self.change.values)}
        return out


def as_problem(p: Problem | str, field: str | None = None) -> Problem:
    return p if isinstance(p, Problem) else Problem(str(p), field)


class Problems(Exception):
    """Problems to show the user, all at once. Accepts Problem objects or plain strings."""

    def __init__(self, problems: Iterable[Problem | str] | Problem | str, field: str | None = None):
        if isinstance(problems, (str, Problem)):
            problems = [problems]
        self.items: list[Problem] = [as_problem(p, field) for p in problems]
        super().__init__("\n".join(str(p) for p in self.items))

    @property
    def problems(self) -> list[str]:
        """One plain line per problem ('field: message' where it has a field)."""
        return [str(p) for p in self.items]

    def __add__(self, other: Problems) -> Problems:
        return Problems([*self.items, *other.items])


UserError = Problems  # the name the front ends and the runner use for "the user's mistake"


def problem_text(lines: list[str]) -> str:
    """Problems as every tuneplan command prints them on stderr: one line, or a count and one line each."""
    if len(lines) == 1:
        return f"tuneplan: {lines[0]}"
    return "\n".join([f"tuneplan: {len(lines)} problems:", *(f"  - {line}" for line in lines)])
