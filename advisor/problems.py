"""Typed problems: what is wrong with the user's input, where in the plan, and how to fix it.

Every layer raises :class:`Problems` (one or many at once); each front end renders them its own way:
the CLI with flag names (``--batch (training.micro_batch): ...``), the TUI on the form field the
problem belongs to, ``--json`` as a list of objects. No front end parses another's text.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Problem:
    """One user mistake. ``field`` is the plan location ("training.micro_batch", "model.ref",
    "hardware.gpu") or None when it belongs to no single field; ``what`` says what is wrong and
    ``fix`` (optional) how to put it right."""

    what: str
    field: str | None = None
    fix: str | None = None

    @property
    def message(self) -> str:
        return f"{self.what}; {self.fix}" if self.fix else self.what

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message

    def as_json(self) -> dict[str, str | None]:
        return {**asdict(self), "message": self.message}


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
